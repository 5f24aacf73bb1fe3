"""New-flow admission control: past knobs.flow_budget inserts per CPU per
second, frames that would create a flow are counted (admission map), not
tracked; flows already in the table and the interface counters stay exact."""

from __future__ import annotations

import os
import time
from ipaddress import ip_network

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from xdpflow.bindings.libbpf import Object
from xdpflow.dataplane import abi
from xdpflow.dataplane.abi import ffi
from xdpflow.dataplane.lifecycle import FLOW_BUDGET_DEFAULT
from xdpflow.dataplane.maps import knobs_of, sum_admission
from xdpflow.dataplane.protect import Group

from .. import frames
from ..frames import ether, expect, flow_key, kernel_hz, on_cpu, read_flows
from ..progtest import XDP_PASS

# loaded programs from a pool shared by the session, reset before each test (frames.py)
prog_pool_fixture = frames.prog_pool_fixture
prog_fixture = frames.prog_fixture
make_prog_fixture = frames.make_prog_fixture

BUDGET = 5


def one_cpu() -> int:
    return min(os.sched_getaffinity(0))


def with_hz(prog):
    # the window is config.hz jiffies; the controller measures HZ
    # unreliably (test_prog_clock.py), so these tests set it right
    m = prog.map("config")
    cfg = m[0]
    cfg.hz = kernel_hz(prog)
    m[0] = cfg
    return prog


def udp4(dst: str, sport: int, payload: int = 10) -> bytes:
    return bytes(ether() / IP(src="198.18.0.1", dst=dst) / UDP(sport=sport, dport=53) / Raw(b"x" * payload))


def udp6(dst: str, sport: int, payload: int = 10) -> bytes:
    return bytes(ether() / IPv6(src="2001:2::1", dst=dst) / UDP(sport=sport, dport=53) / Raw(b"x" * payload))


def iplen(frame: bytes) -> int:
    return len(frame) - 14


def test_over_the_budget_new_flows_are_counted_not_tracked(make_prog):
    prog = with_hz(make_prog(flow_budget=BUDGET))
    est = udp4("198.18.1.1", 1000, payload=100)
    # 24 new tuples, both families, payloads of different sizes
    flood = [udp4(f"198.18.2.{i}", 2000 + i, payload=i) for i in range(16)]
    flood += [udp6(f"2001:2::2:{i}", 3000 + i, payload=3 * i) for i in range(8)]
    sent: list[bytes] = []
    with on_cpu(one_cpu()):  # the budget is per CPU
        t0 = time.monotonic()
        assert prog.run(est) == XDP_PASS  # the established flow takes one insert
        sent.append(est)
        for f in flood:
            # the flood between every two frames of the established flow
            assert prog.run(f) == XDP_PASS
            assert prog.run(est) == XDP_PASS
            sent += [f, est]
        assert time.monotonic() - t0 < 0.5, "the flood must fall in one window"
        flows = read_flows(prog)
        adm = prog.map("admission")[0]
        untracked = flood[BUDGET - 1 :]
        got = sum_admission(adm)
        assert (got.packets, got.bytes) == (len(untracked), sum(iplen(f) for f in untracked))
        assert 0 < got.first <= got.last
        assert sum(int(v.inserts) for v in adm) == BUDGET
        # inserted: the established flow and the first BUDGET - 1 new tuples, in order
        assert len(flows) == BUDGET
        assert flows[flow_key("198.18.0.1", "198.18.1.1", 1000, 53, 17)] == [len(flood) + 1, 128 * (len(flood) + 1), 0]
        for i in range(BUDGET - 1):
            assert flows[flow_key("198.18.0.1", f"198.18.2.{i}", 2000 + i, 53, 17)] == [1, 28 + i, 0]
        # the interface counters count every frame, as always
        c = prog.counters()
        v4 = [f for f in sent if f[12:14] == b"\x08\x00"]
        v6 = [f for f in sent if f[12:14] == b"\x86\xdd"]
        assert c == expect(
            *[(len(f), "ipv4", "passed", "udp") for f in v4], *[(len(f), "ipv6", "passed", "udp") for f in v6]
        )
        assert c["flow_insert_failed"] == 0

        # the next window admits new flows again; the old counts stay
        time.sleep(max(0.0, 1.05 - (time.monotonic() - t0)))
        late = [udp4(f"198.18.3.{i}", 4000 + i) for i in range(3)]
        assert [prog.run(f) for f in late] == [XDP_PASS] * 3
    flows = read_flows(prog)
    assert len(flows) == BUDGET + 3
    for i in range(3):
        assert flows[flow_key("198.18.0.1", f"198.18.3.{i}", 4000 + i, 53, 17)] == [1, 38, 0]
    again = sum_admission(prog.map("admission")[0])
    assert (again.packets, again.bytes, again.first) == (got.packets, got.bytes, got.first)


