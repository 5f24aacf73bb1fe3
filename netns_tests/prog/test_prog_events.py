"""The events ring buffer: new flows, blocklist hits, and the per-CPU budget."""

from __future__ import annotations

import os
import socket
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from xdpflow.dataplane import abi
from xdpflow.dataplane.abi import ffi
from xdpflow.dataplane.clock import CLOCK_PROG, sample
from xdpflow.rules.blockfile import Rule, parse_cidr

from .. import frames
from ..frames import arp, ether, kernel_hz, on_cpu, raw_udp4
from ..progtest import XDP_DROP, XDP_PASS

# loaded programs from a pool shared by the session, reset before each test (frames.py)
prog_pool_fixture = frames.prog_pool_fixture
prog_fixture = frames.prog_fixture
make_prog_fixture = frames.make_prog_fixture

NEW_FLOW, BLOCKED, MONITORED = abi.C.XF_EV_NEW_FLOW, abi.C.XF_EV_BLOCKED, abi.C.XF_EV_MONITORED
LO = socket.if_nametoindex("lo")  # test runs see the netns loopback as ingress


def one_cpu() -> int:
    return min(os.sched_getaffinity(0))


def test_record_is_one_struct(prog):
    assert prog.run(ether() / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=1, dport=2)) == XDP_PASS
    (ev,) = prog.events.drain()
    assert ev.size == ffi.sizeof("struct xf_event")


@pytest.mark.parametrize(
    ("pkt", "family", "src", "dst", "sport", "dport", "proto"),
    [
        (
            IP(src="198.18.0.1", dst="203.0.113.5") / UDP(sport=1000, dport=53),
            4,
            "198.18.0.1",
            "203.0.113.5",
            1000,
            53,
            17,
        ),
        (
            IP(src="198.18.0.1", dst="203.0.113.5") / TCP(sport=40000, dport=443),
            4,
            "198.18.0.1",
            "203.0.113.5",
            40000,
            443,
            6,
        ),
        (
            IP(src="198.18.0.1", dst="203.0.113.5") / ICMP(type=3, code=4),
            4,
            "198.18.0.1",
            "203.0.113.5",
            3,
            4,
            1,
        ),
        (
            IPv6(src="2001:2::1", dst="2001:db8::2") / UDP(sport=5, dport=6),
            6,
            "2001:2::1",
            "2001:db8::2",
            5,
            6,
            17,
        ),
        (
            IPv6(src="2001:2::1", dst="2001:db8::2") / ICMPv6EchoRequest(),
            6,
            "2001:2::1",
            "2001:db8::2",
            128,
            0,
            58,
        ),
        (IP(src="198.18.0.3", dst="198.18.0.4", proto=47, frag=9), 4, "198.18.0.3", "198.18.0.4", 0, 0, 47),
    ],
    ids=["v4-udp", "v4-tcp", "v4-icmp", "v6-udp", "v6-icmp", "v4-gre-fragment"],
)
def test_new_flow_event(prog, pkt, family, src, dst, sport, dport, proto):
    frame = bytes(ether() / pkt)
    clock = prog.obj.program(CLOCK_PROG)
    j0 = sample(clock)[0]
    assert prog.run(frame) == XDP_PASS
    j1 = sample(clock)[0]
    clock.close()
    assert prog.run(frame) == XDP_PASS  # not new any more
    (ev,) = prog.events.drain()
    assert (ev.type, ev.family, ev.src, ev.dst, ev.sport, ev.dport, ev.proto) == (
        NEW_FLOW,
        family,
        src,
        dst,
        sport,
        dport,
        proto,
    )
    assert (ev.len, ev.rule, ev.ifindex) == (len(frame), None, LO)
    assert j0 <= ev.ts <= j1  # jiffies, stamped while the frame ran
    assert prog.counters()["events_suppressed"] == prog.counters()["events_lost"] == 0


def test_ipv4_event_addresses_are_zero_padded(prog):
    """IPv4 addresses fill the first 4 bytes of the 16; the rest, both pad
    fields and a new flow's rule are zero, never leftovers of earlier records."""
    prog.run(ether() / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=1, dport=2))
    prog.run(ether() / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=1, dport=2))
    prog.run(ether() / IP(src="198.18.0.1", dst="198.18.0.3") / UDP(sport=1, dport=2))
    recs = prog.events.drain_raw()
    assert len(recs) == 3
    for r in recs[1:]:
        e = ffi.cast("struct xf_event *", ffi.from_buffer(r))
        assert e.family == 4
        assert bytes(e.saddr)[4:] == bytes(12) and bytes(e.daddr)[4:] == bytes(12)
        assert e.pad == 0 and e.generation == prog.map("config")[0].generation
        assert (e.type, e.rule) == (NEW_FLOW, 0)


