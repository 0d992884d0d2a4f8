"""`cogni-mamba chat`: an interactive conversation with a checkpoint, replies streamed as they are made.

With a terminal it shows prompts; with piped stdin it prints only the replies (and command output),
one reply per entry, so a conversation can be scripted:

    printf 'Hello!\\n/set temperature=0\\nTell me more\\n' | cogni-mamba chat --checkpoint runs/nano
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ..errors import CogniError
from ..files import write_text_atomically
from ..stats import param_counts
from .generate import add_sampling_args, sampling_overrides

HELP = """\
Type a message and press Enter. Multi-line input: end a line with a backslash (\\) to continue on the
next line, or put \"\"\" alone on a line, then the lines, then \"\"\" alone again.
Ctrl-C stops the current reply (the session goes on); Ctrl-D or /quit leaves.
Commands:
  /help               this text
  /reset              forget the conversation (the system prompt and settings stay)
  /system [TEXT]      set the system prompt (empty: none); without TEXT, show it
  /set [k=v ...]      change generation settings, e.g. /set temperature=0.7 top_p=0.9 max_new_tokens=200
                      (none disables top_k / top_p / min_p); without arguments, show them
  /save FILE          write the conversation and settings as JSON
  /quit               leave (also /exit)
A message that starts with / is sent as text by doubling the slash: //like this"""

BLOCK = '"""'


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="chat with a trained checkpoint in the terminal")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint or run directory")
    p.add_argument("--system", metavar="TEXT", help="system prompt (default: the Chatbot's)")
    add_sampling_args(p)
    return p


def read_entry(read_line: Callable[[str], str | None], interactive: bool) -> str | None:
    """One user entry (None at end of input): backslash-continued lines or a triple-quoted block."""
    first = read_line("you> " if interactive else "")
    if first is None:
        return None
    if first.strip() == BLOCK:
        lines = []
        while (line := read_line("... " if interactive else "")) is not None and line.strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        nxt = read_line("... " if interactive else "")
        if nxt is None:
            break
        lines.append(nxt)
    return "\n".join(lines)


def line_reader(stdin: TextIO, interactive: bool) -> Callable[[str], str | None]:
    """A read_line(prompt) for a terminal (input() with line editing) or a pipe (no prompts)."""
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform
            import readline  # noqa: F401  (gives input() history and editing)

        def read_tty(prompt: str) -> str | None:
            try:
                return input(prompt)
            except EOFError:
                return None
        return read_tty

    def read_pipe(_prompt: str) -> str | None:
        line = stdin.readline()
        return line.rstrip("\n").rstrip("\r") if line else None
    return read_pipe


def parse_settings(items: list[str]) -> dict:
    """`k=v` words -> typed setting values; none/null -> None; a bad name or value is a CogniError."""
    from ..config import Config, apply_overrides

    for item in items:
        if "=" not in item:
            raise CogniError(f"/set needs name=value pairs (e.g. /set temperature=0.7), got {item!r}.")
    names = [item.split("=", 1)[0].strip() for item in items]
    # The config's typed parsing gives the same messages as --set (valid names listed, bad values named).
    parsed = apply_overrides(Config(), [f"generation.{item}" for item in items]).generation
    return {name: getattr(parsed, name) for name in names}


def save_conversation(bot, path: str) -> int:
    """Write the conversation as JSON through a temp file; returns the number of messages."""
    from ..config import to_dict

    target = Path(path)
    if not target.parent.is_dir():
        raise CogniError(f"Cannot save to {path}: folder {target.parent} does not exist; create it or pick another path.")
    data = {"system_prompt": bot.system_prompt, "messages": bot.messages, "settings": to_dict(bot.settings)}
    try:
        write_text_atomically(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise CogniError(f"Cannot save to {path} ({e.strerror}); pick another path.") from None
    return len(data["messages"])


def stream_reply(bot, message: str, out: TextIO, interactive: bool, stop: tuple[str, ...] = ()) -> None:
    """Print a reply as it is made; Ctrl-C ends this reply only (the part shown stays in the history)."""
    pieces = bot.reply(message, stop=stop)
    if interactive:
        out.write("bot> ")
        out.flush()
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        pieces.close()
        out.write(" [stopped]")
    out.write("\n")
    out.flush()


def handle_command(bot, line: str, out: TextIO) -> bool:
    """Run a /command; False means the session should end."""
    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if name in ("quit", "exit"):
        return False
    if name == "help":
        print(HELP, file=out)
    elif name == "reset":
        bot.reset()
        print("(conversation cleared)", file=out)
    elif name == "system":
        if rest:
            bot.system_prompt = rest
            print("(system prompt set)", file=out)
        else:
            print(f"system prompt: {bot.system_prompt or '(none)'}", file=out)
    elif name == "set":
        if rest:
            bot.configure(**parse_settings(rest.split()))
        s = bot.settings
        print(f"(settings: max_new_tokens={s.max_new_tokens} temperature={s.temperature} top_k={s.top_k} "
              f"top_p={s.top_p} min_p={s.min_p} repetition_penalty={s.repetition_penalty} seed={s.seed})", file=out)
    elif name == "save":
        if not rest:
            raise CogniError("/save needs a file name, e.g. /save chat.json.")
        print(f"(saved {save_conversation(bot, rest)} messages to {rest})", file=out)
    else:
        raise CogniError(f"Unknown command /{name}; type /help for the list (start a message with // to send a slash).")
    return True


def run_session(bot, read_line: Callable[[str], str | None], out: TextIO, err: TextIO, interactive: bool,
                stop: tuple[str, ...] = ()) -> None:
    """The read-reply loop until /quit or end of input."""
    while True:
        try:
            entry = read_entry(read_line, interactive)
        except KeyboardInterrupt:
            print("\n(input cancelled; /quit or Ctrl-D leaves)", file=out)
            continue
        if entry is None:
            if interactive:
                out.write("\n")
            return
        if not entry.strip():
            continue
        try:
            if entry.startswith("/") and not entry.startswith("//"):
                if not handle_command(bot, entry.strip(), out):
                    return
            else:
                stream_reply(bot, entry[1:] if entry.startswith("//") else entry, out, interactive, stop)
        except CogniError as e:
            print(f"error: {e}", file=err)
            err.flush()


def run(args: argparse.Namespace) -> int:
    from ..chat import Chatbot
    from ..device import resolve_device
    from ..inference.compiled_step import build_now

    # threads "auto": the first reply times a step at 1, half and all of torch's threads and keeps the fastest
    kwargs = {"threads": "auto"} if args.system is None else {"system_prompt": args.system or None, "threads": "auto"}
    bot = Chatbot.from_checkpoint(args.checkpoint, device=resolve_device(args.device), dtype=args.dtype,
                                  quantize="int8" if args.int8 else None, compile=args.compile, **kwargs)
    bot.configure(**sampling_overrides(args))
    build_now(bot.model)
    interactive = sys.stdin.isatty()
    if interactive:
        # from the shapes: an int8 model's weights are buffers, not parameters, and would not be counted
        print(f"Chatting with {args.checkpoint} ({param_counts(bot.model.config).total / 1e6:.1f}M parameters). "
              "/help lists the commands, Ctrl-D leaves.")
    run_session(bot, line_reader(sys.stdin, interactive), sys.stdout, sys.stderr, interactive, tuple(args.stop))
    return 0
