"""Flow tracking: keys, packet and byte counts, TCP flags, times, fragments,
extension headers, table modes (per-CPU, shared, sink) and a full table."""

from __future__ import annotations

import os
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
)
from scapy.packet import Raw

from xdpflow.dataplane.flows import read_table
from xdpflow.rules.blockfile import Rule, parse_cidr

from .. import frames
from ..frames import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    Model,
    arp,
    ether,
    expect,
    flow_key,
    on_cpu,
    pad,
    read_flows,
)
from ..progtest import XDP_DROP, XDP_PASS

# loaded programs from a pool shared by the session, reset before each test (frames.py)
prog_pool_fixture = frames.prog_pool_fixture
prog_fixture = frames.prog_fixture
make_prog_fixture = frames.make_prog_fixture

V4 = {"src": "198.18.0.1", "dst": "198.18.0.2"}
V6 = {"src": "2001:2::1", "dst": "2001:2::2"}


def run_all(prog, pkts) -> list[int]:
    return [prog.run(bytes(p)) for p in pkts]


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


# --------------------------------------------------------------------------
# keys and counts


def test_udp_flow_counts_packets_and_ip_bytes(prog):
    pkts = [ether() / IP(**V4) / UDP(sport=1000, dport=53) / Raw(b"x" * n) for n in (0, 10, 100)]
    assert run_all(prog, pkts) == [XDP_PASS] * 3
    assert read_flows(prog) == {flow_key(V4["src"], V4["dst"], 1000, 53, 17): [3, 28 * 3 + 110, 0]}
    f = prog.flow(V4["src"], V4["dst"], 1000, 53, 17)
    assert (f.family, f.packets, f.bytes, f.tcp_flags) == (4, 3, 194, 0)


def test_each_five_tuple_is_its_own_flow(prog):
    base = {"src": "198.18.0.1", "dst": "198.18.0.2", "sport": 1, "dport": 2, "proto": 17}
    variants = [
        {},
        {"src": "198.18.0.3"},
        {"dst": "198.19.255.254"},
        {"sport": 3},
        {"dport": 3},
        {"src": "198.18.0.2", "dst": "198.18.0.1", "sport": 2, "dport": 1},  # the reverse direction
        {"proto": 6},
    ]
    want = {}
    for v in variants:
        k = {**base, **v}
        l4 = UDP(sport=k["sport"], dport=k["dport"]) if k["proto"] == 17 else TCP(sport=k["sport"], dport=k["dport"])
        frame = bytes(ether() / IP(src=k["src"], dst=k["dst"]) / l4)
        assert prog.run(frame) == XDP_PASS
        key = flow_key(k["src"], k["dst"], k["sport"], k["dport"], k["proto"])
        want[key] = [1, len(frame) - 14, 2 if k["proto"] == 6 else 0]
    assert read_flows(prog) == want


def test_flow_bytes_are_ip_bytes_not_frame_bytes(prog):
    f4 = pad(bytes(ether((ETH_P_8021Q, 7)) / IP(**V4) / UDP(sport=1, dport=2)), 64)  # 18 + 28 + padding
    f6 = bytes(ether((ETH_P_8021AD, 1), (ETH_P_8021Q, 2)) / IPv6(**V6) / UDP(sport=1, dport=2) / Raw(b"p" * 33))
    assert run_all(prog, [f4, f6]) == [XDP_PASS, XDP_PASS]
    assert read_flows(prog) == {
        flow_key(V4["src"], V4["dst"], 1, 2, 17): [1, 28, 0],
        flow_key(V6["src"], V6["dst"], 1, 2, 17): [1, 40 + 8 + 33, 0],
    }
    assert prog.counters()["bytes"] == 64 + len(f6)


