"""Compile a rule set into the data plane's classification tables.

Pure arithmetic; ``dataplane/rules.py`` writes the result into one rule-set
slot. The scheme is bpf-iptables' linear bit vector search, grouped:

- every rule owns one bit; for each field (src, dst, proto+TCP flags,
  sport, dport, length, iface) every possible value of that field maps to a
  CLASS, an index into a pool of bitmaps, whose bit b is set iff rule b
  accepts that value (a rule that does not constrain the field accepts
  every value). A frame's candidates are the AND of its fields' bitmaps; the
  best candidate is the one of lowest rank (priority, then id).
- bits are laid out in GROUPS, each starting on a 64-bit word: rules with a
  dst CIDR, rules with a src CIDR (and no dst), rules reading L4 (ports,
  ICMP type, TCP flags; no address), the rest. Within a group rules of one
  shape (family, protocols, fields read, then address) share words, and
  each word's bits follow rank, so the first set bit of a word is that
  word's best; a field's per-class summary of non-empty words then rules
  out most words before any is ANDed.
- addresses map to the class of their longest matching rule CIDR (the
  CIDRs containing an address nest, so that one names them all), through a
  table like a router's FIB: an array indexed by the top 16 bits holds the
  class for CIDRs up to /16 and a bitmask of the LEVELS (prefix lengths over
  16) that have entries inside that /16; each level is a hash of prefixes,
  longer CIDRs expanded to the next level. IPv4 levels are /24 and /32
  (DIR-16-8-8); IPv6 levels are the prefix lengths in use, merged down to at
  most ``max_levels``.
- ports and ICMP type/code share the flow key's sport/dport positions; the
  extra sport value ``NO_L4`` (65536) stands for "no L4 header" (a
  non-first fragment, a truncated header), where only rules that do not read
  L4 match.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from xdpflow.errors import MapFullError
from xdpflow.rules.rulespec import BLOCKLIST_PRIORITY, LENGTH_MAX, TCP, RuleSpec

NO_L4 = 65536
CHUNK = 0x8000_0000  # an IPv4 entry naming a chunk of the next level
PORT_TABLE = 65537
DIRS = ("src", "dst")
FAMILY_BITS = {4: 32, 6: 128}
V4_LEVELS = (24, 32)
FIELDS = ("src", "dst", "proto", "sport", "dport", "length", "iface")


@dataclass(frozen=True)
class Geometry:
    """The data plane's sizes (from bpf/xdpflow.h, handed in by the caller)."""

    rules: int  # rules per set
    words: int  # 64-bit words per bitmap
    classes: int  # bitmaps in one slot's pool
    addr_entries: int  # level entries per slot, every family and direction
    max_levels: int = 8
    c24_chunks: int = 2048  # IPv4 /16s with longer rule prefixes, both directions
    c32_chunks: int = 2048  # IPv4 /24s with rule prefixes longer than /24


@dataclass
class Compiled:
    """One rule set as tables. Class 0 is the bitmap of every rule: the one
    an unconstrained field would give."""

    rules: list[RuleSpec]  # in bit order; None-free
    bits: list[int]  # bit of each rule (parallel to rules)
    ranks: list[int]  # rank of each rule (parallel)
    bl_rank: int  # rules of lower rank come before the blocklist
    fields: set[str]  # fields some rule constrains
    pool: list[int] = field(default_factory=list)  # class -> bitmap
    sport: np.ndarray | None = None  # PORT_TABLE class ids
    dport: np.ndarray | None = None
    proto: np.ndarray | None = None  # 65536: proto << 8 | tcp flags
    length: np.ndarray | None = None  # 65536
    l1: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)  # class | level mask << 16
    levels: dict[int, list[int]] = field(default_factory=dict)  # family -> level prefix lengths
    addr: dict[tuple[int, str, int, int], int] = field(default_factory=dict)  # (fam, dir, level, prefix) -> class
    iface: dict[str, int] = field(default_factory=dict)
    # IPv4 as arrays (what the data plane reads; `l1` and `addr` are the same
    # answers as a FIB's levels): per direction the /16 array, entries
    # CHUNK | chunk << 16 | class where a /16 holds longer prefixes; 256-slot
    # chunks of /24 answers (CHUNK | chunk << 16 | class again where a /24
    # holds longer ones) and of /32 answers
    l1v4: dict[str, np.ndarray] = field(default_factory=dict)
    c24: np.ndarray | None = None  # (chunks, 256) u32
    c32: np.ndarray | None = None
    iface_default: int = 0

    def words(self, cls: int, nwords: int) -> list[int]:
        b = self.pool[cls]
        return [(b >> (64 * i)) & 0xFFFF_FFFF_FFFF_FFFF for i in range(nwords)]


