"""Current rates of the heaviest sources, destinations or flows.

The flow tables hold totals, not rates: a rate is the difference of two reads
an interval apart. ``read_snapshot()`` reads every selected interface's
tables (per-CPU slots folded, flows.read_table); ``top()`` matches the two
reads' flows and ranks what arrived in between. All of it is array work: a
million flows are matched with one sort of the keys' raw bytes (as 64-bit
words), never one Python object per flow; only the rows printed become
Python values.

A flow present in both reads counts the difference of its totals. A flow
that appeared in between (or was evicted and inserted again: its first_seen
changed, or its totals went down) counts from 0, so its whole total is what
arrived. A flow that vanished in between counts nothing: the table forgot
its last packets, and so does the rate.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xdpflow.dataplane.flows import FlowArrays, read_table
from xdpflow.dataplane.maps import open_map
from xdpflow.dataplane.pins import PinRoot

BY = ("src", "dst", "flow")

_TABLES = (("flows_v4", 4), ("flows_v6", 6))


@dataclass
class Snapshot:
    """Every flow of some interfaces at one moment (``at``: monotonic seconds,
    the middle of the read)."""

    at: float
    ifnames: list[str]
    tables: dict[int, list[FlowArrays]]  # family -> one per interface, in ifnames' order
    index: dict[int, _Sorted] = field(default_factory=dict)  # see _index


@dataclass(frozen=True)
class TopRow:
    """One source, destination or flow and what it sent during the interval."""

    key: dict[str, Any]  # {"src"}, {"dst"} or {"ifname", "src", "dst", "sport", "dport", "proto"}
    packets: int
    bytes: int
    pps: float
    bps: float

    def to_json(self) -> dict[str, Any]:
        return {**self.key, "pps": self.pps, "bps": self.bps, "packets": self.packets, "bytes": self.bytes}


def read_snapshot(pins: PinRoot, ifnames: list[str]) -> Snapshot:
    """Both flow tables of each interface. Raises NotAttachedError, XdpflowError."""
    t0 = time.monotonic()
    tables: dict[int, list[FlowArrays]] = {4: [], 6: []}
    for ifname in ifnames:
        for name, family in _TABLES:
            with open_map(pins, name, ifname) as m:
                tables[family].append(read_table(m, family))
    return Snapshot((t0 + time.monotonic()) / 2, list(ifnames), tables)


def _words(keys: np.ndarray) -> np.ndarray:
    """A key array's raw bytes as rows of 64-bit words (zero-padded): equal
    keys, equal rows. The kernel hashes every byte of a key, padding too, so
    the bytes are the flow's identity."""
    n, size = len(keys), keys.dtype.itemsize
    raw = np.frombuffer(keys.tobytes(), dtype=np.uint8).reshape(n, size)
    width = -(-size // 8) * 8
    if width != size:
        raw = np.concatenate([raw, np.zeros((n, width - size), dtype=np.uint8)], axis=1)
    return np.ascontiguousarray(raw).view(np.uint64).reshape(n, width // 8)


def _hash(cols: np.ndarray) -> np.ndarray:
    """A 64-bit mix of each row of ``cols`` (n x w uint64), to sort by."""
    h = np.zeros(len(cols), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in cols.T:
            h ^= c
            h *= np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
    return h


def _sorted_groups(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``cols`` (n x w uint64) in an order that puts equal rows side
    by side, and for each position whether its row equals the one before.

    One column is sorted as it is; several by a hash of them (one sort of
    one column is several times faster than a sort by all), equality checked
    on the full rows: two keys of one hash (odds 2**-64 a pair) would come
    out as two groups, never as one.
    """
    if cols.shape[1] == 1:
        order = np.argsort(cols[:, 0])
    else:
        order = np.argsort(_hash(cols))
    s = cols[order]
    same = np.zeros(len(order), dtype=bool)
    if len(order) > 1:
        same[1:] = np.all(s[1:] == s[:-1], axis=1)
    return order, same


@dataclass
class _Delta:
    """One family's flows of the newer read, with what each sent since the older."""

    family: int
    keys: np.ndarray
    ifidx: np.ndarray
    packets: np.ndarray
    bytes: np.ndarray


def _flat(tables: list[FlowArrays]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keys, interface indexes, packets, bytes and first_seen of one family's tables, end to end."""
    keys = np.concatenate([fa.keys for fa in tables])
    ifidx = np.concatenate([np.full(len(fa), i, dtype=np.uint64) for i, fa in enumerate(tables)])
    pk = np.concatenate([fa.packets for fa in tables]).astype(np.uint64)
    nb = np.concatenate([fa.bytes for fa in tables]).astype(np.uint64)
    first = np.concatenate([fa.first_seen for fa in tables])
    return keys, ifidx, pk, nb, first


@dataclass
class _Sorted:
    """One family's rows of a snapshot ordered by key hash: words (the key,
    then the interface index), hash, packets, bytes, first_seen, and where
    each row came from."""

    words: np.ndarray
    hash: np.ndarray
    packets: np.ndarray
    bytes: np.ndarray
    first_seen: np.ndarray
    order: np.ndarray


def _index(snap: Snapshot, family: int) -> _Sorted:
    """One family's rows in hash order, computed once per snapshot: a refresh
    sorts only the newer read (the older one was sorted the refresh before),
    and matching walks both in order instead of gathering at random."""
    if family not in snap.index:
        keys, ifidx, pk, nb, first = _flat(snap.tables[family])
        words = np.concatenate([_words(keys), ifidx[:, None]], axis=1)
        h = _hash(words)
        o = np.argsort(h)
        snap.index[family] = _Sorted(words[o], h[o], pk[o], nb[o], first[o], o)
    return snap.index[family]


def _delta(family: int, old: Snapshot, new: Snapshot) -> _Delta:
    """Match the newer read's flows to the older's (same interface, same key)."""
    keys, ifidx, pk, nb, _ = _flat(new.tables[family])
    dpk, dnb = pk.copy(), nb.copy()  # a new flow counts from 0
    if sum(len(fa) for fa in old.tables[family]) and len(keys):
        a, b = _index(old, family), _index(new, family)
        pos = np.minimum(np.searchsorted(a.hash, b.hash), len(a.hash) - 1)
        # a hash shared by two keys (odds 2**-64 a pair) finds only one: the other counts as new
        j = np.nonzero(a.hash[pos] == b.hash)[0]
        i = pos[j]
        same = np.all(a.words[i] == b.words[j], axis=1)
        # the same flow only if it was not evicted and inserted again meanwhile
        same &= (a.first_seen[i] == b.first_seen[j]) & (a.packets[i] <= b.packets[j]) & (a.bytes[i] <= b.bytes[j])
        j, i = j[same], i[same]
        rows = b.order[j]
        dpk[rows] = b.packets[j] - a.packets[i]
        dnb[rows] = b.bytes[j] - a.bytes[i]
    return _Delta(family, keys, ifidx, dpk, dnb)


def _addr(raw: Any, family: int) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(int(raw)))
    return str(ipaddress.IPv6Address(bytes(raw)))


def _group_cols(d: _Delta, by: str) -> np.ndarray:
    if by == "flow":
        return np.concatenate([_words(d.keys), d.ifidx[:, None]], axis=1)
    field = "saddr" if by == "src" else "daddr"
    col = np.ascontiguousarray(d.keys[field])
    if d.family == 4:
        return col.astype(np.uint64)[:, None]
    return col.view(np.uint64).reshape(len(col), 2)


def top(old: Snapshot, new: Snapshot, by: str = "src", count: int | None = 10) -> list[TopRow]:
    """The ``count`` heaviest sources, destinations or flows (``by``) between
    two snapshots of the same interfaces, by packets, then bytes; only those
    that sent something. Raises ValueError for an unknown ``by``."""
    if by not in BY:
        raise ValueError(f"top by one of {', '.join(BY)}, not {by!r}")
    if old.ifnames != new.ifnames:
        raise ValueError("top: the two snapshots are of different interfaces")
    interval = max(new.at - old.at, 1e-9)
    picked: list[tuple[int, int, int, _Delta, int]] = []  # (packets, bytes, family, delta, row)
    for family in (4, 6):
        if not new.tables[family] or not sum(len(fa) for fa in new.tables[family]):
            continue
        d = _delta(family, old, new)
        live = np.nonzero(d.packets > 0)[0]
        if not len(live):
            continue
        d = _Delta(family, d.keys[live], d.ifidx[live], d.packets[live], d.bytes[live])
        order, same = _sorted_groups(_group_cols(d, by))
        starts = np.nonzero(~same)[0]
        gp = np.add.reduceat(d.packets[order], starts)
        gb = np.add.reduceat(d.bytes[order], starts)
        rep = order[starts]  # a row of each group, for its key
        if count is not None and len(gp) > count:
            part = np.lexsort((gb, gp))[-count:]  # packets first, bytes to break ties
            gp, gb, rep = gp[part], gb[part], rep[part]
        picked.extend((int(p), int(b), family, d, int(r)) for p, b, r in zip(gp, gb, rep))
    picked.sort(key=lambda t: (t[0], t[1]), reverse=True)
    if count is not None:
        picked = picked[:count]
    rows = []
    for p, b, family, d, r in picked:
        k = d.keys[r]
        if by == "src":
            key: dict[str, Any] = {"src": _addr(k["saddr"], family)}
        elif by == "dst":
            key = {"dst": _addr(k["daddr"], family)}
        else:
            key = {
                "ifname": new.ifnames[int(d.ifidx[r])],
                "src": _addr(k["saddr"], family),
                "dst": _addr(k["daddr"], family),
                "sport": int(k["sport"]),
                "dport": int(k["dport"]),
                "proto": int(k["proto"]),
            }
        rows.append(TopRow(key, p, b, p / interval, 8 * b / interval))
    return rows


__all__ = ["BY", "Snapshot", "TopRow", "read_snapshot", "top"]
