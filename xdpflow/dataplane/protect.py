"""Protected destinations: which hosts the program counts, and their counts.

The program (bpf/protect.h) counts every frame to a host inside a protected
prefix per host, in ``prot_hosts`` (per CPU, an array of slots found by
hashing the address, sized at attach: see struct xf_host_slot; a host whose
slots are all taken counts in ``prot_overflow`` per group instead). A host
may sit in different slots on different CPUs: readers sum by address. Which
prefixes are protected is a small LPM table that no frame walks as a trie:
an array per /16 and up to XF_PLEVELS hash levels below it (see xdpflow.h);
``compile_groups`` computes it, purely, and ``ProtectTables.install`` writes
it.

Like the rule set, the tables exist twice: ``install`` writes the inactive
slot after an RCU grace period (no frame still reads it) and then flips
XF_CFG_PROTECT_SLOT together with XF_CFG_PROTECT in one config write, so a
frame sees the old set or the new one, never half of one. Installing the set
already in force changes nothing (a restarted daemon keeps the counts); a
different set drops the hosts whose group changed and zeroes the overflow
records. Thresholds are the daemon's business, not this module's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import numpy as np

from xdpflow.bindings.libbpf import Map
from xdpflow.dataplane.abi import C, ffi, np_dtype
from xdpflow.dataplane.pins import PinRoot
from xdpflow.dataplane.rules import rcu_grace_period
from xdpflow.errors import InputError, MapFullError, XdpflowError

PROTECT_FLAG = C.XF_CFG_PROTECT
SLOT_FLAG = C.XF_CFG_PROTECT_SLOT
HOSTS_DEFAULT = C.XF_PHOSTS_DEFAULT
GROUPS_MAX = C.XF_PGROUPS - 1  # ids 1 .. XF_PGROUPS - 1
LEVELS_MAX = C.XF_PLEVELS
L1_SIZE = C.XF_PL1_SIZE
ADDR_ENTRIES = C.XF_PADDR_MAX // 2  # the level hash holds both slots
FAMILY_BITS = {4: 32, 6: 128}
FILTER_MAX = {4: 32, 6: 64}  # the filter's region: at most a /32 or a /64
_NO_BATCH = "this kernel cannot batch-read hash maps: protected groups need Linux 5.6 or later"
COUNT_FIELDS = ("packets", "bytes", "new_flows", "syn", "udp", "icmp", "frags")

Prefix = IPv4Network | IPv6Network
_RowKey = bytes  # family byte + 16 address bytes (HostCounts has a field named bytes)


@dataclass(frozen=True)
class Group:
    """A protected group: its hosts are the addresses inside ``prefixes``."""

    name: str
    prefixes: tuple[Prefix, ...]


@dataclass
class Compiled:
    """The tables of one group set, as the program reads them (pure data).

    ``l1[family]``: the /16 array; ``levels[family]``: the prefix length of
    each level; ``addr[(family, level, masked address)]``: group ids.
    """

    l1: dict[int, np.ndarray]
    levels: dict[int, list[int]]
    addr: dict[tuple[int, int, int], int]
    digest: int
    filter: np.ndarray = field(default_factory=lambda: np.zeros(C.XF_PPF_WORDS, dtype=np.uint64))
    pf_len: dict[int, int] = field(default_factory=lambda: {4: 0, 6: 0})  # the filter's region length

    def group_of(self, addr: IPv4Address | IPv6Address) -> int:
        """The group id the program finds for ``addr`` (0: none): the
        reference the kernel is tested against."""
        fam = addr.version
        width = FAMILY_BITS[fam]
        a = int(addr)
        v = int(self.l1[fam][a >> (width - 16)])
        mask = v >> 16
        if v and not v & C.XF_PGROUP_MASK:
            bit = int(_filter_bits(np.array([a >> (width - self.pf_len[fam])], dtype=np.uint64))[0])
            if not (int(self.filter[bit >> 6]) >> (bit & 63)) & 1:
                return 0
        for i in reversed(range(len(self.levels[fam]))):
            if mask & (1 << i):
                lv = self.levels[fam][i]
                g = self.addr.get((fam, i, (a >> (width - lv)) << (width - lv)))
                if g is not None:
                    return g
        return v & C.XF_PGROUP_MASK


def _digest(groups: Sequence[Group]) -> int:
    text = "\n".join(f"{g.name}\t" + " ".join(sorted(str(p) for p in g.prefixes)) for g in groups)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") or 1


def _choose_levels(plens: list[int], counts: dict[int, int]) -> list[int]:
    """At most LEVELS_MAX prefix lengths (the longest always among them);
    each prefix is expanded to the next level at or above its length. Drops
    the level whose removal adds the fewest entries, one at a time."""
    levels = sorted(plens)
    while len(levels) > LEVELS_MAX:

        def cost(i: int) -> int:
            nxt = levels[i + 1]
            return counts.get(levels[i], 0) * ((1 << (nxt - levels[i])) - 1)

        drop = min(range(len(levels) - 1), key=cost)
        nxt = levels[drop + 1]
        counts[nxt] = counts.get(nxt, 0) + counts.pop(levels[drop], 0) * (1 << (nxt - levels[drop]))
        del levels[drop]
    return levels


def compile_groups(groups: Sequence[Group]) -> Compiled:
    """The tables for ``groups`` (group i gets id i + 1). The most specific
    prefix wins across groups. Raises InputError for a prefix in two groups
    or too many groups, MapFullError when the levels do not fit."""
    if len(groups) > GROUPS_MAX:
        raise InputError(f"{len(groups)} protected groups: at most {GROUPS_MAX} fit; merge some")
    owner: dict[Prefix, int] = {}
    for gid, g in enumerate(groups, start=1):
        for p in g.prefixes:
            if p in owner and owner[p] != gid:
                raise InputError(
                    f"prefix {p} is in protected groups {groups[owner[p] - 1].name!r} and {g.name!r}: "
                    "give it to one of them"
                )
            owner[p] = gid
    c = Compiled(l1={}, levels={}, addr={}, digest=_digest(groups))
    for fam in FAMILY_BITS:
        _compile_family(
            c, fam, {(int(p.network_address), p.prefixlen): g for p, g in owner.items() if p.version == fam}
        )
    return c


def _lpm(by_len: dict[int, dict[int, int]], lens_desc: list[int], width: int, a: int, upto: int) -> int:
    """Group of the longest prefix of at most ``upto`` bits holding ``a``."""
    for q in lens_desc:
        if q <= upto:
            g = by_len[q].get((a >> (width - q)) << (width - q) if q else 0)
            if g is not None:
                return g
    return 0


def _compile_family(c: Compiled, fam: int, nets: dict[tuple[int, int], int]) -> None:
    width = FAMILY_BITS[fam]
    by_len: dict[int, dict[int, int]] = {}
    for (a, plen), gid in nets.items():
        by_len.setdefault(plen, {})[a] = gid
    lens_desc = sorted(by_len, reverse=True)
    l1 = np.zeros(L1_SIZE, dtype=np.uint32)
    for (a, plen), gid in sorted(nets.items(), key=lambda kv: kv[0][1]):
        if plen <= 16:
            top = a >> (width - 16)
            l1[top : top + (1 << (16 - plen))] = gid  # longer prefixes come later and overwrite
    deep = {p: len(v) for p, v in by_len.items() if p > 16}
    levels = _choose_levels(list(deep), dict(deep))
    c.pf_len[fam] = min([FILTER_MAX[fam], *deep])  # one region per prefix: each sets one bit
    for a, plen in nets:
        if plen <= 16:
            continue
        li = next(i for i, lv in enumerate(levels) if lv >= plen)
        lv = levels[li]
        l1[a >> (width - 16)] |= np.uint32(1 << (16 + li))
        _set_filter(c, fam, a, plen)
        step = 1 << (width - lv)
        for j in range(1 << (lv - plen)):
            e = a + j * step
            c.addr[(fam, li, e)] = _lpm(by_len, lens_desc, width, e, lv)
            if len(c.addr) > ADDR_ENTRIES:
                raise MapFullError(
                    errno.E2BIG,
                    f"the protected prefixes need more than {ADDR_ENTRIES} table entries: "
                    "use fewer distinct prefix lengths longer than /16",
                )
    c.l1[fam] = l1
    c.levels[fam] = levels


def _filter_bits(tops: np.ndarray) -> np.ndarray:
    """The filter's bit numbers for region prefixes (bpf/protect.h prot_filter)."""
    x = (tops & np.uint64(0xFFFFFFFF)) ^ (tops >> np.uint64(32))
    return ((x * np.uint64(C.XF_PF6_MULT)) & np.uint64(0xFFFFFFFF)) >> np.uint64(C.XF_PF6_SHIFT)


