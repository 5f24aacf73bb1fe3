"""Automatic mitigation: the rules an attack gets, and installing them.

``plan()`` is pure: an attack, its group's policy and the flows seen toward
the victim in, rules out (or the reason for none). ``Mitigator`` reads the
flow tables and writes the rule set through ``RuleTables``.

Mitigation rules are ordinary rules at MITIGATION_PRIORITY with a TTL and
the comment "attack ID". Every operator rule below that priority (pass rules
included) is judged first; the config's allowlist gets pass rules toward
the victim just above them (ALLOWLIST_PRIORITY), and ban_sources never
names a source inside it. The TTL is extended while the attack lasts; after
it (or after a crash) the data plane stops matching them by itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import numpy as np

from xdpflow.dataplane.flows import read_table
from xdpflow.dataplane.maps import open_clock, open_map
from xdpflow.dataplane.pins import PinRoot
from xdpflow.dataplane.rules import RuleTables, mitigation_comment, mitigation_entry
from xdpflow.export.detect import Attack, Mitigation, Net, Policy
from xdpflow.rules.rulespec import (
    ALLOWLIST_PRIORITY,
    ICMP,
    ICMPV6,
    MITIGATION_PRIORITY,
    TCP,
    TCP_FLAGS,
    UDP,
    RuleSpec,
)

log = logging.getLogger("xdpflow")

BAN_COVERAGE = 0.9  # ban_sources: the banned sources carry at least this share of the victim's traffic
BAN_MAX = 1000  # ... and are at most this many (the rule set holds 1,024 rules)
BAN_PEERS = 0.5  # ... and so is every other source more than this fraction as fast as the slowest of them
DOMINANT = 0.5  # a protocol or port with at least this share of the traffic is the attack's
# flows handed to plan(): the fastest; ten times what a ban may name. Each
# becomes a Python object: 50,000 took 0.3 s under a spoofed flood, past the
# 1 s the issue allows from detection to mitigation.
SAMPLE_MAX = 10_000
SYN_NOT_ACK = (TCP_FLAGS["SYN"] | TCP_FLAGS["ACK"], TCP_FLAGS["SYN"])


@dataclass(frozen=True)
class FlowSample:
    """One flow toward the victim: its rate (packets/s over its life)."""

    src: str
    sport: int
    dport: int
    proto: int
    rate: float


def _allowed(src: str, allowlist: Sequence[Net], passes: Sequence[RuleSpec], victim: str) -> bool:
    a = ip_address(src)
    if any(a.version == n.version and a in n for n in allowlist):
        return True
    v = ip_address(victim)
    return any(
        r.src is not None
        and r.src.version == a.version
        and a in r.src
        and (r.dst is None or v in r.dst)
        and r.priority < MITIGATION_PRIORITY
        for r in passes
    )


def plan(
    attack: Attack,
    policy: Policy,
    flows: Sequence[FlowSample],
    allowlist: Sequence[Net] = (),
    passes: Sequence[RuleSpec] = (),
    expires_at: int | None = None,
) -> tuple[list[RuleSpec], str | None]:
    """The rules ``policy.mitigation`` installs against ``attack`` (without
    ids), and None; or no rules and the reason why not. ``flows`` are the
    flows toward the victim seen during the attack; ``passes`` the pass rules
    in force (sources they exempt are never banned)."""
    kind = policy.mitigation
    victim = ip_network(attack.victim)
    common: dict[str, Any] = {
        "priority": MITIGATION_PRIORITY,
        "expires_at": expires_at,
        "comment": mitigation_comment(attack.id),
    }
    if kind == "none":
        return [], None
    if kind == "ban_sources":
        return _ban(attack, policy, flows, allowlist, passes, common)
    allow = [
        RuleSpec(
            action="pass",
            src=n,
            dst=victim,
            priority=ALLOWLIST_PRIORITY,
            expires_at=expires_at,
            comment=mitigation_comment(attack.id),
        )
        for n in allowlist
        if n.version == victim.version
    ]
    if kind == "rate_limit":
        return [*allow, RuleSpec(action="rate-limit", dst=victim, pps=policy.rate_limit_pps, **common)], None  # type: ignore[arg-type]
    rule, why = _fingerprint(attack, flows, victim, common)
    return ([*allow, rule] if rule is not None else []), why


def _ban(
    attack: Attack,
    policy: Policy,
    flows: Sequence[FlowSample],
    allowlist: Sequence[Net],
    passes: Sequence[RuleSpec],
    common: dict[str, Any],
) -> tuple[list[RuleSpec], str | None]:
    by_src: dict[str, float] = {}
    for f in flows:
        by_src[f.src] = by_src.get(f.src, 0.0) + f.rate
    total = sum(by_src.values())
    if total <= 0:
        return [], "no flows toward the victim seen"
    ranked = sorted(by_src.items(), key=lambda kv: -kv[1])
    covered, n = 0.0, 0
    for _, rate in ranked:
        if covered >= BAN_COVERAGE * total:
            break
        covered += rate
        n += 1
    # the rest of the flood too: every source more than BAN_PEERS as fast as the slowest of those
    cutoff = ranked[n - 1][1] * BAN_PEERS
    picked = [src for src, rate in ranked if rate > cutoff]
    if len(picked) > BAN_MAX:
        return [], (
            f"no few sources carry the attack: {len(picked)} carry {BAN_COVERAGE:.0%} of it, more than {BAN_MAX} "
            '(spoofed?); try mitigation = "fingerprint"'
        )
    victim = ip_network(attack.victim)
    banned = [s for s in picked if not _allowed(s, allowlist, passes, attack.victim)]
    if not banned:
        return [], "every top source is in the allowlist or exempted by a pass rule"
    return [RuleSpec(action="drop", src=ip_network(s), dst=victim, **common) for s in banned], None  # type: ignore[arg-type]


def _fingerprint(
    attack: Attack, flows: Sequence[FlowSample], victim: Net, common: dict[str, Any]
) -> tuple[RuleSpec | None, str | None]:
    r = attack.rates or attack.peak
    pps = max(r.get("pps", 0.0), 1e-9)
    syn = r.get("syn_pps", 0.0) / pps >= DOMINANT
    proto: int | None = None
    if syn:
        proto = TCP
    elif r.get("udp_pps", 0.0) / pps >= DOMINANT:
        proto = UDP
    elif r.get("icmp_pps", 0.0) / pps >= DOMINANT:
        proto = ICMP if victim.version == 4 else ICMPV6
    else:  # from the flows
        by_proto: dict[int, float] = {}
        for f in flows:
            by_proto[f.proto] = by_proto.get(f.proto, 0.0) + f.rate
        tot = sum(by_proto.values())
        if tot > 0:
            p, v = max(by_proto.items(), key=lambda kv: kv[1])
            proto = p if v / tot >= DOMINANT else None
    if proto is None:
        return None, "no dominant protocol"
    if proto in (ICMP, ICMPV6):
        return RuleSpec(action="drop", dst=victim, proto=proto, **common), None  # type: ignore[arg-type]
    mine = [f for f in flows if f.proto == proto]
    tot = sum(f.rate for f in mine)
    fields: dict[str, object] = {}
    for name, port_of in (("dport", lambda f: f.dport), ("sport", lambda f: f.sport)):
        by_port: dict[int, float] = {}
        for f in mine:
            by_port[port_of(f)] = by_port.get(port_of(f), 0.0) + f.rate
        if tot > 0 and by_port:
            port, v = max(by_port.items(), key=lambda kv: kv[1])
            if v / tot >= DOMINANT:
                fields[name] = (port, port)
                break
    if syn:
        fields["tcp_flags"] = SYN_NOT_ACK
    elif not fields:
        return None, "no dominant port in the flows toward the victim"
    return RuleSpec(action="drop", dst=victim, proto=proto, **fields, **common), None  # type: ignore[arg-type]


def victim_flows(pins: PinRoot, ifaces: Sequence[str], victim: str, since: float) -> list[FlowSample]:
    """The flows toward ``victim`` on ``ifaces`` seen since ``since`` (Unix
    seconds), each with its rate over its life; the SAMPLE_MAX fastest.
    Raises XdpflowError."""
    a = ip_address(victim)
    clock = open_clock(pins)
    since_j = clock.to_jiffies(since)
    out: list[FlowSample] = []
    for ifname in ifaces:
        with open_map(pins, "flows_v4" if a.version == 4 else "flows_v6", ifname) as m:
            fa = read_table(m, a.version)
        if not len(fa):
            continue
        d = fa.keys["daddr"]
        if a.version == 4:
            sel = d == int(a)
        else:
            sel = np.all(d == np.frombuffer(a.packed, dtype=np.uint8), axis=1)
        sel &= fa.last_seen >= since_j
        idx = np.nonzero(sel)[0]
        life = np.maximum((fa.last_seen[idx].astype(np.float64) - fa.first_seen[idx]) / clock.hz, 1.0)
        rate = fa.packets[idx].astype(np.float64) / life
        if len(idx) > SAMPLE_MAX:
            keep = np.argpartition(-rate, SAMPLE_MAX - 1)[:SAMPLE_MAX]
            idx, rate = idx[keep], rate[keep]
        k = fa.keys[idx]
        srcs = (
            [str(IPv4Address(int(x))) for x in k["saddr"]]
            if a.version == 4
            else [str(IPv6Address(bytes(x))) for x in k["saddr"]]
        )
        out += [
            FlowSample(s, int(sp), int(dp), int(p), float(r))
            for s, sp, dp, p, r in zip(srcs, k["sport"], k["dport"], k["proto"], rate)
        ]
    return out


class Mitigator:
    """Installs, extends and reports the mitigation of attacks, through the
    rule set under ``pins``. ``ifaces`` are those whose flows are read."""

    def __init__(
        self,
        pins: PinRoot,
        ifaces: Sequence[str],
        allowlist: Sequence[Net] = (),
    ) -> None:
        self.pins = pins
        self.ifaces = list(ifaces)
        self.allowlist = list(allowlist)

    def apply(self, attack: Attack, policy: Policy, now: float | None = None) -> Mitigation:
        """Plan and (unless dry run) install the mitigation of a new attack.
        Never raises for a data-plane failure: the reason is in ``declined``."""
        now = time.time() if now is None else now
        m = Mitigation(kind=policy.mitigation, dry_run=policy.dry_run)
        if policy.mitigation == "none":
            return m
        expires = int(now + policy.ttl)
        try:
            since = attack.start - policy.trigger_seconds - 1
            flows = victim_flows(self.pins, self.ifaces, attack.victim, since)
            with RuleTables.of_pins(self.pins) as rt:
                passes = [r for r in rt.active() if r.action == "pass"]
                rules, why = plan(attack, policy, flows, self.allowlist, passes, expires)
                m.declined, m.lines = why, [r.line() for r in rules]
                if rules and not policy.dry_run:
                    installed = rt.add(rules, now)
                    m.rules = [int(r.id or 0) for r in installed]
                    m.expires_at = expires
        except OSError as e:
            m.declined = f"installing failed: {e}"
            log.error("mitigation failed attack=%d victim=%s: %s", attack.id, attack.victim, e)
        return m

    def extend(self, attacks: Sequence[tuple[Attack, Policy]], now: float | None = None) -> list[Attack]:
        """Push the expiry of the active attacks' rules to now + ttl once
        half the TTL has passed (a re-add: the rules keep ids and counters).
        Returns the attacks whose rules are no longer in force (expired
        while no daemon ran, or deleted by hand): mitigate them again."""
        now = time.time() if now is None else now
        due = [
            (a, p)
            for a, p in attacks
            if a.mitigation is not None
            and a.mitigation.rules
            and a.mitigation.expires_at is not None
            and a.mitigation.expires_at - now < p.ttl / 2
        ]
        if not due:
            return []
        gone: list[Attack] = []
        try:
            with RuleTables.of_pins(self.pins) as rt, rt.locked():
                cur = [r for r in rt.active() if (r.expires_at or 0) > now]
                readd = []
                for a, p in due:
                    assert a.mitigation is not None
                    exp = int(now + p.ttl)
                    mine = [r for r in cur if mitigation_entry(r) == a.id]
                    if not mine:
                        gone.append(a)
                        continue
                    readd += [replace(r, expires_at=exp) for r in mine]
                    a.mitigation.expires_at = exp
                    a.mitigation.rules = [int(r.id or 0) for r in mine]
                if readd:
                    rt.add(readd, now)
        except OSError as e:
            log.error("extending mitigation rules failed (they expire by their TTL): %s", e)
        return gone

    def installed(self) -> int:
        """Mitigation rules in force now."""
        try:
            with RuleTables.of_pins(self.pins) as rt:
                now = time.time()
                return sum(1 for r in rt.active() if mitigation_entry(r) is not None and (r.expires_at or 0) > now)
        except OSError:
            return 0
