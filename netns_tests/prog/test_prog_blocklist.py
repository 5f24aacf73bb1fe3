"""The blocklist in the data plane: drops, hit counters, directions, longest
prefix, changes (add/delete/sync/flush) and monitor mode."""

from __future__ import annotations

import ipaddress
import random
import threading

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from xdpflow.dataplane import abi
from xdpflow.dataplane.blocklist import WAYS, bucket_of, l1_hash
from xdpflow.rules.blockfile import Rule, parse_cidr

from .. import frames
from ..frames import Model, ModelRule, check_model, ether, expect, flow_key, raw_udp4, read_flows
from ..progtest import XDP_DROP, XDP_PASS

# loaded programs from a pool shared by the session, reset before each test (frames.py)
prog_pool_fixture = frames.prog_pool_fixture
prog_fixture = frames.prog_fixture
make_prog_fixture = frames.make_prog_fixture

MONITOR = abi.C.XF_CFG_MONITOR


def R(cidr: str, direction: str = "src") -> Rule:
    return Rule(parse_cidr(cidr), direction)


def udp(src: str, dst: str, sport: int = 1111, dport: int = 2222) -> bytes:
    ip = IP(src=src, dst=dst) if ":" not in src else IPv6(src=src, dst=dst)
    return bytes(ether() / ip / UDP(sport=sport, dport=dport))


def hits(prog) -> dict[str, int]:
    return {f"{r.direction} {r.net}": n for r, n in prog.blocklist.listing()}


def set_monitor(prog, on: bool) -> None:
    """Flip only the monitor bit: the blocklist owns the other bits."""
    m = prog.map("config")
    cfg = m[0]
    cfg.flags = (cfg.flags | MONITOR) if on else (cfg.flags & ~MONITOR)
    m[0] = cfg


def model_of(prog, **kw) -> Model:
    return Model(rules=[ModelRule(r.net, r.direction, i) for r, i in prog.blocklist.entries().items()], **kw)


# --------------------------------------------------------------------------
# basics


def test_source_match_drops_without_flow(prog):
    prog.blocklist.add([R("198.51.100.0/24")])
    blocked = udp("198.51.100.7", "198.18.0.1")
    ok = udp("198.18.0.9", "198.18.0.1")
    assert prog.run(blocked) == XDP_DROP
    assert prog.run(ok) == XDP_PASS
    assert prog.counters() == expect((len(blocked), "ipv4", "dropped", "udp"), (len(ok), "ipv4", "passed", "udp"))
    assert read_flows(prog) == {flow_key("198.18.0.9", "198.18.0.1", 1111, 2222, 17): [1, 28, 0]}
    assert hits(prog) == {"src 198.51.100.0/24": 1}


def test_blocked_frames_count_in_their_class_and_protocol(prog):
    """The blocklist is consulted before the L4 header: even a frame whose
    TCP header is truncated is dropped and counted as ipv4/tcp."""
    prog.blocklist.add([R("198.51.100.0/24"), R("2001:db8::/32")])
    fs = [
        bytes(ether() / IP(src="198.51.100.1", dst="198.18.0.1") / TCP(sport=1, dport=2)),
        bytes(ether() / IP(src="198.51.100.1", dst="198.18.0.1", proto=6) / Raw(b"\0" * 7)),
        bytes(ether() / IPv6(src="2001:db8::1", dst="2001:2::1", nh=58) / Raw(b"\x80\0")),
        bytes(ether() / IP(src="198.51.100.2", dst="198.18.0.1", proto=47)),
    ]
    assert [prog.run(f) for f in fs] == [XDP_DROP] * 4
    assert prog.counters() == expect(
        (len(fs[0]), "ipv4", "dropped", "tcp"),
        (len(fs[1]), "ipv4", "dropped", "tcp"),
        (len(fs[2]), "ipv6", "dropped", "icmp"),
        (len(fs[3]), "ipv4", "dropped", "other"),
    )
    assert read_flows(prog) == {}
    assert hits(prog) == {"src 198.51.100.0/24": 3, "src 2001:db8::/32": 1}