@pytest.mark.parametrize(
    ("pkt", "sport", "dport", "proto"),
    [
        (IP(**V4) / ICMP(type=8, code=0), 8, 0, 1),
        (IP(**V4) / ICMP(type=0, code=0), 0, 0, 1),
        (IP(**V4) / ICMP(type=3, code=13), 3, 13, 1),
        (IP(**V4) / ICMP(type=11, code=1), 11, 1, 1),
        (IPv6(**V6) / ICMPv6EchoRequest(), 128, 0, 58),
        (IPv6(**V6) / ICMPv6EchoReply(), 129, 0, 58),
        (IPv6(**V6) / ICMPv6DestUnreach(code=4), 1, 4, 58),
    ],
    ids=["echo", "echo-reply", "unreach-13", "ttl-1", "v6-echo", "v6-reply", "v6-unreach-4"],
)
def test_icmp_type_and_code_in_ports(prog, pkt, sport, dport, proto):
    frame = bytes(ether() / pkt)
    assert prog.run(frame) == XDP_PASS
    src, dst = (V4["src"], V4["dst"]) if proto == 1 else (V6["src"], V6["dst"])
    assert read_flows(prog) == {flow_key(src, dst, sport, dport, proto): [1, len(frame) - 14, 0]}
    assert prog.counters() == expect((len(frame), "ipv4" if proto == 1 else "ipv6", "passed", "icmp"))


def test_other_protocols_have_port_zero(prog):
    pkts = [
        ether() / IP(**V4, proto=47) / Raw(b"\0\0\x08\0" + b"g" * 20),
        ether() / IP(**V4, proto=50) / Raw(b"\1\2\3\4" * 4),
        ether() / IPv6(**V6, nh=59),
        ether() / IPv6(**V6, nh=132) / Raw(b"\x00\x01\x00\x02" * 3),
    ]
    assert run_all(prog, pkts) == [XDP_PASS] * 4
    assert read_flows(prog) == {
        flow_key(V4["src"], V4["dst"], 0, 0, 47): [1, 44, 0],
        flow_key(V4["src"], V4["dst"], 0, 0, 50): [1, 36, 0],
        flow_key(V6["src"], V6["dst"], 0, 0, 59): [1, 40, 0],
        flow_key(V6["src"], V6["dst"], 0, 0, 132): [1, 52, 0],
    }


def test_tcp_flags_are_ored(prog):
    seq = [("S", 0x02), ("A", 0x10), ("F", 0x01)]
    for flags, _ in seq:
        assert prog.run(ether() / IP(**V4) / TCP(sport=40000, dport=443, flags=flags)) == XDP_PASS
    assert prog.run(ether() / IP(src=V4["dst"], dst=V4["src"]) / TCP(sport=443, dport=40000, flags="SA")) == XDP_PASS
    assert read_flows(prog) == {
        flow_key(V4["src"], V4["dst"], 40000, 443, 6): [3, 120, 0x13],
        flow_key(V4["dst"], V4["src"], 443, 40000, 6): [1, 40, 0x12],
    }
    f = prog.flow(V4["src"], V4["dst"], 40000, 443, 6)
    assert f.to_json()["tcp_flags"] == "FSA"


def test_tcp_flags_all_bits(prog):
    for bit in range(8):
        pkt = ether() / IPv6(**V6) / TCP(sport=1, dport=2, flags=1 << bit)
        assert prog.run(pkt) == XDP_PASS
        assert read_flows(prog)[flow_key(V6["src"], V6["dst"], 1, 2, 6)][2] == (2 << bit) - 1


def test_first_seen_and_last_seen(prog):
    """Raw stamps in whatever unit the program stores; Flow's wall times
    must bracket the runs."""
    frame = bytes(ether() / IP(**V4) / UDP(sport=1, dport=2))
    with on_cpu(usable_cpus()[0]):
        t0 = time.time()
        assert prog.run(frame) == XDP_PASS
        fa1 = read_table(prog.map("flows_v4"), 4)
        time.sleep(0.05)
        assert prog.run(frame) == XDP_PASS
        t1 = time.time()
    fa2 = read_table(prog.map("flows_v4"), 4)
    assert fa1.first_seen[0] == fa1.last_seen[0] > 0
    assert fa2.first_seen[0] == fa1.first_seen[0]
    assert fa2.last_seen[0] > fa2.first_seen[0]
    f = prog.flow(V4["src"], V4["dst"], 1, 2, 17)
    slack = 0.05  # coarse clocks tick every few ms
    assert t0 - slack <= f.first_seen <= f.last_seen <= t1 + slack
    assert f.last_seen - f.first_seen >= 0.05 - slack


