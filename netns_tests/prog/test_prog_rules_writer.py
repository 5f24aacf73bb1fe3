"""The rule-set writer's encoding, read back from the loaded object's maps.

``RuleTables.install`` writes random rule sets into the program's maps; a
reader here walks those maps exactly as bpf/rules.h does (config flags, slot
header, /16 array and address levels, per-field tables, bitmap pool, action
records) and must pick the same rule as the plain reference classifier, for
every set written in turn (so both slots, and rewrites of a used slot, are
covered). What the program itself does with the maps is tested through
BPF_PROG_TEST_RUN elsewhere; this pins down the bytes the writer puts there.
"""

from __future__ import annotations

import random
import socket
import time
from dataclasses import replace
from typing import Any

import pytest

from xdpflow.dataplane.abi import C, ffi
from xdpflow.dataplane.rules import RuleTables
from xdpflow.errors import MapFullError
from xdpflow.rules.compile import NO_L4
from xdpflow.rules.rulespec import LENGTH_MAX, RuleSpec, parse_line

from ..progtest import ProgHarness
from ..rules_ref import Pkt, random_pkt, random_rule, reference

IFACES = ("lo", "xfnone0")  # one that exists here, one that does not


# the arrays with one element per slot (xdpflow.h), by entries per slot
PER_SLOT = {
    "rl_proto": 65536,
    "rl_len": 65536,
    "rl_sport": C.XF_RPORT_SIZE,
    "rl_dport": C.XF_RPORT_SIZE,
    "rl_l1": 4 * C.XF_RL1_SIZE,
    "rl_c24": C.XF_RC24_CHUNKS * 256,
    "rl_c32": C.XF_RC32_CHUNKS * 256,
}