def test_hit_counters_exact(prog):
    prog.blocklist.add([R("198.51.100.0/24"), R("203.0.113.0/24")])
    for i in range(7):
        assert prog.run(udp(f"198.51.100.{i}", "198.18.0.1")) == XDP_DROP
    assert prog.prog.test_run(udp("203.0.113.5", "198.18.0.1"), repeat=25).retval == XDP_DROP
    assert hits(prog) == {"src 198.51.100.0/24": 7, "src 203.0.113.0/24": 25}
    assert prog.counters()["dropped"] == 32


@pytest.mark.parametrize(
    ("rule", "inside", "outside"),
    [
        ("198.51.100.7/32", ["198.51.100.7"], ["198.51.100.6", "198.51.100.8", "198.51.101.7"]),
        ("2001:db8::7/128", ["2001:db8::7"], ["2001:db8::6", "2001:db8::8", "2001:db8:1::7"]),
        ("198.18.0.0/15", ["198.18.0.0", "198.19.255.255", "198.18.77.1"], ["198.51.100.1", "203.0.113.1"]),
        ("198.18.128.0/17", ["198.18.128.0", "198.18.255.255"], ["198.18.127.255", "198.19.128.0"]),
        ("198.18.4.0/22", ["198.18.4.0", "198.18.7.255"], ["198.18.3.255", "198.18.8.0"]),
        ("198.51.100.64/26", ["198.51.100.64", "198.51.100.127"], ["198.51.100.63", "198.51.100.128"]),
        ("198.51.100.4/31", ["198.51.100.4", "198.51.100.5"], ["198.51.100.3", "198.51.100.6"]),
        ("2001:2::/48", ["2001:2::1", "2001:2:0:ffff::1"], ["2001:2:1::1", "2001:db8::1"]),
        ("2001:db8:0:1::/64", ["2001:db8:0:1::99"], ["2001:db8:0:2::99", "2001:db8::1"]),
        ("2001:db8::/32", ["2001:db8::1", "2001:db8:ffff::1"], ["2001:2::1"]),
    ],
)
def test_prefix_boundaries(prog, rule, inside, outside):
    prog.blocklist.add([R(rule)])
    other = "2001:2::ffff" if ":" in rule else "198.18.0.1"
    for a in inside:
        assert prog.run(udp(a, other)) == XDP_DROP, a
    for a in outside:
        assert prog.run(udp(a, other)) == XDP_PASS, a
    assert hits(prog) == {f"src {rule}": len(inside)}
    assert len(read_flows(prog)) == len(outside)


def test_longest_prefix_wins(prog):
    prog.blocklist.add([R("198.51.100.0/24"), R("198.51.100.128/25"), R("198.51.100.200/32"), R("198.51.100.192/27")])
    for a in ("198.51.100.1", "198.51.100.130", "198.51.100.200", "198.51.100.201", "198.51.100.250"):
        assert prog.run(udp(a, "198.18.0.1")) == XDP_DROP
    assert hits(prog) == {
        "src 198.51.100.0/24": 1,
        "src 198.51.100.128/25": 2,
        "src 198.51.100.192/27": 1,
        "src 198.51.100.200/32": 1,
    }


def test_longest_prefix_wins_v6(prog):
    prog.blocklist.add([R("2001:db8::/32"), R("2001:db8:1::/48"), R("2001:db8:1:2::/64"), R("2001:db8:1:2::5/128")])
    for a in ("2001:db8:9::1", "2001:db8:1:9::1", "2001:db8:1:2::4", "2001:db8:1:2::5"):
        assert prog.run(udp(a, "2001:2::1")) == XDP_DROP
    assert hits(prog) == {
        "src 2001:db8::/32": 1,
        "src 2001:db8:1::/48": 1,
        "src 2001:db8:1:2::/64": 1,
        "src 2001:db8:1:2::5/128": 1,
    }


