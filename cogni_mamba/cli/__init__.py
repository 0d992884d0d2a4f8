"""The `cogni-mamba` command. Each subcommand lives in its own module here with two functions:
`add_parser(subparsers)` declares its arguments and `run(args) -> int` wires the library together.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from ..errors import CogniError, allocation_size, is_disk_full, is_out_of_memory

# Subcommand modules, in the order `--help` lists them.
COMMANDS = (
    "demo", "info", "check", "plan", "tokenizer", "prepare", "train", "generate", "chat", "make_chat_data", "finetune",
    "serve", "eval", "export", "import_hf", "verify",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogni-mamba",
                                     description="Train a small Llama-style language model and chat with it.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"cogni-mamba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


_python_format = warnings.formatwarning


def _one_line_for_ours(message, category, filename, lineno, line=None) -> str:
    """Our own warnings (one sentence each, for people) as `warning: ...`; others in Python's format."""
    if category is UserWarning and f"{os.sep}cogni_mamba{os.sep}" in filename:
        return f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    warnings.formatwarning = _one_line_for_ours
    try:
        return int(args._run(args) or 0)
    except CogniError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cogni-mamba info | head`
        sys.stderr.close()
        return 0
    except Exception as e:  # where no command said it better: out of memory, a full disk, a path it cannot use
        sentence = _machine_trouble(e, f"`cogni-mamba {args.command}`")
        if sentence is None:
            raise
        print(f"error: {sentence}", file=sys.stderr)
        return 2


def _machine_trouble(e: BaseException, running: str) -> str | None:
    """One sentence for what the machine ran out of or refused, or None for anything else (a bug: its traceback)."""
    if is_out_of_memory(e):
        tried = allocation_size(e)
        return (f"this machine ran out of memory{f' (an allocation of {tried})' if tried else ''} running {running}; "
                "use a smaller model (preset, model.dim, n_layers, vocab_size, max_seq_len) or batch, or free some "
                "memory.")
    if is_disk_full(e):
        where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
        return (f"the disk ran out of space{where} while running {running}; free some space or write somewhere "
                "else, then run it again.")
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror}{where} while running {running}; check the path, its permissions and the disk."
    return None