class MapReader:
    """bpf/rules.h's classification, in Python, over the maps as written."""

    def __init__(self, h: ProgHarness) -> None:
        self.h = h
        self.pool: dict[int, Any] = {}
        self.slots: dict[Any, Any] = {}  # per-slot arrays' elements, read once

    def _element(self, name: str, slot: int) -> Any:
        if (name, slot) not in self.slots:
            self.slots[name, slot] = self.h.map(name).lookup(slot)
        return self.slots[name, slot]

    def _get(self, name: str, key: Any) -> Any:
        if name in PER_SLOT:  # one element per slot: key is slot * size + index
            slot, idx = divmod(key, PER_SLOT[name])
            return self._element(name, slot).e[idx]
        return self.h.map(name).lookup(key)

    def slot(self) -> tuple[int, bool]:
        flags = self._get("config", 0).flags
        return (1 if flags & C.XF_CFG_RULES_SLOT else 0), bool(flags & C.XF_CFG_RULES)

    def _entry(self, slot: int, e: int, cls: int) -> int:
        """``cls``, once the entry's upper half is checked: the summary of
        that class (what the program ANDs before loading any bitmap)."""
        assert e >> 32 == self._bits(slot, cls)[0], f"entry {e:#x}: not class {cls}'s summary"
        return cls

    def _field(self, slot: int, e: Any) -> int:
        return self._entry(slot, int(e), int(e) & 0xFFFFFFFF)

    def _addr_class(self, slot: int, head: Any, fd: int, addr: bytes) -> int:
        a = addr.ljust(16, b"\0")
        e = int(self._get("rl_l1", (slot * 4 + fd) * C.XF_RL1_SIZE + (a[0] << 8 | a[1])))
        if fd < 2:  # IPv4: the chunk arrays
            if e & C.XF_RL_CHUNK:
                assert e >> 32 == 0
                e = int(self._get("rl_c24", (slot * C.XF_RC24_CHUNKS + ((e >> 16) & 0x7FFF)) * 256 + a[2]))
                if e & C.XF_RL_CHUNK:
                    assert e >> 32 == 0
                    e = int(self._get("rl_c32", (slot * C.XF_RC32_CHUNKS + ((e >> 16) & 0x7FFF)) * 256 + a[3]))
            return self._entry(slot, e, e & 0xFFFF)
        cls, mask = self._entry(slot, e, e & 0xFFFF), (e >> 16) & 0xFFFF
        for i in reversed(range(C.XF_RLEVELS)):
            if not mask & (1 << i):
                continue
            lm = head.lmask[fd >> 1][i]
            m = int(lm[0]).to_bytes(8, "little") + int(lm[1]).to_bytes(8, "little")
            key = ffi.new("struct xf_raddr_key *")
            key.tag = (slot * 4 + fd) * C.XF_RLEVELS + i
            key.addr = bytes(x & y for x, y in zip(a, m))
            hit = self._get("rl_addr", key)
            if hit is not None:
                return self._entry(slot, int(hit), int(hit) & 0xFFFFFFFF)
        return cls

    def _bits(self, slot: int, cls: int) -> tuple[int, int]:
        k = slot * C.XF_RCLASS_MAX + cls
        if k not in self.pool:
            b = self._element("rl_pool", slot).b[cls]
            words = [int(w) for w in b.w]
            summary = sum(1 << i for i, w in enumerate(words) if w)
            assert int(b.summary) == summary, f"class {cls}: summary {b.summary:#x}, words say {summary:#x}"
            self.pool[k] = (summary, sum(w << (64 * i) for i, w in enumerate(words)))
        return self.pool[k]

    def classify(self, p: Pkt, now_jiffies: int) -> int | None:
        """The id of the rule the program would apply, or None."""
        slot, on = self.slot()
        if not on:
            return None
        head = self._get("rl_head", slot)
        f = head.fields
        # what the program reads: the slot's byte of the config's mask
        assert (self._get("config", 0).rule_fields >> (8 * slot)) & 0xFF == f
        fd = 0 if p.family == 4 else 2
        cls = [0] * 7
        if f & C.XF_RF_SRC:
            cls[0] = self._addr_class(slot, head, fd, p.src)
        if f & C.XF_RF_DST:
            cls[1] = self._addr_class(slot, head, fd + 1, p.dst)
        sport, dport = (p.sport, p.dport) if p.has_l4 else (NO_L4, NO_L4)
        if f & C.XF_RF_PROTO:
            cls[2] = self._field(
                slot, self._get("rl_proto", slot * 65536 + (p.proto << 8 | (p.tcp_flags if p.proto == 6 else 0)))
            )
        if f & C.XF_RF_SPORT:
            cls[3] = self._field(slot, self._get("rl_sport", slot * C.XF_RPORT_SIZE + sport))
        if f & C.XF_RF_DPORT:
            cls[4] = self._field(slot, self._get("rl_dport", slot * C.XF_RPORT_SIZE + dport))
        if f & C.XF_RF_LEN:
            cls[5] = self._field(slot, self._get("rl_len", slot * 65536 + min(p.iplen, LENGTH_MAX)))
        if f & C.XF_RF_IFACE:
            key = ffi.new("struct xf_riface_key *", {"slot": slot, "ifindex": _ifindex(p.iface)})
            hit = self._get("rl_iface", key)
            if hit is not None:
                cls[6] = self._field(slot, hit)
            else:
                cls[6] = self._entry(slot, int(head.iface_default_sum) << 32, int(head.iface_default))
        summary, bm = ~0, ~0
        for c in cls:
            s, b = self._bits(slot, int(c))
            summary &= s
            bm &= b
        assert all((bm >> (64 * i)) & (2**64 - 1) == 0 for i in range(C.XF_RULE_WORDS) if not summary >> i & 1)
        best = None
        for bit in range(C.XF_RULE_BITS):
            if not bm >> bit & 1:
                continue
            act = self._get("rl_act", slot * C.XF_RULE_BITS + bit)
            assert act.bit == bit
            if act.expires and now_jiffies >= act.expires:
                continue
            if best is None or act.rank < best.rank:
                best = act
        return None if best is None else int(best.id)


def _ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 999_999


@pytest.fixture
def tables(prog: ProgHarness) -> RuleTables:
    return prog.rules


def test_random_sets_read_back_as_the_reference(prog: ProgHarness, tables: RuleTables) -> None:
    rng = random.Random(11)
    reader = MapReader(prog)
    pkts = [random_pkt(rng, IFACES) for _ in range(300)]
    previous: list[RuleSpec] = []
    for round_ in range(4):
        # keep some rules (ids stay), drop some, add new ones
        kept = [r for r in previous if rng.random() < 0.6]
        new = [replace(random_rule(rng, 0, IFACES), id=None) for _ in range(rng.choice([1, 40, 200]))]
        installed = tables.install(kept + new)
        reader.pool.clear()
        reader.slots.clear()
        assert {r.id for r in kept} <= {r.id for r in installed}
        assert [r.identity() for r in tables.active()] == [r.identity() for r in installed]
        by_id = {r.id: r for r in installed}
        assert len(by_id) == len(installed)
        for p in pkts:
            want = reference(installed, p)
            got = reader.classify(p, 0)
            assert got == (want.id if want else None), (round_, p, want, got and by_id[got])
        previous = installed
    assert tables.install([]) == [] and reader.slot()[1] is False