def test_dst_rules_match_destination_only(prog):
    prog.blocklist.add([R("203.0.113.0/24", "dst"), R("2001:db8::/32", "dst")])
    assert prog.run(udp("198.18.0.1", "203.0.113.9")) == XDP_DROP
    assert prog.run(udp("203.0.113.9", "198.18.0.1")) == XDP_PASS
    assert prog.run(udp("2001:2::1", "2001:db8::9")) == XDP_DROP
    assert prog.run(udp("2001:db8::9", "2001:2::1")) == XDP_PASS
    assert hits(prog) == {"dst 203.0.113.0/24": 1, "dst 2001:db8::/32": 1}
    assert set(read_flows(prog)) == {
        flow_key("203.0.113.9", "198.18.0.1", 1111, 2222, 17),
        flow_key("2001:db8::9", "2001:2::1", 1111, 2222, 17),
    }


def test_src_rule_in_same_range_as_dst_rule(prog):
    """A source that misses the source rules still goes through the
    destination rules; a source hit is counted for the source rule only."""
    prog.blocklist.add([R("198.51.100.0/25", "src"), R("198.51.100.0/24", "dst")])
    assert prog.run(udp("198.51.100.200", "198.51.100.1")) == XDP_DROP  # src misses /25, dst hits
    assert prog.run(udp("198.51.100.1", "198.51.100.2")) == XDP_DROP  # src hits
    assert prog.run(udp("198.51.100.200", "198.18.0.1")) == XDP_PASS
    assert hits(prog) == {"src 198.51.100.0/25": 1, "dst 198.51.100.0/24": 1}


def test_v4_rules_never_match_v6_and_back(prog):
    prog.blocklist.add([R("198.18.0.0/15"), R("2001:db8::/32", "dst")])
    assert prog.run(udp("2001:2::1", "2001:2::2")) == XDP_PASS
    assert prog.run(udp("198.51.100.1", "203.0.113.1")) == XDP_PASS
    assert hits(prog) == {"src 198.18.0.0/15": 0, "dst 2001:db8::/32": 0}


# --------------------------------------------------------------------------
# changes


def test_delete_restores_passing(prog):
    prog.blocklist.add([R("198.51.100.0/24"), R("2001:db8::/32")])
    assert prog.run(udp("198.51.100.1", "198.18.0.1")) == XDP_DROP
    assert prog.run(udp("2001:db8::1", "2001:2::1")) == XDP_DROP
    prog.blocklist.delete([R("198.51.100.0/24"), R("2001:db8::/32")])
    assert prog.run(udp("198.51.100.1", "198.18.0.1")) == XDP_PASS
    assert prog.run(udp("2001:db8::1", "2001:2::1")) == XDP_PASS
    assert hits(prog) == {}
    assert prog.map("config")[0].flags == 0
    assert len(read_flows(prog)) == 2


def test_delete_one_of_two_in_same_slot_keeps_the_other(prog):
    """Both /25s share a /16 (IPv4 table) and both /64s a /48 (IPv6
    table region): deleting one must not unblock the other."""
    prog.blocklist.add([R("198.51.100.0/25"), R("198.51.100.128/25"), R("2001:db8:0:1::/64"), R("2001:db8:0:2::/64")])
    prog.blocklist.delete([R("198.51.100.0/25"), R("2001:db8:0:1::/64")])
    assert prog.run(udp("198.51.100.1", "198.18.0.1")) == XDP_PASS
    assert prog.run(udp("198.51.100.129", "198.18.0.1")) == XDP_DROP
    assert prog.run(udp("2001:db8:0:1::1", "2001:2::1")) == XDP_PASS
    assert prog.run(udp("2001:db8:0:2::1", "2001:2::1")) == XDP_DROP
    assert hits(prog) == {"src 198.51.100.128/25": 1, "src 2001:db8:0:2::/64": 1}


def test_delete_inner_rule_falls_back_to_outer(prog):
    prog.blocklist.add([R("198.18.0.0/15"), R("198.18.5.0/24"), R("198.18.5.7/32")])
    prog.blocklist.delete([R("198.18.5.7/32")])
    assert prog.run(udp("198.18.5.7", "203.0.113.1")) == XDP_DROP
    prog.blocklist.delete([R("198.18.5.0/24")])
    assert prog.run(udp("198.18.5.7", "203.0.113.1")) == XDP_DROP
    assert hits(prog) == {"src 198.18.0.0/15": 1}
    prog.blocklist.delete([R("198.18.0.0/15")])
    assert prog.run(udp("198.18.5.7", "203.0.113.1")) == XDP_PASS


