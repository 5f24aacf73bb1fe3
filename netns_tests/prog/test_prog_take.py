"""The data plane's part of the export contracts: rec_start, and
BPF_PROG_TEST_RUN of ``xdpflow_take`` (shared and per-CPU tables): an active
record starts at the first packet it counts."""

from __future__ import annotations

import os
import time

import pytest
from scapy.layers.inet import IP, UDP

from xdpflow.dataplane.flows import read_table
from xdpflow.dataplane.take import TAKE_PROG, take

from ..frames import ether, on_cpu

# --- the data plane: rec_start and xdpflow_take -----------------------------------------


def _frame(sport: int) -> bytes:
    return bytes(ether() / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=sport, dport=9000))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "percpu"])
def test_take_swaps_the_record_start_for_zero(make_prog, shared: bool) -> None:
    """Created: rec_start is the first packet's jiffies. Taken: the stamp
    comes back with the totals and the flow holds 0 until its next packet,
    which stamps afresh. Per-CPU: every CPU's slot is cleared and the
    earliest stamp is the one taken."""
    h = make_prog(shared_flows=shared)
    taker = h.obj.program(TAKE_PROG)
    cpus = sorted(os.sched_getaffinity(0))
    try:
        with on_cpu(cpus[0]):
            h.run(_frame(1))
        fa = read_table(h.map("flows_v4"), 4)
        (key,) = [fa.keys.tobytes()]
        first = int(fa.rec_start[0])
        assert first == int(fa.first_seen[0]) > 0

        time.sleep(0.05)  # a later jiffy
        with on_cpu(cpus[-1]):
            h.run(_frame(1))
        (t,) = take(taker, 4, [key]).values()
        assert (t.rec_start, t.packets, t.bytes) == (first, 2, 2 * 28)
        assert int(read_table(h.map("flows_v4"), 4).rec_start[0]) == 0
        (t,) = take(taker, 4, [key]).values()
        assert (t.rec_start, t.packets) == (0, 2)  # nothing new: nothing to take

        time.sleep(0.05)
        with on_cpu(cpus[0]):
            h.run(_frame(1))
        fa = read_table(h.map("flows_v4"), 4)
        assert int(fa.rec_start[0]) == int(fa.last_seen[0]) > first
        (t,) = take(taker, 4, [key]).values()
        assert (t.rec_start, t.packets, t.last_seen) == (int(fa.last_seen[0]), 3, int(fa.last_seen[0]))

        # a flow that is not in the table is left out
        other = bytearray(key)
        other[8] ^= 0xFF
        assert take(taker, 4, [bytes(other)]) == {}
    finally:
        taker.close()


def test_take_batches_many_flows(make_prog) -> None:
    """More flows than one test-run frame holds: each is taken once."""
    h = make_prog()
    taker = h.obj.program(TAKE_PROG)
    try:
        for sport in range(1, 101):
            h.run(_frame(sport))
        fa = read_table(h.map("flows_v4"), 4)
        ks = fa.keys.itemsize
        keys = [fa.keys.tobytes()[i * ks : (i + 1) * ks] for i in range(len(fa))]
        got = take(taker, 4, keys)
        assert sorted(got) == sorted(keys)
        assert all(t.packets == 1 and t.rec_start > 0 for t in got.values())
        assert not read_table(h.map("flows_v4"), 4).rec_start.any()
    finally:
        taker.close()