def test_first_seen_survives_a_second_cpu(prog):
    """Per-CPU tables: the second CPU's slot of a flow holds packets but no
    first_seen (the program sets it only on insert); the reader must not
    take that 0 for the flow's first sighting."""
    cpus = usable_cpus()
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    frame = bytes(ether() / IP(**V4) / UDP(sport=1, dport=2))
    t0 = time.time()
    with on_cpu(cpus[0]):
        assert prog.run(frame) == XDP_PASS
    with on_cpu(cpus[1]):
        assert prog.run(frame) == XDP_PASS
    t1 = time.time()
    f = prog.flow(V4["src"], V4["dst"], 1, 2, 17)
    assert (f.packets, f.bytes) == (2, 56)
    assert t0 - 0.05 <= f.first_seen <= f.last_seen <= t1 + 0.05


def test_flow_seen_on_every_cpu_sums_exactly(prog):
    frame = bytes(ether() / IPv6(**V6) / TCP(sport=1, dport=2, flags="S"))
    ack = bytes(ether() / IPv6(**V6) / TCP(sport=1, dport=2, flags="A"))
    cpus = usable_cpus()
    for i, cpu in enumerate(cpus):
        with on_cpu(cpu):
            assert prog.run(frame if i == 0 else ack, repeat=3) == XDP_PASS
    n = 3 * len(cpus)
    assert read_flows(prog) == {flow_key(V6["src"], V6["dst"], 1, 2, 6): [n, 60 * n, 0x12 if n > 3 else 0x02]}
    assert prog.counters()["ipv6"] == n


# --------------------------------------------------------------------------
# fragments, extension headers, options


def test_ipv4_fragments(prog):
    payload = bytes(UDP(sport=5000, dport=6000)) + b"d" * 32  # 40 bytes: 5 units of 8
    first = ether() / IP(**V4, proto=17, id=9, flags="MF", frag=0) / Raw(payload[:16])
    middle = ether() / IP(**V4, proto=17, id=9, flags="MF", frag=2) / Raw(payload[16:32])
    last = ether() / IP(**V4, proto=17, id=9, frag=4) / Raw(payload[32:])
    frames_ = [bytes(p) for p in (first, middle, last)]
    assert run_all(prog, frames_) == [XDP_PASS] * 3
    assert read_flows(prog) == {
        flow_key(V4["src"], V4["dst"], 5000, 6000, 17): [1, 36, 0],
        flow_key(V4["src"], V4["dst"], 0, 0, 17): [2, 36 + 28, 0],
    }
    assert prog.counters() == expect(*[(len(f), "ipv4", "passed", "udp") for f in frames_])


def test_ipv4_later_fragment_of_tcp_needs_no_tcp_header(prog):
    frame = bytes(ether() / IP(**V4, proto=6, frag=100) / Raw(b"\0" * 3))
    assert prog.run(frame) == XDP_PASS
    assert prog.counters() == expect((len(frame), "ipv4", "passed", "tcp"))
    assert read_flows(prog) == {flow_key(V4["src"], V4["dst"], 0, 0, 6): [1, 23, 0]}


@pytest.mark.parametrize("ihl", range(5, 16))
def test_ipv4_options_ports(prog, ihl):
    frame = bytes(
        ether()
        / IP(**V4, options=[IPOption_NOP()] * (4 * (ihl - 5)))
        / TCP(sport=2222, dport=3333, flags="PA")
        / Raw(b"o" * 3)
    )
    assert frame[14] & 0xF == ihl
    assert prog.run(frame) == XDP_PASS
    assert read_flows(prog) == {flow_key(V4["src"], V4["dst"], 2222, 3333, 6): [1, ihl * 4 + 23, 0x18]}
    assert prog.counters() == expect((len(frame), "ipv4", "passed", "tcp"))