def test_delete_outer_rule_keeps_inner(prog):
    prog.blocklist.add([R("198.18.0.0/15"), R("198.18.5.0/24"), R("198.19.0.0/28")])
    prog.blocklist.delete([R("198.18.0.0/15")])
    assert prog.run(udp("198.18.5.7", "203.0.113.1")) == XDP_DROP
    assert prog.run(udp("198.19.0.15", "203.0.113.1")) == XDP_DROP
    assert prog.run(udp("198.18.6.7", "203.0.113.1")) == XDP_PASS
    assert prog.run(udp("198.19.0.16", "203.0.113.1")) == XDP_PASS
    assert hits(prog) == {"src 198.18.5.0/24": 1, "src 198.19.0.0/28": 1}


def test_flush_restores_passing_and_keeps_monitor_bit(prog):
    set_monitor(prog, True)
    prog.blocklist.add([R("198.51.100.0/24"), R("203.0.113.0/24", "dst"), R("2001:db8::/32"), R("2001:2::/48", "dst")])
    assert prog.map("config")[0].flags == MONITOR | sum(
        getattr(abi.C, f) for f in ("XF_CFG_BL4_SRC", "XF_CFG_BL4_DST", "XF_CFG_BL6_SRC", "XF_CFG_BL6_DST")
    )
    prog.blocklist.flush()
    assert prog.map("config")[0].flags == MONITOR
    set_monitor(prog, False)
    for f in (udp("198.51.100.1", "203.0.113.1"), udp("2001:db8::1", "2001:2::1")):
        assert prog.run(f) == XDP_PASS
    assert prog.counters()["monitored"] == 0
    assert hits(prog) == {}


def test_sync_to_a_new_list(prog):
    prog.blocklist.add([R("198.51.100.0/24"), R("2001:db8:1::/48"), R("203.0.113.0/25")])
    change = prog.blocklist.sync([R("203.0.113.0/25"), R("203.0.113.128/25", "dst"), R("2001:db8:2::/48")])
    assert sorted(map(str, change.added)) == ["dst 203.0.113.128/25", "src 2001:db8:2::/48"]
    assert sorted(map(str, change.deleted)) == ["src 198.51.100.0/24", "src 2001:db8:1::/48"]
    verdicts = {
        ("198.51.100.1", "198.18.0.1"): XDP_PASS,
        ("2001:db8:1::1", "2001:2::1"): XDP_PASS,
        ("203.0.113.1", "198.18.0.1"): XDP_DROP,
        ("198.18.0.1", "203.0.113.200"): XDP_DROP,
        ("203.0.113.200", "198.18.0.1"): XDP_PASS,
        ("2001:db8:2::1", "2001:2::1"): XDP_DROP,
    }
    assert {k: prog.run(udp(*k)) for k in verdicts} == verdicts
    assert hits(prog) == {"src 203.0.113.0/25": 1, "dst 203.0.113.128/25": 1, "src 2001:db8:2::/48": 1}


def test_reused_rule_index_starts_at_zero_hits(prog):
    prog.blocklist.add([R("198.51.100.0/24")])
    idx = prog.blocklist.entries()[R("198.51.100.0/24")]
    for _ in range(3):
        prog.run(udp("198.51.100.1", "198.18.0.1"))
    prog.blocklist.delete([R("198.51.100.0/24")])
    prog.blocklist.add([R("203.0.113.0/24")])
    assert prog.blocklist.entries()[R("203.0.113.0/24")] == idx
    assert hits(prog) == {"src 203.0.113.0/24": 0}
    prog.run(udp("203.0.113.1", "198.18.0.1"))
    assert hits(prog) == {"src 203.0.113.0/24": 1}


# --------------------------------------------------------------------------
# monitor mode