def test_no_event_for_non_ip_parse_errors_or_known_flows(prog):
    f = bytes(ether() / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=1, dport=2))
    for frame in (arp(), bytes(ether() / IP(src="198.18.0.1", dst="198.18.0.2", ihl=3)), f, f, f):
        prog.run(frame)
    assert [e.type for e in prog.events.drain()] == [NEW_FLOW]


def test_ingress_ifindex_from_context(prog):
    frame = bytes(ether() / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=1, dport=2))
    assert prog.prog.test_run(frame, ingress_ifindex=LO).retval == XDP_PASS
    (ev,) = prog.events.drain()
    assert ev.ifindex == LO


def test_blocked_and_monitored_events_carry_the_rule(prog):
    rules = [Rule(parse_cidr("198.51.100.0/24"), "src"), Rule(parse_cidr("2001:db8::/32"), "dst")]
    prog.blocklist.add(rules)
    idx = prog.blocklist.entries()
    f4 = bytes(ether() / IP(src="198.51.100.7", dst="198.18.0.2") / UDP(sport=1, dport=2))
    f6 = bytes(ether() / IPv6(src="2001:2::1", dst="2001:db8::9") / TCP(sport=3, dport=4))
    assert prog.run(f4) == XDP_DROP
    assert prog.run(f6) == XDP_DROP
    ev4, ev6 = prog.events.drain()
    assert (ev4.type, ev4.rule, ev4.family, ev4.src, ev4.dst, ev4.proto, ev4.len) == (
        BLOCKED,
        idx[rules[0]],
        4,
        "198.51.100.7",
        "198.18.0.2",
        17,
        len(f4),
    )
    assert (ev6.type, ev6.rule, ev6.family, ev6.src, ev6.dst, ev6.proto, ev6.len) == (
        BLOCKED,
        idx[rules[1]],
        6,
        "2001:2::1",
        "2001:db8::9",
        6,
        len(f6),
    )
    m = prog.map("config")
    cfg = m[0]
    cfg.flags |= abi.C.XF_CFG_MONITOR
    m[0] = cfg
    assert prog.run(f4) == XDP_PASS
    (ev,) = prog.events.drain()
    assert (ev.type, ev.rule) == (MONITORED, idx[rules[0]])  # and no NEW_FLOW: no flow


def test_budget_per_second(make_prog):
    prog = make_prog(events_per_sec=5)
    # the budget's window is config.hz jiffies; the controller measures HZ
    # unreliably (test_prog_clock.py), so this test sets it right
    m = prog.map("config")
    cfg = m[0]
    cfg.hz = kernel_hz(prog)
    m[0] = cfg
    fs = [bytes(ether() / IP(src="198.18.0.1", dst=f"198.18.2.{i}") / UDP(sport=i, dport=9)) for i in range(40)]
    with on_cpu(one_cpu()):  # the budget is per CPU
        t0 = time.monotonic()
        assert [prog.run(f) for f in fs[:20]] == [XDP_PASS] * 20
        assert time.monotonic() - t0 < 0.5
        evs = prog.events.drain()
        assert [e.type for e in evs] == [NEW_FLOW] * 5
        assert [e.dst for e in evs] == [f"198.18.2.{i}" for i in range(5)]
        c = prog.counters()
        assert (c["events_suppressed"], c["events_lost"]) == (15, 0)
        assert c["events_suppressed_bytes"] == sum(len(f) for f in fs[5:20])
        # a second later the budget is back
        time.sleep(max(0.0, 1.05 - (time.monotonic() - t0)))
        assert [prog.run(f) for f in fs[20:]] == [XDP_PASS] * 20
    assert [e.dst for e in prog.events.drain()] == [f"198.18.2.{i}" for i in range(20, 25)]
    assert prog.counters()["events_suppressed"] == 30
    assert len(prog.flows()) == 40  # suppression never costs a flow


def test_zero_budget_sends_nothing(make_prog):
    prog = make_prog(events_per_sec=0)
    prog.blocklist.add([Rule(parse_cidr("198.51.100.0/24"), "src")])
    for i in range(5):
        prog.run(ether() / IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=i, dport=2))
    prog.run(ether() / IP(src="198.51.100.1", dst="198.18.0.2") / UDP(sport=1, dport=2))
    assert prog.events.drain() == []
    assert prog.counters()["events_suppressed"] == 6


def test_full_ring_counts_lost_events(make_prog):
    """The ring holds XF_EVENTS_BYTES; with an unlimited budget and nobody
    reading, events past its end are lost, and counted, never blocking."""
    prog = make_prog(events_per_sec=1 << 30)
    n = abi.C.XF_EVENTS_BYTES // (ffi.sizeof("struct xf_event") + 8) + 100
    fs = [raw_udp4(0xC6120001, 0xC6130000 + i, 7, 9) for i in range(n)]
    assert [prog.run(f) for f in fs] == [XDP_PASS] * n
    c = prog.counters()
    delivered = len(prog.events.drain())
    assert delivered + c["events_lost"] == n
    assert c["events_lost"] >= 100
    assert c["events_suppressed"] == 0
