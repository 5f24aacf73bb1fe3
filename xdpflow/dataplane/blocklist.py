"""The kernel blocklist: rule store, IPv4 and IPv6 tables, hit counters.

Each rule (CIDR + direction) lives in one of four LPM tries (v4/v6 x src/dst),
the store of every rule, which no frame walks; its value is a rule index into
the per-CPU ``rule_hits`` array. Traffic is matched in tables computed here
from the rules: for IPv4 (``v4_tables``) an array indexed by /16, a hash of
/24s and a hash of hosts, each entry a rule index + 1 with flags meaning
"look one level down"; for IPv6 (``v6_tables``) an array indexed by the top
16 bits and deeper regions at 8-bit steps whose entries name the next
prefix length to look up, so a lookup jumps straight to where longer rules
branch; the deeper regions are placed (``place_v6``) in a set-associative
hash laid out in an array, a full bucket's extra regions in a BPF hash. The
shared ``config`` flags say which directions are non-empty, so traffic skips
empty ones entirely.

Changes keep every address that stays listed blocked at every moment: rules
are added to the store before anything is deleted, and each table is
rewritten bottom-up (deeper entries, then the top array) and pruned after,
so a frame walking it mid-change gets either the old or the new answer (every
entry is the complete answer for its region under one of the two sets). A
region new to the IPv6 array takes a slot free before the change (its
address first, its prefix length last) and a slot it leaves is freed after
it: no live entry moves while a frame may read it.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import socket
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from xdpflow.bindings.libbpf import Map, possible_cpus
from xdpflow.dataplane import abi
from xdpflow.dataplane.abi import ffi, np_dtype
from xdpflow.dataplane.background import Background
from xdpflow.dataplane.counts import rule_capacity
from xdpflow.dataplane.maps import PinnedMaps
from xdpflow.dataplane.pins import PinRoot
from xdpflow.errors import MapFullError, XdpflowError
from xdpflow.rules.blockfile import KEY6, Rule, rule_from_key, rule_key

TRIES = abi.BLOCKLIST_TRIES  # (family, direction) -> (trie, config flag)
V6_TABLES = {"src": ("bl6_l0_src", "bl6_deep_src"), "dst": ("bl6_l0_dst", "bl6_deep_dst")}
V6_FILTERS = {"src": "bl6_pf_src", "dst": "bl6_pf_dst"}
V6_ARRAYS = {"src": "bl6_tab_src", "dst": "bl6_tab_dst"}
V6_L1 = {"src": "bl6_l1_src", "dst": "bl6_l1_dst"}
V4_LEVELS = {
    "src": ("bl4_l1_src", "bl4_l2_src", "bl4_l3_src"),
    "dst": ("bl4_l1_dst", "bl4_l2_dst", "bl4_l3_dst"),
}
V4_CHUNKS = {"src": "bl4_l2c_src", "dst": "bl4_l2c_dst"}
# the hosts' chunks: L2H (parallel to L2C) names a /24's chunk of L3C
V4_HOSTS = {"src": ("bl4_l2h_src", "bl4_l3c_src"), "dst": ("bl4_l2h_dst", "bl4_l3c_dst")}
ALL_TRIE_FLAGS = sum(t[1] for t in TRIES.values())
D24 = abi.C.XF_BL_D24
HOSTS = abi.C.XF_BL_HOSTS
CHUNK = abi.C.XF_BL_CHUNK
RULE_MASK = abi.C.XF_BL_RULE_MASK
_DIRS = ("src", "dst")
_U128 = (1 << 128) - 1

# Internally a rule is its rule_key int: (address << 8 | prefixlen, IPv6 bit
# 136) << 1 | direction bit. Hashing 10^5 ipaddress objects costs a second.


_KINDS = ((4, "src"), (4, "dst"), (6, "src"), (6, "dst"))
_V6_SHIFT = KEY6.bit_length()  # rule_key >> this is 1 for IPv6


def _kind(k: int) -> tuple[int, str]:
    return _KINDS[(k >> _V6_SHIFT) << 1 | (k & 1)]


def _by_kind(keys: Iterable[int]) -> dict[tuple[int, str], list[int]]:
    v6 = 1 << _V6_SHIFT  # every IPv6 key is at least this
    ks = keys if isinstance(keys, Collection) else list(keys)  # two passes
    k4 = [k for k in ks if k < v6]
    k6 = [k for k in ks if k >= v6]
    return {
        (4, "src"): [k for k in k4 if not k & 1],
        (4, "dst"): [k for k in k4 if k & 1],
        (6, "src"): [k for k in k6 if not k & 1],
        (6, "dst"): [k for k in k6 if k & 1],
    }


def _addr(k: int) -> int:
    return (k >> 9) & _U128


def _plen(k: int) -> int:
    return (k >> 1) & 0xFF


def _span(k: int) -> tuple[int, int]:
    bits = (128 if (k >> 1) & KEY6 else 32) - _plen(k)
    lo = _addr(k)
    return lo, lo | ((1 << bits) - 1)


def key_cidr(k: int) -> str:
    """The CIDR text of a rule key, without building ipaddress objects."""
    if (k >> 1) & KEY6:
        return str(rule_from_key(k).net)
    return f"{socket.inet_ntoa(_addr(k).to_bytes(4, 'big'))}/{_plen(k)}"


class Change:
    """What a blocklist operation added and deleted (rule keys; Rules and
    CIDR texts made on demand: a feed sync changes 10^5 of them)."""

    def __init__(self, added: list[int], deleted: list[int]) -> None:
        self.added_keys = sorted(added)
        self.deleted_keys = sorted(deleted)

    @property
    def added(self) -> list[Rule]:
        return [rule_from_key(k) for k in self.added_keys]

    @property
    def deleted(self) -> list[Rule]:
        return [rule_from_key(k) for k in self.deleted_keys]

    def added_cidrs(self) -> list[str]:
        return [key_cidr(k) for k in self.added_keys]

    def deleted_cidrs(self) -> list[str]:
        return [key_cidr(k) for k in self.deleted_keys]


@dataclass
class V4Tables:
    l1: np.ndarray  # XF_BL4_L1_SIZE entries, uint32
    l2: dict[int, int]  # /24 (address >> 8) -> entry
    l3: dict[int, int]  # host address -> entry


def v4_tables(addrs: np.ndarray, plens: np.ndarray, idx: np.ndarray) -> V4Tables:
    """The IPv4 lookup table for one direction's rules (host-order network
    addresses, prefix lengths, rule indices; parallel arrays).

    Longest prefix wins: rules are painted shortest first, so a longer rule
    overwrites the entries of a shorter one it lies inside. An entry is rule
    index + 1, the answer for its whole range unless flagged: D24 (L1) means
    /17-/24 rules lie inside and every /24 holding a longer rule has an L2
    entry; HOSTS means /25-/32 rules lie inside and have L3 entries.
    """
    addrs = addrs.astype(np.uint64)
    vals = idx.astype(np.uint64) + 1
    l1 = np.zeros(abi.C.XF_BL4_L1_SIZE, dtype=np.uint32)
    l2: dict[int, int] = {}
    l3: dict[int, int] = {}
    for plen in range(0, 33):
        sel = plens == plen
        if not sel.any():
            continue
        a, v = addrs[sel], vals[sel]
        if plen <= 16:
            width = 1 << (16 - plen)
            for first, val in zip((a >> 16).tolist(), v.tolist()):
                l1[first : first + width] = val
        elif plen <= 24:
            keys = ((a >> 8)[:, None] + np.arange(1 << (24 - plen), dtype=np.uint64)).ravel()
            l2.update(zip(keys.tolist(), np.repeat(v, 1 << (24 - plen)).tolist()))
        else:
            keys = (a[:, None] + np.arange(1 << (32 - plen), dtype=np.uint64)).ravel()
            l3.update(zip(keys.tolist(), np.repeat(v, 1 << (32 - plen)).tolist()))
    mid, long_ = (plens > 16) & (plens <= 24), plens > 24
    d24 = set((addrs[mid] >> 16).tolist())
    hosts16 = set((addrs[long_] >> 16).tolist())
    if d24:
        # a /24 holding hosts whose /16 has L2 entries: the lookup reaches L3 through the /24's entry
        cs, _n = _sorted_unique(addrs[long_] >> 8)
        tops = np.sort(np.fromiter(d24, dtype=np.uint64, count=len(d24)))
        at = np.minimum(np.searchsorted(tops, cs >> 8), len(tops) - 1)
        cs = cs[tops[at] == cs >> 8]
        get = l2.get
        for c, whole16 in zip(cs.tolist(), l1[(cs >> 8).astype(np.int64)].tolist()):
            l2[c] = (get(c) or whole16) | HOSTS
    if d24:
        l1[np.fromiter(d24, dtype=np.int64)] |= np.uint32(D24)
    if hosts16:
        l1[np.fromiter(hosts16, dtype=np.int64)] |= np.uint32(HOSTS)
    return V4Tables(l1, l2, l3)


@dataclass
class V4Placed:
    """A V4Tables as written: /16s that need L2 get a 256-slot chunk of the
    L2 array where there is one, the rest keep /24 entries in the L2 hash.
    The /24s with hosts in a chunked /16 get a 256-slot chunk of L3C where
    there is one (``l2h`` names it per /24 slot); the L3 hash keeps every
    host regardless, for the rest and for programs that predate L3C."""

    l1: np.ndarray
    chunks: dict[int, np.ndarray]  # chunk number -> its 256 slots
    l2: dict[int, int]  # /24 -> entry, for /16s without a chunk
    l3: dict[int, int]
    old_l1: np.ndarray  # the /16 array as the program reads it now
    l2h: dict[int, np.ndarray] = field(default_factory=dict)  # chunk number -> host chunk + 1 per /24 slot
    hchunks: dict[int, np.ndarray] = field(default_factory=dict)  # host chunk number -> its 256 slots


CHUNK_MIN = 8  # /24 entries a /16 needs before it gets a chunk


def place_chunks(
    t: V4Tables,
    old_l1: np.ndarray,
    capacity: int,
    chunk_min: int = CHUNK_MIN,
    old_l2h: np.ndarray | None = None,
    host_capacity: int = 0,
) -> V4Placed:
    """Give every /16 of ``t`` that needs L2 a chunk, keeping the chunk it has
    in ``old_l1`` (the table the program reads now) and never handing a
    chunk in use there to another /16: a frame that read the old /16 entry
    then reads either the old or the new slot of the same /16. New chunks go
    to the /16s with the most /24 entries first, and only to /16s with at
    least CHUNK_MIN of them (a feed's scattered /24s stay in the hash); past
    ``capacity`` the rest use the L2 hash too. A /16 that has a chunk keeps it
    while it needs L2 at all.

    With ``host_capacity`` (L3C chunks; 0 where the maps predate them), /16s
    holding hosts need L2 too, and each /24 with hosts in a chunked /16 gets
    an L3C chunk under the same rules: kept while it has hosts (and its /16
    its chunk), never one that ``old_l2h`` (the L2H array the program reads
    now) still names, the /24s with the most hosts first.
    """
    hosts16 = (t.l1 & np.uint32(HOSTS)) != 0 if host_capacity else np.zeros(len(t.l1), dtype=bool)
    need = np.flatnonzero(((t.l1 & np.uint32(D24)) != 0) | hosts16)
    was = old_l1[need]
    had = (was & np.uint32(D24 | CHUNK)) == np.uint32(D24 | CHUNK)
    assign = dict(zip(need[had].tolist(), (was[had] & np.uint32(RULE_MASK)).tolist()))
    used = set(((old_l1[(old_l1 & np.uint32(CHUNK)) != 0]) & np.uint32(RULE_MASK)).tolist())
    free = (k for k in range(capacity) if k not in used)
    k24 = np.fromiter(t.l2.keys(), dtype=np.int64, count=len(t.l2))
    v24 = np.fromiter(t.l2.values(), dtype=np.uint32, count=len(t.l2))
    per16 = np.bincount(k24 >> 8, minlength=abi.C.XF_BL4_L1_SIZE)
    cand = need[~had]
    # sparse /16s get none: a 256-slot chunk for a few /24s costs more to write than it saves;
    # a /16 with hosts does, when they can have chunks: they spare a hash lookup
    cand = cand[(per16[cand] >= chunk_min) | hosts16[cand]]
    for c in cand[np.lexsort((cand, -per16[cand]))].tolist():  # the most /24 entries first
        k = next(free, None)
        if k is None:
            break
        assign[c] = k
    l1 = t.l1.copy()
    cs = np.fromiter(assign.keys(), dtype=np.int64, count=len(assign))
    ks = np.fromiter(assign.values(), dtype=np.int64, count=len(assign))
    # every slot of a chunk starts as its /16's own answer, then takes its /24's
    slots = np.repeat((t.l1[cs] & np.uint32(RULE_MASK)).astype(np.uint32), 256).reshape(-1, 256)
    row_of = np.full(abi.C.XF_BL4_L1_SIZE, -1, dtype=np.int64)
    row_of[cs] = np.arange(len(cs))
    rows = row_of[k24 >> 8]
    chunked = rows >= 0
    slots[rows[chunked], k24[chunked] & 0xFF] = v24[chunked]
    l2h: dict[int, np.ndarray] = {}
    hchunks: dict[int, np.ndarray] = {}
    if host_capacity:
        hosts = np.fromiter(t.l3.keys(), dtype=np.int64, count=len(t.l3))
        hrows = row_of[hosts >> 16]
        in_chunk = hrows >= 0
        # a /24 slot of a chunk holding hosts says so (those of /16s with
        # /24 rules already do, from v4_tables)
        slots[hrows[in_chunk], (hosts[in_chunk] >> 8) & 0xFF] |= np.uint32(HOSTS)
        l2h, hchunks = _place_host_chunks(t, slots, ks, row_of, hosts[in_chunk], old_l1, old_l2h, host_capacity)
    chunks = dict(zip(ks.tolist(), slots))
    l1[cs] = np.uint32(D24 | CHUNK) | ks.astype(np.uint32)
    l2 = dict(zip(k24[~chunked].tolist(), v24[~chunked].tolist()))
    return V4Placed(l1, chunks, l2, t.l3, old_l1, l2h, hchunks)


def _sorted_unique(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``a`` and how often each occurs (np.unique
    loads numpy.ma, ~90 ms of a command's start)."""
    a = np.sort(a)
    if not len(a):
        return a, a
    starts = np.flatnonzero(np.concatenate(([True], a[1:] != a[:-1])))
    return a[starts], np.diff(np.append(starts, len(a)))


def _place_host_chunks(
    t: V4Tables,
    slots: np.ndarray,
    ks: np.ndarray,
    row_of: np.ndarray,
    hosts: np.ndarray,
    old_l1: np.ndarray,
    old_l2h: np.ndarray | None,
    capacity: int,
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """L3C chunks for the /24s of ``hosts`` (host addresses in chunked /16s;
    ``slots`` the chunks' rows, ``ks`` their chunk numbers): the L2H row of
    every chunk, and each host chunk's 256 complete answers."""
    chunked_old = (old_l1 & np.uint32(D24 | CHUNK)) == np.uint32(D24 | CHUNK)
    tops = np.flatnonzero(chunked_old)
    old_ks = (old_l1[tops] & np.uint32(RULE_MASK)).astype(np.int64)
    held: dict[int, int] = {}  # /24 -> the host chunk the program may read for it now
    used: set[int] = set()  # every host chunk the program may read now
    if old_l2h is not None and len(tops):
        idx = (old_ks[:, None] * 256 + np.arange(256)).ravel()
        ptr = old_l2h[idx].astype(np.int64)
        live = np.flatnonzero(ptr)
        used = set((ptr[live] - 1).tolist())
        owner = np.repeat(tops, 256)[live]  # the /16 whose chunk the row is
        held = dict(zip((owner << 8 | (idx[live] & 0xFF)).tolist(), (ptr[live] - 1).tolist()))
    h24, per24 = _sorted_unique(hosts >> 8)
    assign: dict[int, int] = {}
    for c in h24.tolist():
        k = held.get(c)
        # kept while its /16 keeps the chunk whose row names it
        if k is not None and int(ks[row_of[c >> 8]]) == int(old_l1[c >> 8] & RULE_MASK):
            assign[c] = k
    taken = used | set(assign.values())
    free = (k for k in range(capacity) if k not in taken)
    for c in h24[np.argsort(-per24, kind="stable")].tolist():  # the most hosts first
        if c in assign:
            continue
        k = next(free, None)
        if k is None:
            break
        assign[c] = k
    l2h = {int(k): np.zeros(256, dtype=np.uint32) for k in ks.tolist()}
    if not assign:
        return l2h, {}
    cs = np.fromiter(assign.keys(), dtype=np.int64, count=len(assign))
    hk = np.fromiter(assign.values(), dtype=np.int64, count=len(assign))
    rows = row_of[cs >> 8]
    for k, b, h in zip(ks[rows].tolist(), (cs & 0xFF).tolist(), hk.tolist()):
        l2h[k][b] = h + 1
    # each host chunk starts as its /24's answer, then takes its hosts'
    hs = np.repeat(slots[rows, cs & 0xFF] & np.uint32(RULE_MASK), 256).reshape(-1, 256)
    addrs = np.fromiter(t.l3.keys(), dtype=np.int64, count=len(t.l3))
    vals = np.fromiter(t.l3.values(), dtype=np.uint32, count=len(t.l3))
    order = np.argsort(cs)
    at = np.minimum(np.searchsorted(cs[order], addrs >> 8), len(cs) - 1)
    mine = cs[order][at] == addrs >> 8
    hs[order[at[mine]], addrs[mine] & 0xFF] = vals[mine]
    return l2h, dict(zip(hk.tolist(), hs))


@dataclass
class V6Tables:
    l0: np.ndarray  # XF_BL6_L0_SIZE entries, uint32
    deep: dict[tuple[int, int], int]  # (prefix length, address >> (128 - length)) -> entry


_NEXT = abi.C.XF_BL6_NEXT_SHIFT


def _v6_level(plen: int) -> int:
    """The prefix length a rule is stored at: /16 in L0, else the next multiple of 8."""
    return 16 if plen <= 16 else -(-plen // 8) * 8


def v6_tables(rules: list[tuple[int, int, int]]) -> V6Tables:
    """The IPv6 lookup table for one direction's rules, given as (address
    int, prefix length, rule index).

    A rule of length p is stored at level L = _v6_level(p), expanded to the
    2^(L - p) regions of length L it covers; rules are painted shortest
    first, so the longest rule wins in each region. An entry's answer is the
    longest rule covering its whole region (rules stored at shallower levels
    included), and its next field the smallest level at which a longer rule
    lies inside it. The lookup follows next from L0; a region on that path
    that holds no rule of its own but contains deeper rules gets a marker
    entry (answer inherited), so a miss always means "nothing longer".
    """
    l0 = np.zeros(abi.C.XF_BL6_L0_SIZE, dtype=np.uint32)
    answer: dict[tuple[int, int], int] = {}
    inside: dict[tuple[int, int], int] = {}  # (level, region) -> smallest level of a rule inside it
    deep = []
    # shortest first, so levels only grow: the first level noted inside a region is its smallest
    note = inside.setdefault
    for addr, plen, idx in sorted(rules, key=lambda r: r[1]):
        level = _v6_level(plen)
        if level == 16:
            first = addr >> 112
            l0[first : first + (1 << (16 - plen))] = idx + 1
            continue
        deep.append((addr, level))
        if level == plen:
            answer[(level, addr >> (128 - level))] = idx + 1
        else:
            base = addr >> (128 - level)
            for region in range(base, base + (1 << (level - plen))):
                answer[(level, region)] = idx + 1
        for a in range(16, level, 8):
            note((a, addr >> (128 - a)), level)
    markers = set()
    for addr, level in deep:
        a = 16
        while (n := inside[(a, addr >> (128 - a))]) < level:
            key = (n, addr >> (128 - n))
            if key not in answer:
                markers.add(key)
            a = n
    for level, region in sorted(markers):  # shallow first: ancestors are done
        inherited = int(l0[region >> (level - 16)])
        for a in range(level - 8, 16, -8):
            up = answer.get((a, region >> (level - a)))
            if up is not None:
                inherited = up
                break
        answer[(level, region)] = inherited & abi.C.XF_BL6_RULE_MASK
    for (a, region), n in inside.items():
        if a == 16:
            l0[region] |= np.uint32(n << _NEXT)
    return V6Tables(l0, {key: v | (inside.get(key, 0) << _NEXT) for key, v in answer.items()})


WAYS = abi.C.XF_BL6_WAYS
SLOT_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("plen", "<u4"), ("val", "<u4")])
BUCKET_DTYPE = np.dtype([("s", SLOT_DTYPE, (WAYS,)), ("ovf", "<u4"), ("pad", "<u4")])
_M64 = (1 << 64) - 1


def bucket_of(hi: np.ndarray, lo: np.ndarray, plen: np.ndarray, bits: int = abi.C.XF_BL6_BUCKET_BITS) -> np.ndarray:
    """The buckets of regions (their address halves and prefix lengths),
    hashed as bl6_find() in the program does."""
    u = np.uint64
    x: np.ndarray = (hi.astype(u) * u(abi.C.XF_BL6_M1)) ^ (lo.astype(u) * u(abi.C.XF_BL6_M2)) ^ plen.astype(u)
    x = x ^ (x >> u(32))
    return ((x * u(abi.C.XF_BL6_M3)) >> u(64 - bits)).astype(np.int64)


def region_halves(regions: Iterable[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hi, lo, plen) arrays of (prefix length, region) keys, as the program
    masks an address to a region."""
    his, los, plens = [], [], []
    for plen, region in regions:
        if plen <= 64:
            his.append(region << (64 - plen))
            los.append(0)
        else:
            his.append(region >> (plen - 64))
            los.append((region << (128 - plen)) & _M64)
        plens.append(plen)
    return np.array(his, np.uint64), np.array(los, np.uint64), np.array(plens, np.uint32)


@dataclass
class V6Placed:
    """A V6Tables as written: the array slots it changes and the regions
    that go to the overflow hash (their buckets were full)."""

    l0: np.ndarray
    new: tuple[np.ndarray, ...]  # (bucket, way, hi, lo, plen, val) of slots to fill
    update: tuple[np.ndarray, np.ndarray, np.ndarray]  # (bucket, way, val): kept slots whose answer changes
    clear: tuple[np.ndarray, np.ndarray]  # (bucket, way) of slots no region keeps
    ovf: np.ndarray  # bucket -> 1 where a region of it is in the overflow hash
    deep: dict[tuple[int, int], int]  # the overflow hash's regions
    l1: np.ndarray | None = None  # the L1 slots (v6_l1)


def place_v6(t: V6Tables, old: np.ndarray | None) -> V6Placed:
    """Place the deeper regions of ``t`` in the array whose buckets hold
    ``old`` now (BUCKET_DTYPE; None: there is no array, every region goes to
    the hash, as objects before it read them). A region already in a slot
    keeps it; a new one takes a slot of its bucket that is free in ``old``,
    in key order; the rest go to the overflow hash.
    """
    keys = list(t.deep)
    vals = np.fromiter(t.deep.values(), dtype=np.uint32, count=len(keys))
    if old is None:
        e = np.zeros(0, np.int64)
        return V6Placed(t.l0, (e,) * 6, (e,) * 3, (e, e), np.zeros(0, np.uint32), dict(t.deep))
    hi, lo, plen = region_halves(keys)
    b = bucket_of(hi, lo, plen, int(len(old)).bit_length() - 1)
    os_ = old["s"]
    live = os_["plen"] != 0
    match = (os_["plen"][b] == plen[:, None]) & (os_["hi"][b] == hi[:, None]) & (os_["lo"][b] == lo[:, None])
    kept = match.any(axis=1)
    kway = match.argmax(axis=1)
    kb, kw = b[kept], kway[kept]
    changed = os_["val"][kb, kw] != vals[kept]
    update = (kb[changed], kw[changed], vals[kept][changed])
    still = np.zeros(live.shape, dtype=bool)
    still[kb, kw] = True
    cb, cw = np.nonzero(live & ~still)
    # the rest: the r-th region of a bucket takes its r-th free slot
    rest = np.flatnonzero(~kept)
    rb = b[rest]
    order = np.argsort(rb, kind="stable")
    rest, rb = rest[order], rb[order]
    n = len(rest)
    starts = np.ones(n, dtype=bool)
    starts[1:] = rb[1:] != rb[:-1]
    pos = np.arange(n)
    rank = pos - np.maximum.accumulate(np.where(starts, pos, 0)) if n else pos
    free = ~live
    cum = np.cumsum(free, axis=1)
    fits = rank < cum[rb, -1] if n else np.zeros(0, dtype=bool)
    way = (free[rb] & (cum[rb] == (rank + 1)[:, None])).argmax(axis=1)
    put, pb, pw = rest[fits], rb[fits], way[fits]
    new = (pb, pw, hi[put], lo[put], plen[put], vals[put])
    over = rest[~fits]
    ovf = np.zeros(len(old), dtype=np.uint32)
    ovf[rb[~fits]] = 1
    deep = {keys[i]: int(vals[i]) for i in over.tolist()}
    return V6Placed(t.l0, new, update, (cb, cw), ovf, deep)


def fill_v6(arr: np.ndarray, write: Callable[[np.ndarray], None], t: V6Placed) -> None:
    """The first half of writing ``t`` into the array ``arr`` (``write``
    stores buckets changed in it): the flags of buckets with regions in the
    hash, answers that change in place, then the new slots, each filled
    before its prefix length makes it live."""
    up = np.flatnonzero(t.ovf & ~arr["ovf"])
    arr["ovf"][up] = 1
    slots = arr["s"]
    ub, uw, uv = t.update
    slots["val"][ub, uw] = uv
    nb, nw, hi, lo, plen, val = t.new
    slots["hi"][nb, nw] = hi
    slots["lo"][nb, nw] = lo
    slots["val"][nb, nw] = val
    write(np.concatenate((up, ub, nb)))
    slots["plen"][nb, nw] = plen
    write(nb)


def prune_v6(arr: np.ndarray, write: Callable[[np.ndarray], None], t: V6Placed) -> None:
    """The second half, once nothing links to what ``t`` drops: free the
    slots it no longer uses and the flags no bucket needs."""
    cb, cw = t.clear
    arr["s"]["plen"][cb, cw] = 0
    down = np.flatnonzero(arr["ovf"] & ~t.ovf)
    arr["ovf"][down] = 0
    write(np.concatenate((cb, down)))


class _Split:
    """A change's rule keys split by (family, direction) once: a pass over
    10^5 keys costs tens of ms, and counts, tables and flags all need it.
    ``to_delete`` is part of ``current``, ``to_add`` is not."""

    def __init__(self, current: Iterable[int], to_add: list[int], to_delete: list[int]) -> None:
        self.current, self.add, self.delete = _by_kind(current), _by_kind(to_add), _by_kind(to_delete)

    def counts(self, deleted: int) -> dict[tuple[int, str], int]:
        """Rules per kind: current and added, less the deleted ones with -1."""
        return {k: len(self.current[k]) + len(self.add[k]) + deleted * len(self.delete[k]) for k in _KINDS}

    def final(self, gone: set[int]) -> dict[tuple[int, str], list[int]]:
        """Each kind's keys once ``gone`` (the deleted keys) are out and the added in."""
        return {
            k: ([x for x in self.current[k] if x not in gone] if self.delete[k] else self.current[k]) + self.add[k]
            for k in _KINDS
        }


class Blocklist:
    """The blocklist maps of one xdpflow instance.

    ``open_map(name)`` returns an open Map for a map name; whoever provides it
    owns and closes those maps. Writers must hold the pin-root lock (the CLI
    does); readers need none.
    """

    def __init__(self, open_map: Callable[[str], Map]) -> None:
        self._map = open_map
        self._views: dict[str, np.ndarray | None] = {}
        self._optional: dict[str, bool] = {}

    # reading ------------------------------------------------------------

    def entry_keys(self) -> dict[int, int]:
        """Every rule as rule_key -> rule index."""
        out: dict[int, int] = {}
        for (family, direction), (trie, _flag) in TRIES.items():
            m = self._map(trie)
            raw = m.lookup_batch_raw()
            if raw is None:
                kb = b"".join(bytes(ffi.buffer(k)) for k in m)
                vb = np.array([m[k] for k in m], dtype="<u4").tobytes()
                raw = (kb, vb, len(vb) // 4)
            keys, vals, n = raw
            if n == 0:
                continue
            arr = np.frombuffer(keys, dtype=np_dtype(m.key_type), count=n)
            idx = np.frombuffer(vals, dtype="<u4", count=n).tolist()
            bit = _DIRS.index(direction)
            if family == 4:
                addr = np.ascontiguousarray(arr["addr"]).view(">u4").ravel().astype(np.uint64)
                net = addr << np.uint64(8) | arr["prefixlen"].astype(np.uint64)
                rk = (net << np.uint64(1)) | np.uint64(bit)
                out.update(zip(rk.tolist(), idx))
            else:
                for a, p, i in zip(arr["addr"], arr["prefixlen"].tolist(), idx):
                    out[((KEY6 | int.from_bytes(a.tobytes(), "big") << 8 | p) << 1) | bit] = i
        return out

    def entries(self) -> dict[Rule, int]:
        """Every rule with its rule index."""
        return {rule_from_key(k): i for k, i in self.entry_keys().items()}

    def rules(self) -> list[Rule]:
        return [rule_from_key(k) for k in sorted(self.entry_keys())]

    def __len__(self) -> int:
        return len(self.entry_keys())

    def rule_indices(self) -> dict[int, Rule]:
        """Rule index -> rule, for naming the rule an event carries."""
        return {i: rule_from_key(k) for k, i in self.entry_keys().items()}

    def missing(self, rules: Iterable[Rule]) -> list[Rule]:
        """The rules that are not in the blocklist."""
        current = self.entry_keys()
        return [r for r in rules if rule_key(r) not in current]

    def hit_counts(self, limit: int | None = None) -> np.ndarray:
        """Hits per rule index, summed over CPUs; only the first ``limit``
        indices (they are handed out lowest first) when given: the whole
        per-CPU array is 512k x CPUs counters."""
        m = self._map("rule_hits")
        raw = m.lookup_batch_raw(chunk=65536, limit=limit)
        if raw is None:
            return np.array([sum(v) for _, v in m.items()], dtype=np.uint64)
        _keys, vals, n = raw
        per_cpu = np.frombuffer(vals, dtype="<u8", count=n * possible_cpus()).reshape(n, possible_cpus())
        return per_cpu.sum(axis=1, dtype=np.uint64)

    def listing(self) -> list[tuple[Rule, int]]:
        """(rule, hits) for every rule, in rule order."""
        return [(rule_from_key(k), h) for k, h in self.listing_keys()]

    def listing_keys(self) -> list[tuple[int, int]]:
        """(rule key, hits) for every rule, in rule order: listing() without
        building 10^5 ipaddress objects (key_cidr() formats a key)."""
        entries = self.entry_keys()
        if not entries:
            return []
        hits = self.hit_counts(limit=max(entries.values()) + 1).tolist()
        return [(k, hits[entries[k]]) for k in sorted(entries)]

    def capacity(self) -> tuple[int, int]:
        """(rules per family and direction, rules in all)."""
        return rule_capacity(self._map)

    # writing ------------------------------------------------------------

    def add(self, rules: Iterable[Rule]) -> Change:
        current = self.entry_keys()
        return self._apply(current, sorted({rule_key(r) for r in rules} - current.keys()), [])

    def delete(self, rules: Iterable[Rule]) -> Change:
        current = self.entry_keys()
        return self._apply(current, [], sorted({rule_key(r) for r in rules} & current.keys()))

    def sync(self, wanted: Iterable[Rule], dry_run: bool = False, direction: str | None = None) -> Change:
        """Make the blocklist equal ``wanted`` by applying only the difference.
        With ``direction``, only that direction's rules are compared: the
        other direction's stay as they are.
        """
        return self.sync_keys((rule_key(r) for r in wanted), dry_run, direction)

    def sync_keys(self, wanted: Iterable[int], dry_run: bool = False, direction: str | None = None) -> Change:
        """sync() for rule keys (blocklist_file.read_file_keys gives them)."""
        current = self.entry_keys()
        keys = wanted if isinstance(wanted, list) else list(wanted)
        want = set(keys)
        if len(want) != len(keys) or keys != sorted(keys):  # read_file_keys gives them sorted, once each
            keys = sorted(want)
        # in order as they are (sorting 10^5 keys again costs tens of ms); the
        # other direction's keys added below are all current, never added
        to_add = [k for k in keys if k not in current]
        if direction is not None:
            other = 1 - _DIRS.index(direction)
            want |= {k for k in current if k & 1 == other}
        to_delete = sorted(current.keys() - want)
        if dry_run:
            self._deletes_first(current, to_add, to_delete)
            return Change(to_add, to_delete)
        return self._apply(current, to_add, to_delete)

    def flush(self) -> Change:
        current = self.entry_keys()
        return self._apply(current, [], sorted(current))

    def _counts(self, keys: Iterable[int]) -> dict[tuple[int, str], int]:
        return {kind: len(ks) for kind, ks in _by_kind(keys).items()}

    def _check_capacity(self, counts: dict[tuple[int, str], int]) -> None:
        """Raises MapFullError unless the tries hold ``counts`` rules."""
        per_trie, total = self.capacity()
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

    def _fits(self, counts: dict[tuple[int, str], int]) -> bool:
        """Whether the tries can hold ``counts`` rules at once."""
        per_trie, total = self.capacity()
        return sum(counts.values()) <= total and max(counts.values()) <= per_trie

    def _deletes_first(
        self, current: dict[int, int], to_add: list[int], to_delete: list[int], split: _Split | None = None
    ) -> list[int]:
        """The deletions to make before the additions, so the tries never hold
        more than they can: none when old and new fit side by side; else the
        rules that share no address with any rule that stays or comes
        (whatever they unblock is unblocked by this change anyway). Raises
        MapFullError when even that does not make room: deleting anything
        else first could unblock, for a moment, an address listed before and
        after.
        """
        sp = split or _Split(current, to_add, to_delete)
        self._check_capacity(sp.counts(-1))
        if not to_add or self._fits(sp.counts(0)):
            return []
        gone = set(to_delete)
        first = _disjoint_from(to_delete, [k for k in current if k not in gone] + to_add)
        firsts = set(first)
        if not self._fits(self._counts([k for k in current if k not in firsts] + to_add)):
            per_trie, total = self.capacity()
            raise MapFullError(
                errno.E2BIG,
                f"this change adds {len(to_add)} rules before it may delete {len(to_delete) - len(first)} that "
                f"overlap them, which needs more than the {per_trie} rules per family and direction "
                f"({total} in all) the blocklist holds; apply it in two steps (first a list without the "
                "overlapping rules); nothing was changed",
            )
        return first

    def _apply(self, current: dict[int, int], to_add: list[int], to_delete: list[int]) -> Change:
        counted = self._map_if_pinned("bl_count")  # None where the pins predate it (see xf_bl_count)
        if counted is not None:
            _write_count(counted, self.generation(), None)  # stale until the change is done
        change = self._apply_unmarked(current, to_add, to_delete)
        if counted is not None:
            n = len(current) + len(change.added_keys) - len(change.deleted_keys)
            _write_count(counted, self.generation(), n)
        return change

    def _map_if_pinned(self, name: str) -> Map | None:
        """Map ``name``, or None where it is not pinned: maps added since an
        instance was attached appear at its next attach."""
        try:
            return self._map(name)
        except XdpflowError as e:
            if e.errno != errno.ENOENT:
                raise
            return None

    def _apply_unmarked(self, current: dict[int, int], to_add: list[int], to_delete: list[int]) -> Change:
        split = _Split(current, to_add, to_delete)
        first = self._deletes_first(current, to_add, to_delete, split)
        if first:
            self._apply_unmarked(current, [], first)
            firsts = set(first)
            rest = self._apply_unmarked(self.entry_keys(), to_add, [k for k in to_delete if k not in firsts])
            return Change(rest.added_keys, rest.deleted_keys + first)

        gone = set(to_delete)
        final = {k: i for k, i in current.items() if k not in gone}
        # new rules get indices no current rule holds, so an entry still
        # pointing at a deleted rule never counts hits for a new one
        free = np.zeros(0, dtype=np.int64)
        if to_add:
            used = np.zeros(self.capacity()[1], dtype=bool)
            used[list(current.values())] = True
            free = np.flatnonzero(~used)[: len(to_add)]
            final.update(zip(to_add, free.tolist()))

        # 1. adds: the rule store first. Its writes (syscalls, most of a large
        # sync's kernel time) run on another thread while this one computes
        # the tables: no frame walks the tries, so rules there that no table
        # names yet change nothing, and they are taken out again if the
        # tables turn out not to fit (nothing changed, as before).
        adds = [(kind, keys) for kind, keys in split.add.items() if keys]
        for kind, _keys in adds:
            self._map(TRIES[kind][0])  # opened on this thread: the map cache is not shared
        self._map("rule_hits")

        def store() -> None:
            for kind, keys in adds:
                self._write_trie(kind, keys, [final[k] for k in keys])

        zeroing = Background(lambda: self._zero_hits(free))
        writing = Background(store)
        try:
            kinds = split.final(gone)
            v4 = {d: self._v4_placed(kinds[(4, d)], final, d) for d in V4_LEVELS}
            self._check_v4_sizes(v4)
            rules6 = {d: [(_addr(k), _plen(k), final[k]) for k in kinds[(6, d)]] for d in V6_TABLES}
            v6 = {d: self._v6_placed(d, v6_tables(rules6[d])) for d in V6_TABLES}
            self._check_v6_sizes(v6)
            pf_final = {d: v6_filter(rules6[d]) for d in V6_FILTERS}
            flags = _flags_of(kinds)
        except BaseException:
            zeroing.wait()
            writing.wait()
            for kind, keys in adds:
                self._take_out(kind, keys)
            raise
        for error in (zeroing.wait(), writing.wait()):
            if error is not None:
                raise error

        # then the tables, then the flags
        for direction, tables in v4.items():
            self._write_v4(direction, tables)
        for d in V6_FILTERS:  # a bit is set before any entry that needs it
            self._write_filter(d, pf_final[d], keep=True)
        for direction, t6 in v6.items():
            self._write_v6(direction, t6)
        self._set_flags(flags, keep=True)

        # 2. deletes: out of the rule store, then the flags nobody needs
        for kind, keys in split.delete.items():
            if keys:
                self._delete_trie(kind, keys)
        for d in V6_FILTERS:  # and cleared once no entry needs it
            self._write_filter(d, pf_final[d])
        self._set_flags(flags, bump=bool(to_add or to_delete))
        return Change(to_add, to_delete)

    def _v4_tables(self, keys: list[int], rules: dict[int, int]) -> V4Tables:
        """The IPv4 table of one direction's rule keys (rules: key -> index)."""
        arr = np.array(keys, dtype=np.uint64)
        idx = np.array([rules[k] for k in keys], dtype=np.uint64)
        net = arr >> np.uint64(1)
        return v4_tables(net >> np.uint64(8), (net & np.uint64(0xFF)).astype(np.int64), idx)

    def _check_v6_sizes(self, v6: dict[str, V6Placed]) -> None:
        for direction, t in v6.items():
            name = V6_TABLES[direction][1]
            cap = self._map(name).info.max_entries
            if len(t.deep) > cap:
                raise MapFullError(
                    errno.E2BIG,
                    f"the IPv6 {direction} rules expand to more entries than {V6_ARRAYS[direction]} and {name} "
                    f"hold ({len(t.deep)} left for {name}, which holds {cap}): use fewer prefixes whose length "
                    "is not a multiple of 8; nothing was changed",
                )

    def _v6_array(self, direction: str) -> tuple[np.ndarray, Callable[[np.ndarray], None]] | None:
        """The IPv6 array of ``direction`` as buckets, and what writes
        buckets changed in it to the map: the map's memory itself (nothing
        to write) or, where it is not mmapable, a copy written back by
        syscall. None where the program has no array (pinned by an older
        object, whose program reads every region from the hash)."""
        name = V6_ARRAYS[direction]
        m = self._map_if_pinned(name)
        if m is None:
            return None
        if name not in self._views:
            mm = m.mmap()
            if mm is None or mm.closed:
                self._views[name] = None
            else:
                self._views[name] = np.ndarray((m.info.max_entries,), dtype=BUCKET_DTYPE, buffer=mm)
        view = self._views[name]
        if view is not None and view.flags.writeable:
            return view, lambda _b: None
        raw = m.lookup_batch_raw(chunk=m.info.max_entries)
        if raw is None:
            arr = np.frombuffer(b"".join(bytes(ffi.buffer(v)) for _, v in sorted(m.items())), BUCKET_DTYPE).copy()
        else:
            arr = np.frombuffer(raw[1], BUCKET_DTYPE, raw[2]).copy()

        def write(buckets: np.ndarray) -> None:
            b = np.unique(buckets).astype(np.uint32)
            if len(b):
                vals = np.ascontiguousarray(arr[b])
                m.update_batch_raw(ffi.from_buffer(b), ffi.from_buffer(vals), len(b))

        return arr, write

    def _v6_placed(self, direction: str, t: V6Tables) -> V6Placed:
        got = self._v6_array(direction)  # only read: nothing writes it before the placement is done
        placed = place_v6(t, None if got is None else got[0])
        placed.l1 = v6_l1(t)
        return placed

    def _write_l1(self, direction: str, want: np.ndarray | None, keep: bool = False) -> None:
        """Make one direction's L1 slots ``want``; with ``keep``, the slots
        both the old and the new L0 can use (l1_meanwhile). Nothing where
        the pins predate L1: the program attached reads the filter
        instead."""
        name = V6_L1[direction]
        if want is None or self._map_if_pinned(name) is None:
            return
        have = self._read_array(name)
        if keep:
            want = l1_meanwhile(have, want)
        changed = np.flatnonzero(have != want)
        self._write_array(name, changed, want[changed])

    def _v4_placed(self, keys: list[int], rules: dict[int, int], direction: str) -> V4Placed:
        capacity = self._map(V4_CHUNKS[direction]).info.max_entries // 256
        old_l2h, host_capacity = None, 0
        if self._has_host_chunks(direction):
            l2h, l3c = V4_HOSTS[direction]
            old_l2h = self._view(l2h)
            if old_l2h is None:
                old_l2h = self._read_array(l2h)
            host_capacity = self._map(l3c).info.max_entries // 256
        return place_chunks(
            self._v4_tables(keys, rules),
            self._read_array(V4_LEVELS[direction][0]),
            capacity,
            old_l2h=old_l2h,
            host_capacity=host_capacity,
        )

    def _has_host_chunks(self, direction: str) -> bool:
        """Whether this direction has L2H and L3C: pins made by a version
        before them do not, until the next attach adds them (their hosts are
        then found through the L3 hash, as before)."""
        key = f"hosts_{direction}"
        if key not in self._optional:
            self._optional[key] = all(self._map_if_pinned(name) is not None for name in V4_HOSTS[direction])
        return self._optional[key]

    def _view(self, name: str) -> np.ndarray | None:
        """The values of array ``name`` as a writable numpy array over the
        map's memory, or None where the map is not mmapable (pinned by an
        older object): then it is read and written by batch syscalls."""
        if name not in self._views:
            m = self._map(name)
            mm = m.mmap()
            if mm is None or mm.closed:
                self._views[name] = None
            else:
                dtype = np.dtype("<u8" if m.info.value_size == 8 else "<u4")
                self._views[name] = np.ndarray((m.info.max_entries,), dtype=dtype, buffer=mm, strides=(m.mmap_stride,))
        return self._views[name]

    def _read_array(self, name: str) -> np.ndarray:
        """A copy of an array map's values (uint32 or uint64, by value size)."""
        view = self._view(name)
        if view is not None:
            return view.copy()
        m = self._map(name)
        dtype = "<u8" if m.info.value_size == 8 else "<u4"
        raw = m.lookup_batch_raw(chunk=m.info.max_entries)
        if raw is None:
            return np.array([v for _, v in sorted(m.items())], dtype=dtype)
        return np.frombuffer(raw[1], dtype, raw[2]).copy()

    def _write_array(self, name: str, idx: np.ndarray, vals: np.ndarray) -> None:
        """Store vals at the indices idx of an array map. Through the map's
        memory the stores land in program order (x86 keeps store order, as
        the syscall path did no more), so the bottom-up order of the table
        writes holds either way."""
        if not len(idx):
            return
        view = self._view(name)
        if view is not None and view.flags.writeable:  # else the syscall says why not (EPERM)
            view[idx] = vals
            return
        m = self._map(name)
        keys = np.ascontiguousarray(idx, dtype=np.uint32)
        values = np.ascontiguousarray(vals, dtype="<u8" if m.info.value_size == 8 else "<u4")
        m.update_batch_raw(ffi.from_buffer(keys), ffi.from_buffer(values), len(keys))

    def _check_v4_sizes(self, v4: dict[str, V4Placed]) -> None:
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
        if n == 0:
            return
        keys = np.ascontiguousarray(indices, dtype=np.uint32)
        vals = ffi.new("char[]", n * possible_cpus() * 8)
        m.update_batch_raw(ffi.from_buffer(keys), vals, n)

    def _trie_keys(self, m: Map, kind: tuple[int, str], keys: list[int]) -> np.ndarray:
        arr = np.zeros(len(keys), dtype=np_dtype(m.key_type))
        if kind[0] == 4:  # IPv4 keys fit in 64 bits: numpy does them at once
            k = np.array(keys, dtype=np.uint64)
            arr["prefixlen"] = (k >> np.uint64(1)) & np.uint64(0xFF)
            arr["addr"] = (k >> np.uint64(9)).astype(">u4").view(np.uint8).reshape(len(keys), 4)
            return arr
        arr["prefixlen"] = [_plen(k) for k in keys]
        width = 16
        arr["addr"] = np.frombuffer(b"".join(_addr(k).to_bytes(width, "big") for k in keys), dtype=np.uint8).reshape(
            len(keys), width
        )
        return arr

    def _write_trie(self, kind: tuple[int, str], keys: list[int], idx: list[int]) -> None:
        m = self._map(TRIES[kind][0])
        arr = self._trie_keys(m, kind, keys)
        vals = np.array(idx, dtype="<u4")
        m.update_batch_raw(ffi.from_buffer(arr), ffi.from_buffer(vals), len(keys))

    def _delete_trie(self, kind: tuple[int, str], keys: list[int]) -> None:
        m = self._map(TRIES[kind][0])
        arr = self._trie_keys(m, kind, keys)
        m.delete_batch_raw(ffi.from_buffer(arr), len(keys))

    def _take_out(self, kind: tuple[int, str], keys: list[int]) -> None:
        """Undo a _write_trie of ``keys`` that may have stopped part-way:
        delete those of them that are there."""
        try:
            self._delete_trie(kind, keys)
        except XdpflowError:
            m = self._map(TRIES[kind][0])
            arr = self._trie_keys(m, kind, keys)
            for i in range(len(arr)):
                with contextlib.suppress(XdpflowError):  # ENOENT: never written
                    m.delete_batch_raw(ffi.from_buffer(arr[i : i + 1]), 1)

    def _read_u32_map(self, m: Map) -> dict[int, int]:
        raw = m.lookup_batch_raw(chunk=65536)
        if raw is None:
            return {int(k): int(v) for k, v in m.items()}
        keys, vals, n = raw
        return dict(zip(np.frombuffer(keys, "<u4", n).tolist(), np.frombuffer(vals, "<u4", n).tolist()))

    def _write_v4(self, direction: str, t: V4Placed) -> None:
        """Rewrite one direction's IPv4 table: hosts, /24 entries and chunks
        first, then the /16 array, then remove what the new table no longer
        has (chunks no /16 points to need no clearing).
        """
        l1m, l2m, l3m = (self._map(n) for n in V4_LEVELS[direction])
        have3, have2 = self._read_u32_map(l3m), self._read_u32_map(l2m)
        # two tables of one level: written side by side (syscalls release the GIL)
        new3 = {k: v for k, v in t.l3.items() if have3.get(k) != v} if have3 else t.l3
        hosts = Background(lambda: _upsert(l3m, new3))
        _upsert(l2m, {k: v for k, v in t.l2.items() if have2.get(k) != v} if have2 else t.l2)
        error = hosts.wait()
        if error is not None:
            raise error
        # bottom-up: host chunks, the /24 slots' pointers to them, the /24 chunks
        if t.hchunks:
            self._write_rows(V4_HOSTS[direction][1], t.hchunks)
        if t.l2h:
            self._write_rows(V4_HOSTS[direction][0], t.l2h)
        if t.chunks:
            self._write_rows(V4_CHUNKS[direction], t.chunks)
        changed = np.flatnonzero(t.old_l1 != t.l1)  # read by _v4_placed, under the same lock
        self._write_array(V4_LEVELS[direction][0], changed, t.l1[changed])
        _remove(l2m, [k for k in have2 if k not in t.l2])
        _remove(l3m, [k for k in have3 if k not in t.l3])

    def _write_rows(self, name: str, rows: dict[int, np.ndarray]) -> None:
        """Write 256-slot rows (row number -> slots) of an array map, only
        the slots that differ."""
        ks = np.fromiter(rows.keys(), dtype=np.int64, count=len(rows))
        slots = (ks[:, None] * 256 + np.arange(256)).ravel()
        want = np.stack(list(rows.values())).ravel()
        view = self._view(name)
        have = view[slots] if view is not None else self._read_array(name)[slots]
        diff = np.flatnonzero(have != want)
        self._write_array(name, slots[diff], want[diff])

    def _write_filter(self, direction: str, want: np.ndarray, keep: bool = False) -> None:
        """Make one direction's filter ``want``; with ``keep``, bits set now
        stay set (entries of the rules being replaced may still need them)."""
        name = V6_FILTERS[direction]
        have = self._read_array(name)
        if keep:
            want = want | have
        changed = np.flatnonzero(have != want)
        self._write_array(name, changed, want[changed])

    def _write_v6(self, direction: str, t: V6Placed, prune: bool = True) -> None:
        """Rewrite one direction's IPv6 table: deeper entries first (the
        overflow hash, the flags of buckets that send lookups there, answers
        that change in place, then new slots, each written before its
        prefix length makes it live), then the L0 array, then (with
        ``prune``) free the slots and remove the entries the new table no
        longer has."""
        l0m, deepm = (self._map(n) for n in V6_TABLES[direction])
        have = self._read_deep6(deepm)
        _upsert_deep6(deepm, {k: v for k, v in t.deep.items() if have.get(k) != v})
        got = self._v6_array(direction)
        if got is not None:
            fill_v6(*got, t)
        # L1 names regions now in place, before an L0 entry sends frames to it
        self._write_l1(direction, t.l1, keep=True)
        have0 = self._read_array(V6_TABLES[direction][0])
        changed = np.flatnonzero(have0 != t.l0)
        self._write_array(V6_TABLES[direction][0], changed, t.l0[changed])
        if not prune:
            return
        # and drops the slots of regions the new table does not have
        # before those regions go
        self._write_l1(direction, t.l1)
        if got is not None:
            prune_v6(*got, t)
        gone = [k for k in have if k not in t.deep]
        if gone:
            keys = _deep6_keys(deepm, gone)
            deepm.delete_batch_raw(ffi.from_buffer(keys), len(gone))

    def rebuild_v6(self) -> None:
        """Write the IPv6 arrays and L1 slots from the rule store without
        pruning: for a program that has new, empty ones while the program
        before it still reads every region from the hash, or the filter (an
        upgrade). The next change prunes the hash."""
        entries = self.entry_keys()
        kinds = _by_kind(entries)
        for d in V6_TABLES:
            t = v6_tables([(_addr(k), _plen(k), entries[k]) for k in kinds[(6, d)]])
            self._write_v6(d, self._v6_placed(d, t), prune=False)

    def _read_deep6(self, m: Map) -> dict[tuple[int, int], int]:
        raw = m.lookup_batch_raw(chunk=65536)
        if raw is None:
            items = [(bytes(ffi.buffer(k)), v) for k, v in m.items()]
            raw = (b"".join(k for k, _ in items), np.array([v for _, v in items], "<u4").tobytes(), len(items))
        keys, vals, n = raw
        if n == 0:
            return {}
        arr = np.frombuffer(keys, dtype=np_dtype(m.key_type), count=n)
        out = {}
        for hi, lo, plen, v in zip(
            arr["hi"].tolist(), arr["lo"].tolist(), arr["plen"].tolist(), np.frombuffer(vals, "<u4", n).tolist()
        ):
            out[(plen, ((hi << 64) | lo) >> (128 - plen))] = v
        return out

    def _set_flags(self, flags: int, keep: bool = False, bump: bool = False) -> None:
        """Make the non-empty flags ``flags`` (see _flags_of); with ``keep``,
        flags set now stay set (the rules being replaced may need them);
        ``bump`` also starts a new generation: rule indices may mean other
        rules now."""
        m = self._map("config")
        cfg = m[0]
        new = (cfg.flags & ~ALL_TRIE_FLAGS) | flags | (cfg.flags & ALL_TRIE_FLAGS if keep else 0)
        if new != cfg.flags or bump:
            cfg.flags = new
            cfg.generation = (cfg.generation + int(bump)) & 0xFFFFFFFF
            m[0] = cfg

    def generation(self) -> int:
        return int(self._map("config")[0].generation)


def _write_count(m: Map, generation: int, rules: int | None) -> None:
    """Tag bl_count with ``generation`` and ``rules`` (None: stale)."""
    m[0] = ffi.new("struct xf_bl_count *", {"generation": generation, "valid": rules is not None, "rules": rules or 0})


def _flags_of(kinds: dict[tuple[int, str], list[int]]) -> int:
    """The config flags of the non-empty tries."""
    return sum(TRIES[kind][1] for kind, ks in kinds.items() if ks)


def pf6_bits(tops: np.ndarray) -> np.ndarray:
    """The filter's bit numbers of IPv6 /32s (their top 32 bits), hashed as
    pf6_set() in the program does."""
    t = tops.astype(np.uint64)
    return ((t * np.uint64(abi.C.XF_PF6_MULT)) & np.uint64(0xFFFFFFFF)) >> np.uint64(abi.C.XF_PF6_SHIFT)


_M48 = np.uint64((1 << 48) - 1)
L1_WALK = np.uint64(abi.C.XF_BL6_L1_WALK)


def l1_hash(prefixes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slot, high half) of IPv6 regions given as 48-bit prefixes (the top
    48 address bits masked to the region's length), as bl6_lookup() in the
    program computes them (see XF_BL6_L1_* in xdpflow.h)."""
    y = (prefixes.astype(np.uint64) * np.uint64(abi.C.XF_BL6_L1_MULT)) & _M48
    slot = (y >> np.uint64(31)).astype(np.int64)
    return slot, (y & np.uint64(abi.C.XF_BL6_L1_TAG)) | np.uint64(abi.C.XF_BL6_L1_LIVE)


def v6_l1(t: V6Tables) -> np.ndarray:
    """One direction's L1 slots for its table ``t``: every region at the
    first level of its /16, where that level is /48 or shorter, gets its
    slot, holding its tag and its entry; a slot two of them share says
    "walk"."""
    l1 = np.zeros(abi.C.XF_BL6_L1_SIZE, dtype=np.uint64)
    short = [(plen, region, v) for (plen, region), v in t.deep.items() if plen <= 48]
    if not short:
        return l1
    plen, region, entry = (np.array(c, dtype=np.uint64) for c in zip(*short))
    first = t.l0[(region >> (plen - np.uint64(16))).astype(np.int64)].astype(np.uint64) >> np.uint64(_NEXT)
    at = first == plen
    slots, high = l1_hash(region[at] << (np.uint64(48) - plen[at]))
    l1[slots] = (high << np.uint64(32)) | entry[at]
    l1[np.bincount(slots, minlength=len(l1)) > 1] = L1_WALK
    return l1


def l1_meanwhile(have: np.ndarray, want: np.ndarray) -> np.ndarray:
    """The L1 slots to hold while frames may read the old L0 or the new one
    (from before the new L0 is written until the old regions go). A slot
    that names a region means, to either reader, the state after it; one
    naming another region means "no such region", which would hide an old
    region's rules from a reader of the old L0 whose slot the new table
    gives to another region. So: a slot the new table leaves empty keeps
    what it holds, an empty one takes the new entry, the same region takes
    its new entry, and two different regions make the slot say "walk",
    which is right for both."""
    tag_have, tag_want = have >> np.uint64(32), want >> np.uint64(32)
    same = (tag_have == tag_want) & (have != L1_WALK) & (want != L1_WALK)
    out = np.where((have == 0) | same, want, L1_WALK)
    return np.where(want == 0, have, out)


def v6_filter(rules: Iterable[tuple[int, int, int]]) -> np.ndarray:
    """The words of one direction's IPv6 filter, for its rules as v6_tables()
    takes them: the bit of every /32 a rule of /25 or longer overlaps (see
    XF_PF6_* in xdpflow.h)."""
    words = np.zeros(abi.C.XF_PF6_WORDS, dtype=np.uint64)
    tops: list[int] = []
    for addr, plen, _idx in rules:
        if plen >= 25:
            top = addr >> 96
            tops.extend(range(top, top + (1 << max(32 - plen, 0))))
    if tops:
        bits = pf6_bits(np.array(tops, dtype=np.uint64))
        np.bitwise_or.at(words, (bits >> np.uint64(6)).astype(np.int64), np.uint64(1) << (bits & np.uint64(63)))
    return words


def _disjoint_from(keys: list[int], others: list[int]) -> list[int]:
    """The rules of ``keys`` that share no address with any rule of ``others``
    (same family and direction). CIDRs are nested or disjoint, so an interval
    test against the others sorted by start, with a running maximum of their
    ends, decides each rule in O(log n).
    """
    spans: dict[tuple[int, str], list[tuple[int, int]]] = {k: [] for k in TRIES}
    for o in others:
        spans[_kind(o)].append(_span(o))
    index = {}
    for kind, sp in spans.items():
        sp.sort()
        max_end, running = [], -1
        for _, b in sp:
            running = max(running, b)
            max_end.append(running)
        index[kind] = ([a for a, _ in sp], max_end)
    out = []
    for k in keys:
        starts, max_end = index[_kind(k)]
        lo, hi = _span(k)
        i = bisect.bisect_right(starts, hi) - 1
        if i < 0 or max_end[i] < lo:
            out.append(k)
    return out


def _deep6_keys(m: Map, regions: list[tuple[int, int]]) -> np.ndarray:
    arr = np.zeros(len(regions), dtype=np_dtype(m.key_type))
    prefixes = [region << (128 - plen) for plen, region in regions]
    arr["hi"] = [p >> 64 for p in prefixes]
    arr["lo"] = [p & 0xFFFF_FFFF_FFFF_FFFF for p in prefixes]
    arr["plen"] = [plen for plen, _ in regions]
    return arr


def _upsert_deep6(m: Map, entries: dict[tuple[int, int], int]) -> None:
    if entries:
        keys = _deep6_keys(m, list(entries))
        vals = np.array(list(entries.values()), dtype="<u4")
        m.update_batch_raw(ffi.from_buffer(keys), ffi.from_buffer(vals), len(entries))


def _upsert(m: Map, entries: dict[int, int]) -> None:
    if entries:
        n = len(entries)
        keys = np.fromiter(entries.keys(), dtype=np.uint32, count=n)
        vals = np.fromiter(entries.values(), dtype=np.uint32, count=n)
        m.update_batch_raw(ffi.from_buffer(keys), ffi.from_buffer(vals), n)


def _remove(m: Map, keys: list[int]) -> None:
    if keys:
        m.delete_batch_raw(ffi.new("__u32[]", keys), len(keys))


@contextlib.contextmanager
def blocklist_of(pins: PinRoot) -> Iterator[Blocklist]:
    """The blocklist under ``pins``, its maps opened on demand and closed after."""
    with PinnedMaps(pins) as maps:
        yield Blocklist(maps)


def apply_keys(keys: Iterable[int], pins: PinRoot, dry_run: bool = False) -> Change:
    """Make the blocklist under ``pins`` equal ``keys`` (rule keys of both
    directions), as ``xdpflow block sync`` does for one file: under the
    pin-root lock, applying only the difference, adds before deletes. With
    ``dry_run`` nothing changes and the Change says what would.

    Raises NotAttachedError when nothing is attached under the root,
    MapFullError (E2BIG) when the rules do not fit (nothing is changed then),
    and XdpflowError for other failed map operations.
    """
    with pins.lock(), blocklist_of(pins) as bl:
        return bl.sync_keys(keys, dry_run=dry_run)
