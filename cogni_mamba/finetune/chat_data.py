"""Chat data files: read and check conversations in jsonl, and write them atomically.

Each line of a chat file is one JSON object in one of two forms:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}            (optionally "system": "...")

The second form is the one-turn conversation [system,] user = prompt, assistant = response. A line
that is not valid JSON, has an unknown role, a non-string content or no non-empty assistant message
is reported with its line number and skipped; the good lines are still used. A file with no good
line is one CogniError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CogniError
from ..files import write_file_atomically
from ..tokenizer.chat_template import check_messages

CHAT_FORMAT_HELP = """\
chat data (--data, jsonl: one JSON object per line, in either form):
  {"messages": [{"role": "system", "content": "You are Cogni."},
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello! How can I help?"}]}
  {"prompt": "What comes after 41?", "response": "42.", "system": "optional system message"}
roles are system, user and assistant; every conversation needs at least one non-empty assistant
message. The loss is computed on the assistant messages (and their end-of-turn token) only.
"""

Message = dict[str, str]


class ChatDataError(CogniError):
    """A chat data file that cannot be used at all (missing, or without one good conversation)."""


@dataclass
class ChatFile:
    """The good conversations of a file and a note for each line that was skipped."""

    path: Path
    conversations: list[list[Message]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "PATH:LINE: reason", one per skipped line

    def summary(self, show: int = 5) -> str:
        """A few lines for the user: how many conversations were read and why lines were skipped."""
        lines = [f"{self.path}: {len(self.conversations):,} conversations"
                 + (f", {len(self.problems):,} lines skipped" if self.problems else "")]
        lines += [f"  skipped {p}" for p in self.problems[:show]]
        if len(self.problems) > show:
            lines.append(f"  ... and {len(self.problems) - show:,} more skipped lines")
        return "\n".join(lines)


def conversation_of(record: Any) -> list[Message]:
    """The messages of one parsed jsonl record, or a CogniError saying what is wrong with it."""
    if not isinstance(record, Mapping):
        raise CogniError(f"the line is a JSON {type(record).__name__}, not an object with \"messages\" "
                         "or \"prompt\"/\"response\"")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
        if record.get("system") is not None:
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise CogniError(f"the object has neither \"messages\" nor \"prompt\" and \"response\" (keys: {keys})")
    pairs = check_messages(messages)  # the template's own check: roles and string contents
    if not any(role == "assistant" and content for role, content in pairs):
        raise CogniError("the conversation has no non-empty assistant message, so there is nothing to learn")
    return [{"role": role, "content": content} for role, content in pairs]


def parse_lines(lines: Iterable[tuple[int, str]], where: str) -> tuple[list[list[Message]], list[str]]:
    """(conversations, problems) from numbered text lines; blank lines are ignored."""
    conversations, problems = [], []
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}:{lineno}: not valid JSON ({e.msg.removesuffix(' at')}, column {e.colno})")
            continue
        try:
            conversations.append(conversation_of(record))
        except CogniError as e:
            problems.append(f"{where}:{lineno}: {str(e).rstrip('.')}")
    return conversations, problems


def read_chat_file(path: str | Path) -> ChatFile:
    """Every good conversation of a chat jsonl file; bad lines are listed in `.problems`."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"Chat data file {path} does not exist; pass a .jsonl file of conversations "
                            "with --data (see `cogni-mamba finetune --help` for the format).")
    with open(path, "rb") as f:
        lines = ((n, raw.decode("utf-8", errors="replace")) for n, raw in enumerate(f, 1))
        conversations, problems = parse_lines(lines, str(path))
    result = ChatFile(path, conversations, problems)
    if not conversations:
        first = f" (first problem: {problems[0]})" if problems else " (the file is empty)"
        raise ChatDataError(f"{path} holds no usable conversation{first}; each line must be a JSON object "
                            "with \"messages\" or \"prompt\" and \"response\".")
    return result


def write_chat_file(conversations: Iterable[Sequence[Message]], path: str | Path) -> int:
    """Write conversations as {"messages": [...]} lines via a temp file; returns how many were written."""
    n = 0

    def fill(tmp: Path) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8") as f:
            for messages in conversations:
                f.write(json.dumps({"messages": list(messages)}, ensure_ascii=False) + "\n")
                n += 1

    write_file_atomically(Path(path), fill)
    return n
