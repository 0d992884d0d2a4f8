"""The one exception type for mistakes a user can make (bad path, bad config, bad request); the telling line
of a failed C++ build (a kernel or a compiled step), for the one sentence that reports it; and how to recognise
an allocator that ran out of memory (and the size it asked for), for the sentence that says so.

The CLI prints a CogniError's message as one sentence and exits non-zero, without a traceback.
"""

import errno
import re

# Lines of a build log that say what ran, not what went wrong.
_COMMAND_LINES = ("c++ ", "g++ ", "cc ", "[", "FAILED:", "ninja:", "Command:", "Output:", "compilation terminated")


class CogniError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""


# How torch's allocators say they failed: CUDA's OutOfMemoryError ("CUDA out of memory"), MPS's, and the CPU's
# ("DefaultCPUAllocator: can't allocate memory: ..." on Linux, "not enough memory" on Windows).
_OUT_OF_MEMORY = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """True for an allocation failure: torch.OutOfMemoryError, the CPU / MPS allocators' RuntimeError, MemoryError."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(words in text for words in _OUT_OF_MEMORY)


def is_disk_full(e: BaseException) -> bool:
    """True when a write failed for want of space: ENOSPC / EDQUOT, numpy's short write ("N requested and M
    written"), or a library's error that carries the system's words (safetensors: "No space left on device")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text or (
        isinstance(e, OSError) and re.fullmatch(r"\d+ requested and \d+ written", text) is not None)


def allocation_size(e: BaseException) -> str:
    """ "N GiB" when the allocator said how much it tried to allocate, else ""."""
    found = re.search(r"allocate (\d+) bytes", str(e)) or re.search(r"allocate ([\d.]+ [KMGT]i?B)", str(e))
    if found is None:
        return ""
    if found.group(1).isdigit():
        return f"{int(found.group(1)) / 2**30:,.1f} GiB"
    return found.group(1)


def build_failure(error: BaseException) -> str:
    """The telling line of a C++ build error (torch.utils.cpp_extension's or inductor's): the compiler's or
    linker's complaint ("...: No space left on device"), not the command lines around it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if not lines[0].startswith("Error building extension") and "C++ compile error" not in lines[0]:
        return lines[0][:200]  # e.g. "Ninja is required to load C++ extensions"
    said = [line for line in lines[1:] if not line.startswith(_COMMAND_LINES)]
    telling = [line for line in said if re.search(r"error|not found|no space|denied", line, re.IGNORECASE)]
    detail = (telling or said or ["the compiler gave no reason"])[0]
    detail = re.split(r"(?i)\berror:\s*", detail, maxsplit=1)[-1]  # "/tmp/cc1.s: Fatal error: x" -> "x"
    return detail[:200]
