"""The kernel blocklist: LPM tries, their prefilter bitmaps, rule hit counters.

Each rule (CIDR + direction) lives in one of four tries (v4/v6 x src/dst);
its value is a rule index into the per-CPU ``rule_hits`` array. In front of
each trie a bitmap says which /16 (v4) or hashed /32 (v6) may hold a rule, and
the shared ``config`` flags say which tries are non-empty, so traffic that
misses the blocklist never walks a trie.

Changes keep every address that stays listed blocked at every moment: new
entries and their bits are written before anything is deleted, and bits are
cleared only once no remaining rule needs them.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from . import abi
from .blocklist_file import PF4_BITS, PF6_BITS, Rule, bitmap_words, diff, prefilter_bits
from .errors import MapFullError
from .libbpf import Map, ffi, possible_cpus

# (family, direction) -> (trie, prefilter, config flag, bitmap bits)
TRIES: dict[tuple[int, str], tuple[str, str, int, int]] = {
    (4, "src"): ("bl4_src", "pf4_src", abi.C.XF_CFG_BL4_SRC, PF4_BITS),
    (4, "dst"): ("bl4_dst", "pf4_dst", abi.C.XF_CFG_BL4_DST, PF4_BITS),
    (6, "src"): ("bl6_src", "pf6_src", abi.C.XF_CFG_BL6_SRC, PF6_BITS),
    (6, "dst"): ("bl6_dst", "pf6_dst", abi.C.XF_CFG_BL6_DST, PF6_BITS),
}
ALL_TRIE_FLAGS = sum(t[2] for t in TRIES.values())


@dataclass(frozen=True)
class Change:
    added: list[Rule]
    deleted: list[Rule]


def _rule_from_key(family: int, key: bytes) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    plen = int.from_bytes(key[:4], "little")
    if family == 4:
        return ipaddress.IPv4Network((key[4:8], plen))
    return ipaddress.IPv6Network((key[4:20], plen))


class Blocklist:
    """The blocklist maps of one xdpflow instance.

    ``open_map(name)`` returns an open Map for a map name; the Blocklist keeps
    what it opens and closes it in ``close()``. Writers must hold the pin-root
    lock (the CLI does); readers need none.
    """

    def __init__(self, open_map: Callable[[str], Map]) -> None:
        self._open = open_map

    def _map(self, name: str) -> Map:
        return self._open(name)

    # reading ------------------------------------------------------------

    def entries(self) -> dict[Rule, int]:
        """Every rule with its rule index."""
        out: dict[Rule, int] = {}
        for (family, direction), (trie, _pf, _flag, _bits) in TRIES.items():
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
        return sorted(self.entries())

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
        """(rule, hits) for every rule, sorted by rule."""
        entries = self.entries()
        hits = self.hit_counts() if entries else np.zeros(0, dtype=np.uint64)
        return [(r, int(hits[i]) if i < len(hits) else 0) for r, i in sorted(entries.items())]

    def capacity(self) -> tuple[int, int]:
        """(rules per trie, rule indices in all)."""
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
        for key, (trie, *_rest) in TRIES.items():
            n = sum(1 for r in current if (r.net.version, r.direction) == key)
            n += sum(1 for r in to_add if (r.net.version, r.direction) == key)
            n -= sum(1 for r in to_delete if (r.net.version, r.direction) == key)
            if n > per_trie:
                raise MapFullError(
                    errno.E2BIG,
                    f"the blocklist holds at most {per_trie} IPv{key[0]} {key[1]} rules; "
                    f"this change needs {n}; nothing was changed",
                )
        n = len(current) + len(to_add) - len(to_delete)
        if n > total:
            raise MapFullError(
                errno.E2BIG, f"the blocklist holds at most {total} rules; this change needs {n}; nothing was changed"
            )

    def _apply(self, current: dict[Rule, int], to_add: list[Rule], to_delete: list[Rule]) -> Change:
        self._check_capacity(current, to_add, to_delete)
        remaining = set(current) - set(to_delete)
        final = remaining | set(to_add)

        # 1. new rules: zeroed hit counters, then trie entries
        if to_add:
            used = np.zeros(self.capacity()[1], dtype=bool)
            used[list(current.values())] = True
            free = np.flatnonzero(~used)[: len(to_add)]
            self._zero_hits(free)
            by_trie: dict[tuple[int, str], list[tuple[Rule, int]]] = {}
            for r, i in zip(sorted(to_add), free):
                by_trie.setdefault((r.net.version, r.direction), []).append((r, int(i)))
            for key, items in by_trie.items():
                self._write_trie(key, items)

        # 2. prefilter bits for everything now in the tries; then the flags
        before = prefilter_bits(current)
        after_add = prefilter_bits(set(current) | set(to_add))
        wanted_final = prefilter_bits(final)
        for key in TRIES:
            self._write_bits(key, _union(before.get(key, set()), after_add.get(key, set())))
        self._set_flags(final | set(current))

        # 3. deletions, then bits and flags no remaining rule needs
        if to_delete:
            for key in TRIES:
                rs = [r for r in to_delete if (r.net.version, r.direction) == key]
                if rs:
                    self._delete_trie(key, rs)
            for key in TRIES:
                self._write_bits(key, wanted_final.get(key, set()))
            self._set_flags(final)
        return Change(sorted(to_add), sorted(to_delete))

    def _zero_hits(self, indices: np.ndarray) -> None:
        m = self._map("rule_hits")
        n = len(indices)
        keys = ffi.new("__u32[]", [int(i) for i in indices])
        vals = ffi.new("char[]", n * possible_cpus() * 8)
        m.update_batch_raw(keys, vals, n)

    def _write_trie(self, key: tuple[int, str], items: list[tuple[Rule, int]]) -> None:
        family = key[0]
        m = self._map(TRIES[key][0])
        ctype = "struct xf_lpm4" if family == 4 else "struct xf_lpm6"
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

    def _write_bits(self, key: tuple[int, str], bits: set[int] | None) -> None:
        """Make the prefilter bitmap equal ``bits``, writing only changed words."""
        _trie, pf, _flag, nbits = TRIES[key]
        m = self._map(pf)
        want = np.array(bitmap_words(bits, nbits), dtype=np.uint64)
        raw = m.lookup_batch_raw(chunk=len(want))
        if raw is None:
            have = np.array([v for _, v in sorted(m.items())], dtype=np.uint64)
        else:
            have = np.frombuffer(raw[1], dtype="<u8", count=raw[2])
        changed = np.flatnonzero(have != want)
        if len(changed) == 0:
            return
        keys = ffi.new("__u32[]", [int(i) for i in changed])
        vals = ffi.new("__u64[]", [int(want[i]) for i in changed])
        m.update_batch_raw(keys, vals, len(changed))

    def _set_flags(self, rules: Iterable[Rule]) -> None:
        present = {(r.net.version, r.direction) for r in rules}
        flags = sum(TRIES[k][2] for k in present)
        m = self._map("config")
        cfg = m[0]
        new = (cfg.flags & ~ALL_TRIE_FLAGS) | flags
        if new != cfg.flags:
            cfg.flags = new
            m[0] = cfg


def _union(a: set[int] | None, b: set[int] | None) -> set[int] | None:
    if a is None or b is None:
        return None
    return a | b
