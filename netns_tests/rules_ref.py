"""Reference models for multi-field rules, and random rules and packets.

``reference()`` is the specification written plainly: walk the rules in
priority order, test every field, first match wins. ``via_tables()`` walks
the compiled tables the way bpf/rules.h does. Tests compare both with each
other (no kernel) and with the program (BPF_PROG_TEST_RUN).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

from xdpflow.rules.compile import NO_L4, Compiled
from xdpflow.rules.rulespec import LENGTH_MAX, TCP_FLAGS, RuleSpec, check


@dataclass(frozen=True)
class Pkt:
    family: int
    src: bytes
    dst: bytes
    proto: int
    sport: int  # ICMP: type
    dport: int  # ICMP: code
    has_l4: bool  # the L4 header was read (not a later fragment, not truncated)
    tcp_flags: int
    iplen: int
    iface: str = "test"


def _in(net: ipaddress.IPv4Network | ipaddress.IPv6Network | None, addr: bytes) -> bool:
    if net is None:
        return True
    a = ipaddress.ip_address(addr)
    return a.version == net.version and a in net


def _in_range(r: tuple[int, int] | None, v: int) -> bool:
    return r is None or r[0] <= v <= r[1]


def matches(r: RuleSpec, p: Pkt, now: float | None = None) -> bool:
    """Whether ``r`` matches ``p`` (ignoring priority)."""
    if now is not None and r.expires_at is not None and r.expires_at <= now:
        return False
    if not (_in(r.src, p.src) and _in(r.dst, p.dst)):
        return False
    protos = r.protos()
    if protos is not None and p.proto not in protos:
        return False
    if r.needs_l4() and not p.has_l4:
        return False
    if not (_in_range(r.sport_range(), p.sport) and _in_range(r.dport_range(), p.dport)):
        return False
    if r.tcp_flags is not None and p.tcp_flags & r.tcp_flags[0] != r.tcp_flags[1]:
        return False
    if not _in_range(r.length, min(p.iplen, LENGTH_MAX)):
        return False
    return r.iface is None or r.iface == p.iface


def reference(rules: Sequence[RuleSpec], p: Pkt, now: float | None = None) -> RuleSpec | None:
    """The first matching rule by (priority, id)."""
    for r in sorted(rules, key=lambda r: (r.priority, r.id or 0)):
        if matches(r, p, now):
            return r
    return None


def _addr_class(c: Compiled, family: int, direction: str, addr: bytes) -> int:
    width = 32 if family == 4 else 128
    a = int.from_bytes(addr, "big")
    v = int(c.l1[(family, direction)][a >> (width - 16)])
    cls, mask = v & 0xFFFF, v >> 16
    levels = c.levels[family]
    for li in reversed(range(len(levels))):
        if mask & (1 << li):
            lv = levels[li]
            hit = c.addr.get((family, direction, li, (a >> (width - lv)) << (width - lv)))
            if hit is not None:
                return hit
    return cls


def via_tables(c: Compiled, p: Pkt, now: float | None = None) -> RuleSpec | None:
    """What bpf/rules.h answers for ``p`` from the compiled tables."""
    bm = c.pool[0]
    if "src" in c.fields:
        bm &= c.pool[_addr_class(c, p.family, "src", p.src)]
    if "dst" in c.fields:
        bm &= c.pool[_addr_class(c, p.family, "dst", p.dst)]
    port_s = p.sport if p.has_l4 else NO_L4
    port_d = p.dport if p.has_l4 else NO_L4
    if c.sport is not None:
        bm &= c.pool[int(c.sport[port_s])]
    if c.dport is not None:
        bm &= c.pool[int(c.dport[port_d])]
    if c.proto is not None:
        flags = p.tcp_flags if p.proto == 6 else 0
        bm &= c.pool[int(c.proto[p.proto << 8 | flags])]
    if c.length is not None:
        bm &= c.pool[int(c.length[min(p.iplen, LENGTH_MAX)])]
    if "iface" in c.fields:
        bm &= c.pool[c.iface.get(p.iface, c.iface_default)]
    best = None
    for r, bit, rank in zip(c.rules, c.bits, c.ranks):
        if bm >> bit & 1 and not (now is not None and r.expires_at is not None and r.expires_at <= now):
            if best is None or rank < best[0]:
                best = (rank, r)
    return None if best is None else best[1]


# --------------------------------------------------------------------------
# random rules and packets from a small address world, so they meet often

V4_POOL = ["198.18.0.0", "198.18.1.0", "198.19.0.0", "198.19.200.0", "203.0.113.0", "198.51.100.0"]
V6_POOL = ["2001:2::", "2001:2:0:1::", "2001:2:0:ff00::", "2001:db8::", "2001:db8:bad::"]


def _rand_net(rng: random.Random, family: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if family == 4:
        base = int(ipaddress.IPv4Address(rng.choice(V4_POOL)))
        plen = rng.choice([8, 15, 16, 17, 20, 23, 24, 25, 28, 30, 31, 32])
        addr = base | rng.getrandbits(12) if plen > 20 else base
        return ipaddress.IPv4Network((addr, plen), strict=False)
    base = int(ipaddress.IPv6Address(rng.choice(V6_POOL)))
    plen = rng.choice([16, 24, 32, 33, 40, 47, 48, 56, 60, 64, 72, 96, 112, 120, 127, 128])
    addr = base | (rng.getrandbits(16) << 64 if plen > 48 else 0) | (rng.getrandbits(8) if plen > 112 else 0)
    return ipaddress.IPv6Network((addr, plen), strict=False)


def _rand_range(rng: random.Random, hot: Sequence[int], top: int = 65535) -> tuple[int, int]:
    lo = rng.choice(hot) if rng.random() < 0.7 else rng.randrange(top + 1)
    hi = lo if rng.random() < 0.5 else min(top, lo + rng.choice([1, 10, 100, 1000, 30000]))
    return lo, hi


HOT_PORTS = [0, 53, 80, 123, 443, 1000, 1024, 40000, 65535]
HOT_LENGTHS = [28, 40, 48, 60, 64, 100, 576, 1500]


def random_rule(rng: random.Random, rule_id: int, ifaces: Sequence[str] = ("test",)) -> RuleSpec:
    """A valid random rule using every field now and then."""
    family = rng.choice([4, 6])
    kw: dict[str, object] = {"id": rule_id, "priority": rng.choice([1, 10, 100, 500, 999, 1000, 1001, 5000])}
    kw["action"] = rng.choice(["pass", "drop", "monitor"])
    if rng.random() < 0.4:
        kw["src"] = _rand_net(rng, family)
    if rng.random() < 0.4:
        kw["dst"] = _rand_net(rng, family)
    shape = rng.random()
    if shape < 0.4:
        proto = rng.choice([6, 17, None])
        kw["proto"] = proto
        if rng.random() < 0.6:
            kw["dport"] = _rand_range(rng, HOT_PORTS)
        if rng.random() < 0.3:
            kw["sport"] = _rand_range(rng, HOT_PORTS)
        if proto in (6, None) and rng.random() < 0.3:
            mask = rng.getrandbits(8) or 2
            kw["tcp_flags"] = (mask, rng.getrandbits(8) & mask)
    elif shape < 0.55:
        kw["proto"] = rng.choice([1, 58, None])
        kw["icmp_type"] = (rng.choice([0, 3, 8, 128, 129]), rng.choice([None, 0, 1]))
    elif shape < 0.7:
        kw["proto"] = rng.choice([1, 6, 17, 47, 58])
    if rng.random() < 0.15:
        kw["length"] = _rand_range(rng, HOT_LENGTHS)
    if rng.random() < 0.05:
        kw["iface"] = rng.choice(list(ifaces))
    if rng.random() < 0.1:
        kw["comment"] = f"rule {rule_id}"
    r = RuleSpec(**kw)  # type: ignore[arg-type]
    check(r)
    return r


def _rand_addr(rng: random.Random, family: int) -> bytes:
    if family == 4:
        base = int(ipaddress.IPv4Address(rng.choice(V4_POOL)))
        return (base | rng.choice([0, 1, rng.getrandbits(12), rng.getrandbits(16)])).to_bytes(4, "big")
    base = int(ipaddress.IPv6Address(rng.choice(V6_POOL)))
    low = rng.choice([0, 1, rng.getrandbits(8), rng.getrandbits(16) << 64 | rng.getrandbits(8)])
    return (base | low).to_bytes(16, "big")


def random_pkt(rng: random.Random, ifaces: Sequence[str] = ("test",)) -> Pkt:
    family = rng.choice([4, 6])
    proto = rng.choice([6, 6, 17, 17, 1 if family == 4 else 58, 47])
    has_l4 = proto in (1, 6, 17, 58) and rng.random() < 0.95
    if proto in (1, 58):
        sport, dport = rng.choice([0, 3, 8, 128, 129, rng.randrange(256)]), rng.choice([0, 1, rng.randrange(256)])
    elif proto in (6, 17):
        sport, dport = rng.choice(HOT_PORTS + [rng.randrange(65536)]), rng.choice(HOT_PORTS + [rng.randrange(65536)])
    else:
        sport = dport = 0
    if not has_l4:
        sport = dport = 0
    flags = rng.getrandbits(8) if proto == 6 and has_l4 else 0
    iplen = rng.choice(HOT_LENGTHS + [rng.randrange(20, 1500)])
    return Pkt(
        family,
        _rand_addr(rng, family),
        _rand_addr(rng, family),
        proto,
        sport,
        dport,
        has_l4,
        flags,
        iplen,
        rng.choice(list(ifaces)),
    )


ALL_FLAGS = sum(TCP_FLAGS.values())
