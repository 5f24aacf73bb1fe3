"""Counting per protected destination host (bpf/protect.h), through
BPF_PROG_TEST_RUN: every field exact for IPv4 and IPv6, the most specific
prefix's group, overflow when the host table is full, nothing when no group
is installed, new flows only where the flow table takes one in, and frames
counted whatever the blocklist and the rules do with them.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.packet import Raw

from xdpflow.dataplane.protect import COUNT_FIELDS, Group, compile_groups
from xdpflow.rules.blockfile import Rule, parse_cidr
from xdpflow.rules.rulespec import parse_line

from ..frames import ether, on_cpu
from ..progtest import XDP_DROP, XDP_PASS, ProgHarness

Prefix = IPv4Network | IPv6Network


def group(name: str, *prefixes: str) -> Group:
    return Group(name, tuple(ip_network(p) for p in prefixes))


def nets(*prefixes: str) -> tuple[Prefix, ...]:
    return tuple(ip_network(p) for p in prefixes)


class Expect:
    """What the program should have counted per host: fed the same frames."""

    def __init__(self) -> None:
        self.hosts: dict[str, Counter[str]] = {}

    def add(self, dst: str, frame: bytes, **fields: int) -> None:
        c = self.hosts.setdefault(str(ip_address(dst)), Counter())
        c["packets"] += 1
        c["bytes"] += len(frame)
        for k, v in fields.items():
            c[k] += v


def send(h: ProgHarness, exp: Expect | None, pkt: Any, dst: str | None = None, **fields: int) -> bytes:
    frame = bytes(pkt)
    assert h.run(frame) in (XDP_PASS, XDP_DROP)
    if exp is not None and dst is not None:
        exp.add(dst, frame, **fields)
    return frame


def counted(h: ProgHarness) -> dict[str, dict[str, int]]:
    hc = h.protect.hosts()
    return {str(a): hc.row(i) for i, a in enumerate(hc.addresses())}


def new_flows_by_dst(h: ProgHarness) -> Counter[str]:
    return Counter(str(ip_address(f.dst)) for f in h.flows())


def check(h: ProgHarness, exp: Expect, groups: dict[str, int]) -> None:
    got = counted(h)
    flows = new_flows_by_dst(h)
    want = {}
    for dst, c in exp.hosts.items():
        row = {f: c[f] for f in COUNT_FIELDS}
        row["new_flows"] = flows[dst]  # the flow table started empty and never filled up
        row["group"] = groups[dst]
        want[dst] = row
    assert got == want


def test_ipv4_every_field(prog: ProgHarness) -> None:
    prog.protect.install([group("net", "198.18.0.0/16"), group("web", "198.18.5.0/24")])
    exp = Expect()
    e = ether()
    web, other = "198.18.5.7", "198.18.9.1"
    for sport in (1000, 1001, 1000):  # two flows
        send(prog, exp, e / IP(src="198.19.0.1", dst=web) / UDP(sport=sport, dport=53), web, udp=1)
    send(prog, exp, e / IP(src="198.19.0.2", dst=web) / TCP(sport=5, dport=443, flags="S"), web, syn=1)
    send(prog, exp, e / IP(src="198.19.0.2", dst=web) / TCP(sport=5, dport=443, flags="SA"), web)
    send(prog, exp, e / IP(src="198.19.0.2", dst=web) / TCP(sport=5, dport=443, flags="A"), web)
    send(prog, exp, e / IP(src="198.19.0.3", dst=other) / ICMP(), other, icmp=1)
    # a first fragment (MF) and a later one (offset): both fragments
    send(prog, exp, e / IP(src="198.19.0.4", dst=other, flags="MF") / UDP(sport=7, dport=7) / Raw(b"x" * 16), other,
         udp=1, frags=1)  # fmt: skip
    send(prog, exp, e / IP(src="198.19.0.4", dst=other, frag=3, proto=17) / Raw(b"y" * 16), other, udp=1, frags=1)
    send(prog, exp, e / IP(src="198.19.0.5", dst=other, proto=47) / Raw(b"gre!"), other)
    send(prog, None, e / IP(src="198.19.0.1", dst="203.0.113.9") / UDP(sport=1, dport=2))  # not protected
    send(prog, None, e / IP(src="198.18.5.7", dst="198.19.0.1") / UDP(sport=1, dport=2))  # a protected *source*
    check(prog, exp, {web: 2, other: 1})
    assert prog.protect.overflow() == {}


def test_ipv6_every_field(prog: ProgHarness) -> None:
    prog.protect.install([group("v6", "2001:2::/48"), group("v6host", "2001:2::5/128")])
    exp = Expect()
    e = ether()
    a, b = "2001:2::5", "2001:2:0:1::9"
    send(prog, exp, e / IPv6(src="2001:2:1::1", dst=a) / UDP(sport=9, dport=53), a, udp=1)
    send(prog, exp, e / IPv6(src="2001:2:1::1", dst=a) / TCP(sport=9, dport=80, flags="S"), a, syn=1)
    send(prog, exp, e / IPv6(src="2001:2:1::1", dst=a) / TCP(sport=9, dport=80, flags="SA"), a)
    send(prog, exp, e / IPv6(src="2001:2:1::2", dst=b) / ICMPv6EchoRequest(), b, icmp=1)
    send(prog, exp, e / IPv6(src="2001:2:1::3", dst=b) / IPv6ExtHdrFragment(m=1, offset=0, id=7) / UDP(sport=3, dport=4)
         / Raw(b"z" * 16), b, udp=1, frags=1)  # fmt: skip
    send(prog, exp, e / IPv6(src="2001:2:1::3", dst=b) / IPv6ExtHdrFragment(m=0, offset=3, id=7, nh=17)
         / Raw(b"z" * 16), b, udp=1, frags=1)  # fmt: skip
    send(prog, exp, e / IPv6(src="2001:2:1::3", dst=b) / TCP(sport=3, dport=4, flags="S"), b, syn=1)
    send(prog, None, e / IPv6(src="2001:2:1::3", dst="2001:db8::1") / UDP(sport=3, dport=4))
    check(prog, exp, {a: 2, b: 1})


def test_new_flows_only_for_new_flows(prog: ProgHarness) -> None:
    prog.protect.install([group("g", "198.18.7.7/32")])
    f = bytes(ether() / IP(src="198.19.1.1", dst="198.18.7.7") / UDP(sport=4000, dport=80))
    prog.run(f, repeat=5)
    assert counted(prog)["198.18.7.7"]["new_flows"] == 1
    assert counted(prog)["198.18.7.7"]["packets"] == 5
    for i in range(3):
        prog.run(ether() / IP(src=f"198.19.1.{i + 2}", dst="198.18.7.7") / UDP(sport=4000, dport=80))
    prog.run(f)
    assert counted(prog)["198.18.7.7"]["new_flows"] == 4
    assert counted(prog)["198.18.7.7"]["packets"] == 9


def test_counted_whatever_the_verdict(prog: ProgHarness) -> None:
    prog.protect.install([group("g", "198.18.0.0/24")])
    prog.blocklist.add([Rule(parse_cidr("198.51.100.0/24"), "src")])
    prog.rules.install([parse_line("drop src=203.0.113.5 proto=udp")])
    e = ether()
    assert prog.run(e / IP(src="198.51.100.1", dst="198.18.0.1") / UDP(sport=1, dport=2)) == XDP_DROP
    assert prog.run(e / IP(src="203.0.113.5", dst="198.18.0.1") / UDP(sport=1, dport=2)) == XDP_DROP
    assert prog.run(e / IP(src="198.19.0.1", dst="198.18.0.1") / UDP(sport=1, dport=2)) == XDP_PASS
    row = counted(prog)["198.18.0.1"]
    assert (row["packets"], row["udp"]) == (3, 3)
    assert row["new_flows"] == 1  # dropped frames make no flow


def test_no_group_no_counting(prog: ProgHarness) -> None:
    e = ether()
    prog.run(e / IP(src="198.19.0.1", dst="198.18.0.1") / UDP(sport=1, dport=2))
    assert len(prog.protect.hosts()) == 0 and not prog.protect.enabled()
    prog.protect.install([group("g", "198.18.0.0/24")])
    prog.run(e / IP(src="198.19.0.1", dst="198.18.0.1") / UDP(sport=1, dport=2))
    assert len(prog.protect.hosts()) == 1
    prog.protect.install([])
    assert not prog.protect.enabled() and len(prog.protect.hosts()) == 0
    prog.run(e / IP(src="198.19.0.1", dst="198.18.0.1") / UDP(sport=1, dport=2))
    prog.run(e / IPv6(src="2001:2:1::1", dst="2001:2::1") / UDP(sport=1, dport=2))
    assert len(prog.protect.hosts()) == 0
    assert prog.protect.overflow() == {}


def test_overflow_when_full(make_prog: Any) -> None:
    with on_cpu(0):  # the host table is per CPU
        _overflow_when_full(make_prog(protect_hosts=3))  # rounded up to 4 slots


def _overflow_when_full(h: ProgHarness) -> None:
    h.protect.install([group("a", "198.18.0.0/24"), group("b", "2001:2::/64")])
    assert h.protect.capacity() == 4
    e = ether()
    for i in range(1, 4):
        h.run(e / IP(src="198.19.0.1", dst=f"198.18.0.{i}") / UDP(sport=1, dport=2))
    h.run(e / IPv6(src="2001:2:1::1", dst="2001:2::1") / UDP(sport=1, dport=2))
    assert len(h.protect.hosts()) == 4
    full4 = bytes(e / IP(src="198.19.0.1", dst="198.18.0.200") / TCP(sport=1, dport=2, flags="S"))
    h.run(full4, repeat=3)  # one new flow, three frames
    h.run(e / IP(src="198.19.0.1", dst="198.18.0.201") / ICMP())
    full6 = bytes(e / IPv6(src="2001:2:1::1", dst="2001:2::99") / UDP(sport=1, dport=2))
    h.run(full6)
    h.run(e / IP(src="198.19.0.1", dst="198.18.0.1") / UDP(sport=1, dport=2))  # a known host still counts
    assert h.protect.overflow() == {
        1: {"packets": 4, "bytes": 3 * len(full4) + 42, "new_flows": 2, "syn": 3, "udp": 0, "icmp": 1, "frags": 0},
        2: {"packets": 1, "bytes": len(full6), "new_flows": 1, "syn": 0, "udp": 1, "icmp": 0, "frags": 0},
    }
    assert counted(h)["198.18.0.1"]["packets"] == 2
    h.protect.forget([ip_address("198.18.0.2"), ip_address("198.18.0.3"), ip_address("198.18.0.77")])
    h.run(full4)
    assert counted(h)["198.18.0.200"]["packets"] == 1


def _ref_group(groups: list[Group], addr: Any) -> int:
    best, gid = -1, 0
    for i, g in enumerate(groups, start=1):
        for p in g.prefixes:
            if p.version == addr.version and addr in p and p.prefixlen > best:
                best, gid = p.prefixlen, i
    return gid


def _random_groups(rng: random.Random) -> list[Group]:
    """Nested prefixes of many lengths (more than XF_PLEVELS beyond /16, so
    levels merge) inside the test ranges."""
    seen: set[Prefix] = set()
    groups = []
    for gi in range(rng.randint(1, 6)):
        ps = []
        for _ in range(rng.randint(1, 20)):
            if rng.random() < 0.6:
                plen = rng.choice([15, 16, 17, 19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30, 31, 32])
                a = (198 << 24 | 18 << 16) + rng.randrange(1 << 17)
                p: Prefix = IPv4Network((a, plen), strict=False)
            else:
                plen = rng.choice([48, 52, 56, 60, 64, 72, 80, 96, 112, 120, 127, 128])
                a = (0x20010002 << 96) | (rng.randrange(1 << 16) << 64) | rng.randrange(1 << 64)
                p = IPv6Network((a, plen), strict=False)
            if p not in seen:
                seen.add(p)
                ps.append(p)
        groups.append(Group(f"g{gi}", tuple(ps)))
    return groups


def _random_dst(rng: random.Random, groups: list[Group]) -> Any:
    p = rng.choice([p for g in groups for p in g.prefixes])
    if rng.random() < 0.2:  # near, maybe outside
        p = p.supernet(new_prefix=max(0, p.prefixlen - rng.randint(1, 8)))
    if p.version == 4 and not p.subnet_of(ip_network("198.18.0.0/15")):
        p = ip_network("198.18.0.0/15")
    if p.version == 6 and not p.subnet_of(ip_network("2001:2::/48")):
        p = ip_network("2001:2::/48") if rng.random() < 0.5 else p
    return p[rng.randrange(p.num_addresses)]


def test_most_specific_group_wins(prog: ProgHarness) -> None:
    rng = random.Random(12)
    for _round in range(6):  # both slots, each rewritten
        groups = _random_groups(rng)
        c = compile_groups(groups)
        prog.protect.install(groups)
        before = {str(a): r["packets"] for a, r in counted(prog).items()}
        want: Counter[str] = Counter()
        for _ in range(300):
            dst = _random_dst(rng, groups)
            gid = _ref_group(groups, dst)
            assert c.group_of(dst) == gid, f"{dst}: compiled {c.group_of(dst)}, reference {gid}"
            l3 = IP(src="198.19.255.1", dst=str(dst)) if dst.version == 4 else IPv6(src="2001:2:ffff::1", dst=str(dst))
            prog.run(ether() / l3 / UDP(sport=1, dport=2))
            if gid:
                want[str(dst)] += 1
        got = counted(prog)
        for a, r in got.items():
            assert r["group"] == _ref_group(groups, ip_address(a)), a
            assert r["packets"] == before.get(a, 0) + want[a], a
        assert set(want) <= set(got)


def test_reinstall_keeps_or_regroups(prog: ProgHarness) -> None:
    groups = [group("a", "198.18.0.0/16"), group("b", "198.18.1.0/24")]
    prog.protect.install(groups)
    e = ether()
    for dst in ("198.18.0.1", "198.18.1.1"):
        prog.run(e / IP(src="198.19.0.1", dst=dst) / UDP(sport=1, dport=2))
    slot = prog.protect.active_slot()
    prog.protect.install(list(groups))  # the same set: nothing changes
    assert prog.protect.active_slot() == slot
    assert {a: r["group"] for a, r in counted(prog).items()} == {"198.18.0.1": 1, "198.18.1.1": 2}
    prog.protect.install([group("a", "198.18.0.0/16")])  # 198.18.1.1 moves to group a
    assert prog.protect.active_slot() != slot
    assert {a: r["group"] for a, r in counted(prog).items()} == {"198.18.0.1": 1}
    prog.run(e / IP(src="198.19.0.1", dst="198.18.1.1") / UDP(sport=1, dport=2))
    assert {a: r["group"] for a, r in counted(prog).items()} == {"198.18.0.1": 1, "198.18.1.1": 1}


def test_one_row_per_host_over_cpus(prog: ProgHarness) -> None:
    """Each CPU counts a host in its own slot; a reader sees one row, summed."""
    if len(os.sched_getaffinity(0)) < 2:
        return
    prog.protect.install([group("g", "198.18.0.0/24", "2001:2::/64")])
    f4 = bytes(ether() / IP(src="198.19.0.1", dst="198.18.0.9") / UDP(sport=1, dport=2))
    f6 = bytes(ether() / IPv6(src="2001:2:1::1", dst="2001:2::9") / TCP(sport=1, dport=2, flags="S"))
    with on_cpu(0):
        prog.run(f4, repeat=3)
        prog.run(f6)
    with on_cpu(1):
        prog.run(f4, repeat=2)
        prog.run(f6, repeat=4)
    got = counted(prog)
    assert (got["198.18.0.9"]["packets"], got["198.18.0.9"]["udp"]) == (5, 5)
    assert (got["2001:2::9"]["packets"], got["2001:2::9"]["syn"]) == (5, 5)
    assert got["198.18.0.9"]["new_flows"] == 1  # the flow table is shared by the CPUs
    assert len(prog.protect.hosts()) == 2
    assert prog.protect.forget([ip_address("198.18.0.9")]) == 1
    assert set(counted(prog)) == {"2001:2::9"}