def test_an_untracked_tuple_is_tracked_once_admitted(make_prog):
    """A frame refused in one window is no flow; the same tuple's next frame
    in the next window creates it, counting from that frame."""
    prog = with_hz(make_prog(flow_budget=1))
    a, b = udp4("198.18.4.1", 5000), udp4("198.18.4.2", 5001)
    with on_cpu(one_cpu()):
        t0 = time.monotonic()
        assert [prog.run(f) for f in (a, b, b)] == [XDP_PASS] * 3
        assert list(read_flows(prog)) == [flow_key("198.18.0.1", "198.18.4.1", 5000, 53, 17)]
        time.sleep(max(0.0, 1.05 - (time.monotonic() - t0)))
        assert prog.run(b) == XDP_PASS
    assert read_flows(prog)[flow_key("198.18.0.1", "198.18.4.2", 5001, 53, 17)] == [1, 38, 0]
    got = sum_admission(prog.map("admission")[0])
    assert (got.packets, got.bytes) == (2, 2 * 38)


def test_zero_budget_is_unlimited(make_prog):
    prog = with_hz(make_prog(flow_budget=0))
    fs = [udp4(f"198.18.5.{i}", 6000 + i) for i in range(200)]
    assert [prog.run(f) for f in fs] == [XDP_PASS] * len(fs)
    assert len(read_flows(prog)) == len(fs)
    # the check is compiled out: the state is never touched
    assert all(bytes(ffi.buffer(v)) == bytes(len(ffi.buffer(v))) for v in prog.map("admission")[0])


def test_default_budget_tracks_a_burst(prog):
    fs = [udp4(f"198.18.6.{i % 250}", 7000 + i) for i in range(2000)]
    assert [prog.run(f) for f in fs] == [XDP_PASS] * len(fs)
    assert len(read_flows(prog)) == len(fs)
    assert sum_admission(prog.map("admission")[0]).packets == 0


def test_knobs_of_an_older_program_read_with_the_default_budget():
    """A program loaded before flow_budget had a 16-byte .rodata (sink,
    shared_flows, events_per_sec, prot_mask): an upgrade reads its knobs
    with this version's default budget. The traffic generator's .rodata
    (struct xf_gen_knobs) has that size, so it stands in for one here."""
    assert ffi.sizeof("struct xf_gen_knobs") == ffi.offsetof("struct xf_knobs", "flow_budget") == 16
    with Object(abi.object_path("baseline")) as obj:
        old = obj.map_spec(next(n for n in obj.maps if n.endswith(".rodata"))).initial_value(
            "struct xf_gen_knobs", abi.ffi
        )
        old.vary_offset, old.vary_count, old.vary_base = 1, 1, 1000  # sink, shared_flows, events_per_sec
        obj.load()
        prog = obj.program("xdp_pass")
        try:
            k = knobs_of(prog)
        finally:
            prog.close()
    assert (k.sink, k.shared_flows, k.events_per_sec, k.prot_mask) == (1, 1, 1000, 0)
    assert k.flow_budget == abi.C.XF_FLOW_BUDGET_DEFAULT == FLOW_BUDGET_DEFAULT == 250000


def test_knobs_of_this_program(make_prog):
    prog = make_prog(flow_budget=7)
    k = knobs_of(prog.prog)
    assert (k.flow_budget, k.events_per_sec) == (7, abi.C.XF_EVENTS_PER_SEC)


def test_protected_hosts_count_untracked_frames_as_new_flows(make_prog):
    """Detection sees a flood's new tuples past the budget too (a rate of
    new flows capped by the budget would hide it): every frame that would
    have made a flow counts, the admitted ones and the untracked ones."""
    prog = with_hz(make_prog(flow_budget=2))
    prog.protect.install([Group("g", (ip_network("198.18.7.0/24"),))])
    est = udp4("198.18.7.1", 999)
    flood = [udp4("198.18.7.7", 3000 + i) for i in range(6)]
    with on_cpu(one_cpu()):
        assert [prog.run(f) for f in [est, est, *flood, est]] == [XDP_PASS] * 9
    hc = prog.protect.hosts()
    rows = {str(a): hc.row(i) for i, a in enumerate(hc.addresses())}
    assert (rows["198.18.7.1"]["new_flows"], rows["198.18.7.1"]["packets"]) == (1, 3)
    assert (rows["198.18.7.7"]["new_flows"], rows["198.18.7.7"]["packets"]) == (6, 6)
    assert len(read_flows(prog)) == 2
    assert sum_admission(prog.map("admission")[0]).packets == 5