def test_monitor_mode_passes_and_counts(prog):
    prog.blocklist.add([R("198.51.100.0/24"), R("2001:db8::/32", "dst")])
    set_monitor(prog, True)
    assert prog.map("config")[0].flags & abi.C.XF_CFG_BL4_SRC  # the blocklist's bits survived
    fs = [
        udp("198.51.100.1", "198.18.0.1"),
        bytes(ether() / IP(src="198.51.100.2", dst="198.18.0.1") / TCP(sport=1, dport=2)),
        udp("2001:2::1", "2001:db8::1"),
        udp("198.18.0.5", "198.18.0.1"),
    ]
    assert [prog.run(f) for f in fs] == [XDP_PASS] * 4
    assert prog.counters() == expect(
        (len(fs[0]), "ipv4", "passed", "udp"),
        (len(fs[1]), "ipv4", "passed", "tcp"),
        (len(fs[2]), "ipv6", "passed", "udp"),
        (len(fs[3]), "ipv4", "passed", "udp"),
        monitored=3,
        monitored_bytes=len(fs[0]) + len(fs[1]) + len(fs[2]),
    )
    assert hits(prog) == {"src 198.51.100.0/24": 2, "dst 2001:db8::/32": 1}
    # monitored frames create no flow; the rest do
    assert read_flows(prog) == {flow_key("198.18.0.5", "198.18.0.1", 1111, 2222, 17): [1, 28, 0]}
    # and blocklist changes keep the monitor bit
    prog.blocklist.add([R("203.0.113.0/24")])
    prog.blocklist.delete([R("198.51.100.0/24")])
    assert prog.map("config")[0].flags & MONITOR
    set_monitor(prog, False)
    assert prog.run(udp("2001:2::1", "2001:db8::1")) == XDP_DROP


def test_monitor_with_sink(make_prog):
    prog = make_prog(sink=True)
    prog.blocklist.add([R("198.51.100.0/24")])
    set_monitor(prog, True)
    f = udp("198.51.100.1", "198.18.0.1")
    assert prog.run(f) == XDP_DROP
    assert prog.counters() == expect((len(f), "ipv4", "sunk", "udp"), monitored=1, monitored_bytes=len(f))
    assert read_flows(prog) == {}


# --------------------------------------------------------------------------
# many rules against the reference model


def _random_v4_rules(rng: random.Random, n: int) -> list[Rule]:
    base = int(ipaddress.IPv4Address("198.18.0.0"))
    out = set()
    while len(out) < n:
        plen = rng.choice([15, 16, 16, 17, 19, 20, 22, 23, 24, 24, 25, 26, 28, 30, 31, 32, 32])
        # cluster the rules in a few /16s and /24s so they nest
        addr = base + rng.choice([0, 1 << 16]) + (rng.choice([5, 6, 200]) << 8) + rng.randrange(256)
        if rng.random() < 0.3:
            addr = base + rng.randrange(1 << 17)
        net = ipaddress.IPv4Network((addr, plen), strict=False)
        out.add(Rule(net, rng.choice(["src", "src", "dst"])))
    return sorted(out)


def _random_v4_addr(rng: random.Random, rules: list[Rule]) -> int:
    if rules and rng.random() < 0.7:
        net = rng.choice(rules).net
        a = int(net.network_address) + rng.randrange(net.num_addresses)
        return a + rng.choice([0, 0, 0, -1, 1, 256, -256]) & 0xFFFFFFFF
    return int(ipaddress.IPv4Address("198.18.0.0")) + rng.randrange(1 << 17)


def _check_against_model(prog, rng: random.Random, n_frames: int, prior: Model | None = None) -> Model:
    model = model_of(prog)
    if prior is not None:
        model.hits = prior.hits
    rules = [Rule(r.net, r.direction) for r in model.rules]
    fs = [raw_udp4(_random_v4_addr(rng, rules), _random_v4_addr(rng, rules), i, 53) for i in range(n_frames)]
    before = prog.counters()
    got = [prog.run(f) for f in fs]
    want = [model.feed(f) for f in fs]
    bad = [
        (ipaddress.ip_address(f[26:30]), ipaddress.ip_address(f[30:34]), g, w)
        for f, g, w in zip(fs, got, want, strict=True)
        if g != w
    ]
    assert bad == [], bad[:10]
    check_model(prog, model, before)
    entries = prog.blocklist.entries()
    by_index = {i: f"{r.direction} {r.net}" for r, i in entries.items()}
    assert hits(prog) == {by_index[i]: model.hits.get(i, 0) for i in by_index}
    return model


