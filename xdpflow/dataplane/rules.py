"""The kernel rule set: write a compiled set into a slot, flip, count.

Every table of the rule classifier (bpf/rules.h) exists twice, one rule-set
SLOT each; the shared config's XF_CFG_RULES_SLOT names the active one. A
change (``install``) writes the whole new set into the inactive slot and
then flips the flag in one config write, so a frame is judged by the old
set or the new one, never by a mix. A writer killed before the flip leaves
the old slot in force; the next install rewrites the inactive slot from
scratch, so it converges.

Before a slot is overwritten the writer waits for an RCU grace period
(``membarrier(MEMBARRIER_CMD_GLOBAL)`` runs synchronize_rcu()): XDP programs
run inside RCU read sections, so after it no frame still reads the slot the
previous flip left behind.

The rule store (``rule_defs``, per slot) keeps each rule's canonical words,
id, counter slot and expiry: ``active()`` reads it back, so the kernel is the
only state. Rule ids come from ``next_id`` in the slot header; counter
slots (``rule_counters``, per CPU) stay with a rule id across changes, and a
slot is zeroed before a new rule gets it. Expiry is exact without any
process running: the deadline (jiffies) is in the rule's action record and
the program stops matching it; ``expire()`` only tidies expired rules away.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network
from typing import Any

import numpy as np

from xdpflow.bindings.libbpf import Map
from xdpflow.dataplane.abi import C, ffi, np_dtype
from xdpflow.dataplane.clock import JiffiesClock
from xdpflow.dataplane.pins import PinRoot
from xdpflow.errors import InputError, XdpflowError
from xdpflow.rules.compile import CHUNK, DIRS, FAMILY_BITS, Compiled, Geometry, compile_rules
from xdpflow.rules.rulespec import (
    ALLOWLIST_PRIORITY,
    BLOCKLIST_PRIORITY,
    MITIGATION_PRIORITY,
    RuleError,
    RuleSpec,
    parse_line,
)

# the data plane's sizes, from the header: the compiler checks a set against them
GEOMETRY = Geometry(
    rules=C.XF_RULE_CAP,
    words=C.XF_RULE_WORDS,
    classes=C.XF_RCLASS_MAX,
    addr_entries=C.XF_RADDR_MAX // 2,  # the hash holds both slots
    max_levels=C.XF_RLEVELS,
    c24_chunks=C.XF_RC24_CHUNKS,
    c32_chunks=C.XF_RC32_CHUNKS,
)
CAPACITY = C.XF_RULE_CAP

ACTION_CODES = {"pass": C.XF_RA_PASS, "drop": C.XF_RA_DROP, "monitor": C.XF_RA_MONITOR, "rate-limit": C.XF_RA_RATE}
FIELD_FLAGS = {
    "src": C.XF_RF_SRC,
    "dst": C.XF_RF_DST,
    "proto": C.XF_RF_PROTO,
    "sport": C.XF_RF_SPORT,
    "dport": C.XF_RF_DPORT,
    "length": C.XF_RF_LEN,
    "iface": C.XF_RF_IFACE,
}
SLOT_FLAG = C.XF_CFG_RULES_SLOT
RULES_FLAG = C.XF_CFG_RULES
TEXT_MAX = ffi.sizeof(ffi.typeof("struct xf_rule_def").fields[3][1].type) - 1  # NUL-terminated

# Rate limits are GCRA with one tolerance (burst_ns) for both buckets. A
# tolerance of a second lets a source that was quiet send a second's worth
# at once, which a per-second measurement sees as double the rate; a few
# packets' worth absorbs the jitter of a conforming sender (timer slack,
# NAPI batches) and lets at most BURST_PACKETS + 1 frames through beyond
# the rate, once: 0.5% of 1,000 pps. The program's clock is the frame's
# jiffies (in units of 2^-XF_RATE_SHIFT jiffy), which lag real time by up to
# a tick, so the tolerance is two ticks at least.
BURST_MIN_NS = 5_000_000
BURST_PACKETS = 4
BURST_FRAME = 1514  # bytes: a full Ethernet frame's worth of the bit/s bucket

# MEMBARRIER_CMD_GLOBAL waits for an RCU grace period (synchronize_rcu)
_MEMBARRIER_NR = {"x86_64": 324, "aarch64": 283, "riscv64": 283, "ppc64le": 365, "s390x": 356}
_MEMBARRIER_CMD_GLOBAL = 1
GRACE_FALLBACK_S = 0.05  # nohz_full CPUs refuse the command: sleep past a grace period instead


@dataclass(frozen=True)
class Carried:
    """A rule set on its way from one object's maps to another's."""

    slot: int
    defs: list[tuple[RuleSpec, int]]  # (rule, counter slot)
    next_id: int


def rcu_grace_period() -> None:
    """Return once every RCU read section running at the call has ended (so
    every XDP frame that read the previous rule slot is done with it)."""
    nr = _MEMBARRIER_NR.get(platform.machine())
    if nr is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(nr, _MEMBARRIER_CMD_GLOBAL, 0, 0) == 0:
            return
    time.sleep(GRACE_FALLBACK_S)


def rate_params(pps: int | None, bps: int | None, tick_ns: int = 0) -> tuple[int, int, int]:
    """(ns per packet, ns per frame byte << 10, tolerance in ns) of a
    rate-limit rule (see BURST_*; tick_ns: one tick of the program's clock)."""
    pkt_ns = round(1e9 / pps) if pps else 0
    byte_ns = round((8e9 / bps) * 1024) if bps else 0
    burst = max(BURST_MIN_NS, 2 * tick_ns, BURST_PACKETS * pkt_ns, (BURST_PACKETS * BURST_FRAME * byte_ns) >> 10)
    return pkt_ns, byte_ns, burst


def rate_costs(pps: int | None, bps: int | None, hz: int) -> tuple[int, int, int]:
    """rate_params() in the program's clock units (2^-XF_RATE_SHIFT jiffy
    at ``hz``): xf_rule_act's pkt_cost, byte_cost, burst. A cost that
    rounds to 0 would mean "no limit", so it is at least 1."""
    per_ns = hz * (1 << C.XF_RATE_SHIFT) / 1e9
    pkt_ns, byte_ns, burst = rate_params(pps, bps, round(1e9 / hz))
    pkt = max(1, round(pkt_ns * per_ns)) if pps else 0
    byte = max(1, round(byte_ns * per_ns)) if bps else 0
    return pkt, byte, round(burst * per_ns)


def merge(current: Sequence[RuleSpec], wanted: Sequence[RuleSpec]) -> tuple[list[RuleSpec], list[RuleSpec]]:
    """Pure: ``wanted`` matched against ``current`` by identity. Returns
    (the new set, the current rules it drops): a wanted rule already present
    keeps the current one's id (taking the wanted expiry and comment); a new
    one has id None. A rule wanted twice counts once (the last wins)."""
    by_identity = {r.identity(): r for r in current}
    out: dict[str, RuleSpec] = {}
    for w in wanted:
        have = by_identity.get(w.identity())
        out[w.identity()] = replace(w, id=have.id if have is not None else None)
    gone = [r for k, r in by_identity.items() if k not in out]
    return list(out.values()), gone


def stored_text(rule: RuleSpec) -> str:
    """What the rule store keeps of a rule: its words and comment (the expiry
    has a field of its own). Raises InputError when it is too long."""
    text = replace(rule, expires_at=None).line()
    if len(text.encode()) > TEXT_MAX:
        raise InputError(f"the rule {text[:60]!r}... is longer than {TEXT_MAX} bytes: shorten its comment")
    return text


def _mask_words(plen: int, width: int) -> tuple[int, int]:
    """A prefix mask as the two u64 the program ANDs with the address bytes
    as they lie in memory (little-endian halves of big-endian bytes)."""
    m = (((1 << width) - 1) ^ ((1 << (width - plen)) - 1)).to_bytes(width // 8, "big").ljust(16, b"\0")
    return int.from_bytes(m[:8], "little"), int.from_bytes(m[8:], "little")


def _ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None  # not here (yet): the rule matches nothing until it is installed again


class RuleTables:
    """The rule-set maps of one xdpflow instance.

    ``open_map(name)`` returns an open Map (pinned maps: ``PinnedMaps``; a
    test harness: ``h.map``); whoever provides it closes them. ``clock`` maps
    Unix time to the program's jiffies (a JiffiesClock, or a callable making
    one when a rule with a TTL first needs it). ``lock`` makes the
    context manager serialising writers (the pin-root lock); ``locked()``
    takes it (reentrantly) around a read-modify-write of several calls.
    """

    def __init__(
        self,
        open_map: Callable[[str], Map],
        clock: JiffiesClock | Callable[[], JiffiesClock] | None = None,
        lock: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
    ) -> None:
        self._map = open_map
        self._clock = clock
        self._lock = lock
        self._depth = 0

    @classmethod
    @contextlib.contextmanager
    def of_pins(cls, pins: PinRoot, lock: bool = True) -> Iterator[RuleTables]:
        """The rule set under ``pins``, its maps opened on demand and closed
        after; writers take the pin-root lock (``lock`` False: the caller
        holds it already). Raises NotAttachedError when nothing is attached."""
        from xdpflow.dataplane.maps import PinnedMaps, open_clock

        if not os.path.exists(pins.shared("rl_head")):
            raise pins.not_attached()
        with PinnedMaps(pins) as maps:
            yield cls(maps, clock=lambda: open_clock(pins), lock=pins.lock if lock else None)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the writers' lock (if any); nests."""
        if self._lock is None or self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with self._lock():
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1

    def jiffies_clock(self) -> JiffiesClock:
        """The clock deadlines are written in. Raises XdpflowError without one."""
        if self._clock is None:
            raise XdpflowError(errno.EINVAL, "a rule with a TTL needs the data plane's clock, and none was given")
        if not isinstance(self._clock, JiffiesClock):
            self._clock = self._clock()
        return self._clock

    def _hz(self) -> int:
        """The kernel's HZ, as measured into the config map at load."""
        hz = int(self._map("config")[0].hz)
        if not hz:
            raise XdpflowError(errno.EIO, "the data plane's clock was never measured (config hz is 0): attach again")
        return hz

    # an upgrade across rule-table layouts ------------------------------------

    def carry(self) -> Carried:
        """The rule set in force, to be written into another object's fresh
        rule maps with restore()."""
        slot = self.active_slot()
        return Carried(slot, self._defs(slot), int(self._head(slot).next_id))

    def restore(self, carried: Carried) -> None:
        """Write ``carried`` into its slot of these maps: fresh maps of a
        program that does not run yet (so no flip and no grace period)."""
        rules = [r for r, _ in carried.defs]
        if not rules:
            return
        expires = {r.id: self.jiffies_clock().to_jiffies(r.expires_at) for r in rules if r.expires_at is not None}
        self._write_slot(
            carried.slot,
            compile_rules(rules, GEOMETRY),
            {r.id: stored_text(r) for r in rules},
            {r.id: c for r, c in carried.defs},
            expires,
            carried.next_id,
        )

    # reading ----------------------------------------------------------------

    def active_slot(self) -> int:
        return 1 if self._map("config")[0].flags & SLOT_FLAG else 0

    def _head(self, slot: int) -> Any:
        return self._map("rl_head")[slot]

    def _defs(self, slot: int) -> list[tuple[RuleSpec, int]]:
        """The rule store of ``slot``: (rule with id and expiry, counter slot)."""
        head = self._head(slot)
        m = self._map("rule_defs")
        out = []
        for i in range(min(int(head.nrules), CAPACITY)):
            d = m[slot * CAPACITY + i]
            text = ffi.string(d.text).decode("utf-8", "surrogateescape")
            try:
                rule = parse_line(text, now=0.0)  # now=0: an expired rule still reads back
            except RuleError as e:
                raise XdpflowError(
                    errno.EIO, f"rule store entry {i} of slot {slot} cannot be read ({e}): run `xdpflow rule flush`"
                ) from None
            if rule is None:
                continue
            rule = replace(rule, id=int(d.id), expires_at=int(d.expires_at) or None)
            out.append((rule, int(d.counter)))
        return out

    def active(self) -> list[RuleSpec]:
        """The rules in force, ids set, in (priority, id) order."""
        return sorted((r for r, _ in self._defs(self.active_slot())), key=_order)

    def counters(self) -> dict[int, tuple[int, int, int]]:
        """Rule id -> (packets, bytes, limited) of the rules in force, summed
        over CPUs."""
        defs = self._defs(self.active_slot())
        if not defs:
            return {}
        m = self._map("rule_counters")
        raw = m.lookup_batch_raw(limit=C.XF_RCOUNTERS)
        dt = np_dtype("struct xf_rule_cnt", m.value_stride)
        if raw is None:
            return {r.id: _sum_cnt(m.lookup(c)) for r, c in defs if r.id is not None}
        keys, vals, n = raw
        arr = np.frombuffer(vals, dtype=dt, count=n * m.ncpu).reshape(n, m.ncpu)
        idx = np.frombuffer(keys, dtype="<u4", count=n)
        pos = {int(k): i for i, k in enumerate(idx)}
        out = {}
        for r, c in defs:
            row = arr[pos[c]]
            out[int(r.id or 0)] = (int(row["packets"].sum()), int(row["bytes"].sum()), int(row["limited"].sum()))
        return out

    # changing ---------------------------------------------------------------

    def install(self, rules: Sequence[RuleSpec], now: float | None = None) -> list[RuleSpec]:
        """Make the rule set equal ``rules`` in one flip. Rules already in
        force (same identity) keep their id and counters; new ones get fresh
        ids and zeroed counters; rules already expired at ``now`` are left
        out. Returns the set installed, ids set, in (priority, id) order.

        Raises MapFullError (E2BIG) when the set does not fit and InputError
        for a rule the store cannot hold: nothing is changed then. Other
        failures (XdpflowError) leave the old set in force.
        """
        now = time.time() if now is None else now
        with self.locked():
            slot = self.active_slot()
            target = 1 - slot
            current = self._defs(slot)
            counter_of = {r.id: c for r, c in current}
            live = [r for r in rules if r.expires_at is None or r.expires_at > now]
            new, _gone = merge([r for r, _ in current], live)
            next_id = max(1, int(self._head(slot).next_id), int(self._head(target).next_id))
            used = set(counter_of.values())
            free = (c for c in range(C.XF_RCOUNTERS) if c not in used)
            fresh: list[int] = []
            out = []
            for r in sorted(new, key=lambda r: (r.id is None, r.priority, r.id or 0)):
                if r.id is None:
                    r = r.with_id(next_id)
                    next_id += 1
                    counter_of[r.id] = next(free)
                    fresh.append(counter_of[r.id])
                out.append(r)
            texts = [stored_text(r) for r in out]
            compiled = compile_rules(out, GEOMETRY)  # MapFullError: nothing written yet
            expires = {r.id: self.jiffies_clock().to_jiffies(r.expires_at) for r in out if r.expires_at is not None}
            rcu_grace_period()  # no frame still reads the target slot after this
            self._zero_counters(fresh)
            self._write_slot(target, compiled, {r.id: t for r, t in zip(out, texts)}, counter_of, expires, next_id)
            self._flip(target, bool(out))
        return sorted(out, key=_order)

    def expire(self, now: float | None = None) -> list[RuleSpec]:
        """Remove the rules expired at ``now`` (they already match nothing);
        returns them."""
        now = time.time() if now is None else now
        with self.locked():
            cur = self.active()
            gone = [r for r in cur if r.expires_at is not None and r.expires_at <= now]
            if gone:
                self.install([r for r in cur if r not in gone], now)
        return gone

    def flush(self, blocks: bool = False) -> list[RuleSpec]:
        """Remove every rule but the `block add --ttl` entries (``blocks``:
        those, and only those); returns what was removed."""
        with self.locked():
            cur = self.active()
            gone = [r for r in cur if (block_entry(r) is not None) == blocks]
            if gone:
                self.install([r for r in cur if r not in gone])
        return gone

    def add(self, rules: Sequence[RuleSpec], now: float | None = None) -> list[RuleSpec]:
        """Add ``rules`` to the set (one already there keeps its id and takes
        the new expiry and comment); returns them with their ids. Raises as
        install()."""
        with self.locked():
            installed = self.install([*self.active(), *rules], now)
        want = {r.identity() for r in rules}
        return [r for r in installed if r.identity() in want]

    def delete(self, ids: Sequence[int]) -> list[RuleSpec]:
        """Remove the rules with these ids; returns them. Raises InputError,
        changing nothing, when one is not in force."""
        with self.locked():
            cur = self.active()
            have = {r.id for r in cur}
            missing = [i for i in ids if i not in have]
            if missing:
                raise InputError(f"no rule with id {', '.join(map(str, missing))}; nothing was changed")
            gone = [r for r in cur if r.id in set(ids)]
            self.install([r for r in cur if r not in gone])
        return gone

    def sync(
        self, rules: Sequence[RuleSpec], dry_run: bool = False, now: float | None = None
    ) -> tuple[list[RuleSpec], list[RuleSpec]]:
        """Make the rule set equal ``rules``, `block add --ttl` entries and
        automatic mitigation rules aside (they stay, and expire by their
        TTLs). Returns (added, removed); ``dry_run`` changes nothing and
        the added rules have no ids. Raises as install()."""
        now = time.time() if now is None else now
        with self.locked():
            cur = self.active()
            blocks = [r for r in cur if block_entry(r) is not None or mitigation_entry(r) is not None]
            live = [r for r in rules if r.expires_at is None or r.expires_at > now]
            new, removed = merge([r for r in cur if r not in blocks], live)
            added = [r for r in new if r.id is None]
            if dry_run:
                return added, removed
            installed = self.install([*blocks, *new], now)
        fresh = {r.identity() for r in added}
        return [r for r in installed if r.identity() in fresh and r.id not in {b.id for b in blocks}], removed

    def block_entries(self, now: float | None = None) -> list[tuple[RuleSpec, str, int]]:
        """The `block add --ttl` entries in force: (rule, direction, packets
        matched). Read only; expired entries (which match nothing) are left out."""
        now = time.time() if now is None else now
        rules = [r for r in self.active() if block_entry(r) is not None and (r.expires_at or 0) > now]
        counts = self.counters() if rules else {}
        return [(r, block_entry(r) or "src", counts.get(r.id or 0, (0, 0, 0))[0]) for r in rules]

    # writing one slot ---------------------------------------------------------

    def _zero_counters(self, slots: list[int]) -> None:
        if not slots:
            return
        m = self._map("rule_counters")
        keys = np.array(slots, dtype="<u4")
        vals = ffi.new("char[]", len(slots) * m.ncpu * m.value_stride)
        m.update_batch_raw(ffi.from_buffer(keys), vals, len(slots))

    def _write_slot(
        self,
        t: int,
        c: Compiled,
        texts: dict[int | None, str],
        counter_of: dict[int | None, int],
        expires: dict[int | None, int],
        next_id: int,
    ) -> None:
        """Write every table of slot ``t``; its header last (nothing reads
        the slot before the flip anyway, but a header names what is valid).
        Field-table entries carry their class's summary above bit 32."""
        sums = self._write_pool(t, c)
        for name, table in (("rl_sport", c.sport), ("rl_dport", c.dport), ("rl_proto", c.proto), ("rl_len", c.length)):
            if table is not None:
                self._write_element(name, t, [(0, _with_summary(table, sums))])
        # IPv4 as the arrays the program reads: the chunks, then the /16 entries naming them
        if c.c32 is not None and len(c.c32):
            self._write_element("rl_c32", t, [(0, _with_summary(c.c32.reshape(-1), sums))])
        if c.c24 is not None and len(c.c24):
            self._write_element("rl_c24", t, [(0, _with_summary(c.c24.reshape(-1), sums))])
        l1s = [
            (_fd(family, direction) * C.XF_RL1_SIZE, _with_summary(c.l1v4[direction] if family == 4 else l1, sums))
            for (family, direction), l1 in c.l1.items()
            if direction in c.fields
        ]
        if l1s:
            self._write_element("rl_l1", t, l1s)
        self._write_addr(t, c, sums)
        self._write_iface(t, c, sums)
        self._write_act(t, c, counter_of, expires)
        self._write_defs(t, c, texts, counter_of)
        head = ffi.new("struct xf_rule_head *")
        head.fields = sum(FIELD_FLAGS[f] for f in c.fields)
        head.nrules = len(c.rules)
        head.bl_rank = c.bl_rank
        head.next_id = next_id
        head.iface_default = c.iface_default
        head.iface_default_sum = int(sums[c.iface_default])
        for fi, family in enumerate((4, 6)):
            for li, plen in enumerate(c.levels.get(family, [])):
                head.lmask[fi][li][0], head.lmask[fi][li][1] = _mask_words(plen, FAMILY_BITS[family])
        self._map("rl_head")[t] = head
        # the program reads the mask from the config it already has; this
        # slot's byte only, so the slot in force reads on unchanged
        m = self._map("config")
        cfg = m[0]
        cfg.rule_fields = (cfg.rule_fields & ~(0xFF << 8 * t)) | head.fields << 8 * t
        m[0] = cfg

    def _write_element(self, name: str, t: int, parts: list[tuple[int, np.ndarray]]) -> None:
        """Slot t's element of a per-slot array (see xdpflow.h): each part's
        entries at its offset, zeros elsewhere (no entry the set names)."""
        m = self._map(name)
        arr = np.zeros(m.types.sizeof(m.value_type) // 8, dtype="<u8")
        for off, vals in parts:
            arr[off : off + len(vals)] = vals
        m[t] = arr.tobytes()

    def _write_pool(self, t: int, c: Compiled) -> np.ndarray:
        """The bitmaps; returns each class's summary."""
        words = C.XF_RULE_WORDS
        # the slot's whole element (classes past the set's are zeros): the
        # program reaches every bitmap through one lookup of it
        arr = np.zeros(C.XF_RCLASS_MAX, dtype=np_dtype("struct xf_rule_bits"))
        n = len(c.pool)
        w = np.array([c.words(i, words) for i in range(n)], dtype=np.uint64).reshape(n, words)
        arr["w"][:n] = w
        arr["summary"][:n] = ((w != 0).astype(np.uint32) << np.arange(words, dtype=np.uint32)).sum(axis=1)
        self._map("rl_pool")[t] = arr.tobytes()
        return arr["summary"][:n].astype(np.uint64)

    def _write_addr(self, t: int, c: Compiled, sums: np.ndarray) -> None:
        m = self._map("rl_addr")
        kdt = np_dtype(m.key_type)
        per_slot = 4 * C.XF_RLEVELS
        raw = m.lookup_batch_raw(chunk=65536)
        if raw is not None and raw[2]:
            have = np.frombuffer(raw[0], dtype=kdt, count=raw[2])
            stale = have[have["tag"] // per_slot == t]
            if len(stale):
                stale = np.ascontiguousarray(stale)
                m.delete_batch_raw(ffi.from_buffer(stale), len(stale))
        elif raw is None:
            for k in list(m):
                if k.tag // per_slot == t:
                    m.pop(k, None)
        v6 = {k: v for k, v in c.addr.items() if k[0] == 6}  # IPv4 is read from arrays
        if not v6:
            return
        keys = np.zeros(len(v6), dtype=kdt)
        addrs = bytearray()
        tags = []
        for family, direction, li, prefix in v6:
            tags.append((t * 4 + _fd(family, direction)) * C.XF_RLEVELS + li)
            addrs += prefix.to_bytes(FAMILY_BITS[family] // 8, "big").ljust(16, b"\0")
        keys["tag"] = tags
        keys["addr"] = np.frombuffer(bytes(addrs), dtype=np.uint8).reshape(len(v6), 16)
        vals = _with_summary(np.fromiter(v6.values(), dtype=np.uint32, count=len(v6)), sums)
        m.update_batch_raw(ffi.from_buffer(keys), ffi.from_buffer(vals), len(keys))

    def _write_iface(self, t: int, c: Compiled, sums: np.ndarray) -> None:
        m = self._map("rl_iface")
        for k in list(m):
            if k.slot == t:
                m.pop(k, None)
        for name, cls in c.iface.items():
            idx = _ifindex(name)
            if idx is not None:
                key = ffi.new("struct xf_riface_key *", {"slot": t, "ifindex": idx})
                m[key] = cls | int(sums[cls]) << 32

    def _write_act(
        self, t: int, c: Compiled, counter_of: dict[int | None, int], expires: dict[int | None, int]
    ) -> None:
        if not c.rules:
            return
        arr = np.zeros(len(c.rules), dtype=np_dtype("struct xf_rule_act"))
        hz = self._hz() if any(r.action == "rate-limit" for r in c.rules) else 0
        for i, (r, bit, rank) in enumerate(zip(c.rules, c.bits, c.ranks)):
            pkt, byte, burst = rate_costs(r.pps, r.bps, hz) if r.action == "rate-limit" else (0, 0, 0)
            arr[i] = (
                r.id,
                rank,
                counter_of[r.id],
                ACTION_CODES[r.action],
                0,
                bit,
                expires.get(r.id, 0),
                pkt,
                byte,
                burst,
            )
        keys = np.array(c.bits, dtype="<u4") + t * C.XF_RULE_BITS
        self._map("rl_act").update_batch_raw(ffi.from_buffer(keys), ffi.from_buffer(arr), len(arr))

    def _write_defs(self, t: int, c: Compiled, texts: dict[int | None, str], counter_of: dict[int | None, int]) -> None:
        if not c.rules:
            return
        arr = np.zeros(len(c.rules), dtype=np_dtype("struct xf_rule_def"))
        for i, r in enumerate(c.rules):
            text = np.frombuffer(texts[r.id].encode().ljust(TEXT_MAX + 1, b"\0"), dtype=np.uint8)
            arr[i] = (r.id, counter_of[r.id], r.expires_at or 0, text)
        keys = np.arange(len(arr), dtype="<u4") + t * CAPACITY
        self._map("rule_defs").update_batch_raw(ffi.from_buffer(keys), ffi.from_buffer(arr), len(arr))

    def _flip(self, t: int, nonempty: bool) -> None:
        """One config write: the slot and whether it holds rules at once."""
        m = self._map("config")
        cfg = m[0]
        flags = (cfg.flags & ~(SLOT_FLAG | RULES_FLAG)) | (SLOT_FLAG if t else 0) | (RULES_FLAG if nonempty else 0)
        cfg.flags = flags
        m[0] = cfg


BLOCK_COMMENT = "block"


def block_entry(rule: RuleSpec) -> str | None:
    """The direction ("src"/"dst") of a `block add --ttl` entry: a drop rule
    at the blocklist's priority with one address, an expiry and the comment
    "block"; None for any other rule. `rule sync` and `rule flush` leave
    these to the `block` commands."""
    if (
        rule.action != "drop"
        or rule.priority != BLOCKLIST_PRIORITY
        or rule.comment != BLOCK_COMMENT
        or rule.expires_at is None
        or (rule.src is None) == (rule.dst is None)
        or rule.match_words()[1:-1] != [f"src={rule.src}" if rule.src is not None else f"dst={rule.dst}"]
    ):
        return None
    return "src" if rule.src is not None else "dst"


def block_rule(net: IPv4Network | IPv6Network, direction: str, expires_at: int) -> RuleSpec:
    """The rule `block add CIDR --ttl` installs."""
    kw = {direction: net}
    return RuleSpec(action="drop", priority=BLOCKLIST_PRIORITY, expires_at=expires_at, comment=BLOCK_COMMENT, **kw)  # type: ignore[arg-type]


_ATTACK_COMMENT = re.compile(r"^attack (\d+)$")


def mitigation_comment(attack_id: int) -> str:
    """The comment of every rule automatic mitigation installs for an attack."""
    return f"attack {attack_id}"


def mitigation_entry(rule: RuleSpec) -> int | None:
    """The attack id of a rule automatic mitigation installed (a rule at
    MITIGATION_PRIORITY or ALLOWLIST_PRIORITY with an expiry and the comment
    "attack ID"); None for any other rule. `rule sync` leaves these to the
    daemon; they expire by their TTLs."""
    if rule.priority not in (MITIGATION_PRIORITY, ALLOWLIST_PRIORITY) or rule.expires_at is None:
        return None
    m = _ATTACK_COMMENT.match(rule.comment or "")
    return int(m.group(1)) if m else None


def _order(r: RuleSpec) -> tuple[int, int]:
    return (r.priority, r.id or 0)


def _fd(family: int, direction: str) -> int:
    return (2 if family == 6 else 0) + DIRS.index(direction)


def _sum_cnt(per_cpu: Any) -> tuple[int, int, int]:
    return (
        sum(int(v.packets) for v in per_cpu),
        sum(int(v.bytes) for v in per_cpu),
        sum(int(v.limited) for v in per_cpu),
    )


def _with_summary(table: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """u32 table entries as the program reads them: above bit 32 the
    summary of the class an entry names (bits 0-15), 0 for a chunk entry."""
    t = table.astype(np.uint64)
    s = sums[t & np.uint64(0xFFFF)]
    s[(t & np.uint64(CHUNK)) != 0] = 0
    return t | (s << np.uint64(32))
