"""Flow expiry: turning the kernel's flow tables into exported flow records.

Per scan, for each flow of an interface:
- idle longer than ``idle_timeout``, or a TCP FIN/RST seen: the entry is
  taken out of the table with one lookup-and-delete (so no packet counted
  between a read and a delete is lost) and exported with what it had not
  exported yet; a later packet of the same 5-tuple starts a new flow;
- alive for ``active_timeout`` since its last export: the delta since then is
  exported and the entry stays.

A record starts at the first packet it counts (flowStartMilliseconds, RFC
7012 IE 152), as if the exporter had re-created the entry: the data plane
stamps ``rec_start`` with the first packet after an active-timeout export,
and that export takes the stamp (swapping it for 0) and the totals it counts
in one kernel call (dataplane/take.py), so no packet falls between the two.

What was exported of each live flow is kept in a pinned hash next to its
table (``exported_v4``/``exported_v6``, struct xf_exported), written right
after the records went out, so a restarted exporter resumes where the last
one stopped. Crash windows, each at most one scan's records: between sending
active-timeout deltas and writing that state, those deltas are sent again;
between taking an ended flow out of its table and sending it, its last delta
is lost; a delta sent again after a crash starts at the first packet after
the lost export, not before. A flow the LRU table evicted before it expired loses its last
delta; the table's size is the knob for that.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import numpy as np

from xdpflow.bindings.libbpf import BPF_MAP_TYPE_HASH, Map, Program
from xdpflow.dataplane import abi
from xdpflow.dataplane.abi import ffi
from xdpflow.dataplane.clock import JiffiesClock
from xdpflow.dataplane.flows import fold, read_table
from xdpflow.dataplane.maps import open_map, pinned_prog, read_admission
from xdpflow.dataplane.pins import PinRoot
from xdpflow.dataplane.take import TAKE_PIN, take
from xdpflow.defaults import ACTIVE_TIMEOUT, IDLE_TIMEOUT
from xdpflow.errors import XdpflowError
from xdpflow.export.ipfix import END_ACTIVE, END_FORCED, END_IDLE, END_OF_FLOW, FlowRecord, ReliabilityRecord

TCP_FIN, TCP_RST = 0x01, 0x04


FAMILIES = ((4, "flows_v4", "exported_v4", "struct xf_flow4"), (6, "flows_v6", "exported_v6", "struct xf_flow6"))


@dataclass
class _Pending:
    """Export state to write once the records of a scan went out."""

    put: dict[bytes, tuple[int, int, int]] = field(default_factory=dict)
    drop: list[bytes] = field(default_factory=list)
    ended: int = 0  # flows whose export this scan ended


def _open_exported(pins: PinRoot, ifname: str, name: str, key_type: str, size: int) -> Map:
    path = pins.iface(ifname, name)
    try:
        return Map.from_pin(path, key_type, "struct xf_exported", types=abi.ffi)
    except XdpflowError as e:
        if e.errno != errno.ENOENT:
            raise
    m = Map.create(BPF_MAP_TYPE_HASH, name, key_type, "struct xf_exported", size, types=abi.ffi)
    m.pin(path)
    return m


def _fold_one(m: Map, family: int, key: bytes, raw: bytes) -> tuple[int, int, int, int, int, int]:
    """(packets, bytes, first_seen, last_seen, tcp_flags, rec_start) of one
    raw flow value taken out of ``m``, folded as ``flows.fold`` folds tables."""
    keys = np.frombuffer(key, dtype=abi.np_dtype(m.key_type))
    vals = np.frombuffer(raw, dtype=abi.np_dtype(m.value_type, itemsize=m.value_stride)).reshape(1, m.ncpu)
    fa = fold(family, keys, vals)
    return (
        int(fa.packets[0]),
        int(fa.bytes[0]),
        int(fa.first_seen[0]),
        int(fa.last_seen[0]),
        int(fa.tcp_flags[0]),
        int(fa.rec_start[0]),
    )


class FlowExpirer:
    """Expires and exports the flows of one interface. Use ``scan()`` then,
    once its records are sent, ``commit()``; ``flush()`` at shutdown.
    """

    def __init__(
        self,
        ifname: str,
        ifindex: int,
        pins: PinRoot,
        clock: JiffiesClock,
        idle_timeout: float = IDLE_TIMEOUT,
        active_timeout: float = ACTIVE_TIMEOUT,
    ) -> None:
        self.ifname = ifname
        self.ifindex = ifindex
        self.pins = pins
        self.clock = clock
        self.idle = int(idle_timeout * clock.hz)
        self.active = int(active_timeout * clock.hz)
        self.tables: list[tuple[int, Map, Map, str, Program]] = []
        self._taker: Program | None = None
        try:
            self._taker = pinned_prog(pins, ifname, TAKE_PIN)
            if self._taker is None:
                raise XdpflowError(
                    errno.ENOENT,
                    f"{ifname}: the data plane has no {TAKE_PIN!r} program pinned (attached by an older "
                    f"xdpflow?); attach again with `xdpflow attach {ifname}`",
                )
            for family, flows_name, exp_name, key_type in FAMILIES:
                flows = open_map(pins, flows_name, ifname)
                exported = _open_exported(pins, ifname, exp_name, key_type, flows.info.max_entries)
                self.tables.append((family, flows, exported, key_type, self._taker))
        except BaseException:
            self.close()
            raise
        self._pending: list[tuple[Map, _Pending]] = []

    def close(self) -> None:
        for _family, flows, exported, _kt, _taker in self.tables:
            flows.close()
            exported.close()
        self.tables = []
        if self._taker is not None:
            self._taker.close()
            self._taker = None

    def _now(self) -> int:
        return self.clock.now_jiffies()

    def _record(
        self,
        family: int,
        key: bytes,
        key_type: str,
        delta_p: int,
        delta_b: int,
        first: int,
        last: int,
        flags: int,
        reason: int,
    ) -> FlowRecord:
        alen = 4 if family == 4 else 16
        so, do = ffi.offsetof(key_type, "saddr"), ffi.offsetof(key_type, "daddr")
        po, qo = ffi.offsetof(key_type, "sport"), ffi.offsetof(key_type, "dport")
        return FlowRecord(
            family=family,
            src=key[so : so + alen],
            dst=key[do : do + alen],
            sport=int.from_bytes(key[po : po + 2], "big"),
            dport=int.from_bytes(key[qo : qo + 2], "big"),
            proto=key[ffi.offsetof(key_type, "proto")],
            packets=delta_p,
            octets=delta_b,
            start_ms=int(self.clock.to_wall(first) * 1000),
            end_ms=int(self.clock.to_wall(last) * 1000),
            tcp_flags=flags,
            ingress_ifindex=self.ifindex,
            end_reason=reason,
        )

    def _exported(self, m: Map) -> dict[bytes, tuple[int, int, int]]:
        raw = m.lookup_batch_raw()
        if raw is None:
            return {bytes(ffi.buffer(k)): (int(v.packets), int(v.bytes), int(v.at)) for k, v in m.items()}
        keys, vals, n = raw
        ks = m.info.key_size
        arr = np.frombuffer(vals, dtype=abi.np_dtype("struct xf_exported"), count=n)
        return {
            keys[i * ks : (i + 1) * ks]: (int(a["packets"]), int(a["bytes"]), int(a["at"])) for i, a in enumerate(arr)
        }

    def scan(self, force: bool = False) -> list[FlowRecord]:
        """Records for every flow that expired or is due an active export
        (every flow with ``force``: shutdown). Raises XdpflowError."""
        if self._pending:
            raise XdpflowError(errno.EBUSY, "scan() before commit() of the previous scan")
        now = self._now()
        out: list[FlowRecord] = []
        for family, flows, exported, key_type, taker in self.tables:
            pend = _Pending()
            self._pending.append((exported, pend))
            done = self._exported(exported)
            fa = read_table(flows, family)
            ks = flows.info.key_size
            keys = fa.keys.tobytes()
            ended = (fa.tcp_flags & (TCP_FIN | TCP_RST)) != 0
            idle = (now - fa.last_seen.astype(np.int64)) > self.idle
            live: set[bytes] = set()
            due: dict[bytes, int] = {}
            for i in range(len(fa)):
                key = keys[i * ks : (i + 1) * ks]
                prev_p, prev_b, prev_at = done.get(key, (0, 0, 0))
                if force or ended[i] or idle[i]:
                    raw = flows.lookup_and_delete_raw(key)
                    if raw is None:  # evicted meanwhile
                        continue
                    p, b, first, last, flags, rec_start = _fold_one(flows, family, key, raw)
                    reason = END_FORCED if force else END_OF_FLOW if ended[i] else END_IDLE
                    if p > prev_p:
                        start = rec_start or prev_at or first
                        out.append(
                            self._record(family, key, key_type, p - prev_p, b - prev_b, start, last, flags, reason)
                        )
                    if p > prev_p or key in done:
                        pend.ended += 1
                    if key in done:
                        pend.drop.append(key)
                    continue
                live.add(key)
                since = prev_at or int(fa.first_seen[i])
                if now - since >= self.active and int(fa.packets[i]) > prev_p:
                    due[key] = i
            # Active-timeout records count what the kernel had right after
            # taking each flow's stamp, so the next record starts exactly at
            # the first packet after this one; the table read above only
            # said which flows are due.
            for key, t in take(taker, family, list(due)).items():
                prev_p, prev_b, prev_at = done.get(key, (0, 0, 0))
                start = t.rec_start or prev_at or int(fa.first_seen[due[key]])
                out.append(
                    self._record(
                        family,
                        key,
                        key_type,
                        t.packets - prev_p,
                        t.bytes - prev_b,
                        start,
                        t.last_seen,
                        t.tcp_flags,
                        END_ACTIVE,
                    )
                )
                pend.put[key] = (t.packets, t.bytes, now)
            # state of flows the table no longer has (LRU-evicted) is stale:
            # their export ended too
            gone = set(pend.drop)
            stale = [k for k in done if k not in live and k not in gone]
            pend.ended += len(stale)
            pend.drop.extend(stale)
        return out

    def commit(self) -> int:
        """Record that the last scan's records were sent. Returns how many
        flows' export that scan ended: each flow once, when it left the
        table, whether or not its last record came at that scan."""
        n = 0
        for exported, pend in self._pending:
            for key, (p, b, at) in pend.put.items():
                v = abi.ffi.new("struct xf_exported *", {"packets": p, "bytes": b, "at": at})
                exported[key] = v
            for key in pend.drop:
                exported.pop(key, None)
            n += pend.ended
        self._pending = []
        return n

    def untracked(self) -> ReliabilityRecord | None:
        """The interface's admission control totals as an RFC 7011 section
        4.2 record (None: nothing went untracked). Raises XdpflowError."""
        u = read_admission(self.pins, self.ifname)
        if not u.packets:
            return None
        return ReliabilityRecord(
            metering_process=self.ifindex,
            packets=u.packets,
            octets=u.bytes,
            first_ms=int(self.clock.to_wall(u.first) * 1000),
            last_ms=int(self.clock.to_wall(u.last) * 1000),
        )

    def flush(self) -> list[FlowRecord]:
        """Every flow, taken out of the table: for a clean shutdown, so the
        next exporter starts from empty tables and nothing is sent twice."""
        return self.scan(force=True)