def test_nested_v4_rules_against_model(prog):
    rng = random.Random(4242)
    rules = _random_v4_rules(rng, 60)
    prog.blocklist.add(rules)
    m = _check_against_model(prog, rng, 3000)
    # delete a third, check again (hits of surviving rules keep counting)
    gone = rng.sample(rules, 20)
    prog.blocklist.delete(gone)
    survivors = {i for r, i in prog.blocklist.entries().items()}
    m.hits = type(m.hits)({i: n for i, n in m.hits.items() if i in survivors})
    m = _check_against_model(prog, rng, 3000, m)
    # sync to a fresh random list
    prog.blocklist.sync(_random_v4_rules(rng, 50))
    kept = prog.blocklist.entries()
    m.hits = type(m.hits)({i: n for i, n in m.hits.items() if i in set(kept.values())})
    _check_against_model(prog, rng, 3000, m)


def test_many_v6_rules_against_model(prog):
    rng = random.Random(66)
    rules = set()
    while len(rules) < 40:
        plen = rng.choice([32, 33, 40, 47, 48, 56, 63, 64, 100, 127, 128])
        base = rng.choice(["2001:db8::", "2001:db8:7::", "2001:2::"])
        addr = int(ipaddress.IPv6Address(base)) + (rng.randrange(1 << 16) << rng.choice([0, 64, 72, 80]))
        net = ipaddress.IPv6Network((addr, max(plen, 48) if base == "2001:2::" else plen), strict=False)
        rules.add(Rule(net, rng.choice(["src", "dst"])))
    prog.blocklist.add(rules)
    model = model_of(prog)
    rl = sorted(rules)
    fs = []
    for i in range(2000):
        pick = []
        for _ in range(2):
            if rng.random() < 0.7:
                net = rng.choice(rl).net
                a = int(net.network_address) + rng.randrange(min(net.num_addresses, 1 << 20))
            else:
                a = int(ipaddress.IPv6Address(rng.choice(["2001:db8::", "2001:2::"]))) + rng.randrange(1 << 80)
            pick.append(str(ipaddress.IPv6Address(a)))
        fs.append(udp(pick[0], pick[1], sport=i))
    assert [prog.run(f) for f in fs] == [model.feed(f) for f in fs]
    check_model(prog, model)
    by_index = {i: f"{r.direction} {r.net}" for r, i in prog.blocklist.entries().items()}
    assert hits(prog) == {by_index[i]: model.hits.get(i, 0) for i in by_index}


def test_match_all_rules(prog):
    """/0 rules: every IPv4 /16 entry and every IPv6 L0 entry."""
    prog.blocklist.add([R("0.0.0.0/0"), R("::/0", "dst"), R("2001:db8::/32")])
    assert prog.run(udp("198.18.0.1", "198.19.0.1")) == XDP_DROP
    assert prog.run(udp("203.0.113.255", "198.51.100.1")) == XDP_DROP
    assert prog.run(udp("2001:2::1", "2001:2::2")) == XDP_DROP  # dst ::/0
    assert prog.run(udp("2001:db8::1", "2001:2::2")) == XDP_DROP  # src /32 first
    assert hits(prog) == {"src 0.0.0.0/0": 2, "dst ::/0": 1, "src 2001:db8::/32": 1}
    prog.blocklist.delete([R("0.0.0.0/0"), R("::/0", "dst")])
    assert prog.run(udp("198.18.0.1", "198.19.0.1")) == XDP_PASS
    assert prog.run(udp("2001:2::1", "2001:2::2")) == XDP_PASS
    assert prog.run(udp("2001:db8::1", "2001:2::2")) == XDP_DROP