def _group(r: RuleSpec) -> int:
    if r.dst is not None:
        return 0
    if r.src is not None:
        return 1
    if r.needs_l4():
        return 2
    return 3


def _shape(r: RuleSpec) -> tuple[object, ...]:
    """Sort key inside a group: rules of one shape (family, protocols, the
    fields they read) and then of nearby addresses share words, so a field's
    summary rules out whole words. A word that mixes shapes keeps bits that
    every field lets through, and the frame pays to AND it."""
    net = r.dst if r.dst is not None else r.src
    return (
        0 if net is None else net.version,
        tuple(sorted(r.protos() or ())),
        tuple(getattr(r, f) is None for f in ("src", "sport", "dport", "icmp_type", "tcp_flags", "length", "iface")),
        0 if net is None else int(net.network_address),
        0 if net is None else net.prefixlen,
    )


def layout(rules: Sequence[RuleSpec], geo: Geometry) -> tuple[list[RuleSpec], list[int], list[int], int]:
    """Bits and ranks: rules sorted into groups, each group word-aligned;
    inside a group by shape, each word's bits in rank order (so a word's
    first set bit is its best). Returns (rules in bit order, bits, ranks,
    bl_rank). Raises MapFullError when they do not fit."""
    if len(rules) > geo.rules:
        raise MapFullError(
            errno.E2BIG, f"a rule set holds at most {geo.rules} rules; this one has {len(rules)}; nothing was changed"
        )
    order = sorted(rules, key=lambda r: (r.priority, r.id or 0))
    rank = {id(r): i for i, r in enumerate(order)}
    bl_rank = sum(1 for r in order if r.priority < BLOCKLIST_PRIORITY)
    groups = [sorted((r for r in order if _group(r) == g), key=lambda r: (_shape(r), rank[id(r)])) for g in range(4)]
    # Each shape on words of its own where the bits allow (small sets):
    # a word shared by two shapes is kept by any field that one of them
    # leaves open. Else each group starts a word, shapes packed inside.
    runs = [list(run) for g in groups for _, run in itertools.groupby(g, key=lambda r: _shape(r)[:3])]
    if sum(-(-len(run) // 64) for run in runs) > geo.words:
        runs = [g for g in groups if g]
    out, bits, ranks = [], [], []
    nxt = 0
    for members in runs:
        nxt = (nxt + 63) // 64 * 64
        for w in range(0, len(members), 64):
            for r in sorted(members[w : w + 64], key=lambda r: rank[id(r)]):
                out.append(r)
                bits.append(nxt)
                ranks.append(rank[id(r)])
                nxt += 1
    if nxt > geo.words * 64:
        raise MapFullError(errno.E2BIG, f"the rules need {nxt} bits, more than {geo.words * 64}; nothing was changed")
    return out, bits, ranks, bl_rank


class _Pool:
    def __init__(self, everything: int, cap: int) -> None:
        self.cls: dict[int, int] = {everything: 0}
        self.bitmaps = [everything]
        self.cap = cap

    def __call__(self, bitmap: int) -> int:
        c = self.cls.get(bitmap)
        if c is None:
            if len(self.bitmaps) >= self.cap:
                raise MapFullError(
                    errno.E2BIG,
                    f"the rules need more than {self.cap} distinct field classes; "
                    "use fewer distinct ranges or CIDRs; nothing was changed",
                )
            c = self.cls[bitmap] = len(self.bitmaps)
            self.bitmaps.append(bitmap)
        return c


def _range_table(size: int, base: int, items: Iterable[tuple[int, int, int]], pool: _Pool) -> np.ndarray:
    """Classes for every value 0..size-1: ``base`` plus each item's bit
    (lo, hi, bitmask) over its inclusive range. A sweep: O(items + segments)."""
    events: dict[int, int] = {0: 0}
    for lo, hi, bit in items:
        events[lo] = events.get(lo, 0) ^ bit
        events[hi + 1] = events.get(hi + 1, 0) ^ bit
    table = np.zeros(size, dtype=np.uint32)
    cur = base
    points = sorted(p for p in events if p < size)
    for i, p in enumerate(points):
        cur ^= events[p]
        end = points[i + 1] if i + 1 < len(points) else size
        table[p:end] = pool(cur)
    return table


def _pick_levels(plens: dict[int, int], max_levels: int) -> list[int]:
    """Level prefix lengths for CIDRs longer than /16 (plens: length -> count):
    every length in use, merged upwards (cheapest expansion first) down to
    ``max_levels``."""
    levels = sorted(p for p in plens if p > 16)
    counts = {p: plens[p] for p in levels}
    while len(levels) > max_levels:
        best, cost = 0, None
        for i in range(len(levels) - 1):
            c = counts[levels[i]] * ((1 << (levels[i + 1] - levels[i])) - 1)
            if cost is None or c < cost:
                best, cost = i, c
        gone = levels.pop(best)
        counts[levels[best]] += counts.pop(gone) << (levels[best] - gone)
    return levels


def compile_rules(rules: Sequence[RuleSpec], geo: Geometry) -> Compiled:
    """Compile ``rules`` (each with an id). Raises MapFullError (E2BIG) when
    the set does not fit ``geo``; nothing else can fail."""
    ordered, bits, ranks, bl_rank = layout(rules, geo)
    bitof = {id(r): 1 << b for r, b in zip(ordered, bits)}
    everything = 0
    for b in bitof.values():
        everything |= b
    pool = _Pool(everything, geo.classes)
    c = Compiled(ordered, bits, ranks, bl_rank, set())
    rs = ordered

    # one level list per family, shared by both directions
    counts: dict[int, int] = {}
    for r in rs:
        for net in (r.src, r.dst):
            if net is not None and net.version == 6:
                counts[net.prefixlen] = counts.get(net.prefixlen, 0) + 1
    c.levels = {4: list(V4_LEVELS), 6: _pick_levels(counts, geo.max_levels)}
    n = 0
    for family in (4, 6):
        for direction in DIRS:
            n += _addresses_levels(c, pool, bitof, family, direction, c.levels[family])
    if n > geo.addr_entries:
        raise MapFullError(
            errno.E2BIG,
            f"the rules' CIDRs expand to {n} table entries, more than {geo.addr_entries}; "
            "use fewer long prefixes of scattered lengths; nothing was changed",
        )
    for d in DIRS:
        if any(getattr(r, d) is not None for r in rs):
            c.fields.add(d)
    _v4_chunks(c, geo)

    def base_without(pred: object) -> int:
        out = 0
        for r in rs:
            if not pred(r):  # type: ignore[operator]
                out |= bitof[id(r)]
        return out

    if any(r.needs_l4() for r in rs):
        c.fields.add("sport")
        items = []
        for r in rs:
            if r.needs_l4():
                lo, hi = r.sport_range() or (0, 65535)
                items.append((lo, hi, bitof[id(r)]))
        c.sport = _range_table(PORT_TABLE, base_without(RuleSpec.needs_l4), items, pool)
    if any(r.dport_range() is not None for r in rs):
        c.fields.add("dport")
        items = [(*r.dport_range(), bitof[id(r)]) for r in rs if r.dport_range() is not None]  # type: ignore[misc]
        base = base_without(lambda r: r.dport_range() is not None)
        c.dport = _range_table(PORT_TABLE, base, items, pool)
        c.dport[NO_L4] = pool(base | _or(bitof[id(r)] for r in rs if r.dport_range() is not None))
    if any(r.length is not None for r in rs):
        c.fields.add("length")
        items = [(*r.length, bitof[id(r)]) for r in rs if r.length is not None]  # type: ignore[misc]
        c.length = _range_table(LENGTH_MAX + 1, base_without(lambda r: r.length is not None), items, pool)
    if any(r.protos() is not None for r in rs):
        c.fields.add("proto")
        c.proto = _proto_table(rs, bitof, pool)
    if any(r.iface is not None for r in rs):
        c.fields.add("iface")
        base = base_without(lambda r: r.iface is not None)
        c.iface_default = pool(base)
        names = {r.iface for r in rs if r.iface is not None}
        for name in sorted(n for n in names if n is not None):
            c.iface[name] = pool(base | _or(bitof[id(r)] for r in rs if r.iface == name))
    c.pool = pool.bitmaps
    return c


def _v4_chunks(c: Compiled, geo: Geometry) -> None:
    """The IPv4 levels as arrays (DIR-16-8-8): an array load per level where
    a hash lookup of a 20-byte key cost ~40 ns. A longest-first walk of the
    levels gives, for each address, the /32 entry, else the /24 entry, else
    the /16 array's class; the chunks hold exactly that answer per slot.
    Raises MapFullError when the chunks do not fit."""
    per16: dict[tuple[str, int], dict[int, int]] = {}  # (dir, /16) -> {byte 2: /24 class}
    per24: dict[tuple[str, int], dict[int, int]] = {}  # (dir, /24) -> {byte 3: /32 class}
    for (family, direction, li, prefix), cls in c.addr.items():
        if family != 4:
            continue
        if V4_LEVELS[li] == 24:
            per16.setdefault((direction, prefix >> 16), {})[(prefix >> 8) & 0xFF] = cls
        else:
            per24.setdefault((direction, prefix >> 8), {})[prefix & 0xFF] = cls
            per16.setdefault((direction, prefix >> 16), {})
    if len(per16) > geo.c24_chunks or len(per24) > geo.c32_chunks:
        raise MapFullError(
            errno.E2BIG,
            f"the rules' IPv4 CIDRs longer than /16 fall in {len(per16)} /16s and those longer than /24 in "
            f"{len(per24)} /24s, more than the {geo.c24_chunks} and {geo.c32_chunks} the tables hold; "
            "nothing was changed",
        )
    c24 = np.zeros((len(per16), 256), dtype=np.uint32)
    c32 = np.zeros((len(per24), 256), dtype=np.uint32)
    for direction in DIRS:
        l1 = c.l1.get((4, direction))
        if l1 is not None:
            c.l1v4[direction] = (l1 & 0xFFFF).astype(np.uint32)
    chunk24: dict[tuple[str, int], int] = {}
    for i, ((direction, top), entries) in enumerate(sorted(per16.items())):
        l1v = c.l1v4[direction]
        base = int(l1v[top])
        c24[i, :] = base
        for b, cls in entries.items():
            c24[i, b] = cls
        l1v[top] = CHUNK | i << 16 | base
        chunk24[(direction, top)] = i
    for j, ((direction, p24), entries) in enumerate(sorted(per24.items())):
        i, b = chunk24[(direction, p24 >> 8)], p24 & 0xFF
        under = int(c24[i, b]) & 0xFFFF
        c32[j, :] = under
        for h, cls in entries.items():
            c32[j, h] = cls
        c24[i, b] = CHUNK | j << 16 | under
    c.c24, c.c32 = c24, c32


def _or(bits: Iterable[int]) -> int:
    out = 0
    for b in bits:
        out |= b
    return out


def _proto_table(rs: Sequence[RuleSpec], bitof: dict[int, int], pool: _Pool) -> np.ndarray:
    table = np.zeros(65536, dtype=np.uint32)
    plain = [(r.protos(), bitof[id(r)]) for r in rs if r.tcp_flags is None]
    flagged = [(r.tcp_flags, bitof[id(r)]) for r in rs if r.tcp_flags is not None]
    for p in range(256):
        row = _or(b for ps, b in plain if ps is None or p in ps)
        if p != TCP or not flagged:
            table[p << 8 : (p + 1) << 8] = pool(row)
            continue
        for f in range(256):
            table[p << 8 | f] = pool(row | _or(b for (mask, value), b in flagged if f & mask == value))  # type: ignore[misc]
    return table


def _addresses_levels(
    c: Compiled, pool: _Pool, bitof: dict[int, int], family: int, direction: str, levels: list[int]
) -> int:
    """Fill c.l1 / c.addr for one family and direction with the given levels;
    returns the number of level entries."""
    width = FAMILY_BITS[family]
    base = 0
    by_net: dict[tuple[int, int], int] = {}
    for r in c.rules:
        net = getattr(r, direction)
        if net is None:
            base |= bitof[id(r)]
        elif net.version == family:
            key = (int(net.network_address), net.prefixlen)
            by_net[key] = by_net.get(key, 0) | bitof[id(r)]
    plens_used = sorted({p for _, p in by_net})
    l1 = np.full(65536, pool(base), dtype=np.uint32)
    n = 0
    for a, p in sorted(by_net, key=lambda k: k[1]):
        bm = base
        for q in plens_used:
            if q > p:
                break
            bm |= by_net.get(((a >> (width - q)) << (width - q) if q else 0, q), 0)
        cls = pool(bm)
        top = a >> (width - 16)
        if p <= 16:
            span = 1 << (16 - p)
            l1[top : top + span] = (l1[top : top + span] & np.uint32(0xFFFF0000)) | np.uint32(cls)
            continue
        li = next(i for i, lv in enumerate(levels) if lv >= p)
        lv = levels[li]
        l1[top] |= np.uint32(1 << (16 + li))
        step = 1 << (width - lv)
        for j in range(1 << (lv - p)):
            c.addr[(family, direction, li, a + j * step)] = cls
        n += 1 << (lv - p)
    c.l1[(family, direction)] = l1
    return n
