"""Prometheus metrics: the pinned maps, read afresh on every scrape.

``XdpflowCollector`` reads one pin root each time Prometheus asks: counters
per interface, flow-table and blocklist occupancy, monitor mode, whether the
pinned program is the one running, the rules with the most hits (at most
``top_n`` of them, so a 10^5-rule feed does not become 10^5 series), and the
daemon's own export counters when it hands them over in an ``ExporterStats``.
Nothing is cached: a scrape shows what the maps hold at that moment.

An interface whose pins vanish between listing the pin root and reading them
(a detach running at that moment) is left out of that scrape; so are the
blocklist metrics while the shared maps are gone. Any other failure fails
the scrape (an HTTP 500, which Prometheus records as ``up == 0``).

Pins are visible from every network namespace, interfaces are not: whether
the program is attached is asked over netlink in the namespace the scraping
thread is in. ``netns`` makes each scrape enter a named namespace for that.
Threads inherit the namespace of the thread that starts them, so a process
that calls ``serve()`` from inside ``netlink.in_netns()`` (the daemon) needs
no ``netns``; its listening socket is then in that namespace too.

``serve()`` runs prometheus-client's threaded HTTP server on its own registry
(these metrics plus the usual ``process_*``/``python_*`` ones of the exporter
process), on loopback unless told otherwise.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from xdpflow.bindings import netlink
from xdpflow.dataplane import abi, maps
from xdpflow.dataplane.blocklist import Blocklist, key_cidr
from xdpflow.dataplane.flows import count_flows
from xdpflow.dataplane.maps import PinnedMaps
from xdpflow.dataplane.pins import PinRoot
from xdpflow.dataplane.rules import RuleTables
from xdpflow.defaults import TOP_RULES
from xdpflow.errors import XdpflowError, os_error

__all__ = [
    "ExporterStats",
    "MetricsServer",
    "XdpflowCollector",
    "serve",
]

DEFAULT_TOP_N = TOP_RULES
PREFIX = "xdpflow"
_ENOTSUPP = 524  # the kernel's internal "operation not supported", as libbpf passes it on

_COUNTER_HELP = {
    "packets": "seen by the XDP program",
    "passed": "passed on to the kernel stack",
    "dropped": "dropped by a blocklist rule",
    "sunk": "dropped after accounting (sink mode)",
    "monitored": "a blocklist rule would have dropped, passed in monitor mode",
    "parse_errors": "with headers too short or malformed to parse",
    "non_ip": "neither IPv4 nor IPv6",
    "ipv4": "IPv4",
    "ipv6": "IPv6",
    "tcp": "TCP",
    "udp": "UDP",
    "icmp": "ICMP or ICMPv6",
    "other": "IP with another transport protocol",
    "flow_insert_failed": "whose new flow could not be added to the flow table",
    "events_suppressed": "whose event was not sent: over the per-CPU event budget",
    "events_lost": "whose event was lost: the events ring buffer was full",
    "untracked": "that would have added a flow over the per-CPU new-flow budget: counted, not tracked",
}
# counters whose bytes are IP bytes (as flows count them), not frame bytes
_IP_BYTES = {"untracked"}

# ExporterStats field -> help of its metric, xdpflow_<field>_total
_EXPORTER_COUNTERS = {
    "flows_exported": "Flows whose IPFIX export the daemon finished, each counted once",
    "records_exported": "IPFIX data records sent by the daemon",
    "export_errors": "IPFIX messages the daemon failed to send",
    "blocklist_syncs": "Blocklist syncs from files and feeds that succeeded",
    "blocklist_sync_errors": "Blocklist syncs from files and feeds that failed",
    "notifications_failed": "Attack notifications (command runs, webhook posts) that failed or were dropped",
}


@dataclass
class ExporterStats:
    """The daemon's own counters, shown as ``xdpflow_*_total`` metrics.

    Plain ints: the daemon's one thread adds to them (``stats.flows_exported
    += n``) and a scrape reads them; a read never sees a torn int. Counters
    only grow; a restarted daemon starts from 0, which Prometheus reads as a
    counter reset.
    """

    flows_exported: int = 0
    records_exported: int = 0
    export_errors: int = 0
    blocklist_syncs: int = 0
    blocklist_sync_errors: int = 0
    notifications_failed: int = 0
    # automatic mitigation (the daemon replaces these objects, never edits them)
    protecting: bool = False  # [[protect]] groups are configured: show the attack metrics
    attacks_active: dict[str, int] = field(default_factory=dict)  # group -> attacks going on
    attacks_total: dict[str, int] = field(default_factory=dict)  # group -> attacks started
    mitigation_rules: int = 0  # mitigation rules in force
    protect_overflow: dict[str, int] = field(default_factory=dict)  # group -> frames counted without a host
    # (victim, group, rate name, value) of the active attacks only: bounded by them
    attack_rates: list[tuple[str, str, str, float]] = field(default_factory=list)


@dataclass
class _Iface:
    ifname: str
    counters: dict[str, int]
    flows: int
    flows_max: int
    attached: bool


@dataclass
class _Shared:
    monitor: bool
    rules: int
    rules_max: int
    top: list[tuple[str, str, int]]  # (cidr, direction, hits), most hits first
    rules_in_force: int = 0  # multi-field rules (`rule list`)
    # (id, action, packets, bytes, limited), most packets first
    top_rules: list[tuple[int, str, int, int, int]] = field(default_factory=list)


def _vanished(e: OSError) -> bool:
    return e.errno == errno.ENOENT


class XdpflowCollector(Collector):
    """Reads the maps under ``pins`` on every ``collect()``.

    ``top_n`` bounds the per-rule hit series (0: none). ``stats`` adds the
    daemon's export counters. ``netns`` names the network namespace the
    interfaces live in (None: the calling thread's own); each collect enters
    it and leaves it again, in the calling thread only.
    """

    def __init__(
        self,
        pins: PinRoot,
        stats: ExporterStats | None = None,
        top_n: int = DEFAULT_TOP_N,
        netns: str | None = None,
    ) -> None:
        if top_n < 0:
            raise ValueError(f"top_n must be 0 or more, not {top_n}")
        self.pins = pins
        self.stats = stats
        self.top_n = top_n
        self.netns = netns

    # reading the maps -------------------------------------------------------

    def _attached(self, ifname: str) -> bool:
        """Whether the pinned program is the one running on ``ifname``."""
        try:
            prog = maps.pinned_prog(self.pins, ifname)
        except XdpflowError as e:
            if _vanished(e):
                return False
            raise
        if prog is None:  # not pinned yet (mid-attach) or gone: not ours
            return False
        try:
            prog_id = prog.id
        finally:
            prog.close()
        try:
            return netlink.xdp_state(ifname).prog_id == prog_id
        except XdpflowError as e:
            if e.errno == errno.ENODEV:
                return False
            raise

    def _iface(self, ifname: str) -> _Iface | None:
        """One interface's maps; None when its pins vanished meanwhile.
        Reads pins only, so any thread in any namespace may call it."""
        try:
            counters = maps.read_counters(self.pins, ifname)
            flows, flows_max = count_flows(self.pins, ifname)
        except OSError as e:
            if _vanished(e):
                return None
            raise
        return _Iface(ifname, counters, flows, flows_max, attached=False)

    def _shared(self) -> _Shared | None:
        """Monitor mode and the blocklist; None while the shared maps are gone."""
        opened = PinnedMaps(self.pins)
        try:
            monitor = bool(opened("config")[0].flags & abi.C.XF_CFG_MONITOR)
            bl = Blocklist(opened)
            # rule key -> rule index, decoded in bulk: listing() would build
            # an ipaddress object for each of 10^5 rules
            entries = bl.entry_keys()
            _per_trie, rules_max = bl.capacity()
            hits = None
            if entries and self.top_n:
                hits = bl.hit_counts(limit=max(entries.values()) + 1)
            rule_set = RuleTables(opened)
            in_force = rule_set.active()
            top_rules: list[tuple[int, str, int, int, int]] = []
            if in_force and self.top_n:
                counts = rule_set.counters()
                hit = [(r.id, r.action, *counts[r.id]) for r in in_force if r.id is not None and r.id in counts]
                top_rules = sorted((h for h in hit if h[2]), key=lambda h: (-h[2], h[0]))[: self.top_n]
        except OSError as e:
            if _vanished(e):
                return None
            raise
        finally:
            opened.close()
        top = _top_rules(entries, hits, self.top_n) if hits is not None else []
        return _Shared(monitor, len(entries), rules_max, top, len(in_force), top_rules)

    # the metrics --------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """The metric families, reading no map (for the registry's name checks)."""
        return self._families([], None)

    def collect(self) -> Iterable[Metric]:
        """Every metric, read now. Raises OSError for anything but vanished pins.

        Returns a list, not a generator: the namespace switch is over by the
        time the caller sees the first metric.
        """
        names = self.pins.interfaces()
        # A full flow table is 10^5-10^6 entries to read; the kernel copies
        # them with the GIL released, so the tables of several interfaces (and
        # the blocklist) are read on as many CPUs while this thread asks
        # netlink which programs run.
        workers = min(len(names) + 1, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers, thread_name_prefix="xdpflow-scrape") as pool:
            shared_f = pool.submit(self._shared)
            iface_fs = [pool.submit(self._iface, n) for n in names]
            with netlink.in_netns(self.netns):
                attached = {n: self._attached(n) for n in names}
            shared = shared_f.result()
            ifaces = [i for i in (f.result() for f in iface_fs) if i is not None]
        for i in ifaces:
            i.attached = attached[i.ifname]
        return self._families(ifaces, shared)

    def _families(self, ifaces: list[_Iface], shared: _Shared | None) -> list[Metric]:
        out: list[Metric] = []
        for name in maps.STAT_NAMES:
            what = _COUNTER_HELP.get(name, f"counted as {name}")
            unit = "IP bytes" if name in _IP_BYTES else "Bytes"
            packets = CounterMetricFamily(f"{PREFIX}_{name}_packets", f"Frames {what}", labels=["interface"])
            nbytes = CounterMetricFamily(f"{PREFIX}_{name}_bytes", f"{unit} of the frames {what}", labels=["interface"])
            for i in ifaces:
                packets.add_metric([i.ifname], i.counters[name])
                nbytes.add_metric([i.ifname], i.counters[abi.bytes_key(name)])
            out += [packets, nbytes]

        flows = GaugeMetricFamily(f"{PREFIX}_flows", "Entries in the flow tables (IPv4 and IPv6)", labels=["interface"])
        flows_max = GaugeMetricFamily(
            f"{PREFIX}_flows_max", "Capacity of the flow tables (IPv4 and IPv6)", labels=["interface"]
        )
        attached = GaugeMetricFamily(
            f"{PREFIX}_attached",
            "1 if the pinned xdpflow program is the one running on the interface, else 0",
            labels=["interface"],
        )
        for i in ifaces:
            flows.add_metric([i.ifname], i.flows)
            flows_max.add_metric([i.ifname], i.flows_max)
            attached.add_metric([i.ifname], int(i.attached))
        out += [flows, flows_max, attached]

        rules = GaugeMetricFamily(f"{PREFIX}_blocklist_rules", "Rules in the blocklist")
        rules_max = GaugeMetricFamily(f"{PREFIX}_blocklist_rules_max", "Rules the blocklist can hold")
        monitor = GaugeMetricFamily(
            f"{PREFIX}_monitor_mode", "1 if blocklist matches are counted and passed instead of dropped"
        )
        hits = CounterMetricFamily(
            f"{PREFIX}_blocklist_rule_hits",
            f"Frames matched by a blocklist rule (shown only for the up to {self.top_n} rules with the most)",
            labels=["cidr", "direction"],
        )
        if shared is not None:
            rules.add_metric([], shared.rules)
            rules_max.add_metric([], shared.rules_max)
            monitor.add_metric([], int(shared.monitor))
            for cidr, direction, n in shared.top:
                hits.add_metric([cidr, direction], n)
        out += [rules, rules_max, monitor, hits]

        in_force = GaugeMetricFamily(f"{PREFIX}_rules", "Multi-field rules in force (`xdpflow rule list`)")
        shown = f"shown only for the up to {self.top_n} rules with the most packets"
        r_packets = CounterMetricFamily(
            f"{PREFIX}_rule_packets", f"Frames a rule matched ({shown})", labels=["id", "action"]
        )
        r_bytes = CounterMetricFamily(
            f"{PREFIX}_rule_bytes", f"Bytes of the frames a rule matched ({shown})", labels=["id", "action"]
        )
        r_limited = CounterMetricFamily(
            f"{PREFIX}_rule_limited",
            f"Frames a rate-limit rule dropped as excess ({shown})",
            labels=["id", "action"],
        )
        if shared is not None:
            in_force.add_metric([], shared.rules_in_force)
            for rid, action, pk, by, lim in shared.top_rules:
                r_packets.add_metric([str(rid), action], pk)
                r_bytes.add_metric([str(rid), action], by)
                r_limited.add_metric([str(rid), action], lim)
        out += [in_force, r_packets, r_bytes, r_limited]

        if self.stats is not None:
            for field, text in _EXPORTER_COUNTERS.items():
                c = CounterMetricFamily(f"{PREFIX}_{field}", text)
                c.add_metric([], int(getattr(self.stats, field)))
                out.append(c)
        if self.stats is not None and self.stats.protecting:
            out += _attack_families(self.stats)
        return out


def _attack_families(stats: ExporterStats) -> list[Metric]:
    active = GaugeMetricFamily(f"{PREFIX}_attacks_active", "Attacks going on, per protected group", labels=["group"])
    total = CounterMetricFamily(
        f"{PREFIX}_attacks", "Attacks detected by this daemon process, per protected group", labels=["group"]
    )
    groups = sorted({*stats.attacks_active, *stats.attacks_total})
    for g in groups:
        active.add_metric([g], stats.attacks_active.get(g, 0))
        total.add_metric([g], stats.attacks_total.get(g, 0))
    rules = GaugeMetricFamily(f"{PREFIX}_mitigation_rules", "Automatic mitigation rules in force")
    rules.add_metric([], stats.mitigation_rules)
    rates = GaugeMetricFamily(
        f"{PREFIX}_attack_rate",
        "Current rate toward the victim of an active attack (only while it lasts: one series per active "
        "attack and rate: pps, bps, new_flows, syn_pps, udp_pps, icmp_pps, frag_pps)",
        labels=["victim", "group", "rate"],
    )
    for victim, group, name, value in stats.attack_rates:
        rates.add_metric([victim, group, name], round(value))  # whole units: rates over a second
    overflow = CounterMetricFamily(
        f"{PREFIX}_protect_overflow_packets",
        "Frames to protected hosts the full per-host table had no room for (counted per group only)",
        labels=["group"],
    )
    for g in groups:
        overflow.add_metric([g], stats.protect_overflow.get(g, 0))
    return [active, total, rules, rates, overflow]


def _top_rules(entries: dict[int, int], hits: np.ndarray, n: int) -> list[tuple[str, str, int]]:
    """The ``n`` rules with the most hits (none without hits), as (cidr,
    direction, hits); equal hits in rule order, so the choice is stable."""
    keys = list(entries)
    idx = np.fromiter(entries.values(), dtype=np.int64, count=len(keys))
    h = hits[idx]
    rows = np.flatnonzero(h)
    if len(rows) > n:
        # the n-th largest count; every rule above it is in, ties fill the rest
        cut = np.partition(h[rows], len(rows) - n)[len(rows) - n]
        above = rows[h[rows] > cut]
        ties = sorted(rows[h[rows] == cut].tolist(), key=keys.__getitem__)
        rows = np.concatenate([above, np.array(ties[: n - len(above)], dtype=np.int64)])
    picked = sorted(rows.tolist(), key=lambda r: (-int(h[r]), keys[r]))
    return [(key_cidr(keys[r]), "dst" if keys[r] & 1 else "src", int(h[r])) for r in picked]


# serving ----------------------------------------------------------------------


class MetricsServer:
    """A running metrics HTTP server; ``shutdown()`` (or ``close()``, or
    leaving a ``with`` block) stops it and closes its socket."""

    def __init__(self, httpd: Any, thread: threading.Thread, registry: CollectorRegistry) -> None:
        self._httpd = httpd
        self._thread = thread
        self.registry = registry
        addr = httpd.socket.getsockname()
        self.host: str = addr[0]
        self.port: int = addr[1]

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the socket is bound to: the real port when 0 was asked."""
        return self.host, self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def shutdown(self) -> None:
        """Stop serving, wait for the server thread, close the socket. Idempotent."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    close = shutdown

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()


_LISTEN_HINTS = {
    errno.EADDRINUSE: "another process listens there; choose another port",
    errno.EADDRNOTAVAIL: "no interface in this network namespace has that address",
}


def serve(
    address: tuple[str, int],
    pins: PinRoot,
    stats: ExporterStats | None = None,
    top_n: int = DEFAULT_TOP_N,
    netns: str | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` for ``pins`` on ``address`` (host, port; port 0
    picks a free one) from a background thread, until ``shutdown()`` on the
    returned server. Raises XdpflowError when the address cannot be resolved
    or bound.
    """
    host, port = address
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    registry = CollectorRegistry()
    registry.register(XdpflowCollector(pins, stats, top_n, netns))
    for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(c)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except socket.gaierror as e:
        raise XdpflowError(errno.EINVAL, f"listening on {listen}: cannot resolve {host!r}: {e.strerror}") from None
    except OSError as e:
        raise os_error(e.errno or errno.EIO, f"listening on {listen}", _LISTEN_HINTS.get(e.errno or 0)) from None
    thread.name = f"xdpflow-metrics-{port}"
    return MetricsServer(httpd, thread, registry)
