"""Rules without a kernel: the grammar, validation, and the compiled tables
against the plain reference classifier."""

from __future__ import annotations

import errno
import ipaddress
import random

import pytest

from xdpflow.errors import MapFullError
from xdpflow.rules import rulespec
from xdpflow.rules.compile import CHUNK, Compiled, Geometry, compile_rules
from xdpflow.rules.rulespec import RuleError, RulesFileError, RuleSpec, parse_line, parse_lines

from ..rules_ref import Pkt, _addr_class, random_pkt, random_rule, reference, via_tables

GEO = Geometry(rules=1024, words=20, classes=16384, addr_entries=262144)
NOW = 1_700_000_000


def test_line_parses_every_field() -> None:
    r = parse_line(
        "rate-limit src=198.18.0.0/15 dst=198.19.0.1 proto=tcp sport=1-1023 dport=443 tcp-flags=SYN,!ACK "
        "length=40-60 iface=eth0 pps=2k bps=1M priority=10 ttl=10m # SYN flood guard",
        now=NOW,
    )
    assert r is not None
    assert r.action == "rate-limit"
    assert r.src == ipaddress.ip_network("198.18.0.0/15")
    assert r.dst == ipaddress.ip_network("198.19.0.1/32")
    assert (r.proto, r.sport, r.dport, r.length) == (6, (1, 1023), (443, 443), (40, 60))
    assert r.tcp_flags == (0x12, 0x02)
    assert (r.iface, r.pps, r.bps, r.priority) == ("eth0", 2000, 1_000_000, 10)
    assert r.expires_at == NOW + 600
    assert r.comment == "SYN flood guard"
    # the canonical line reads back as the same rule
    assert parse_line(r.line(), now=NOW) == r


def test_icmp_and_defaults() -> None:
    r = parse_line("drop icmp-type=8/0", now=NOW)
    assert r is not None and r.icmp_type == (8, 0) and r.protos() == {1, 58}
    assert r.priority == rulespec.DEFAULT_PRIORITY and r.expires_at is None
    assert parse_line("   # only a comment") is None
    assert parse_line("") is None
    assert parse_line("pass dport=53").protos() == {6, 17}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("drop colour=red", "unknown field 'colour'"),
        ("drop dport=65536", "destination port 65536 is outside 0-65535"),
        ("drop sport=-1", "source port must be a number"),
        ("drop dport=90-80", "reversed"),
        ("drop proto=udp tcp-flags=SYN", "tcp-flags needs proto tcp"),
        ("drop pps=100", "pps and bps only go with action rate-limit"),
        ("rate-limit src=198.18.0.1", "rate-limit needs pps, bps or both"),
        ("drop ttl=0s", "not in the future"),
        ("drop ttl=soon", "is not a duration"),
        ("drop expires=1000", "expiry is in the past"),
        ("drop src=198.18.0.1 dst=2001:2::1", "different address families"),
        ("drop src=198.18.0.1/15", "host bits"),
        ("drop proto=gre dport=80", "ports need proto tcp or udp"),
        ("drop proto=tcp icmp-type=8", "icmp-type needs proto icmp"),
        ("explode src=198.18.0.1", "unknown action"),
        ("drop tcp-flags=SYN,BOGUS", "unknown TCP flag"),
        ("drop proto=300", "outside 0-255"),
        ("drop src=198.18.0.1 src=198.18.0.2", "given twice"),
        ("drop priority=70000", "outside 0-65535"),
        ("drop length=0-70000", "outside 0-65535"),
    ],
)
def test_bad_input(line: str, reason: str) -> None:
    with pytest.raises(RuleError, match=reason):
        parse_line(line, now=NOW)


def test_file_error_names_path_line_and_text() -> None:
    with pytest.raises(RulesFileError) as e:
        parse_lines(["# rules", "drop dport=80", "drop dport=80-70 # oops"], "r.rules", now=NOW)
    assert (
        str(e.value) == "r.rules:3: destination port range '80-70' is reversed (write 70-80): 'drop dport=80-70 # oops'"
    )


def _check(rules: list[RuleSpec], pkts: list[Pkt], now: float | None = None) -> int:
    c = compile_rules(rules, GEO)
    hits = 0
    for p in pkts:
        want = reference(rules, p, now)
        assert via_tables(c, p, now) is want, p
        hits += want is not None
    return hits


