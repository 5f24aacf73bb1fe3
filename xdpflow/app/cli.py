"""The `xdpflow` console script's entry point.

The commands (commands.py) and everything below them are imported here,
inside the error handling, so a failure to load them is one line on stderr
like every other failure: an installation this user may not read in full
(a checkout below a home directory of mode 0700, a bpf/ directory only root
may open) says so and what to do, instead of a traceback. Only this module
and errors.py must be readable for that. ``--debug`` (or XDPFLOW_DEBUG)
adds the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from xdpflow.errors import ROOT_HINT, one_line

EXIT_FAIL = 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from xdpflow.app import commands  # see the module docstring: why here

        return commands.main(argv)
    except Exception as e:
        if "--debug" in argv or os.environ.get("XDPFLOW_DEBUG"):
            import traceback  # only here: ~2 ms of every command's start

            traceback.print_exc()
        print(f"xdpflow: {_why(e)}", file=sys.stderr)
        return EXIT_FAIL


def _why(e: Exception) -> str:
    if isinstance(e, OSError):  # reading the package: its header, its objects, its modules
        return one_line(e)
    if isinstance(e, ImportError):  # a directory of the package this user may not open
        return f"cannot load {e.name or 'xdpflow'}: {e}; is the installation readable by this user? {ROOT_HINT}"
    return f"internal error: {e!r}; --debug shows the traceback"  # a bug: still one line


if __name__ == "__main__":
    sys.exit(main())
