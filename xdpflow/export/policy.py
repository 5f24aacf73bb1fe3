"""What a ``[[protect]]`` group asks for: the rates, the mitigations, the
defaults. Apart from detect.py so reading the config (every CLI command)
does not import numpy."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

Net = IPv4Network | IPv6Network

# threshold / rate name -> (counter of the protect tables, factor)
RATES: dict[str, tuple[str, int]] = {
    "pps": ("packets", 1),
    "bps": ("bytes", 8),
    "new_flows": ("new_flows", 1),
    "syn_pps": ("syn", 1),
    "udp_pps": ("udp", 1),
    "icmp_pps": ("icmp", 1),
    "frag_pps": ("frags", 1),
}
MITIGATIONS = ("ban_sources", "fingerprint", "rate_limit", "none")

TRIGGER_SECONDS = 2.0
RELEASE_RATIO = 0.5
RELEASE_SECONDS = 30.0
MITIGATION_TTL = 300.0  # seconds: extended while the attack lasts
HOSTS = 16384  # per group: the per-host table holds the sum over groups
RATE_LIMIT_PPS = 1000  # per source, for mitigation = "rate_limit"
IDLE_HOST_SECONDS = 60.0  # a host whose counters did not move this long is forgotten
RECENT_ATTACKS = 100  # ended attacks kept in the state file

STATE_DIR = "/run/xdpflow"


@dataclass(frozen=True)
class Policy:
    """One ``[[protect]]`` group: what counts as an attack and what to do."""

    name: str
    prefixes: tuple[Net, ...]
    thresholds: dict[str, float]
    trigger_seconds: float = TRIGGER_SECONDS
    release_ratio: float = RELEASE_RATIO
    release_seconds: float = RELEASE_SECONDS
    mitigation: str = "none"
    ttl: float = MITIGATION_TTL
    dry_run: bool = False
    hosts: int = HOSTS
    rate_limit_pps: int = RATE_LIMIT_PPS