def test_tables_agree_with_reference() -> None:
    rng = random.Random(11)
    ifaces = ("veth0", "veth1")
    rules = [random_rule(rng, i + 1, ifaces) for i in range(1024)]
    pkts = [random_pkt(rng, ifaces + ("other",)) for _ in range(5000)]
    assert _check(rules, pkts) > 1000
    # a sparse set, where most packets match nothing
    sparse = [r for r in rules if r.src is not None and r.src.prefixlen >= 24 and r.src.version == 4]
    hits = _check(sparse, pkts)
    assert 0 < hits < len(pkts) // 2


def test_expired_rule_gives_way_to_the_next() -> None:
    a = RuleSpec("drop", priority=1, proto=17, expires_at=NOW + 10, id=1)
    b = RuleSpec("pass", priority=2, proto=17, id=2)
    p = Pkt(4, bytes(4), bytes(4), 17, 1, 2, True, 0, 28)
    c = compile_rules([a, b], GEO)
    assert via_tables(c, p, NOW) is a
    assert via_tables(c, p, NOW + 10) is b


def test_fragment_never_matches_port_or_flag_rules() -> None:
    rules = [
        RuleSpec("drop", priority=1, dport=(0, 65535), id=1),
        RuleSpec("drop", priority=2, tcp_flags=(2, 0), id=2),
        RuleSpec("monitor", priority=3, proto=6, id=3),
    ]
    frag = Pkt(4, bytes(4), bytes(4), 6, 0, 0, False, 0, 100)
    assert _check(rules, [frag]) == 1
    assert via_tables(compile_rules(rules, GEO), frag) is rules[2]


def test_too_many_rules_refused() -> None:
    rules = [RuleSpec("drop", dport=(i, i), id=i + 1) for i in range(GEO.rules + 1)]
    with pytest.raises(MapFullError) as e:
        compile_rules(rules, GEO)
    assert e.value.errno == errno.E2BIG
    assert "nothing was changed" in str(e.value)


def test_capacity_of_mixed_shapes() -> None:
    rng = random.Random(5)
    rules = [random_rule(rng, i + 1) for i in range(GEO.rules)]
    c = compile_rules(rules, GEO)
    assert len(c.rules) == GEO.rules


def _chunk_class(c: Compiled, direction: str, addr: bytes) -> int:
    """An IPv4 address's class the way bpf/rules.h reads the arrays."""
    assert c.c24 is not None and c.c32 is not None
    e = int(c.l1v4[direction][addr[0] << 8 | addr[1]])
    if e & CHUNK:
        e = int(c.c24[(e >> 16) & 0x7FFF, addr[2]])
        if e & CHUNK:
            e = int(c.c32[(e >> 16) & 0x7FFF, addr[3]])
    return e & 0xFFFF


def test_ipv4_chunks_give_the_levels_answers() -> None:
    """The arrays the data plane reads answer every IPv4 address as the
    longest-first walk of the compiled levels does."""
    rng = random.Random(5)
    for trial in range(4):
        rules = [random_rule(rng, i + 1) for i in range(300)]
        # and some that nest inside one /16 and one /24, where the chunks matter
        for i, plen in enumerate((17, 20, 24, 25, 28, 30, 32, 32)):
            net = ipaddress.ip_network(f"198.18.5.{64 + i}/{plen}", strict=False)
            rules.append(RuleSpec("drop", priority=10 + i, dst=net, id=400 + i))
        c = compile_rules(rules, GEO)
        addrs = [rng.getrandbits(32).to_bytes(4, "big") for _ in range(3000)]
        addrs += [bytes([198, 18, 5, rng.randrange(256)]) for _ in range(500)]
        for r in rules:
            for net in (r.src, r.dst):
                if net is not None and net.version == 4:
                    addrs.append(net.network_address.packed)
                    addrs.append(net.broadcast_address.packed)
        for direction in ("src", "dst"):
            if (4, direction) not in c.l1:
                continue
            for a in addrs:
                assert _chunk_class(c, direction, a) == _addr_class(c, 4, direction, a), (trial, direction, a)


def test_ipv4_chunks_refuse_what_does_not_fit() -> None:
    rules = [RuleSpec("drop", dst=ipaddress.ip_network(f"10.{i}.0.1/32"), id=i + 1) for i in range(40)]
    with pytest.raises(MapFullError) as e:
        compile_rules(rules, Geometry(rules=1024, words=20, classes=16384, addr_entries=262144, c24_chunks=32))
    assert e.value.errno == errno.E2BIG and "nothing was changed" in str(e.value)
