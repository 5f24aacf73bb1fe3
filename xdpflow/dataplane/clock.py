"""Jiffies to wall time.

The data plane stamps flows and events with jiffies (a plain load, where a
clock read costs ~10 ns a frame). The program ``xdpflow_clock``, run through
BPF_PROG_TEST_RUN, reads jiffies and CLOCK_MONOTONIC at one moment; with the
kernel's HZ (measured once, stored in the config map) that maps any jiffies
stamp to Unix time, to within one tick.
"""

from __future__ import annotations

import math
import time

from xdpflow.bindings.libbpf import Program
from xdpflow.dataplane.abi import ffi

CLOCK_PROG = "xdpflow_clock"  # its name in the object
CLOCK_PIN = "clock"  # its pin, shared by every interface
KNOWN_HZ = (100, 250, 300, 1000)


def sample(prog: Program) -> tuple[int, int]:
    """(jiffies, CLOCK_MONOTONIC ns) read together in the kernel."""
    size = max(ffi.sizeof("struct xf_clock"), 64)
    r = prog.test_run(bytes(size))
    clk = ffi.cast("struct xf_clock *", ffi.from_buffer(r.data))
    return int(clk.jiffies), int(clk.mono_ns)


def measure_hz(prog: Program, span: float = 0.2) -> int:
    """The kernel's HZ: jiffies counted against the clock over ``span``
    seconds. Either end may be off by one tick, so the answer is the known
    HZ inside [(ticks - 1) / t, (ticks + 1) / t]; at 0.2 s only one fits."""
    j0, t0 = sample(prog)
    j1, t1 = j0, t0
    while t1 - t0 < span * 1e9:
        time.sleep(0.01)
        j1, t1 = sample(prog)
    seconds = (t1 - t0) / 1e9
    lo, hi = (j1 - j0 - 1) / seconds, (j1 - j0 + 1) / seconds
    fits = [hz for hz in KNOWN_HZ if lo <= hz <= hi]
    return fits[0] if len(fits) == 1 else max(1, round((j1 - j0) / seconds))


class JiffiesClock:
    """Converts jiffies stamps to Unix seconds."""

    def __init__(self, prog: Program, hz: int) -> None:
        self.hz = hz
        j, mono = sample(prog)
        wall_minus_mono = time.time() - time.clock_gettime_ns(time.CLOCK_MONOTONIC) / 1e9
        # Unix time of jiffy 0, as this sample sees it
        self._epoch = wall_minus_mono + mono / 1e9 - j / hz

    def to_wall(self, jiffies: int) -> float:
        return self._epoch + jiffies / self.hz

    def to_jiffies(self, wall: float) -> int:
        """The first jiffy at or after Unix time ``wall`` (a deadline: the
        data plane treats a stamp <= jiffies64 as past)."""
        return max(1, math.ceil((wall - self._epoch) * self.hz))

    def now_jiffies(self) -> int:
        """The kernel's jiffies now, as this clock sees them."""
        return int((time.time() - self._epoch) * self.hz)
