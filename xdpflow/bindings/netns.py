"""Network namespaces: entering one by name with setns(2).

Apart from netlink.py (which re-exports these names) because every command
that takes --netns enters one, and most of them never talk netlink: this
module loads no socket code and no pyroute2.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator

from xdpflow.errors import XdpflowError, os_error

CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body inside network namespace ``name`` (None: stay here).

    setns() switches only this thread's network namespace, not its mount
    namespace, so bpffs pins stay visible (unlike `ip netns exec`). Netlink
    sockets opened inside stay bound to that namespace.
    """
    if name is None:
        yield
        return
    path = netns_path(name)
    if not os.path.exists(path):
        raise XdpflowError(errno.ENOENT, f"no network namespace named {name!r}; `ip netns list` lists them")
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(path)
        try:
            yield
        finally:
            setns(saved)
    finally:
        os.close(saved)


def netns_path(name: str) -> str:
    return name if "/" in name else f"/run/netns/{name}"


def setns(target: str | int) -> None:
    """setns(2) into a network namespace given by path or open fd."""
    fd = os.open(target, os.O_RDONLY) if isinstance(target, str) else target
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise os_error(err, f"entering network namespace {target}")
    finally:
        if isinstance(target, str):
            os.close(fd)


def enter_netns(name: str) -> None:
    """Move this thread into network namespace ``name`` for good: the rest
    of a forked child's life. Unlike ``in_netns`` there is no way back.

    Raises FileNotFoundError when there is no such namespace (it is never
    created), XdpflowError when entering it fails.
    """
    setns(netns_path(name))
