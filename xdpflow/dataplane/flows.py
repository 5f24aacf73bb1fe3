"""Reading the flow tables: batch lookups decoded in bulk with numpy.

A million-entry per-CPU table is tens of megabytes; decoding it entry by
entry through cffi takes seconds, so the raw batch buffers are viewed as
numpy structured arrays whose layout comes from the shared header (field
offsets from cffi, never written here), and per-CPU values are folded with
array operations.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import numpy as np

from xdpflow.bindings.libbpf import Map
from xdpflow.dataplane.abi import ffi, np_dtype
from xdpflow.dataplane.clock import JiffiesClock
from xdpflow.dataplane.counts import count_flows, kernel_counts
from xdpflow.dataplane.maps import open_clock, open_map
from xdpflow.dataplane.pins import PinRoot

_TCP_FLAG_LETTERS = "FSRPAUEC"  # bit 0 (FIN) .. bit 7 (CWR)

SORT_KEYS = ("packets", "bytes", "last-seen")


def tcp_flags_str(flags: int) -> str:
    """TCP flags as letters, FIN first: SYN|ACK -> "SA"."""
    return "".join(ch for i, ch in enumerate(_TCP_FLAG_LETTERS) if flags & (1 << i))


@dataclass
class Flow:
    ifname: str
    family: int
    src: str
    dst: str
    sport: int
    dport: int
    proto: int
    packets: int
    bytes: int
    first_seen: float  # Unix seconds
    last_seen: float
    tcp_flags: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ifname": self.ifname,
            "src": self.src,
            "dst": self.dst,
            "sport": self.sport,
            "dport": self.dport,
            "proto": self.proto,
            "packets": self.packets,
            "bytes": self.bytes,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "tcp_flags": tcp_flags_str(self.tcp_flags),
        }


@dataclass
class FlowArrays:
    """One table's flows as parallel numpy arrays (per-CPU values folded)."""

    family: int
    keys: np.ndarray  # structured, dtype of struct xf_flow4/xf_flow6
    packets: np.ndarray
    bytes: np.ndarray
    first_seen: np.ndarray  # jiffies
    last_seen: np.ndarray
    tcp_flags: np.ndarray
    rec_start: np.ndarray  # jiffies of the first packet since the last take, 0: none

    def __len__(self) -> int:
        return len(self.packets)


def read_table(m: Map, family: int) -> FlowArrays:
    """Every entry of an open flow map, decoded in bulk. Raises XdpflowError."""
    return fold(family, *read_raw(m))


def read_raw(m: Map) -> tuple[np.ndarray, np.ndarray]:
    """Every entry of an open flow map, undecoded: keys (structured, the
    key type's layout) and values (one row per flow, one column per CPU
    slot). Raises XdpflowError."""
    key_dt = np_dtype(m.key_type)
    ncpu = m.ncpu
    val_dt = np_dtype(m.value_type, itemsize=m.value_stride)
    chunk = 65536
    # the kernel writes straight into the arrays (np.empty: no page is touched twice)
    keys = np.empty(m.info.max_entries + chunk, dtype=key_dt)
    vals = np.empty((m.info.max_entries + chunk) * ncpu, dtype=val_dt)
    n = m.lookup_batch_into(keys, vals, chunk)
    if n is not None:
        return keys[:n], vals[: n * ncpu].reshape(n, ncpu)
    raw = m.lookup_batch_raw()
    if raw is None:  # no batch ops for this map type: slow path
        items = m.items()
        kb = b"".join(bytes(ffi.buffer(k)) for k, _ in items)
        vb = b"".join(
            b"".join(bytes(ffi.buffer(x)).ljust(m.value_stride, b"\0") for x in (v if m.percpu else [v]))
            for _, v in items
        )
        raw = (kb, vb, len(items))
    kbytes, vbytes, n = raw
    return (
        np.frombuffer(kbytes, dtype=key_dt, count=n),
        np.frombuffer(vbytes, dtype=val_dt, count=n * ncpu).reshape(n, ncpu),
    )


def fold(family: int, keys: np.ndarray, vals: np.ndarray) -> FlowArrays:
    """Flows from keys and their values (an array of ``struct xf_flow_val``,
    one row per flow and one column per CPU slot; one column for shared
    tables), per-CPU slots folded into one value each."""
    packets = vals["packets"].sum(axis=1, dtype=np.uint64)
    nbytes = vals["bytes"].sum(axis=1, dtype=np.uint64)
    # A CPU's slot has first_seen only if the flow was created there (jiffies
    # are never 0): slots created empty by another CPU's insert hold 0.
    first = np.where(vals["first_seen"] > 0, vals["first_seen"], np.iinfo(np.uint64).max).min(axis=1)
    first = np.where(packets > 0, first, 0)
    last = vals["last_seen"].max(axis=1)
    flags = np.bitwise_or.reduce(vals["tcp_flags"], axis=1)
    # each CPU's slot stamps its own first packet: the record starts at the earliest
    stamps = vals["rec_start"]
    rec = np.where(stamps > 0, stamps, np.iinfo(np.uint64).max).min(axis=1)
    rec = np.where((stamps > 0).any(axis=1), rec, 0)
    return FlowArrays(family, keys, packets, nbytes, first, last, flags, rec)


