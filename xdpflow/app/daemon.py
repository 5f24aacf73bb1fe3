"""`xdpflow run`: the long-running controller.

Attaches to the configured interfaces, expires flows and exports them as
IPFIX, serves Prometheus metrics, and keeps the blocklist equal to the union
of its sources. SIGTERM/SIGINT stop it cleanly (every flow is exported and
taken out of the tables first, so a successor starts clean); SIGHUP reloads
the configuration. The data plane keeps running after it exits unless
``detach_on_exit`` is set.

With ``[[protect]]`` groups it also reads the per-destination counters every
second, detects attacks, mitigates them through the rule set, notifies, and
keeps the attacks in a state file (``xdpflow attacks``; a restarted daemon
resumes them).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from ipaddress import ip_address
from typing import Any

from xdpflow.app.config import OVERRIDES, Config, load_config, parse_hostport, protect_hosts
from xdpflow.bindings import netlink
from xdpflow.dataplane import lifecycle, maps
from xdpflow.dataplane.abi import C
from xdpflow.dataplane.blocklist import apply_keys
from xdpflow.dataplane.clock import JiffiesClock
from xdpflow.dataplane.lifecycle import AttachOptions
from xdpflow.dataplane.pins import PinRoot
from xdpflow.dataplane.protect import Group, ProtectTables
from xdpflow.dataplane.rules import RuleTables
from xdpflow.export.detect import Attack, Detector, Policy, load_state, save_state, state_path
from xdpflow.export.expiry import FlowExpirer
from xdpflow.export.ipfix import FlowRecord, IpfixExporter, ReliabilityRecord
from xdpflow.export.metrics import ExporterStats, MetricsServer, serve
from xdpflow.export.mitigate import Mitigator
from xdpflow.export.notify import Notifier, event
from xdpflow.rules.rulespec import RuleSpec
from xdpflow.rules.sources import FeedSource, FileSource, RulesFileSource, Source, SourceSet

log = logging.getLogger("xdpflow")

# seconds between reads of the per-destination counters: an attack is
# started trigger_seconds after the first read that sees it over, so the
# interval is what detection adds on top (a second left no margin on the
# 3 s the mitigation issue asks for, with the flood's start between reads)
PROTECT_INTERVAL = 0.5


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None, overrides: dict[str, Any]) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.expirers: dict[str, FlowExpirer] = {}
        self.exporter: IpfixExporter | None = None
        self.metrics: MetricsServer | None = None
        self.sources: SourceSet | None = None
        self.sync_pending = False
        self.retry_at = 0.0
        self.source_by_key: dict[tuple[Any, ...], Source] = {}  # settings -> source, kept across reloads
        self.stats = ExporterStats()
        self.rule_sources: dict[str, RulesFileSource] = {}  # path -> source, kept across reloads
        self.rules_pending = False
        self.rules_retry_at = 0.0
        self.detector: Detector | None = None
        self.mitigator: Mitigator | None = None
        self.notifier: Notifier | None = None
        self.overflow_logged = -1e9
        self.protect_lock = threading.Lock()  # the detection thread against a reload
        self.protect_thread: threading.Thread | None = None

    @property
    def pins(self) -> PinRoot:
        return PinRoot(self.cfg.pin_root)

    # life cycle -------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload.set())
        with netlink.in_netns(self.cfg.netns):
            try:
                self.start()
                self.loop()
            finally:
                self.shutdown()
        return 0

    def start(self) -> None:
        cfg = self.cfg
        for ifname in cfg.interfaces:
            opts = AttachOptions(
                mode=cfg.mode,
                flows=cfg.flows,
                flow_budget=cfg.flow_budget,
                sink=cfg.sink,
                monitor=cfg.monitor or None,
                protect_hosts=_table_size(cfg),
            )
            r = lifecycle.attach(ifname, opts, self.pins)
            log.info("attached iface=%s prog_id=%d mode=%s upgraded=%s", ifname, r.prog_id, r.mode, r.replaced)
        if not cfg.monitor:
            maps.set_monitor(self.pins, False)
        self._start_exporter()
        self._start_metrics()
        self._start_sources()
        self._start_rule_sources()
        with self.protect_lock:
            self._start_protect()
        self.protect_thread = threading.Thread(target=self._protect_loop, name="xdpflow-detect", daemon=True)
        self.protect_thread.start()

    def _start_exporter(self) -> None:
        cfg = self.cfg
        clock = maps.open_clock(self.pins)
        for e in self.expirers.values():
            e.close()
        self.expirers = {
            ifname: FlowExpirer(ifname, netlink.ifindex(ifname), self.pins, clock, cfg.idle_timeout, cfg.active_timeout)
            for ifname in cfg.interfaces
        }
        self.clock: JiffiesClock = clock
        if self.exporter is not None:
            self.exporter.close()
        self.exporter = None
        if cfg.collectors:
            self.exporter = IpfixExporter(
                [parse_hostport(c) for c in cfg.collectors],
                observation_domain=cfg.observation_domain,
                mtu=cfg.mtu,
                template_refresh=cfg.template_refresh,
            )
            log.info(
                "exporting collectors=%s idle=%gs active=%gs",
                ",".join(cfg.collectors),
                cfg.idle_timeout,
                cfg.active_timeout,
            )

    def _start_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.shutdown()
        self.metrics = serve(parse_hostport(self.cfg.listen), self.pins, stats=self.stats, top_n=self.cfg.top_rules)
        log.info("metrics listen=%s", self.cfg.listen)

    def _start_sources(self) -> None:
        """(Re)build the blocklist sources; sources whose settings did not
        change are kept, with their last good lists and fetch timers."""
        cfg = self.cfg
        kept = self.source_by_key
        wanted: list[tuple[tuple[Any, ...], Any]] = [
            (("file", p, cfg.blocklist_direction), lambda p=p: FileSource(p, direction=cfg.blocklist_direction))
            for p in cfg.blocklist_files
        ]
        wanted += [
            (
                ("feed", f.url, f.interval, f.timeout, f.max_bytes, cfg.blocklist_direction),
                lambda f=f: FeedSource(
                    f.url,
                    interval=f.interval,
                    timeout=f.timeout,
                    max_bytes=f.max_bytes,
                    direction=cfg.blocklist_direction,
                ),
            )
            for f in cfg.feeds
        ]
        srcs = [kept.get(key) or make() for key, make in wanted]
        self.source_by_key = {key: src for (key, _make), src in zip(wanted, srcs)}
        old, self.sources = self.sources, (SourceSet(srcs) if srcs else None)
        if old is not None:
            if self.sources is not None:
                self.sources.carry_over(old)
            old.close()
        self.sync_pending = False

    def _start_rule_sources(self) -> None:
        """(Re)build the rules-file sources; a file still configured keeps
        its source and last good rules."""
        old = self.rule_sources
        self.rule_sources = {p: old.get(p) or RulesFileSource(p) for p in self.cfg.rules_files}
        if set(old) - set(self.rule_sources):  # a file left the union: sync without it
            self.rules_pending, self.rules_retry_at = True, 0.0

    def poll_rules(self) -> None:
        """Keep the rule set equal to the union of the rules files (entries of
        `block add --ttl` aside): a bad edit keeps the running set."""
        if not self.rule_sources:
            return
        changed = False
        for src in self.rule_sources.values():
            r = src.poll()
            if r.error is not None:
                log.warning("rules source error: %s", r.error)
            changed |= r.changed
        if not changed and not (self.rules_pending and time.monotonic() >= self.rules_retry_at):
            return
        wanted: list[RuleSpec] = [r for s in self.rule_sources.values() for r in (s.rules or [])]
        try:
            with RuleTables.of_pins(self.pins) as rt:
                added, removed = rt.sync(wanted)
            self.rules_pending = False
            log.info("rules synced rules=%d added=%d deleted=%d", len(wanted), len(added), len(removed))
        except OSError as e:
            self.rules_pending, self.rules_retry_at = True, time.monotonic() + 10
            log.error("rules sync failed, the previous rule set stays in force (retry in 10 s): %s", e)

    def expire_rules(self) -> None:
        """Take expired rules out of the set (the data plane already ignores them)."""
        try:
            with RuleTables.of_pins(self.pins) as rt:
                gone = rt.expire()
        except OSError as e:
            log.error("removing expired rules failed: %s", e)
            return
        for r in gone:
            log.info("rule expired id=%s rule=%r", r.id, r.line())

    def loop(self) -> None:
        next_scan = time.monotonic()
        while not self.stop.is_set():
            if self.reload.is_set():
                self.reload.clear()
                self.do_reload()
            self.poll_sources()
            self.poll_rules()
            if time.monotonic() >= next_scan:
                self.scan()
                self.expire_rules()
                next_scan = time.monotonic() + self.cfg.scan_interval
            self.stop.wait(min(0.5, max(0.05, next_scan - time.monotonic())))

    # automatic mitigation ------------------------------------------------------

    def _protect_loop(self) -> None:
        """Detection's own thread: a scan of a full flow table (seconds,
        under a spoofed flood) never delays a read of the counters or a TTL
        extension. It inherits the daemon's network namespace."""
        next_t = time.monotonic()
        while not self.stop.wait(max(0.0, next_t - time.monotonic())):
            next_t = max(next_t + PROTECT_INTERVAL, time.monotonic())  # never catch up in a burst
            try:
                with self.protect_lock:
                    self.protect_tick()
            except Exception as e:  # keep detecting: one bad read is logged, the next may do
                log.error("detection failed: %r", e)

    def _start_protect(self) -> None:
        """(Re)install the protected groups in the data plane; the first
        time, resume the attacks a previous daemon left in the state file."""
        cfg = self.cfg
        try:
            with ProtectTables.of_pins(self.pins) as pt:
                pt.install([Group(p.name, p.prefixes) for p in cfg.protect], protect_hosts(cfg) or None)
        except OSError as e:
            if self.detector is None:  # at start: the operator fixes the config
                raise
            log.error("installing the protected groups failed, the previous ones stay: %s", e)
        if cfg.protect:
            log.info("protecting groups=%s", ",".join(p.name for p in cfg.protect))
        if self.detector is None:
            self.detector = Detector(cfg.protect)
            try:
                attacks, next_id = load_state(state_path(self.pins))
            except OSError as e:
                log.error("%s", e)
                attacks, next_id = [], 1
            self.detector.next_id = next_id
            self.detector.resume(attacks)
            for a in self.detector.active():
                log.info("attack resumed id=%d victim=%s group=%s", a.id, a.victim, a.group)
        else:
            self.detector.set_policies(cfg.protect)
        self.mitigator = Mitigator(self.pins, cfg.interfaces, cfg.allow_nets())
        if self.notifier is None or self.notifier.cfg != cfg.notify:
            if self.notifier is not None:
                self.notifier.close()
            self.notifier = Notifier(cfg.notify)
        self.stats.protecting = bool(cfg.protect)

    def _policy(self, group: str) -> Policy | None:
        return next((p for p in self.cfg.protect if p.name == group), None)

    def _notify(self, kind: str, a: Attack) -> None:
        if self.notifier is not None:
            self.notifier.send(event(kind, a.json()))

    def _mitigate(self, a: Attack, pol: Policy) -> None:
        assert self.mitigator is not None
        a.mitigation = m = self.mitigator.apply(a, pol)
        log.warning(
            "attack mitigation id=%d victim=%s kind=%s dry_run=%s rules=%s declined=%r would=%r",
            a.id,
            a.victim,
            m.kind,
            m.dry_run,
            ",".join(map(str, m.rules)) or "-",
            m.declined,
            m.lines if m.dry_run else None,
        )
        self._notify("mitigation", a)

    def protect_tick(self) -> None:
        """One read of the per-destination counters: detect, mitigate,
        notify, extend the TTLs of the rules of attacks still going on."""
        det, mit = self.detector, self.mitigator
        if det is None or mit is None or (not self.cfg.protect and not det.active()):
            return
        now = time.time()
        try:
            with ProtectTables.of_pins(self.pins) as pt:
                changes = det.update(pt.hosts(), now)
                overflow = pt.overflow()
                idle = det.idle_hosts(now)
                if idle:
                    pt.forget([ip_address(raw) for _, raw in idle])
        except OSError as e:
            log.error("reading the per-destination counters failed: %s", e)
            return
        self._overflow(overflow)
        for ch in changes:
            a = ch.attack
            rates = " ".join(f"{k}={v:.0f}" for k, v in a.rates.items() if v)
            if ch.kind == "start":
                log.warning(
                    "attack started id=%d victim=%s group=%s exceeded=%s %s",
                    a.id,
                    a.victim,
                    a.group,
                    ",".join(a.exceeded),
                    rates,
                )
                self._notify("start", a)
                pol = self._policy(a.group)
                if pol is not None and pol.mitigation != "none":
                    self._mitigate(a, pol)
            else:
                log.warning("attack ended id=%d victim=%s group=%s", a.id, a.victim, a.group)
                self._notify("end", a)
        active = [(a, p) for a in det.active() if (p := self._policy(a.group)) is not None]
        for a in mit.extend(active, now):  # their rules are gone (a daemon down past their TTL): again
            pol = self._policy(a.group)
            if pol is not None:
                self._mitigate(a, pol)
        if changes or active:
            try:
                save_state(state_path(self.pins), det.attacks(), det.next_id)
            except OSError as e:
                log.error("saving the attacks state failed: %s", e)
        self._update_stats([a for a, _ in active], now)

    def _overflow(self, overflow: dict[int, dict[str, int]]) -> None:
        """Frames to hosts the full table had no room for are counted per
        group only: no host's rates, so say so (once a minute at most)."""
        names = {i + 1: p.name for i, p in enumerate(self.cfg.protect)}
        packets = {names.get(g, str(g)): c.get("packets", 0) for g, c in overflow.items()}
        grown = [g for g, n in packets.items() if n > self.stats.protect_overflow.get(g, 0)]
        self.stats.protect_overflow = packets
        if grown and time.monotonic() - self.overflow_logged > 60:
            self.overflow_logged = time.monotonic()
            log.warning(
                "protected host table full: frames to new hosts are counted per group only groups=%s "
                "(raise hosts in [[protect]]; a full table needs a detach and attach to grow)",
                ",".join(grown),
            )

    def _update_stats(self, active: list[Attack], now: float) -> None:
        det, mit = self.detector, self.mitigator
        assert det is not None and mit is not None
        by_group: dict[str, int] = {}
        for a in active:
            by_group[a.group] = by_group.get(a.group, 0) + 1
        self.stats.attacks_active = {p.name: by_group.get(p.name, 0) for p in self.cfg.protect}
        self.stats.attacks_total = {p.name: det.total.get(p.name, 0) for p in self.cfg.protect}
        self.stats.attack_rates = [(a.victim, a.group, k, v) for a in active for k, v in a.rates.items()]
        # reading the rule set back costs: only while some mitigation's rules may still be in force
        recent = [a.mitigation.expires_at for a in det.attacks() if a.mitigation and a.mitigation.expires_at]
        self.stats.mitigation_rules = mit.installed() if recent and max(recent) > now - 5 else 0
        if self.notifier is not None:
            self.stats.notifications_failed = self.notifier.failed

    def poll_sources(self) -> None:
        if self.sources is None:
            return
        update = self.sources.poll(time.monotonic())
        for r in self.sources.errors:
            log.warning("blocklist source error: %s", r)
            for bad in (r.bad_lines or [])[1:20]:
                log.warning("  %s", bad)
        if update is not None:
            keys = update.keys
        elif self.sync_pending and time.monotonic() >= self.retry_at:
            keys = self.sources.snapshot().keys  # the last sync failed: try again
        else:
            return
        try:
            ch = apply_keys(keys, self.pins)
            self.sync_pending = False
            self.stats.blocklist_syncs += 1
            log.info(
                "blocklist synced rules=%d added=%d deleted=%d", len(keys), len(ch.added_keys), len(ch.deleted_keys)
            )
        except OSError as e:
            self.sync_pending, self.retry_at = True, time.monotonic() + 10
            self.stats.blocklist_sync_errors += 1
            log.error("blocklist sync failed, the previous list stays in force (retry in 10 s): %s", e)

    def _untracked(self) -> list[ReliabilityRecord]:
        """Each interface's admission control totals, for the exporter."""
        out = []
        for ifname, exp in self.expirers.items():
            try:
                rec = exp.untracked()
            except OSError as e:
                log.error("reading untracked frames failed iface=%s: %s", ifname, e)
                continue
            if rec is not None:
                out.append(rec)
        return out

    def _export(self, records: list[FlowRecord], reliability: list[ReliabilityRecord]) -> None:
        assert self.exporter is not None
        errors_before = self.exporter.errors
        self.exporter.export(records, reliability)
        self.stats.records_exported += len(records)
        # a counter: add this exporter's new errors (a reload starts a new exporter)
        self.stats.export_errors += self.exporter.errors - errors_before

    def scan(self, force: bool = False) -> None:
        # the reliability statistics go with the templates, whichever export sends them
        reliability = self._untracked() if self.exporter is not None else []
        for ifname, exp in self.expirers.items():
            try:
                records = exp.scan(force=force)
            except OSError as e:
                log.error("flow scan failed iface=%s: %s", ifname, e)
                continue
            if records and self.exporter is not None:
                self._export(records, reliability)
            ended = exp.commit()
            if self.exporter is not None:
                # every flow once, also one whose last record was an active one
                self.stats.flows_exported += ended
        if self.exporter is not None and reliability:
            # when no flow record went out, the statistics still go when the templates are due
            self._export([], reliability)

    def do_reload(self) -> None:
        try:
            new = load_config(self.config_path, self.overrides)
        except (OSError, ValueError) as e:
            log.error("reload failed, keeping the running config: %s", e)
            return
        old, self.cfg = self.cfg, new
        for ifname in new.interfaces:
            attached_as = (new.mode, new.flows, new.sink, new.flow_budget)
            if ifname not in old.interfaces or attached_as != (old.mode, old.flows, old.sink, old.flow_budget):
                opts = AttachOptions(
                    mode=new.mode,
                    flows=new.flows,
                    flow_budget=new.flow_budget,
                    sink=new.sink,
                    protect_hosts=_table_size(new),
                )
                r = lifecycle.attach(ifname, opts, self.pins)
                log.info("attached iface=%s prog_id=%d", ifname, r.prog_id)
        maps.set_monitor(self.pins, new.monitor)
        self.scan(force=False)
        self._start_exporter()
        if new.listen != old.listen or new.top_rules != old.top_rules:
            self._start_metrics()
        self._start_sources()
        self._start_rule_sources()
        with self.protect_lock:
            self._start_protect()
        log.info("reloaded config=%s", self.config_path)

    def shutdown(self) -> None:
        self.stop.set()  # the detection thread too (start() may have failed after starting it)
        # export everything and empty the tables: nothing pending, nothing twice
        try:
            self.scan(force=True)
        except Exception as e:  # keep shutting down
            log.error("final export failed: %s", e)
        for exp in self.expirers.values():
            exp.close()
        if self.exporter is not None:
            self.exporter.close()
        if self.metrics is not None:
            self.metrics.shutdown()
        if self.sources is not None:
            self.sources.close()
        if self.protect_thread is not None:
            self.protect_thread.join(10)
        if self.notifier is not None:
            self.notifier.close(wait=self.cfg.notify.timeout)
        if self.cfg.detach_on_exit:
            for ifname in self.cfg.interfaces:
                try:
                    lifecycle.detach(ifname, self.pins)
                    log.info("detached iface=%s", ifname)
                except OSError as e:
                    log.error("detach failed iface=%s: %s", ifname, e)
        log.info("stopped")


def _table_size(cfg: Config) -> int | None:
    """The per-host table's size to ask for at attach: the default unless
    the groups' ``hosts`` add up to more (it is fixed once pinned)."""
    n = protect_hosts(cfg)
    return n if n > C.XF_PHOSTS_DEFAULT else None


class _Formatter(logging.Formatter):
    """ts=... level=... msg with key=value pairs: plain, greppable, structured."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"ts={ts}Z level={record.levelname.lower()} {record.getMessage()}"


def main(args: argparse.Namespace) -> int:
    """Entry point for `xdpflow run`. Raises ConfigError/XdpflowError."""
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.debug else logging.INFO)
    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in OVERRIDES}
    overrides["pin_root"] = getattr(args, "pin_root_given", None)
    overrides["netns"] = getattr(args, "netns", None)
    cfg = load_config(args.config, overrides)
    os.umask(0o077)
    return Daemon(cfg, args.config, overrides).run()
