"""`xdpflow run`: the long-running controller.

Attaches to the configured interfaces, expires flows and exports them as
IPFIX, serves Prometheus metrics, and keeps the blocklist equal to the union
of its sources. SIGTERM/SIGINT stop it cleanly (every flow is exported and
taken out of the tables first, so a successor starts clean); SIGHUP reloads
the configuration. The data plane keeps running after it exits unless
``detach_on_exit`` is set.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import threading
import time
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from . import controller, netlink
from .clock import JiffiesClock
from .controller import AttachOptions
from .errors import InputError, XdpflowError
from .pins import default_root

log = logging.getLogger("xdpflow")


@dataclass
class FeedConfig:
    url: str
    interval: float = 3600.0
    timeout: float = 10.0
    max_bytes: int = 16 * 1024 * 1024


@dataclass
class Config:
    interfaces: list[str] = field(default_factory=list)
    pin_root: str = field(default_factory=default_root)
    netns: str | None = None
    mode: str = "auto"
    flows: int | None = None
    sink: bool = False
    monitor: bool = False
    detach_on_exit: bool = False
    # export
    collectors: list[str] = field(default_factory=list)
    idle_timeout: float = 15.0
    active_timeout: float = 60.0
    scan_interval: float = 1.0
    template_refresh: float = 60.0
    observation_domain: int = 1
    mtu: int = 1500
    # metrics
    listen: str = "127.0.0.1:9437"
    top_rules: int = 20
    # blocklist
    blocklist_files: list[str] = field(default_factory=list)
    blocklist_direction: str = "src"
    feeds: list[FeedConfig] = field(default_factory=list)


# TOML table -> the Config fields it may hold (table "" is the top level)
_SECTIONS = {
    "": {"interfaces", "pin_root", "netns", "mode", "flows", "sink", "monitor", "detach_on_exit"},
    "export": {
        "collectors",
        "idle_timeout",
        "active_timeout",
        "scan_interval",
        "template_refresh",
        "observation_domain",
        "mtu",
    },
    "metrics": {"listen", "top_rules"},
    "blocklist": {"files", "direction", "feeds"},
}
_RENAMES = {("blocklist", "files"): "blocklist_files", ("blocklist", "direction"): "blocklist_direction"}


class ConfigError(InputError):
    """A configuration that cannot be right: the CLI exits 2."""


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML config file (None: defaults only) and apply command-line
    overrides. Raises ConfigError naming the file and the offending key."""
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise XdpflowError(e.errno or errno.EIO, f"cannot read config {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for key, value in doc.items():
            if isinstance(value, dict):
                allowed = _SECTIONS.get(key)
                if allowed is None:
                    raise ConfigError(f"{path}: unknown section [{key}]")
                for k, v in value.items():
                    if k not in allowed:
                        raise ConfigError(f"{path}: unknown key {k!r} in [{key}]")
                    values[_RENAMES.get((key, k)) or k] = v
            elif key in _SECTIONS[""]:
                values[key] = value
            else:
                raise ConfigError(f"{path}: unknown key {key!r}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    feeds = values.pop("feeds", [])
    try:
        cfg = Config(**values)
        cfg.feeds = [FeedConfig(**f) if isinstance(f, dict) else FeedConfig(url=str(f)) for f in feeds]
    except TypeError as e:
        raise ConfigError(f"{path or 'command line'}: {e}") from None
    _validate(cfg, path or "command line")
    return cfg


def _validate(cfg: Config, where: str) -> None:
    if not cfg.interfaces:
        raise ConfigError(f'{where}: no interfaces: set interfaces = ["eth0"] or pass --interface')
    if cfg.mode not in netlink.MODE_FLAGS:
        raise ConfigError(f"{where}: mode must be one of {', '.join(netlink.MODE_FLAGS)}")
    for name in ("idle_timeout", "active_timeout", "scan_interval", "template_refresh"):
        if not isinstance(getattr(cfg, name), (int, float)) or getattr(cfg, name) <= 0:
            raise ConfigError(f"{where}: {name} must be a positive number of seconds")
    if cfg.blocklist_direction not in ("src", "dst"):
        raise ConfigError(f"{where}: blocklist direction must be src or dst")
    for c in cfg.collectors:
        parse_hostport(c, where)
    for f in cfg.feeds:
        if not f.url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: feed {f.url!r}: a feed URL must start with http:// or https://")
        for name in ("interval", "timeout", "max_bytes"):
            v = getattr(f, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"{where}: feed {f.url!r}: {name} must be a positive number")
    parse_hostport(cfg.listen, where)


def parse_hostport(text: str, where: str = "config") -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port). Raises ConfigError."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError(f"{where}: {text!r} is not host:port")
    return host.strip("[]"), int(port)


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None, overrides: dict[str, Any]) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.expirers: dict[str, Any] = {}
        self.exporter: Any = None
        self.metrics: Any = None
        self.sources: Any = None
        self.sync_pending = False
        self.retry_at = 0.0
        self.source_by_key: dict[Any, Any] = {}  # settings -> source, kept across reloads
        from .metrics import ExporterStats

        self.stats = ExporterStats()

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
            opts = AttachOptions(mode=cfg.mode, flows=cfg.flows, sink=cfg.sink, monitor=cfg.monitor or None)
            r = controller.attach(ifname, opts, cfg.pin_root)
            log.info("attached iface=%s prog_id=%d mode=%s upgraded=%s", ifname, r.prog_id, r.mode, r.replaced)
        if not cfg.monitor:
            controller.set_monitor(False, cfg.pin_root)
        self._start_exporter()
        self._start_metrics()
        self._start_sources()

    def _start_exporter(self) -> None:
        from .expiry import FlowExpirer
        from .ipfix import IpfixExporter

        cfg = self.cfg
        clock = controller.open_clock(cfg.pin_root)
        for e in self.expirers.values():
            e.close()
        self.expirers = {
            ifname: FlowExpirer(
                ifname, netlink.ifindex(ifname), cfg.pin_root, clock, cfg.idle_timeout, cfg.active_timeout
            )
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
        from . import metrics

        if self.metrics is not None:
            self.metrics.shutdown()
        self.metrics = metrics.serve(
            self.cfg.listen, pin_root=self.cfg.pin_root, stats=self.stats, top_n=self.cfg.top_rules
        )
        log.info("metrics listen=%s", self.cfg.listen)

    def _start_sources(self) -> None:
        """(Re)build the blocklist sources; sources whose settings did not
        change are kept, with their last good lists and fetch timers."""
        from .sources import FeedSource, FileSource, SourceSet

        cfg = self.cfg
        kept = self.source_by_key
        wanted: list[tuple[Any, Any]] = [
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

    def loop(self) -> None:
        next_scan = time.monotonic()
        while not self.stop.is_set():
            if self.reload.is_set():
                self.reload.clear()
                self.do_reload()
            self.poll_sources()
            if time.monotonic() >= next_scan:
                self.scan()
                next_scan = time.monotonic() + self.cfg.scan_interval
            self.stop.wait(min(0.5, max(0.05, next_scan - time.monotonic())))

    def poll_sources(self) -> None:
        if self.sources is None:
            return
        from .sources import apply_keys

        update = self.sources.poll(time.monotonic())
        for r in self.sources.errors:
            log.warning("blocklist source error: %s", r)
            for bad in (r.bad_lines or [])[1:20]:
                log.warning("  %s", bad)
        if update is not None:
            keys = update.keys
        elif self.sync_pending and time.monotonic() >= self.retry_at:
            keys = self.sources.snapshot()  # the last sync failed: try again
        else:
            return
        try:
            ch = apply_keys(keys, self.cfg.pin_root)
            self.sync_pending = False
            self.stats.blocklist_syncs += 1
            log.info(
                "blocklist synced rules=%d added=%d deleted=%d", len(keys), len(ch.added_keys), len(ch.deleted_keys)
            )
        except OSError as e:
            self.sync_pending, self.retry_at = True, time.monotonic() + 10
            self.stats.blocklist_sync_errors += 1
            log.error("blocklist sync failed, the previous list stays in force (retry in 10 s): %s", e)

    def scan(self, force: bool = False) -> None:
        from .expiry import END_ACTIVE

        for ifname, exp in self.expirers.items():
            try:
                records = exp.scan(force=force)
            except OSError as e:
                log.error("flow scan failed iface=%s: %s", ifname, e)
                continue
            if records and self.exporter is not None:
                errors_before = self.exporter.errors
                self.exporter.export(records)
                self.stats.records_exported += len(records)
                self.stats.flows_exported += sum(1 for r in records if r.end_reason != END_ACTIVE)
                # a counter: add this exporter's new errors (a reload starts a new exporter)
                self.stats.export_errors += self.exporter.errors - errors_before
            exp.commit()

    def do_reload(self) -> None:
        try:
            new = load_config(self.config_path, self.overrides)
        except (OSError, ValueError) as e:
            log.error("reload failed, keeping the running config: %s", e)
            return
        old, self.cfg = self.cfg, new
        for ifname in new.interfaces:
            if ifname not in old.interfaces or (new.mode, new.flows, new.sink) != (old.mode, old.flows, old.sink):
                opts = AttachOptions(mode=new.mode, flows=new.flows, sink=new.sink)
                r = controller.attach(ifname, opts, new.pin_root)
                log.info("attached iface=%s prog_id=%d", ifname, r.prog_id)
        controller.set_monitor(new.monitor, new.pin_root)
        self.scan(force=False)
        self._start_exporter()
        if new.listen != old.listen or new.top_rules != old.top_rules:
            self._start_metrics()
        self._start_sources()
        log.info("reloaded config=%s", self.config_path)

    def shutdown(self) -> None:
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
        if self.cfg.detach_on_exit:
            for ifname in self.cfg.interfaces:
                try:
                    controller.detach(ifname, self.cfg.pin_root)
                    log.info("detached iface=%s", ifname)
                except OSError as e:
                    log.error("detach failed iface=%s: %s", ifname, e)
        log.info("stopped")


class _Formatter(logging.Formatter):
    """ts=... level=... msg with key=value pairs: plain, greppable, structured."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"ts={ts}Z level={record.levelname.lower()} {record.getMessage()}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration (see contrib/xdpflow.toml)")
    p.add_argument("--interface", action="append", dest="interfaces", metavar="IFACE")
    p.add_argument("--mode", choices=list(netlink.MODE_FLAGS), default=None)
    p.add_argument("--flows", type=int, default=None)
    p.add_argument("--sink", action="store_true", default=None)
    p.add_argument("--monitor", action="store_true", default=None)
    p.add_argument("--detach-on-exit", action="store_true", default=None)
    p.add_argument("--collector", action="append", dest="collectors", metavar="HOST:PORT")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS")
    p.add_argument("--active-timeout", type=float, default=None, metavar="SECONDS")
    p.add_argument("--scan-interval", type=float, default=None, metavar="SECONDS")
    p.add_argument("--template-refresh", type=float, default=None, metavar="SECONDS")
    p.add_argument("--observation-domain", type=int, default=None)
    p.add_argument("--mtu", type=int, default=None)
    p.add_argument("--listen", default=None, metavar="HOST:PORT")
    p.add_argument("--top-rules", type=int, default=None)
    p.add_argument("--blocklist-file", action="append", dest="blocklist_files", metavar="FILE")
    p.add_argument("--blocklist-direction", choices=["src", "dst"], default=None)
    p.add_argument("--feed", action="append", dest="feeds", metavar="URL")


# every Config field but these two comes from `xdpflow run` flags of its name
OVERRIDES = tuple(f.name for f in fields(Config) if f.name not in ("pin_root", "netns"))


def main(args: argparse.Namespace) -> int:
    """Entry point for `xdpflow run`. Raises ConfigError/XdpflowError."""
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.debug else logging.INFO)
    overrides = {k: getattr(args, k, None) for k in OVERRIDES}
    overrides["pin_root"] = getattr(args, "pin_root_given", None)
    overrides["netns"] = getattr(args, "netns", None)
    cfg = load_config(args.config, overrides)
    os.umask(0o077)
    return Daemon(cfg, args.config, overrides).run()
