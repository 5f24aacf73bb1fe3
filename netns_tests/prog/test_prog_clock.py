"""Jiffies stamps to wall time: the HZ measurement and the conversion."""

from __future__ import annotations

import time

from xdpflow.dataplane.clock import CLOCK_PROG, JiffiesClock, measure_hz, sample

from .. import frames
from ..frames import kernel_hz

# loaded programs from a pool shared by the session, reset before each test (frames.py)
prog_pool_fixture = frames.prog_pool_fixture
prog_fixture = frames.prog_fixture


def test_measure_hz_is_the_kernel_hz(prog):
    want = kernel_hz(prog)
    clock = prog.obj.program(CLOCK_PROG)
    try:
        got = [measure_hz(clock) for _ in range(40)]
    finally:
        clock.close()
    assert got == [want] * 40


def test_jiffies_clock_maps_stamps_to_now(prog):
    hz = kernel_hz(prog)
    clock_prog = prog.obj.program(CLOCK_PROG)
    try:
        clock = JiffiesClock(clock_prog, hz)
        j, _mono = sample(clock_prog)
        now = time.time()
    finally:
        clock_prog.close()
    tick = 1 / hz
    assert abs(clock.to_wall(j) - now) <= 2 * tick + 0.005
    assert abs(clock.to_wall(j - 10 * hz) - (now - 10)) <= 2 * tick + 0.005
