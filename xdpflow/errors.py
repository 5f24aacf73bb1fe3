"""Exceptions: each carries an errno and a sentence an operator can act on.

Everything xdpflow raises for a failed system operation is an ``OSError``
subclass, so callers that only care about errno can catch ``OSError``; the
CLI prints ``str(exc)`` on one line and exits non-zero.
"""

from __future__ import annotations

import errno as _errno
import os


class XdpflowError(OSError):
    """A failed operation: ``errno`` says which, ``strerror`` says what to do."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)


class InputError(XdpflowError):
    """What the operator typed or wrote cannot be right (EINVAL): the CLI
    exits 2, as for any input to correct; nothing was changed."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, message)


class MapFullError(XdpflowError):
    """A map has no room for another entry (E2BIG)."""


class VerifierError(XdpflowError):
    """The kernel refused to load a program; ``log`` holds the verifier's log."""

    def __init__(self, err: int, message: str, log: str) -> None:
        super().__init__(err, message)
        self.log = log

    def __str__(self) -> str:
        tail = "\n".join(self.log.strip().splitlines()[-20:])
        return f"{self.strerror}\n{tail}" if tail else str(self.strerror)


class NotAttachedError(XdpflowError):
    """xdpflow state for an interface was asked for but is not there."""


class ForeignProgramError(XdpflowError):
    """An interface runs an XDP program that is not xdpflow's."""


ROOT_HINT = "run as root (needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"

_HINTS = {
    _errno.EPERM: ROOT_HINT,
    _errno.EACCES: ROOT_HINT,
    _errno.ENOMEM: "the kernel could not allocate memory; check `ulimit -l` or free memory",
}


def os_error(err: int, what: str, hint: str | None = None) -> XdpflowError:
    """Build the exception for a failed ``what`` with a positive errno ``err``.

    The sentence is ``"{what}: {strerror(err)}"`` plus a hint on what to do,
    either the one given or a generic one for common errnos.
    """
    err = abs(err)
    hint = hint or _HINTS.get(err)
    msg = f"{what}: {os.strerror(err)}"
    if hint:
        msg += f"; {hint}"
    cls = MapFullError if err == _errno.E2BIG else XdpflowError
    return cls(err, msg)


def one_line(exc: OSError) -> str:
    """The sentence the CLI prints for any OSError: ours as written, others
    (a file that cannot be read...) with the path and, for a missing
    privilege, the hint to run as root."""
    if isinstance(exc, XdpflowError):
        return str(exc)
    msg = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    if exc.errno in (_errno.EACCES, _errno.EPERM):
        msg += f"; {ROOT_HINT}"
    return msg