@pytest.mark.parametrize(
    "exts",
    [
        [IPv6ExtHdrHopByHop()],
        [IPv6ExtHdrRouting()],
        [IPv6ExtHdrDestOpt()],
        [IPv6ExtHdrFragment(offset=0, m=1, id=1)],
        [IPv6ExtHdrHopByHop(options=[]), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting(), IPv6ExtHdrDestOpt()],
        [IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(), IPv6ExtHdrFragment(offset=0, id=2), IPv6ExtHdrDestOpt()],
        [IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 28)])],  # a 32-byte header
        [IPv6ExtHdrHopByHop(options=[PadN(optdata=b"\0" * 252)]), IPv6ExtHdrDestOpt()],  # 256 + 8
        [IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), IPv6ExtHdrDestOpt(), IPv6ExtHdrRouting()]
        + [IPv6ExtHdrDestOpt(), IPv6ExtHdrFragment(offset=0, m=1)],
    ],
    ids=["hbh", "routing", "dstopt", "frag0", "four", "frag-in-chain", "long-dstopt", "long-hbh", "six"],
)
@pytest.mark.parametrize("l4", ["udp", "tcp"])
def test_ipv6_extension_headers_skipped(prog, exts, l4):
    pkt = IPv6(**V6)
    for e in exts:
        pkt = pkt / e
    pkt = pkt / (UDP(sport=4444, dport=5555) if l4 == "udp" else TCP(sport=4444, dport=5555, flags="S"))
    frame = bytes(ether() / pkt)
    assert len(frame) == 14 + 40 + sum(len(bytes(e)) for e in exts) + (8 if l4 == "udp" else 20)
    proto = 17 if l4 == "udp" else 6
    assert prog.run(frame) == XDP_PASS
    iplen = len(frame) - 14
    assert read_flows(prog) == {flow_key(V6["src"], V6["dst"], 4444, 5555, proto): [1, iplen, 0 if l4 == "udp" else 2]}
    assert prog.counters() == expect((len(frame), "ipv6", "passed", l4))


def test_ipv6_later_fragment_has_no_ports(prog):
    first = ether() / IPv6(**V6) / IPv6ExtHdrFragment(offset=0, m=1, id=5) / UDP(sport=7, dport=8) / Raw(b"a" * 8)
    later = ether() / IPv6(**V6) / IPv6ExtHdrFragment(offset=2, m=0, id=5, nh=17) / Raw(b"b" * 5)
    later_hbh = (
        ether() / IPv6(**V6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(offset=8191, m=1, id=6, nh=6) / Raw(b"c")
    )
    fs = [bytes(p) for p in (first, later, later_hbh)]
    assert run_all(prog, fs) == [XDP_PASS] * 3
    assert read_flows(prog) == {
        flow_key(V6["src"], V6["dst"], 7, 8, 17): [1, 40 + 8 + 16, 0],
        flow_key(V6["src"], V6["dst"], 0, 0, 17): [1, 40 + 8 + 5, 0],
        flow_key(V6["src"], V6["dst"], 0, 0, 6): [1, 40 + 8 + 8 + 1, 0],
    }
    assert prog.counters() == expect(
        (len(fs[0]), "ipv6", "passed", "udp"),
        (len(fs[1]), "ipv6", "passed", "udp"),
        (len(fs[2]), "ipv6", "passed", "tcp"),
    )


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xff" + b"x" * 30, b"\x11\x00" + b"x" * 30, b"\x3c\x00" * 16],
    ids=["long-hdrlen", "reads-as-udp", "reads-as-chain"],
)
def test_ipv6_later_fragment_payload_is_not_parsed(prog, payload):
    frame = bytes(ether() / IPv6(**V6) / IPv6ExtHdrFragment(offset=100, nh=60, id=1) / Raw(payload))
    assert prog.run(frame) == XDP_PASS
    assert read_flows(prog) == {flow_key(V6["src"], V6["dst"], 0, 0, 60): [1, 40 + 8 + 32, 0]}
    assert prog.counters() == expect((len(frame), "ipv6", "passed", "other"))


def test_v4_and_v6_flows_never_mix(prog):
    f4 = bytes(ether() / IP(**V4) / UDP(sport=9, dport=9))
    f6 = bytes(ether() / IPv6(**V6) / UDP(sport=9, dport=9))
    assert run_all(prog, [f4, f6, f6]) == [XDP_PASS] * 3
    fa4, fa6 = read_table(prog.map("flows_v4"), 4), read_table(prog.map("flows_v6"), 6)
    assert (len(fa4), len(fa6)) == (1, 1)
    assert (int(fa4.packets[0]), int(fa6.packets[0])) == (1, 2)
    assert read_flows(prog) == {
        flow_key(V4["src"], V4["dst"], 9, 9, 17): [1, 28, 0],
        flow_key(V6["src"], V6["dst"], 9, 9, 17): [2, 96, 0],
    }


# --------------------------------------------------------------------------
# modes