def test_sync_dry_run_changes_nothing(prog):
    prog.blocklist.add([R("198.51.100.0/24")])
    change = prog.blocklist.sync([R("203.0.113.0/24")], dry_run=True)
    assert ([str(r) for r in change.added], [str(r) for r in change.deleted]) == (
        ["src 203.0.113.0/24"],
        ["src 198.51.100.0/24"],
    )
    assert prog.run(udp("198.51.100.1", "198.18.0.1")) == XDP_DROP
    assert prog.run(udp("203.0.113.1", "198.18.0.1")) == XDP_PASS
    assert hits(prog) == {"src 198.51.100.0/24": 1}


def test_changes_never_unblock_what_stays_listed(prog):
    """While rules around them come and go, addresses covered by rules that
    stay listed are dropped by every frame that runs meanwhile (test runs
    in a second thread; cffi releases the GIL during the syscall)."""
    keep = [R("198.18.0.0/16"), R("198.19.7.0/24"), R("198.19.8.9/32"), R("2001:db8:1::/48")]
    probes = [
        raw_udp4(int(ipaddress.IPv4Address(a)), 0xCB007101, 1, 2)
        for a in ("198.18.5.5", "198.18.200.1", "198.19.7.7", "198.19.8.9")
    ] + [udp("2001:db8:1::5", "2001:2::1")]
    rng = random.Random(9)

    def churn() -> list[Rule]:
        out = set(keep)
        for _ in range(rng.randint(0, 12)):
            third = rng.choice([5, 7, 8, 200])
            plen = rng.choice([17, 20, 24, 25, 28, 32])
            base = rng.choice(["198.18", "198.19"])
            out.add(R(str(ipaddress.IPv4Network((f"{base}.{third}.{rng.randrange(256)}", plen), strict=False))))
            out.add(R(str(ipaddress.IPv6Network((f"2001:db8:1:{rng.randrange(9)}::", 64)))))
        return sorted(out)

    prog.blocklist.sync(keep)
    stop = threading.Event()
    seen: list[int] = []

    def probe() -> None:
        run = prog.prog.test_run
        while not stop.is_set():
            for f in probes:
                seen.append(run(f, data_out=False).retval)

    t = threading.Thread(target=probe)
    t.start()
    try:
        for _ in range(12):
            prog.blocklist.sync(churn())
        prog.blocklist.sync(keep)
    finally:
        stop.set()
        t.join()
    assert len(seen) >= 100
    assert set(seen) == {XDP_DROP}


# --------------------------------------------------------------------------
# the IPv6 array: full buckets and changes


def colliding_64s(n: int) -> list[str]:
    """n /64s inside 2001:db8::/32 whose regions share one bucket of the
    IPv6 array (more than it has slots)."""
    rnd = np.random.default_rng(5)
    hi = (np.uint64(0x2001_0DB8) << np.uint64(32)) | rnd.integers(0, 1 << 32, 1 << 21, dtype=np.uint64)
    b = bucket_of(hi, np.zeros(len(hi), np.uint64), np.full(len(hi), 64, np.uint32))
    same = np.unique(hi[b == b[0]])[:n]
    assert len(same) == n
    return [str(ipaddress.IPv6Network((int(h) << 64, 64))) for h in same]


def bucket_state(prog, cidrs: list[str]) -> tuple[int, int, int]:
    """(live slots, the overflow flag, overflow hash entries) of the bucket of cidrs."""
    net = ipaddress.IPv6Network(cidrs[0])
    hi = np.array([int(net.network_address) >> 64], np.uint64)
    b = int(bucket_of(hi, np.zeros(1, np.uint64), np.array([64], np.uint32))[0])
    bucket = prog.map("bl6_tab_src")[b]
    return sum(1 for w in range(WAYS) if bucket.s[w].plen), bucket.ovf, len(prog.map("bl6_deep_src"))


def check_verdicts(prog, listed: list[str], unlisted: list[str]) -> None:
    before = hits(prog)
    for c in listed:
        net = ipaddress.IPv6Network(c)
        assert prog.run(udp(str(net.network_address + 7), "2001:2::1")) == XDP_DROP, c
    for c in unlisted:
        assert prog.run(udp(str(ipaddress.IPv6Network(c).network_address + 7), "2001:2::1")) == XDP_PASS, c
    after = hits(prog)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {
        f"src {c}": 1 for c in listed
    }


