"""The IPv4 blocklist table against a reference longest-prefix match.

Random, heavily nested rule sets (every prefix length from /8 to /32, both
directions) are loaded into the program, then frames from addresses inside,
at the edges of and outside the rules must get exactly the verdict and the
rule hit that a plain longest-prefix match over the rule list gives. Syncing
from one random set to another must leave the table equal to a fresh build.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from xdpflow.dataplane.blocklist import CHUNK, V4_LEVELS
from xdpflow.rules.blockfile import Rule

from ..progtest import XDP_DROP, XDP_PASS

BASES = ["198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24"]


def random_rules(rnd: random.Random, n: int) -> list[Rule]:
    rules: set[Rule] = set()
    while len(rules) < n:
        base = ipaddress.ip_network(rnd.choice(BASES))
        plen = rnd.randint(max(base.prefixlen, 8), 32)
        addr = int(base.network_address) | rnd.getrandbits(32 - base.prefixlen)
        rules.add(Rule(ipaddress.IPv4Network((addr, plen), strict=False), rnd.choice(["src", "src", "dst"])))
    return sorted(rules)


def reference(rules: list[Rule], src: int, dst: int) -> Rule | None:
    """Source rules first, then destination rules; longest prefix wins."""
    for direction, addr in (("src", src), ("dst", dst)):
        best = None
        for r in rules:
            if r.direction == direction and (addr >> (32 - r.net.prefixlen) if r.net.prefixlen else 0) == (
                int(r.net.network_address) >> (32 - r.net.prefixlen) if r.net.prefixlen else 0
            ):
                if best is None or r.net.prefixlen > best.net.prefixlen:
                    best = r
        if best is not None:
            return best
    return None


def probe_addresses(rnd: random.Random, rules: list[Rule], n: int) -> list[int]:
    out = []
    for _ in range(n):
        r = rnd.choice(rules).net
        lo, hi = int(r.network_address), int(r.broadcast_address)
        out.append(rnd.choice([lo, hi, rnd.randint(lo, hi), lo - 1, hi + 1, rnd.getrandbits(17) | 0xC6120000]))
    return [a & 0xFFFFFFFF for a in out]


def frame(src: int, dst: int) -> bytes:
    return bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src=str(ipaddress.IPv4Address(src)), dst=str(ipaddress.IPv4Address(dst)))
        / UDP(sport=1, dport=2)
    )


def check(prog, rules: list[Rule], rnd: random.Random, probes: int) -> None:
    srcs = probe_addresses(rnd, rules, probes)
    dsts = probe_addresses(rnd, rules, probes)
    before = dict(prog.blocklist.listing())
    expected_hits: dict[Rule, int] = {}
    for s, d in zip(srcs, dsts):
        want = reference(rules, s, d)
        got = prog.run(frame(s, d))
        assert got == (XDP_DROP if want else XDP_PASS), (
            ipaddress.IPv4Address(s),
            ipaddress.IPv4Address(d),
            want,
        )
        if want:
            expected_hits[want] = expected_hits.get(want, 0) + 1
    after = dict(prog.blocklist.listing())
    assert {r: after[r] - before.get(r, 0) for r in after if after[r] != before.get(r, 0)} == expected_hits


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_table_matches_longest_prefix_reference(prog, seed):
    rnd = random.Random(seed)
    rules = random_rules(rnd, 300)
    prog.blocklist.add(rules)
    check(prog, rules, rnd, 1500)


def test_sync_between_random_sets_equals_a_fresh_build(prog, make_prog):
    rnd = random.Random(42)
    a, b = random_rules(rnd, 250), random_rules(rnd, 250)
    b = sorted(set(b) | set(a[:100]))  # share some rules
    prog.blocklist.sync(a)
    check(prog, a, rnd, 500)
    prog.blocklist.sync(b)
    assert prog.blocklist.rules() == b
    check(prog, b, rnd, 1000)

    fresh = make_prog()
    fresh.blocklist.sync(b)
    # the same rules may hold other indices; compare the tables' shapes
    for names in V4_LEVELS.values():
        for name in names[1:]:
            assert sorted(k for k, _ in prog.map(name).items()) == sorted(k for k, _ in fresh.map(name).items()), name
    prog.blocklist.flush()
    for names in V4_LEVELS.values():
        assert len(prog.map(names[1])) == 0 and len(prog.map(names[2])) == 0
        assert not any(v for _, v in prog.map(names[0]).items())


def test_dense_16s_go_through_chunks(prog):
    """/16s holding many /24s (and hosts, and a /16 rule around them) get a
    chunk of the /24 array: the kernel's walk through it answers like the
    reference, before and after a change that moves rules in and out."""
    rnd = random.Random(7)
    dense = [Rule(ipaddress.IPv4Network((0xC6120000 | (i << 8), 24)), "src") for i in rnd.sample(range(256), 40)]
    dense += [Rule(ipaddress.IPv4Network((0xC6130000 | rnd.getrandbits(16), 32)), "src") for _ in range(30)]
    dense += [Rule(ipaddress.ip_network("198.19.0.0/16"), "src")]
    dense += [Rule(ipaddress.IPv4Network((0xC6130000 | (i << 8), 24)), "src") for i in rnd.sample(range(256), 12)]
    prog.blocklist.add(dense)
    l1 = prog.map("bl4_l1_src")
    assert l1[0xC612] & CHUNK and l1[0xC613] & CHUNK
    check(prog, dense, rnd, 1500)
    fewer = sorted(
        set(dense[::2]) | {Rule(ipaddress.IPv4Network((0xC6120000 | (i << 8), 24)), "src") for i in (1, 2, 3)}
    )
    prog.blocklist.sync(fewer)
    check(prog, fewer, rnd, 1500)


def test_hosts_go_through_host_chunks(prog):
    """Host rules (a /16 of nothing but hosts, hosts under a /24 rule, a /30)
    are answered from the host chunks: the program's verdicts and hits are
    the reference's, before and after a sync that moves hosts in and out."""
    rnd = random.Random(11)
    rules = [Rule(ipaddress.IPv4Network((0xCB007100 | rnd.getrandbits(8), 32)), "src") for _ in range(20)]
    rules += [Rule(ipaddress.IPv4Network((0xC6120000 | rnd.getrandbits(16), 32)), "src") for _ in range(40)]
    rules += [Rule(ipaddress.ip_network("198.18.7.0/24"), "src"), Rule(ipaddress.ip_network("198.18.7.9/32"), "src")]
    rules += [Rule(ipaddress.ip_network("198.51.100.4/30"), "dst")]
    rules = sorted(set(rules))
    prog.blocklist.add(rules)
    l2h, l3c = prog.map("bl4_l2h_src"), prog.map("bl4_l3c_src")
    assert prog.map("bl4_l1_src")[0xCB00] & CHUNK
    pointers = [v for _, v in l2h.items() if v]
    assert len(pointers) >= 20 and any(v for _, v in l3c.items())
    check(prog, rules, rnd, 1500)
    fewer = sorted(set(rules[::3]) | {Rule(ipaddress.ip_network("203.0.113.77/32"), "src")})
    prog.blocklist.sync(fewer)
    check(prog, fewer, rnd, 1500)
