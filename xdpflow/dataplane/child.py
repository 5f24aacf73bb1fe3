"""Work done in a forked child process, its answer a JSON object on a pipe.

Two jobs need it: a switch that must finish even when the command that
started it is killed (the child leaves the session and ignores the usual
signals), and probes that must not touch the caller's network namespace (the
child unshares one of its own).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable
from typing import Any


def in_child(work: Callable[[], dict[str, Any]], prepare: Callable[[], None] | None = None) -> dict[str, Any] | None:
    """Fork; in the child run ``prepare()`` then ``work()`` and send back the
    dict ``work`` returns (an OSError either raises becomes ``{"errno",
    "error"}``). Returns that dict, or None when the child died without an
    answer. The parent waits for the child to exit.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's stack
        code = 0
        try:
            os.close(r)
            try:
                if prepare is not None:
                    prepare()
                out = work()
            except OSError as e:
                out = {"errno": e.errno or errno.EIO, "error": str(e.strerror or e)}
            with contextlib.suppress(OSError):
                os.write(w, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return json.loads(b"".join(chunks)) if chunks else None