def test_a_full_bucket_sends_the_rest_to_the_hash(prog):
    """Seven /64s in one four-slot bucket: four in the array, three in the
    overflow hash behind the bucket's flag; adds and deletes keep every
    unchanged rule matching, and freed slots take the hash's regions back."""
    cidrs = colliding_64s(10)
    first, spare = cidrs[:7], cidrs[7:]
    prog.blocklist.add([R(c) for c in first])
    assert bucket_state(prog, first) == (WAYS, 1, 3)
    check_verdicts(prog, first, spare)

    # two out, one in: the newcomer finds no slot free before the change
    now = first[2:] + spare[:1]
    prog.blocklist.sync([R(c) for c in now])
    check_verdicts(prog, now, first[:2] + spare[1:])
    live, ovf, in_hash = bucket_state(prog, now)
    assert (live, ovf) == (WAYS - 2, 1) and in_hash == 4

    # the next change (another /16) moves hash regions into the freed slots
    prog.blocklist.add([R("2001:2:7::/48")])
    assert bucket_state(prog, now) == (WAYS, 1, 2)
    check_verdicts(prog, now, first[:2] + spare[1:])

    prog.blocklist.sync([R(c) for c in now[:3]])
    prog.blocklist.add([R("2001:2:8::/48")])
    assert bucket_state(prog, now) == (3, 0, 0)
    check_verdicts(prog, now[:3], now[3:] + first[:2])
    prog.blocklist.flush()
    assert bucket_state(prog, now) == (0, 0, 0)


def test_v6_l1_slots_answer_start_the_walk_or_send_it_whole(prog):
    """Every state of a /32's L1 slot (XF_BL6_L1_*) against the model: a /32
    rule with nothing inside it (the slot answers), regions below a /32
    marker (the walk starts at /48), a /32 of the same /16 with no regions
    (an empty or foreign slot answers), and slots forced to "walk" (the whole
    walk from L0, as for two /32s that share a slot)."""
    rules = [
        R("2001:db8::/32"),
        R("2001:db8:1::/48"),
        R("2001:db8:1:2::/64"),
        R("2001:db8:1:2::7/128"),
        R("2001:2:0:5::/64"),
        R("2001:2:0:6::/80", "dst"),
    ]
    prog.blocklist.add(rules)
    addrs = [
        "2001:db8::1",
        "2001:db8:1::1",
        "2001:db8:1:2::7",
        "2001:db8:1:2::8",
        "2001:db8:1:3::1",
        "2001:db8:9::1",
        "2001:2::1",
        "2001:2:0:5::1",
        "2001:2:0:6::1",
        "2001:2:0:6:1::1",
    ]
    fs = [udp(a, b, sport=i) for i, (a, b) in enumerate((a, b) for a in addrs for b in addrs)]
    model = model_of(prog)
    l1 = prog.map("bl6_l1_src")
    slots = {int(k): int(v) for k, v in l1.items() if int(v)}
    db8, two = (int(t) for t in l1_hash(np.array([0x2001_0DB8 << 16, 0x2001_0002 << 16], dtype=np.uint64))[1])
    assert {v >> 32 for v in slots.values()} == {db8, two}  # the /32s: 2001::/16's first level
    assert [prog.run(f) for f in fs] == [model.feed(f) for f in fs]
    for m in (l1, prog.map("bl6_l1_dst")):
        for k, v in list(m.items()):
            if int(v):
                m[k] = abi.C.XF_BL6_L1_WALK
    assert [prog.run(f) for f in fs] == [model.feed(f) for f in fs]
    # the next change writes every slot it needs again, and clears the rest
    prog.blocklist.delete([R("2001:2:0:5::/64")])
    model.rules = model_of(prog).rules
    assert {int(v) >> 32 for v in l1.values() if int(v)} == {db8}
    assert [prog.run(f) for f in fs] == [model.feed(f) for f in fs]
    check_model(prog, model)