def _set_filter(c: Compiled, fam: int, a: int, plen: int) -> None:
    """Set the bits of every region the prefix (a, plen) overlaps."""
    width, rb = FAMILY_BITS[fam], c.pf_len[fam]
    first = a >> (width - rb)
    n = 1 << (rb - plen) if plen < rb else 1
    bits = _filter_bits(np.arange(first, first + n, dtype=np.uint64))
    np.bitwise_or.at(c.filter, (bits >> np.uint64(6)).astype(np.intp), np.uint64(1) << (bits & np.uint64(63)))


def _mask_words(plen: int, width: int) -> tuple[int, int]:
    """A prefix mask as the two u64 the program ANDs with the address bytes
    as they lie in memory (little-endian halves of big-endian bytes)."""
    m = (((1 << width) - 1) ^ ((1 << (width - plen)) - 1)).to_bytes(width // 8, "big").ljust(16, b"\0")
    return int.from_bytes(m[:8], "little"), int.from_bytes(m[8:], "little")


def _addr_bytes(fam: int, a: int) -> bytes:
    return a.to_bytes(FAMILY_BITS[fam] // 8, "big").ljust(16, b"\0")


def host_key(addr: IPv4Address | IPv6Address) -> bytes:
    """An address as family, three pad bytes and 16 address bytes: the
    first 20 bytes of its struct xf_host_slot."""
    return bytes([addr.version, 0, 0, 0]) + _addr_bytes(addr.version, int(addr))


@dataclass
class HostCounts:
    """Every counted host, one row each, counts summed over CPUs: ``family``
    (4/6, u8), ``addr`` (n x 16 bytes, IPv4 in the first 4), ``group``
    (u16), and the u64 arrays of COUNT_FIELDS."""

    family: np.ndarray
    addr: np.ndarray
    group: np.ndarray
    packets: np.ndarray
    bytes: np.ndarray
    new_flows: np.ndarray
    syn: np.ndarray
    udp: np.ndarray
    icmp: np.ndarray
    frags: np.ndarray
    _index: dict[_RowKey, int] | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.family)

    def address(self, i: int) -> IPv4Address | IPv6Address:
        """Row i's address."""
        raw = bytes(self.addr[i])
        return ip_address(raw[:4] if self.family[i] == 4 else raw)

    def addresses(self) -> list[IPv4Address | IPv6Address]:
        return [self.address(i) for i in range(len(self))]

    def find(self, addr: IPv4Address | IPv6Address) -> int | None:
        """Row of ``addr``, or None."""
        if self._index is None:
            self._index = {bytes([int(self.family[i])]) + bytes(self.addr[i]): i for i in range(len(self))}
        return self._index.get(host_key(addr)[:1] + host_key(addr)[4:])

    def row(self, i: int) -> dict[str, int]:
        """Row i's counts (and group) as plain ints."""
        out = {f: int(getattr(self, f)[i]) for f in COUNT_FIELDS}
        out["group"] = int(self.group[i])
        return out

    @classmethod
    def empty(cls) -> HostCounts:
        counts = {f: np.zeros(0, dtype=np.uint64) for f in COUNT_FIELDS}
        return cls(np.zeros(0, np.uint8), np.zeros((0, 16), np.uint8), np.zeros(0, np.uint16), **counts)


class ProtectTables:
    """The protected-destination maps of one xdpflow instance.

    ``open_map(name)`` returns an open Map (pinned maps: ``PinnedMaps``; a
    test harness: ``h.map``); whoever provides it closes them. ``lock``
    serialises writers (the pin-root lock; config flags are shared with the
    blocklist and the rules).
    """

    def __init__(
        self,
        open_map: Callable[[str], Map],
        lock: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
    ) -> None:
        self._map = open_map
        self._lock = lock

    @classmethod
    @contextlib.contextmanager
    def of_pins(cls, pins: PinRoot, lock: bool = True) -> Iterator[ProtectTables]:
        """The tables under ``pins``, maps opened on demand and closed after.
        Raises NotAttachedError when nothing is attached (or the attached
        program predates protected groups: attach again)."""
        from xdpflow.dataplane.maps import PinnedMaps

        if not os.path.exists(pins.shared("prot_hosts")):
            raise pins.not_attached()
        with PinnedMaps(pins) as maps:
            yield cls(maps, lock=pins.lock if lock else None)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return self._lock() if self._lock is not None else contextlib.nullcontext()

    # reading ----------------------------------------------------------------

    def _flags(self) -> int:
        return int(self._map("config")[0].flags)

    def enabled(self) -> bool:
        """Whether the program counts (a non-empty set is installed)."""
        return bool(self._flags() & PROTECT_FLAG)

    def active_slot(self) -> int:
        return 1 if self._flags() & SLOT_FLAG else 0

    def capacity(self) -> int:
        """How many hosts each CPU's table holds (sized at attach, a power
        of two; a host whose XF_PPROBES slots are all taken counts in its
        group's overflow record even before that)."""
        return int(self._map("prot_hosts").info.max_entries)

    def _slots(self) -> tuple[Map, np.ndarray]:
        """Every slot of every CPU: (the map, a slots x CPUs record array)."""
        m = self._map("prot_hosts")
        n = int(m.info.max_entries)
        raw = m.lookup_batch_raw(chunk=n, limit=n)
        if raw is None:
            raise XdpflowError(errno.EOPNOTSUPP, _NO_BATCH)
        _keys, vals, got = raw
        dt = np_dtype("struct xf_host_slot", m.value_stride)
        return m, np.frombuffer(vals, dtype=dt, count=got * m.ncpu).reshape(got, m.ncpu)

    def hosts(self) -> HostCounts:
        """Every counted host, its slots summed over CPUs (a snapshot; the
        program keeps counting). Raises XdpflowError."""
        _m, arr = self._slots()
        used = arr[arr["family"] != 0]
        if len(used) == 0:
            return HostCounts.empty()
        keys = np.empty((len(used), 17), dtype=np.uint8)
        keys[:, 0] = used["family"]
        keys[:, 1:] = used["addr"]
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        sums = {}
        for f in COUNT_FIELDS:
            out = np.zeros(len(uniq), dtype=np.uint64)
            np.add.at(out, inv, used[f].astype(np.uint64))
            sums[f] = out
        group = np.zeros(len(uniq), dtype=np.uint32)
        np.maximum.at(group, inv, used["group"].astype(np.uint32))
        return HostCounts(
            family=np.ascontiguousarray(uniq[:, 0]),
            addr=np.ascontiguousarray(uniq[:, 1:]),
            group=group.astype(np.uint16),
            **sums,
        )

    def overflow(self) -> dict[int, dict[str, int]]:
        """Per group id with any: the counts of frames to hosts that found
        the host table full (summed over CPUs). Raises XdpflowError."""
        m = self._map("prot_overflow")
        raw = m.lookup_batch_raw(limit=C.XF_PGROUPS)
        vdt = np_dtype("struct xf_host_cnt", m.value_stride)
        out: dict[int, dict[str, int]] = {}
        if raw is None:
            for gid in range(1, C.XF_PGROUPS):
                vs = m.lookup(gid)
                tot = {f: sum(int(getattr(x, f)) for x in vs) for f in COUNT_FIELDS}
                if tot["packets"]:
                    out[gid] = tot
            return out
        keys, vals, n = raw
        idx = np.frombuffer(keys, dtype="<u4", count=n)
        v = np.frombuffer(vals, dtype=vdt, count=n * m.ncpu).reshape(n, m.ncpu)
        pk = v["packets"].sum(axis=1)
        for i in np.nonzero(pk)[0]:
            out[int(idx[i])] = {f: int(v[f][i].sum()) for f in COUNT_FIELDS}
        return out

    def installed_digest(self) -> int | None:
        """Digest of the set in force (None: counting is off)."""
        if not self.enabled():
            return None
        return int(self._map("prot_head")[self.active_slot()].digest)

    # changing ---------------------------------------------------------------

    def forget(self, keys: Iterable[IPv4Address | IPv6Address]) -> int:
        """Free the slots of these hosts on every CPU (idle ones: the
        daemon's call); hosts not counted are skipped. Returns how many
        hosts were found. A frame a CPU counts for a host between the read
        and the write here is lost with it. Raises XdpflowError."""
        want = {host_key(a)[:1] + host_key(a)[4:] for a in keys}
        if not want:
            return 0
        m, arr = self._slots()
        rows = arr.copy()
        keyb = np.empty((rows.shape[0], rows.shape[1], 17), dtype=np.uint8)
        keyb[..., 0] = rows["family"]
        keyb[..., 1:] = rows["addr"]
        hit = np.zeros(rows.shape, dtype=bool)
        found: set[bytes] = set()
        for i, j in zip(*np.nonzero(rows["family"])):
            k = keyb[i, j].tobytes()
            if k in want:
                hit[i, j] = True
                found.add(k)
        idx = np.nonzero(hit.any(axis=1))[0]
        if len(idx):
            sel = rows[idx]
            sel[hit[idx]] = np.zeros(1, dtype=rows.dtype)
            sel = np.ascontiguousarray(sel)
            k = idx.astype("<u4")
            m.update_batch_raw(ffi.from_buffer(k), ffi.from_buffer(sel), len(k))
        return len(found)

    def install(self, groups: Sequence[Group], hosts_max: int | None = None) -> None:
        """Count frames to the hosts of ``groups`` from now on (group i gets
        id i + 1); an empty list switches counting off and empties the
        tables. The set already in force is left as it is, counts included.

        Raises InputError (a prefix in two groups, too many groups,
        ``hosts_max`` beyond the table's size, which is fixed at attach),
        MapFullError (too many level entries): nothing is changed then.
        Other failures (XdpflowError) leave the old set in force.
        """
        if hosts_max is not None and hosts_max > self.capacity():
            raise InputError(
                f"the host table holds {self.capacity()} hosts, fewer than the {hosts_max} asked for: "
                "detach and attach again with a larger protect-hosts size"
            )
        with self._locked():
            if not groups:
                if self.enabled():
                    self._set_flags(clear=PROTECT_FLAG)
                    rcu_grace_period()
                self._clear_counts()
                return
            c = compile_groups(groups)  # InputError/MapFullError: nothing written yet
            if self.installed_digest() == c.digest:
                return
            target = 1 - self.active_slot()
            rcu_grace_period()  # no frame still reads the target slot after this
            self._write_slot(target, c)
            self._set_flags(clear=SLOT_FLAG, set_=PROTECT_FLAG | (SLOT_FLAG if target else 0))
            rcu_grace_period()  # no frame still counts by the old set
            self._drop_regrouped(c)

    def _set_flags(self, clear: int = 0, set_: int = 0) -> None:
        m = self._map("config")
        cfg = m[0]
        cfg.flags = (int(cfg.flags) & ~clear) | set_
        m[0] = cfg

    def _write_slot(self, t: int, c: Compiled) -> None:
        l1 = self._map("prot_l1")
        for fam_i, fam in enumerate((4, 6)):
            base = (t * 2 + fam_i) * L1_SIZE
            vals = np.ascontiguousarray(c.l1[fam], dtype="<u4")
            keys = np.arange(base, base + L1_SIZE, dtype="<u4")
            l1.update_batch_raw(ffi.from_buffer(keys), ffi.from_buffer(vals), L1_SIZE)
        m = self._map("prot_addr")
        kdt = np_dtype("struct xf_paddr_key")
        raw = m.lookup_batch_raw(chunk=65536)
        if raw is None:
            raise XdpflowError(errno.EOPNOTSUPP, _NO_BATCH)
        keys_b, _vals, n = raw
        if n:
            old = np.frombuffer(keys_b, dtype=kdt, count=n)
            stale = old[(old["tag"] // (2 * LEVELS_MAX)) == t].copy()
            if len(stale):
                m.delete_batch_raw(ffi.from_buffer(stale), len(stale))
        if c.addr:
            arr = np.zeros(len(c.addr), dtype=kdt)
            gids = np.zeros(len(c.addr), dtype="<u4")
            for i, ((fam, li, a), g) in enumerate(c.addr.items()):
                arr[i]["tag"] = (t * 2 + (fam == 6)) * LEVELS_MAX + li
                arr[i]["addr"] = np.frombuffer(_addr_bytes(fam, a), dtype=np.uint8)
                gids[i] = g
            m.update_batch_raw(ffi.from_buffer(arr), ffi.from_buffer(gids), len(arr))
        words = np.ascontiguousarray(c.filter, dtype="<u8")
        keys = np.arange(t * C.XF_PPF_WORDS, (t + 1) * C.XF_PPF_WORDS, dtype="<u4")
        self._map("prot_pf").update_batch_raw(ffi.from_buffer(keys), ffi.from_buffer(words), C.XF_PPF_WORDS)
        head = ffi.new("struct xf_prot_head *")
        head.digest = c.digest
        head.pf_len = [c.pf_len[4], c.pf_len[6]]
        for fam_i, fam in enumerate((4, 6)):
            for li, lv in enumerate(c.levels[fam]):
                w0, w1 = _mask_words(lv, FAMILY_BITS[fam])
                head.lmask[fam_i][li][0] = w0
                head.lmask[fam_i][li][1] = w1
        self._map("prot_head")[t] = head[0]

    def _drop_regrouped(self, c: Compiled) -> None:
        """Delete the hosts the new set puts in another group or none (the
        program counts a host it finds without asking the prefixes again),
        and zero the overflow records (group ids may have moved)."""
        h = self.hosts()
        gone = [a for i, a in enumerate(h.addresses()) if c.group_of(a) != int(h.group[i])]
        self.forget(gone)
        self._zero_overflow()

    def _clear_counts(self) -> None:
        m = self._map("prot_hosts")
        n = int(m.info.max_entries)
        keys = np.arange(n, dtype="<u4")
        vals = np.zeros(n * m.ncpu * m.value_stride, dtype=np.uint8)
        m.update_batch_raw(ffi.from_buffer(keys), ffi.from_buffer(vals), n)
        self._zero_overflow()

    def _zero_overflow(self) -> None:
        m = self._map("prot_overflow")
        n = C.XF_PGROUPS
        keys = np.arange(n, dtype="<u4")
        vals = np.zeros(n * m.ncpu * m.value_stride, dtype=np.uint8)
        m.update_batch_raw(ffi.from_buffer(keys), ffi.from_buffer(vals), n)