def _addr(raw: Any, family: int) -> str:
    if family == 4:
        return str(ipaddress.IPv4Address(int(raw)))
    return str(ipaddress.IPv6Address(bytes(raw)))


def to_flows(fa: FlowArrays, ifname: str, clock: JiffiesClock, idx: np.ndarray | None = None) -> list[Flow]:
    """Python Flow objects for the rows ``idx`` (all rows by default)."""
    rows = range(len(fa)) if idx is None else idx
    out = []
    for i in rows:
        k = fa.keys[i]
        out.append(
            Flow(
                ifname=ifname,
                family=fa.family,
                src=_addr(k["saddr"], fa.family),
                dst=_addr(k["daddr"], fa.family),
                sport=int(k["sport"]),
                dport=int(k["dport"]),
                proto=int(k["proto"]),
                packets=int(fa.packets[i]),
                bytes=int(fa.bytes[i]),
                first_seen=clock.to_wall(int(fa.first_seen[i])),
                last_seen=clock.to_wall(int(fa.last_seen[i])),
                tcp_flags=int(fa.tcp_flags[i]),
            )
        )
    return out


def _filter_mask(keys: np.ndarray, family: int, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> np.ndarray:
    """Rows whose source or destination lies in ``net``."""
    if net.version != family:
        return np.zeros(len(keys), dtype=bool)
    if family == 4:
        mask = (0xFFFFFFFF << (32 - net.prefixlen)) & 0xFFFFFFFF
        base = int(net.network_address)
        return ((keys["saddr"] & mask) == base) | ((keys["daddr"] & mask) == base)
    nbytes, nbits = divmod(net.prefixlen, 8)
    want = net.network_address.packed

    def inside(col: np.ndarray) -> np.ndarray:
        ok = np.all(col[:, :nbytes] == np.frombuffer(want[:nbytes], dtype=np.uint8), axis=1)
        if nbits:
            m = (0xFF << (8 - nbits)) & 0xFF
            ok &= (col[:, nbytes] & m) == want[nbytes]
        return ok

    return inside(keys["saddr"]) | inside(keys["daddr"])


def _column(vals: np.ndarray, sort: str) -> np.ndarray:
    """One sort key of every flow, folded over CPU slots as fold() does."""
    if sort == "last-seen":
        return vals["last_seen"].max(axis=1)
    return vals[sort].sum(axis=1, dtype=np.uint64)


def top_flows(
    pins: PinRoot,
    ifname: str,
    top: int | None = None,
    sort: str = "packets",
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None,
) -> list[Flow]:
    """Flows of ``ifname``, largest first by ``sort``, at most ``top`` of them,
    only those touching ``cidr`` when given. Raises NotAttachedError.
    """
    if sort not in SORT_KEYS:
        raise ValueError(f"sort by one of {', '.join(SORT_KEYS)}, not {sort!r}")
    picked: list[tuple[int, int, FlowArrays, int]] = []  # (value, tiebreak, table, row)
    for name, family in (("flows_v4", 4), ("flows_v6", 6)):
        with open_map(pins, name, ifname) as m:
            keys, vals = read_raw(m)
        sel = np.arange(len(keys))
        if cidr is not None:
            sel = sel[_filter_mask(keys, family, cidr)]
        # only the sort key is folded for every flow; the rest for those picked
        values = _column(vals, sort)[sel]
        if top is not None and len(sel) > top:
            part = np.argpartition(-values.astype(np.float64), top - 1)[:top]
            sel, values = sel[part], values[part]
        fa = fold(family, keys[sel], vals[sel])
        picked.extend((int(v), int(fa.packets[i]), fa, i) for i, v in enumerate(values))
    picked.sort(key=lambda t: (t[0], t[1]), reverse=True)
    if top is not None:
        picked = picked[:top]
    clock = open_clock(pins)
    return [to_flows(fa, ifname, clock, np.array([r]))[0] for _, _, fa, r in picked]


__all__ = [
    "Flow",
    "FlowArrays",
    "SORT_KEYS",
    "count_flows",
    "fold",
    "kernel_counts",
    "read_raw",
    "read_table",
    "tcp_flags_str",
    "top_flows",
]
