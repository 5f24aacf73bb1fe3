"""The daemon's configuration: the TOML file, the `xdpflow run` flags that
override it, and every default, written once here (or imported from the
module that owns it).
"""

from __future__ import annotations

import argparse
import errno
import re
from dataclasses import dataclass, field, fields
from ipaddress import ip_network
from typing import Any

from xdpflow.bindings import netlink
from xdpflow.dataplane.abi import FLOW_BUDGET_DEFAULT, FLOW_BUDGET_MAX, FLOWS_DEFAULT
from xdpflow.dataplane.pins import default_root
from xdpflow.defaults import (
    ACTIVE_TIMEOUT,
    FEED_INTERVAL,
    FEED_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_FEED_BYTES,
    METRICS_LISTEN,
    SCAN_INTERVAL,
    TEMPLATE_REFRESH,
    TOP_RULES,
)
from xdpflow.errors import InputError, XdpflowError
from xdpflow.export.notify import NotifyConfig
from xdpflow.export.policy import MITIGATIONS, RATES, Net, Policy
from xdpflow.rules.rulespec import RuleError, parse_duration

DEFAULT_LISTEN = METRICS_LISTEN
DEFAULT_TOP_RULES = TOP_RULES


class ConfigError(InputError):
    """A configuration that cannot be right: the CLI exits 2."""


@dataclass
class FeedConfig:
    url: str
    interval: float = FEED_INTERVAL
    timeout: float = FEED_TIMEOUT
    max_bytes: int = MAX_FEED_BYTES


@dataclass
class Config:
    interfaces: list[str] = field(default_factory=list)
    pin_root: str = field(default_factory=default_root)
    netns: str | None = None
    mode: str = "auto"
    flows: int | None = None
    flow_budget: int = FLOW_BUDGET_DEFAULT
    sink: bool = False
    monitor: bool = False
    detach_on_exit: bool = False
    # export
    collectors: list[str] = field(default_factory=list)
    idle_timeout: float = IDLE_TIMEOUT
    active_timeout: float = ACTIVE_TIMEOUT
    scan_interval: float = SCAN_INTERVAL
    template_refresh: float = TEMPLATE_REFRESH
    observation_domain: int = 1
    mtu: int = 1500
    # metrics
    listen: str = DEFAULT_LISTEN
    top_rules: int = DEFAULT_TOP_RULES
    # blocklist
    blocklist_files: list[str] = field(default_factory=list)
    blocklist_direction: str = "src"
    feeds: list[FeedConfig] = field(default_factory=list)
    # multi-field rules
    rules_files: list[str] = field(default_factory=list)
    # automatic mitigation: [[protect]] groups, sources never banned, [notify]
    protect: list[Policy] = field(default_factory=list)
    allowlist: list[str] = field(default_factory=list)
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    def allow_nets(self) -> list[Net]:
        return [ip_network(a, strict=False) for a in self.allowlist]