def test_expiry_and_counters_and_refusal(prog: ProgHarness, tables: RuleTables) -> None:
    now = time.time()
    soon = parse_line(f"drop src=198.18.0.0/15 expires={int(now) + 3} priority=1", now=0.0)
    later = parse_line("monitor src=198.18.0.0/16 priority=2", now=0.0)
    assert soon is not None and later is not None
    a, b = tables.install([soon, later])
    reader = MapReader(prog)
    p = Pkt(4, bytes([198, 18, 0, 1]), bytes([198, 19, 0, 1]), 17, 1, 2, True, 0, 100, "lo")
    clock = tables.jiffies_clock()
    assert reader.classify(p, clock.now_jiffies()) == a.id
    # the deadline in jiffies: the data plane stops matching it on time
    assert reader.classify(p, clock.to_jiffies(now + 3.0) + 1) == b.id
    assert tables.counters() == {a.id: (0, 0, 0), b.id: (0, 0, 0)}
    assert tables.expire(now + 4) == [a] and [r.id for r in tables.active()] == [b.id]

    # the counter slot of a new rule starts at zero, the kept rule's keeps counting
    cnt = prog.map("rule_counters")
    slot_b = next(
        d.counter for d in (prog.map("rule_defs").lookup(i) for i in range(2 * C.XF_RULE_CAP)) if d.id == b.id
    )
    one = ffi.new("struct xf_rule_cnt *", {"packets": 5, "bytes": 500, "limited": 1})
    cnt[slot_b] = [one] * cnt.ncpu
    for c in range(C.XF_RCOUNTERS):
        if c != slot_b:
            cnt[c] = [one] * cnt.ncpu  # stale counts everywhere else
    (c_,) = tables.add([parse_line("drop dst=203.0.113.5", now=0.0)])  # type: ignore[list-item]
    counts = tables.counters()
    assert counts[b.id] == (5 * cnt.ncpu, 500 * cnt.ncpu, cnt.ncpu) and counts[c_.id] == (0, 0, 0)

    # a set that does not fit changes nothing
    before = tables.active()
    too_many = [parse_line(f"drop dst=198.51.100.{i % 256}/32 sport={i}", now=0.0) for i in range(1100)]
    with pytest.raises(MapFullError):
        tables.install([r for r in too_many if r is not None])
    assert tables.active() == before


def test_the_program_applies_what_was_written(prog: ProgHarness) -> None:
    """A smoke check through BPF_PROG_TEST_RUN (the behaviour tests are elsewhere):
    a drop rule drops, a pass rule below the blocklist's priority exempts a
    listed source, a flip to an empty set lets everything through."""
    from xdpflow.rules.blockfile import Rule, parse_cidr

    from ..frames import raw_udp4
    from ..progtest import XDP_DROP, XDP_PASS

    def ip(text: str) -> int:
        return int.from_bytes(socket.inet_aton(text), "big")

    listed = raw_udp4(ip("198.51.100.7"), ip("198.18.0.1"), 4000, 53)
    ntp = raw_udp4(ip("198.18.0.2"), ip("203.0.113.5"), 123, 4000)
    other = raw_udp4(ip("198.18.0.2"), ip("203.0.113.6"), 123, 4000)
    prog.blocklist.add([Rule(parse_cidr("198.51.100.0/24"), "src")])
    assert [prog.run(f) for f in (listed, ntp, other)] == [XDP_DROP, XDP_PASS, XDP_PASS]
    rules = [
        parse_line(t, now=0.0)
        for t in ("drop proto=udp sport=123 dst=203.0.113.5", "pass src=198.51.100.7 priority=10")
    ]
    installed = prog.rules.install([r for r in rules if r is not None])
    assert [prog.run(f) for f in (listed, ntp, other)] == [XDP_PASS, XDP_DROP, XDP_PASS]
    counts = prog.rules.counters()
    assert sorted(c[0] for c in counts.values()) == [1, 1] and set(counts) == {r.id for r in installed}
    prog.rules.install([])
    assert [prog.run(f) for f in (listed, ntp, other)] == [XDP_DROP, XDP_PASS, XDP_PASS]
