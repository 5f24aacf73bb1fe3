"""The kernel blocklist: rule store, IPv4 table, IPv6 tries, hit counters.

Each rule (CIDR + direction) lives in one of four LPM tries (v4/v6 x src/dst),
the store of every rule; its value is a rule index into the per-CPU
``rule_hits`` array. IPv6 traffic is matched in the tries, behind a bitmap
prefilter that says which hashed /32 may hold a rule. IPv4 traffic is matched
in a three-level table computed here from the rules (``v4_tables``): an array
indexed by /16, a hash of /24s and a hash of hosts, each entry a rule index + 1
with flags meaning "look one level down". The shared ``config`` flags
say which directions are non-empty, so traffic skips empty ones entirely.

Changes keep every address that stays listed blocked at every moment: rules
and bits are added before anything is deleted, bits are cleared only once no
remaining rule needs them, and the IPv4 table is rewritten bottom-up (hosts,
/24s, /16s) and pruned top-down, so a frame walking it mid-change gets either
the old or the new answer.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from . import abi
from .blocklist_file import PF6_BITS, Rule, bitmap_words, diff, prefilter_bits, sort_rules
from .errors import MapFullError
from .libbpf import Map, ffi, possible_cpus

# (family, direction) -> (trie, config flag)
TRIES: dict[tuple[int, str], tuple[str, int]] = {
    (4, "src"): ("bl4_src", abi.C.XF_CFG_BL4_SRC),
    (4, "dst"): ("bl4_dst", abi.C.XF_CFG_BL4_DST),
    (6, "src"): ("bl6_src", abi.C.XF_CFG_BL6_SRC),
    (6, "dst"): ("bl6_dst", abi.C.XF_CFG_BL6_DST),
}
PREFILTERS = {(6, "src"): "pf6_src", (6, "dst"): "pf6_dst"}
V4_LEVELS = {
    "src": ("bl4_l1_src", "bl4_l2_src", "bl4_l3_src"),
    "dst": ("bl4_l1_dst", "bl4_l2_dst", "bl4_l3_dst"),
}
ALL_TRIE_FLAGS = sum(t[1] for t in TRIES.values())
D24 = abi.C.XF_BL_D24
HOSTS = abi.C.XF_BL_HOSTS


@dataclass(frozen=True)
class Change:
    added: list[Rule]
    deleted: list[Rule]


def _rule_from_key(family: int, key: bytes) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    plen = int.from_bytes(key[:4], "little")
    if family == 4:
        return ipaddress.IPv4Network((key[4:8], plen))
    return ipaddress.IPv6Network((key[4:20], plen))


@dataclass
class V4Tables:
    l1: np.ndarray  # XF_BL4_L1_SIZE entries, uint32
    l2: dict[int, int]  # /24 (address >> 8) -> entry
    l3: dict[int, int]  # host address -> entry


def v4_tables(rules: Iterable[tuple[ipaddress.IPv4Network, int]]) -> V4Tables:
    """The IPv4 lookup table for one direction's (network, rule index) pairs.

    Longest prefix wins: rules are painted shortest first, so a longer rule
    overwrites the entries of a shorter one it lies inside. An entry is rule
    index + 1, the answer for its whole range unless flagged: D24 (L1) means
    /17-/24 rules lie inside and every /24 holding a longer rule has an L2
    entry; HOSTS means /25-/32 rules lie inside and have L3 entries.
    """
    l1 = np.zeros(abi.C.XF_BL4_L1_SIZE, dtype=np.uint32)
    l2: dict[int, int] = {}
    l3: dict[int, int] = {}
    d24: set[int] = set()  # /16s with /17-/24 rules
    hosts16: set[int] = set()  # /16s with /25-/32 rules
    hosts24: set[int] = set()  # /24s with /25-/32 rules
    for net, idx in sorted(rules, key=lambda t: t[0].prefixlen):
        a, plen, v = int(net.network_address), net.prefixlen, idx + 1
        if plen <= 16:
            first = a >> 16
            l1[first : first + (1 << (16 - plen))] = v
        elif plen <= 24:
            d24.add(a >> 16)
            first = a >> 8
            for c in range(first, first + (1 << (24 - plen))):
                l2[c] = v
        else:
            hosts16.add(a >> 16)
            hosts24.add(a >> 8)
            for h in range(a, a + (1 << (32 - plen))):
                l3[h] = v
    for c in hosts24:
        if (c >> 8) in d24:
            # the lookup reaches L3 through this /24's entry
            l2[c] = (l2.get(c) or int(l1[c >> 8])) | HOSTS
    for b in d24:
        l1[b] |= np.uint32(D24)
    for b in hosts16:
        l1[b] |= np.uint32(HOSTS)
    return V4Tables(l1, l2, l3)


class Blocklist:
    """The blocklist maps of one xdpflow instance.

    ``open_map(name)`` returns an open Map for a map name; whoever provides it
    owns and closes those maps. Writers must hold the pin-root lock (the CLI
    does); readers need none.
    """

    def __init__(self, open_map: Callable[[str], Map]) -> None:
        self._map = open_map

    # reading ------------------------------------------------------------

    def entries(self) -> dict[Rule, int]:
        """Every rule with its rule index."""
        out: dict[Rule, int] = {}
        for (family, direction), (trie, _flag) in TRIES.items():
            m = self._map(trie)
            ks = m.info.key_size
            raw = m.lookup_batch_raw()
            if raw is None:
                for k, v in m.items():
                    out[Rule(_rule_from_key(family, bytes(ffi.buffer(k))), direction)] = int(v)
                continue
            keys, vals, n = raw
            idx = np.frombuffer(vals, dtype="<u4", count=n)
            for i in range(n):
                net = _rule_from_key(family, keys[i * ks : (i + 1) * ks])
                out[Rule(net, direction)] = int(idx[i])
        return out

    def rules(self) -> list[Rule]:
        return sort_rules(self.entries())

    def hit_counts(self) -> np.ndarray:
        """Hits per rule index, summed over CPUs."""
        m = self._map("rule_hits")
        raw = m.lookup_batch_raw(chunk=65536)
        if raw is None:
            return np.array([sum(v) for _, v in m.items()], dtype=np.uint64)
        _keys, vals, n = raw
        per_cpu = np.frombuffer(vals, dtype="<u8", count=n * possible_cpus()).reshape(n, possible_cpus())
        return per_cpu.sum(axis=1, dtype=np.uint64)

    def listing(self) -> list[tuple[Rule, int]]:
        """(rule, hits) for every rule, in rule order."""
        entries = self.entries()
        hits = self.hit_counts() if entries else np.zeros(0, dtype=np.uint64)
        return [(r, int(hits[entries[r]]) if entries[r] < len(hits) else 0) for r in sort_rules(entries)]

    def capacity(self) -> tuple[int, int]:
        """(rules per family and direction, rules in all)."""
        return self._map("bl4_src").info.max_entries, self._map("rule_hits").info.max_entries

    # writing ------------------------------------------------------------

    def add(self, rules: Iterable[Rule]) -> Change:
        current = self.entries()
        return self._apply(current, [r for r in set(rules) if r not in current], [])

    def delete(self, rules: Iterable[Rule]) -> Change:
        current = self.entries()
        return self._apply(current, [], [r for r in set(rules) if r in current])

    def sync(self, wanted: Iterable[Rule], dry_run: bool = False) -> Change:
        """Make the blocklist equal ``wanted`` by applying only the difference."""
        current = self.entries()
        to_add, to_delete = diff(current, wanted)
        if dry_run:
            self._check_capacity(current, to_add, to_delete)
            return Change(to_add, to_delete)
        return self._apply(current, to_add, to_delete)

    def flush(self) -> Change:
        current = self.entries()
        return self._apply(current, [], list(current))

    def _check_capacity(self, current: dict[Rule, int], to_add: list[Rule], to_delete: list[Rule]) -> None:
        per_trie, total = self.capacity()
        counts = {k: 0 for k in TRIES}
        for r in current:
            counts[(r.net.version, r.direction)] += 1
        for r in to_add:
            counts[(r.net.version, r.direction)] += 1
        for r in to_delete:
            counts[(r.net.version, r.direction)] -= 1
        for (family, direction), n in counts.items():
            if n > per_trie:
                raise MapFullError(
                    errno.E2BIG,
                    f"the blocklist holds at most {per_trie} IPv{family} {direction} rules; "
                    f"this change needs {n}; nothing was changed",
                )
        n = sum(counts.values())
        if n > total:
            raise MapFullError(
                errno.E2BIG,
                f"the blocklist holds at most {total} rules; this change needs {n}; nothing was changed",
            )

    def _apply(self, current: dict[Rule, int], to_add: list[Rule], to_delete: list[Rule]) -> Change:
        self._check_capacity(current, to_add, to_delete)
        gone = set(to_delete)
        final = {r: i for r, i in current.items() if r not in gone}

        # new rules get indices no current rule holds, so an entry still
        # pointing at a deleted rule never counts hits for a new one
        if to_add:
            used = np.zeros(self.capacity()[1], dtype=bool)
            used[list(current.values())] = True
            free = np.flatnonzero(~used)[: len(to_add)]
            final.update(zip(to_add, (int(i) for i in free)))
            self._zero_hits(free)

        v4 = {
            d: v4_tables((r.net, i) for r, i in final.items() if r.net.version == 4 and r.direction == d)
            for d in V4_LEVELS
        }
        self._check_v4_sizes(v4)

        # 1. adds: the rule store, IPv6 prefilter bits, the IPv4 tables
        added = [(r, final[r]) for r in to_add]
        for key in TRIES:
            items = [(r, i) for r, i in added if (r.net.version, r.direction) == key]
            if items:
                self._write_trie(key, items)
        pf_before = prefilter_bits(r for r in current if r.net.version == 6)
        pf_final = prefilter_bits(r for r in final if r.net.version == 6)
        for key in PREFILTERS:
            self._write_bits(key, _union(pf_before[key], pf_final[key]))
        for direction, tables in v4.items():
            self._write_v4(direction, tables)
        self._set_flags(set(current) | set(final))

        # 2. deletes: out of the rule store, then bits and flags nobody needs
        for key in TRIES:
            rs = [r for r in to_delete if (r.net.version, r.direction) == key]
            if rs:
                self._delete_trie(key, rs)
        for key in PREFILTERS:
            self._write_bits(key, pf_final[key])
        self._set_flags(final)
        return Change(sort_rules(to_add), sort_rules(to_delete))

    def _check_v4_sizes(self, v4: dict[str, V4Tables]) -> None:
        for direction, t in v4.items():
            _l1, l2, l3 = V4_LEVELS[direction]
            for name, n in ((l2, len(t.l2)), (l3, len(t.l3))):
                cap = self._map(name).info.max_entries
                if n > cap:
                    raise MapFullError(
                        errno.E2BIG,
                        f"the IPv4 {direction} rules expand to {n} entries in {name}, "
                        f"which holds {cap}: use fewer /17-/23 or /25-/31 prefixes; nothing was changed",
                    )

    def _zero_hits(self, indices: np.ndarray) -> None:
        m = self._map("rule_hits")
        n = len(indices)
        keys = ffi.new("__u32[]", [int(i) for i in indices])
        vals = ffi.new("char[]", n * possible_cpus() * 8)
        m.update_batch_raw(keys, vals, n)

    def _write_trie(self, key: tuple[int, str], items: list[tuple[Rule, int]]) -> None:
        m = self._map(TRIES[key][0])
        ctype = "struct xf_lpm4" if key[0] == 4 else "struct xf_lpm6"
        n = len(items)
        keys = ffi.new(f"{ctype}[]", n)
        vals = ffi.new("__u32[]", n)
        for i, (r, idx) in enumerate(items):
            keys[i].prefixlen = r.net.prefixlen
            keys[i].addr = r.net.network_address.packed
            vals[i] = idx
        m.update_batch_raw(keys, vals, n)

    def _delete_trie(self, key: tuple[int, str], rules: list[Rule]) -> None:
        m = self._map(TRIES[key][0])
        ctype = "struct xf_lpm4" if key[0] == 4 else "struct xf_lpm6"
        n = len(rules)
        keys = ffi.new(f"{ctype}[]", n)
        for i, r in enumerate(rules):
            keys[i].prefixlen = r.net.prefixlen
            keys[i].addr = r.net.network_address.packed
        m.delete_batch_raw(keys, n)

    def _read_u32_map(self, m: Map) -> dict[int, int]:
        raw = m.lookup_batch_raw(chunk=65536)
        if raw is None:
            return {int(k): int(v) for k, v in m.items()}
        keys, vals, n = raw
        return dict(zip(np.frombuffer(keys, "<u4", n).tolist(), np.frombuffer(vals, "<u4", n).tolist()))

    def _write_v4(self, direction: str, t: V4Tables) -> None:
        """Rewrite one direction's IPv4 table: hosts and /24s first, then the
        /16 array, then remove what the new table no longer has.
        """
        l1m, l2m, l3m = (self._map(n) for n in V4_LEVELS[direction])
        have3, have2 = self._read_u32_map(l3m), self._read_u32_map(l2m)
        _upsert(l3m, {k: v for k, v in t.l3.items() if have3.get(k) != v})
        _upsert(l2m, {k: v for k, v in t.l2.items() if have2.get(k) != v})
        raw = l1m.lookup_batch_raw(chunk=len(t.l1))
        have1 = np.frombuffer(raw[1], "<u4", raw[2]) if raw else np.array([v for _, v in sorted(l1m.items())])
        changed = np.flatnonzero(have1 != t.l1)
        _upsert(l1m, dict(zip(changed.tolist(), t.l1[changed].tolist())))
        _remove(l2m, [k for k in have2 if k not in t.l2])
        _remove(l3m, [k for k in have3 if k not in t.l3])

    def _write_bits(self, key: tuple[int, str], bits: set[int] | None) -> None:
        """Make a prefilter bitmap equal ``bits``, writing only changed words."""
        m = self._map(PREFILTERS[key])
        want = np.array(bitmap_words(bits, PF6_BITS), dtype=np.uint64)
        raw = m.lookup_batch_raw(chunk=len(want))
        if raw is None:
            have = np.array([v for _, v in sorted(m.items())], dtype=np.uint64)
        else:
            have = np.frombuffer(raw[1], dtype="<u8", count=raw[2])
        changed = np.flatnonzero(have != want)
        if len(changed) == 0:
            return
        keys = ffi.new("__u32[]", changed.tolist())
        vals = ffi.new("__u64[]", want[changed].tolist())
        m.update_batch_raw(keys, vals, len(changed))

    def _set_flags(self, rules: Iterable[Rule]) -> None:
        present = {(r.net.version, r.direction) for r in rules}
        flags = sum(TRIES[k][1] for k in present)
        m = self._map("config")
        cfg = m[0]
        new = (cfg.flags & ~ALL_TRIE_FLAGS) | flags
        if new != cfg.flags:
            cfg.flags = new
            m[0] = cfg


def _upsert(m: Map, entries: dict[int, int]) -> None:
    if entries:
        n = len(entries)
        m.update_batch_raw(ffi.new("__u32[]", list(entries)), ffi.new("__u32[]", list(entries.values())), n)


def _remove(m: Map, keys: list[int]) -> None:
    if keys:
        m.delete_batch_raw(ffi.new("__u32[]", keys), len(keys))


def _union(a: set[int] | None, b: set[int] | None) -> set[int] | None:
    if a is None or b is None:
        return None
    return a | b