# TOML table -> the Config fields it may hold (table "" is the top level)
_SECTIONS = {
    "": {
        "interfaces",
        "pin_root",
        "netns",
        "mode",
        "flows",
        "flow_budget",
        "sink",
        "monitor",
        "detach_on_exit",
        "allowlist",
    },
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
    "rules": {"files"},
    "notify": {"command", "webhooks", "timeout", "retries"},
}
_PROTECT_KEYS = {
    "name",
    "prefixes",
    *RATES,
    "trigger_seconds",
    "release_ratio",
    "release_seconds",
    "mitigation",
    "ttl",
    "dry_run",
    "hosts",
    "rate_limit_pps",
}
_RENAMES = {
    ("blocklist", "files"): "blocklist_files",
    ("blocklist", "direction"): "blocklist_direction",
    ("rules", "files"): "rules_files",
}


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML config file (None: defaults only) and apply command-line
    overrides. Raises ConfigError naming the file and the offending key."""
    import tomllib  # only `run` reads a file: every command builds the parser that imports this module

    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise XdpflowError(e.errno or errno.EIO, f"cannot read config {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        where = path
        for key, value in doc.items():
            if key == "protect":
                if not isinstance(value, list) or not all(isinstance(g, dict) for g in value):
                    raise ConfigError(f'{where}: protect must be [[protect]] tables, e.g. name = "web"')
                values["protect"] = [_policy(g, f"{where}: [[protect]] #{i + 1}") for i, g in enumerate(value)]
            elif key == "notify" and isinstance(value, dict):
                unknown = set(value) - _SECTIONS["notify"]
                if unknown:
                    raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} in [notify]")
                values["notify"] = _notify(value, f"{where}: [notify]")
            elif isinstance(value, dict):
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
    if cfg.flows is not None and (not isinstance(cfg.flows, int) or cfg.flows < 2):
        raise ConfigError(f"{where}: flows must be a whole number of at least 2")
    if not isinstance(cfg.flow_budget, int) or not 0 <= cfg.flow_budget <= FLOW_BUDGET_MAX:
        raise ConfigError(f"{where}: flow_budget must be a whole number of new flows per CPU per second (0: unlimited)")
    if cfg.blocklist_direction not in ("src", "dst"):
        raise ConfigError(f"{where}: blocklist direction must be src or dst")
    for c in cfg.collectors:
        parse_hostport(c, f"{where}: collector")
    for f in cfg.feeds:
        if not f.url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: feed {f.url!r}: a feed URL must start with http:// or https://")
        for name in ("interval", "timeout", "max_bytes"):
            v = getattr(f, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"{where}: feed {f.url!r}: {name} must be a positive number")
    parse_hostport(cfg.listen, f"{where}: listen")
    if not isinstance(cfg.rules_files, list) or not all(isinstance(p, str) and p for p in cfg.rules_files):
        raise ConfigError(f'{where}: rules files must be a list of paths, e.g. files = ["/etc/xdpflow/rules.txt"]')
    if not isinstance(cfg.allowlist, list) or not all(isinstance(a, str) for a in cfg.allowlist):
        raise ConfigError(f'{where}: allowlist must be a list of CIDRs, e.g. allowlist = ["198.51.100.0/24"]')
    for a in cfg.allowlist:
        try:
            ip_network(a, strict=False)
        except ValueError:
            raise ConfigError(f"{where}: allowlist entry {a!r} is not an address or CIDR") from None
    names = [p.name for p in cfg.protect]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"{where}: two [[protect]] groups are named {n!r}: give each its own name")
    seen: dict[Net, str] = {}
    for p in cfg.protect:
        for net in p.prefixes:
            if net in seen:
                raise ConfigError(f"{where}: prefix {net} is in [[protect]] {seen[net]!r} and {p.name!r}: keep one")
            seen[net] = p.name


def _number(g: dict[str, Any], key: str, where: str, default: float, lo: float = 0.0, hi: float | None = None) -> float:
    v = g.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= lo or (hi is not None and v > hi):
        bound = f"above {lo:g}" + (f" and at most {hi:g}" if hi is not None else "")
        raise ConfigError(f"{where}: {key} must be a number {bound}, not {v!r}")
    return float(v)


def _whole(g: dict[str, Any], key: str, where: str, default: int) -> int:
    v = g.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{where}: {key} must be a whole number of at least 1, not {v!r}")
    return v


def _policy(g: dict[str, Any], where: str) -> Policy:
    """One [[protect]] table. Raises ConfigError naming the key."""
    d = Policy(name="", prefixes=(), thresholds={})
    unknown = set(g) - _PROTECT_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; keys: {', '.join(sorted(_PROTECT_KEYS))}")
    name = g.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(f'{where}: name must be 1-64 letters, digits, "_", "." or "-", e.g. name = "web"')
    where = f"{where.rsplit(' #', 1)[0]} {name!r}"
    prefixes = g.get("prefixes")
    if not isinstance(prefixes, list) or not prefixes or not all(isinstance(x, str) for x in prefixes):
        raise ConfigError(f'{where}: prefixes must be a list of CIDRs, e.g. prefixes = ["198.18.0.0/24"]')
    nets = []
    for x in prefixes:
        try:
            nets.append(ip_network(x))
        except ValueError:
            raise ConfigError(f"{where}: prefix {x!r} is not a CIDR (host bits must be zero)") from None
    thresholds = {k: _number(g, k, where, 0.0) for k in RATES if k in g}
    if not thresholds:
        raise ConfigError(f"{where}: no threshold: set at least one of {', '.join(RATES)}")
    mitigation = g.get("mitigation", d.mitigation)
    if mitigation not in MITIGATIONS:
        raise ConfigError(f"{where}: mitigation must be one of {', '.join(MITIGATIONS)}, not {mitigation!r}")
    ttl = g.get("ttl", d.ttl)
    if isinstance(ttl, str):
        try:
            ttl = parse_duration(ttl)
        except RuleError as e:
            raise ConfigError(f"{where}: ttl: {e}") from None
    dry_run = g.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise ConfigError(f"{where}: dry_run must be true or false")
    return Policy(
        name=name,
        prefixes=tuple(nets),
        thresholds=thresholds,
        trigger_seconds=_number(g, "trigger_seconds", where, d.trigger_seconds),
        release_ratio=_number(g, "release_ratio", where, d.release_ratio, hi=1.0),
        release_seconds=_number(g, "release_seconds", where, d.release_seconds),
        mitigation=mitigation,
        ttl=_number({"ttl": ttl}, "ttl", where, d.ttl),
        dry_run=dry_run,
        hosts=_whole(g, "hosts", where, d.hosts),
        rate_limit_pps=_whole(g, "rate_limit_pps", where, d.rate_limit_pps),
    )


def _notify(t: dict[str, Any], where: str) -> NotifyConfig:
    d = NotifyConfig()
    cmd = t.get("command", [])
    if isinstance(cmd, str):
        cmd = [cmd]
    if not isinstance(cmd, list) or not all(isinstance(c, str) and c for c in cmd):
        raise ConfigError(f'{where}: command must be a program and its arguments, e.g. command = ["/usr/local/bin/x"]')
    hooks = t.get("webhooks", [])
    web = ("http://", "https://")
    if not isinstance(hooks, list) or not all(isinstance(u, str) and u.startswith(web) for u in hooks):
        raise ConfigError(f"{where}: webhooks must be a list of http:// or https:// URLs")
    retries = t.get("retries", d.retries)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"{where}: retries must be a whole number of at least 0, not {retries!r}")
    return NotifyConfig(command=cmd, webhooks=hooks, timeout=_number(t, "timeout", where, d.timeout), retries=retries)


def protect_hosts(cfg: Config) -> int:
    """Hosts the [[protect]] groups want room for in the per-host table."""
    return sum(p.hosts for p in cfg.protect)


_BRACKETED = re.compile(r"^\[([0-9A-Fa-f:.]+)\]:(\d{1,5})$")
_PLAIN = re.compile(r"^([^:\[\]\s]+):(\d{1,5})$")


def parse_hostport(text: str, where: str = "address") -> tuple[str, int]:
    """``"host:port"`` or ``"[v6addr]:port"`` as (host, port); port 0 picks a
    free one where that makes sense. Raises ConfigError naming the forms."""
    m = _BRACKETED.match(text) or _PLAIN.match(text)
    if m is None or int(m.group(2)) > 65535:
        raise ConfigError(
            f"{where} {text!r}: give HOST:PORT or [IPV6]:PORT, e.g. 127.0.0.1:9437, [::1]:9437, "
            "or 0.0.0.0:9437 for every interface"
        )
    return m.group(1), int(m.group(2))


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The `xdpflow run` flags: one per configuration key, each saying what it
    does and its default."""
    d = Config()
    p.add_argument(
        "--config",
        metavar="FILE",
        help="read this TOML configuration, which the other options override "
        "(example: contrib/xdpflow.toml; default none: options and built-in defaults only)",
    )
    p.add_argument(
        "--interface",
        action="append",
        dest="interfaces",
        metavar="IFACE",
        help="attach to IFACE; repeat for several (default none: give it here or as interfaces in --config)",
    )
    p.add_argument(
        "--mode", choices=list(netlink.MODE_FLAGS), default=None, help=f"attach in this XDP mode (default {d.mode})"
    )
    p.add_argument(
        "--flows",
        type=int,
        default=None,
        metavar="N",
        help=f"flows the IPv4 and IPv6 tables hold together (default {FLOWS_DEFAULT}; "
        "an attached interface keeps its tables)",
    )
    p.add_argument(
        "--flow-budget",
        type=int,
        default=None,
        metavar="N",
        help=f"new flows each CPU may add per second; frames over it are counted as untracked "
        f"(default {d.flow_budget}; 0: unlimited)",
    )
    p.add_argument(
        "--sink", action="store_true", default=None, help="drop every frame after accounting it (default off)"
    )
    p.add_argument(
        "--monitor",
        action="store_true",
        default=None,
        help="count would-be drops but pass them (default off: the daemon switches monitor mode off)",
    )
    p.add_argument(
        "--detach-on-exit",
        action="store_true",
        default=None,
        help="detach the interfaces when the daemon stops (default off: the data plane keeps running)",
    )
    p.add_argument(
        "--collector",
        action="append",
        dest="collectors",
        metavar="HOST:PORT",
        help="send IPFIX over UDP to this collector; repeat for several (default none: no export)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"export and remove a flow idle this long (default {d.idle_timeout:g})",
    )
    p.add_argument(
        "--active-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"export a long-lived flow's delta this often (default {d.active_timeout:g})",
    )
    p.add_argument(
        "--scan-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"read the flow tables this often (default {d.scan_interval:g})",
    )
    p.add_argument(
        "--template-refresh",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"resend the IPFIX templates this often (default {d.template_refresh:g})",
    )
    p.add_argument(
        "--observation-domain",
        type=int,
        default=None,
        metavar="ID",
        help=f"send records under this IPFIX observation domain id (default {d.observation_domain})",
    )
    p.add_argument(
        "--mtu",
        type=int,
        default=None,
        metavar="BYTES",
        help=f"path MTU to the collectors: each IPFIX message fits one datagram (default {d.mtu})",
    )
    p.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help=f"serve Prometheus /metrics here (default {d.listen})",
    )
    p.add_argument(
        "--top-rules",
        type=int,
        default=None,
        metavar="N",
        help=f"per-rule hit series in the metrics: the N rules with the most hits (default {d.top_rules})",
    )
    p.add_argument(
        "--blocklist-file",
        action="append",
        dest="blocklist_files",
        metavar="FILE",
        help="keep the blocklist equal to the union of these watched files and the feeds (default none)",
    )
    p.add_argument(
        "--blocklist-direction",
        choices=["src", "dst"],
        default=None,
        help=f"which address the files' and feeds' rules match (default {d.blocklist_direction})",
    )
    p.add_argument(
        "--feed",
        action="append",
        dest="feeds",
        metavar="URL",
        help=f"an HTTP(S) blocklist feed, polled every {FEED_INTERVAL:g} s; repeat for several (default none)",
    )
    p.add_argument(
        "--rules-file",
        action="append",
        dest="rules_files",
        metavar="FILE",
        help="keep the rule set equal to the union of these watched rules files (default none)",
    )


# every Config field but these two comes from `xdpflow run` flags of its name
OVERRIDES = tuple(f.name for f in fields(Config) if f.name not in ("pin_root", "netns"))