def _mixed_frames() -> list[bytes]:
    pkts = [
        ether() / IP(**V4) / TCP(sport=1, dport=2, flags="S"),
        ether() / IP(**V4) / TCP(sport=1, dport=2, flags="A") / Raw(b"x" * 100),
        ether() / IP(**V4) / TCP(sport=1, dport=2, flags="FA"),
        ether() / IPv6(**V6) / UDP(sport=3, dport=4) / Raw(b"y" * 7),
        ether() / IPv6(**V6) / UDP(sport=3, dport=4),
        ether() / IPv6(**V6) / IPv6ExtHdrFragment(offset=3, id=1, nh=17) / Raw(b"z" * 8),
        ether() / IP(src="203.0.113.1", dst="198.51.100.1") / ICMP(type=8),
        ether() / IP(src="198.51.100.9", dst="203.0.113.1") / UDP(sport=5, dport=6),  # blocked below
    ]
    out = [bytes(p) for p in pkts]
    out += [arp(), bytes(ether() / IP(**V4, ihl=4) / UDP())]
    return out


def test_sink_mode_drops_everything_and_still_tracks(make_prog):
    prog = make_prog(sink=True)
    prog.blocklist.add([Rule(parse_cidr("198.51.100.9/32"), "src")])
    model = Model(rules=[frames.ModelRule(parse_cidr("198.51.100.9/32"), "src", 0)], sink=True)
    fs = _mixed_frames()
    verdicts = run_all(prog, fs)
    assert verdicts == [model.feed(f) for f in fs] == [XDP_DROP] * len(fs)
    c = prog.counters()
    assert c == model.counters
    assert (c["sunk"], c["dropped"], c["passed"]) == (len(fs) - 1, 1, 0)
    assert (c["non_ip"], c["parse_errors"]) == (1, 1)
    assert read_flows(prog) == model.flows
    assert len(model.flows) == 4
    assert [h for _r, h in prog.blocklist.listing()] == [1]


@pytest.mark.parametrize("shared", [False, True], ids=["percpu", "shared"])
def test_flow_results_same_in_both_table_modes(make_prog, shared):
    prog = make_prog(shared_flows=shared)
    model = Model()
    fs = _mixed_frames() * 3
    assert run_all(prog, fs) == [model.feed(f) for f in fs]
    assert prog.counters() == model.counters
    assert read_flows(prog) == model.flows
    assert read_flows(prog)[flow_key(V4["src"], V4["dst"], 1, 2, 6)] == [9, 3 * (40 + 140 + 40), 0x13]


def test_shared_table_keeps_first_seen_across_cpus(make_prog):
    prog = make_prog(shared_flows=True)
    cpus = usable_cpus()
    frame = bytes(ether() / IP(**V4) / UDP(sport=1, dport=2))
    t0 = time.time()
    for cpu in cpus:
        with on_cpu(cpu):
            assert prog.run(frame) == XDP_PASS
    t1 = time.time()
    f = prog.flow(V4["src"], V4["dst"], 1, 2, 17)
    assert (f.packets, f.bytes) == (len(cpus), 28 * len(cpus))
    assert t0 - 0.05 <= f.first_seen <= f.last_seen <= t1 + 0.05


@pytest.mark.parametrize(
    ("shared", "family"), [(False, 4), (False, 6), (True, 4)], ids=["percpu-v4", "percpu-v6", "shared-v4"]
)
def test_full_table_evicts(make_prog, shared, family):
    prog = make_prog(flows=64, shared_flows=shared)
    if family == 4:
        fs = [bytes(ether() / IP(src="198.18.0.1", dst=f"198.18.1.{i}") / UDP(sport=i, dport=7)) for i in range(200)]
    else:
        fs = [bytes(ether() / IPv6(src="2001:2::1", dst=f"2001:2::{i:x}") / UDP(sport=i, dport=7)) for i in range(200)]
    assert run_all(prog, fs) == [XDP_PASS] * 200
    table = read_flows(prog)
    assert 0 < len(table) <= 64
    assert all(v == [1, len(fs[0]) - 14, 0] for v in table.values())
    cls = "ipv4" if family == 4 else "ipv6"
    assert prog.counters() == expect(*[(len(f), cls, "passed", "udp") for f in fs])
    assert prog.counters()["flow_insert_failed"] == 0
    # the newest flow is always there
    assert (
        flow_key(
            "198.18.0.1" if family == 4 else "2001:2::1",
            "198.18.1.199" if family == 4 else "2001:2::c7",
            199,
            7,
            17,
        )
        in table
    )
