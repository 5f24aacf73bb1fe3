"""A function run on a thread of its own, for work that is mostly syscalls:
they release the GIL, so the caller's thread computes meanwhile (the
blocklist's writes, status's counts)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """``fn()`` started on a thread now. ``wait()`` returns the exception it
    raised (None when it returned); ``result()`` its value, or raises that
    exception. Either waits for it to end."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="xdpflow-background", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # handed to the caller by wait() or result()
            self._error = e

    def wait(self) -> BaseException | None:
        self._thread.join()
        return self._error

    def result(self) -> T:
        error = self.wait()
        if error is not None:
            raise error
        return self._value  # type: ignore[return-value]
