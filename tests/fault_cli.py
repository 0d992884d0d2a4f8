"""`cogni-mamba` with a fault injected, for tests: `python tests/fault_cli.py [--fail-save N] -- ARGS...`.

--fail-save N makes the N-th checkpoint weights write raise OSError(ENOSPC), as a full disk would, at
the point where the real write would fail; everything else is the real command.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    opts, args = argv[:split], argv[split + 1:]
    if opts[:1] == ["--fail-save"]:
        fail_at = int(opts[1])
        from cogni_mamba.train import checkpoint

        real = checkpoint.save_file
        calls = [0]

        def save_file(tensors, path, metadata=None):
            calls[0] += 1
            if calls[0] == fail_at:
                with open(path, "wb") as f:  # a partial file, as a real full disk leaves behind
                    f.write(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(tensors, path, metadata=metadata)

        checkpoint.save_file = save_file
    from cogni_mamba.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
