"""Attack detection, pure: snapshots of the per-host counters in, starts and
ends out; the mitigation planner; the state file; the [[protect]] config."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from xdpflow.app import config
from xdpflow.dataplane.pins import PinRoot
from xdpflow.dataplane.protect import HostCounts
from xdpflow.dataplane.rules import mitigation_entry
from xdpflow.export.detect import RATES, Attack, Detector, Policy, load_state, save_state, state_path
from xdpflow.export.mitigate import FlowSample, plan
from xdpflow.rules.rulespec import ALLOWLIST_PRIORITY, MITIGATION_PRIORITY, parse_line

from ..clitest import metric_samples

VICTIM = "198.18.0.2"
OTHER = "198.18.0.3"


@dataclass
class Traffic:
    """Cumulative counters per host, advanced one second at a time."""

    totals: dict[str, dict[str, int]] = field(default_factory=dict)

    def second(self, **per_host: dict[str, int]) -> HostCounts:
        for host, rates in per_host.items():
            t = self.totals.setdefault(host.replace("_", "."), {c: 0 for c, _ in RATES.values()})
            for k, v in rates.items():
                t[k] += v
        hosts = list(self.totals)
        addr = np.zeros((len(hosts), 16), dtype=np.uint8)
        for i, h in enumerate(hosts):
            packed = ipaddress.ip_address(h).packed
            addr[i, : len(packed)] = np.frombuffer(packed, dtype=np.uint8)
        col = {c: np.array([self.totals[h][c] for h in hosts], dtype=np.uint64) for c, _ in RATES.values()}
        fam = np.array([ipaddress.ip_address(h).version for h in hosts], dtype=np.uint8)
        return HostCounts(family=fam, addr=addr, group=np.ones(len(hosts), dtype=np.uint32), **col)


def flood(pps: int = 100_000) -> dict[str, int]:
    return {"packets": pps, "bytes": pps * 64, "udp": pps, "new_flows": 1000}


def quiet(pps: int = 100) -> dict[str, int]:
    return {"packets": pps, "bytes": pps * 500, "udp": pps}


POLICY = Policy(
    name="web",
    prefixes=(ipaddress.ip_network("198.18.0.0/24"),),
    thresholds={"pps": 10_000},
    release_seconds=5,
)


def run(det: Detector, tr: Traffic, seconds: int, t0: float, **per_host: dict[str, int]):  # type: ignore[no-untyped-def]
    out = []
    for i in range(seconds):
        for c in det.update(tr.second(**per_host), t0 + i):
            out.append((t0 + i, c.kind, c.attack))
    return out


def test_attack_starts_after_trigger_seconds_and_ends_after_release() -> None:
    det, tr = Detector([POLICY]), Traffic()
    v, o = VICTIM.replace(".", "_"), OTHER.replace(".", "_")
    assert run(det, tr, 3, 0.0, **{v: quiet(), o: quiet()}) == []
    got = run(det, tr, 5, 3.0, **{v: flood(), o: quiet()})
    # over the threshold in the reads at 3 and 4: the attack starts at 4 (2 s)
    assert [(t, k, a.victim) for t, k, a in got] == [(4.0, "start", VICTIM)]
    a = got[0][2]
    assert a.exceeded == ["pps"] and a.group == "web" and a.id == 1 and a.active
    assert a.peak["pps"] == pytest.approx(100_000) and a.peak["bps"] == pytest.approx(100_000 * 64 * 8)
    # just above the release level (5,000) keeps it going
    assert run(det, tr, 10, 8.0, **{v: quiet(6000), o: quiet()}) == []
    got = run(det, tr, 10, 18.0, **{v: quiet(), o: quiet()})
    assert [(t, k) for t, k, _ in got] == [(22.0, "end")]  # 5 s below 5,000 pps: 18..22
    assert a.end == 22.0 and not a.active and det.active() == [] and det.attacks() == [a]
    assert det.total == {"web": 1}


def test_a_single_spike_is_no_attack_and_first_read_is_a_baseline() -> None:
    det, tr = Detector([POLICY]), Traffic()
    v = VICTIM.replace(".", "_")
    # the first read has no previous one: huge counters are no rate
    tr.second(**{v: flood(10_000_000)})
    assert run(det, tr, 1, 0.0, **{v: quiet()}) == []
    assert run(det, tr, 1, 1.0, **{v: flood()}) == []
    assert run(det, tr, 3, 2.0, **{v: quiet()}) == []


def test_counter_reset_counts_from_zero_and_other_thresholds() -> None:
    pol = Policy(name="dns", prefixes=POLICY.prefixes, thresholds={"syn_pps": 1000, "bps": 1e9}, trigger_seconds=1)
    det = Detector([pol])
    tr = Traffic()
    v = VICTIM.replace(".", "_")
    run(det, tr, 2, 0.0, **{v: {"packets": 5000, "syn": 10}})
    tr.totals[VICTIM] = {c: 0 for c, _ in RATES.values()}  # forgotten and inserted again
    got = run(det, tr, 1, 2.0, **{v: {"packets": 2000, "syn": 2000}})
    assert [(k, a.exceeded) for _, k, a in got] == [("start", ["syn_pps"])]


def test_resume_keeps_the_attack_and_ids_go_on(tmp_path: Path) -> None:
    det, tr = Detector([POLICY]), Traffic()
    v = VICTIM.replace(".", "_")
    got = run(det, tr, 4, 0.0, **{v: flood()})
    path = str(tmp_path / "state" / "a.json")
    save_state(path, det.attacks(), det.next_id)
    assert oct(Path(path).stat().st_mode & 0o777) == "0o600"
    attacks, next_id = load_state(path)
    assert [a.json() for a in attacks] == [got[0][2].json()] and next_id == 2
    det2, tr2 = Detector([POLICY]), Traffic()
    det2.resume(attacks)
    assert run(det2, tr2, 3, 10.0, **{v: flood()}) == []  # still the same attack
    got2 = run(det2, tr2, 8, 13.0, **{v: quiet()})
    assert [(k, a.id) for _, k, a in got2] == [("end", 1)]
    assert load_state(str(tmp_path / "none.json")) == ([], 1)
    Path(path).write_text("{bad")
    with pytest.raises(OSError, match="damaged"):
        load_state(path)


def test_state_path_is_one_file_per_pin_root() -> None:
    assert state_path(PinRoot("/sys/fs/bpf/xdpflow")).endswith("/sys-fs-bpf-xdpflow.attacks.json")
    assert state_path(PinRoot("/sys/fs/bpf/a")) != state_path(PinRoot("/sys/fs/bpf/b"))


def test_idle_hosts_are_forgotten_but_not_victims() -> None:
    det, tr = Detector([POLICY]), Traffic()
    v, o = VICTIM.replace(".", "_"), OTHER.replace(".", "_")
    run(det, tr, 1, 0.0, **{v: flood(), o: quiet()})
    run(det, tr, 70, 1.0, **{v: flood()})
    assert det.idle_hosts(71.0) == [(4, ipaddress.ip_address(OTHER).packed)]


# mitigation planning -----------------------------------------------------------


def attack(**rates: float) -> Attack:
    r = {k: 0.0 for k in RATES} | rates
    return Attack(id=7, victim=VICTIM, group="web", start=100.0, rates=r, peak=r)


def pol(kind: str) -> Policy:
    return Policy(name="web", prefixes=POLICY.prefixes, thresholds={"pps": 1}, mitigation=kind)


LEGIT = FlowSample("198.18.1.1", 40000, 80, 6, 500.0)


def test_ban_sources_bans_the_few_that_carry_it_and_spares_the_allowlist() -> None:
    flows = [FlowSample(f"198.18.2.{i}", 1000 + i, 53, 17, 30_000.0) for i in range(3)] + [LEGIT]
    allow = [ipaddress.ip_network("198.18.2.2/32")]
    passes = [parse_line("pass src=198.18.2.1 priority=10", now=0.0)]
    rules, why = plan(attack(pps=90_500, udp_pps=90_000), pol("ban_sources"), flows, allow, passes, 500)  # type: ignore[list-item]
    assert why is None
    assert [r.line() for r in rules] == [
        f"drop src=198.18.2.0/32 dst={VICTIM}/32 priority={MITIGATION_PRIORITY} expires=500 # attack 7"
    ]
    assert mitigation_entry(rules[0]) == 7


def test_ban_sources_declines_a_spoofed_flood() -> None:
    flows = [FlowSample(str(ipaddress.ip_address("198.18.64.0") + i), 1, 53, 17, 1.0) for i in range(5000)]
    rules, why = plan(attack(pps=1e6, udp_pps=1e6), pol("ban_sources"), [*flows, LEGIT])
    assert rules == [] and why is not None and "spoofed" in why
    assert plan(attack(pps=1e6), pol("ban_sources"), [])[1] == "no flows toward the victim seen"


def test_fingerprint_udp_flood_by_dport_and_reflection_by_sport() -> None:
    flood = [FlowSample(f"198.18.3.{i}", 2000 + i, 9999, 17, 1000.0) for i in range(200)]
    rules, why = plan(attack(pps=2e5, udp_pps=2e5), pol("fingerprint"), [*flood, LEGIT], expires_at=9)
    assert why is None and [r.line() for r in rules] == [
        f"drop dst={VICTIM}/32 proto=udp dport=9999 priority={MITIGATION_PRIORITY} expires=9 # attack 7"
    ]
    refl = [FlowSample(f"198.18.4.{i}", 123, 30000 + i, 17, 1000.0) for i in range(200)]
    allow = [ipaddress.ip_network("198.18.9.0/24"), ipaddress.ip_network("2001:2::/48")]
    rules, why = plan(attack(pps=2e5, udp_pps=2e5), pol("fingerprint"), refl, allow, expires_at=9)
    assert [r.line() for r in rules] == [
        f"pass src=198.18.9.0/24 dst={VICTIM}/32 priority={ALLOWLIST_PRIORITY} expires=9 # attack 7",
        f"drop dst={VICTIM}/32 proto=udp sport=123 priority={MITIGATION_PRIORITY} expires=9 # attack 7",
    ]
    spread = [FlowSample(f"198.18.5.{i}", 1000 + i, 1000 + i, 17, 10.0) for i in range(100)]
    assert plan(attack(pps=1e5, udp_pps=1e5), pol("fingerprint"), spread)[0] == []


def test_fingerprint_syn_flood_has_syn_not_ack() -> None:
    syn = [FlowSample(f"198.18.6.{i}", 3000 + i, 443, 6, 1000.0) for i in range(100)]
    rules, why = plan(attack(pps=1e5, syn_pps=1e5), pol("fingerprint"), [*syn, LEGIT], expires_at=9)
    assert why is None and rules[0].json()["tcp_flags"] == "SYN,!ACK" and rules[0].json()["dport"] == "443"
    rules, _ = plan(attack(pps=1e5, syn_pps=1e5), pol("fingerprint"), [], expires_at=9)
    assert [r.line() for r in rules] == [
        f"drop dst={VICTIM}/32 proto=tcp tcp-flags=SYN,!ACK priority={MITIGATION_PRIORITY} expires=9 # attack 7"
    ]


def test_rate_limit_and_none() -> None:
    rules, why = plan(attack(pps=1e5), pol("rate_limit"), [], expires_at=9)
    assert [r.line() for r in rules] == [
        f"rate-limit dst={VICTIM}/32 pps=1000 priority={MITIGATION_PRIORITY} expires=9 # attack 7"
    ]
    assert plan(attack(pps=1e5), pol("none"), [LEGIT]) == ([], None)


# config ------------------------------------------------------------------------

GOOD = """
interfaces = ["eth0"]
allowlist = ["198.51.100.0/24", "2001:db8::1"]

[[protect]]
name = "web"
prefixes = ["198.18.0.0/24", "2001:2::/64"]
pps = 100000
syn_pps = 20000
mitigation = "fingerprint"
ttl = "5m"
dry_run = true

[[protect]]
name = "dns"
prefixes = ["198.18.0.53/32"]
udp_pps = 50000
trigger_seconds = 3
release_ratio = 0.25
release_seconds = 60
hosts = 1024

[notify]
command = ["/usr/local/bin/notify", "--x"]
webhooks = ["http://127.0.0.1:1/hook"]
timeout = 2
retries = 1
"""


def test_protect_config(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    cfg = config.load_config(str(p))
    web, dns = cfg.protect
    assert web.name == "web" and web.thresholds == {"pps": 100000, "syn_pps": 20000} and web.ttl == 300
    assert web.dry_run and web.mitigation == "fingerprint" and str(web.prefixes[1]) == "2001:2::/64"
    assert (dns.trigger_seconds, dns.release_ratio, dns.release_seconds, dns.hosts) == (3, 0.25, 60, 1024)
    assert dns.mitigation == "none" and web.trigger_seconds == 2 and web.release_ratio == 0.5
    assert [str(n) for n in cfg.allow_nets()] == ["198.51.100.0/24", "2001:db8::1/128"]
    assert cfg.notify.command == ["/usr/local/bin/notify", "--x"] and cfg.notify.retries == 1


@pytest.mark.parametrize(
    "edit, says",
    [
        (("pps = 100000", "ppz = 100000"), "unknown key 'ppz'"),
        (('mitigation = "fingerprint"', 'mitigation = "nuke"'), "mitigation must be one of"),
        (('"198.18.0.53/32"', '"198.18.0.53/24"'), "not a CIDR"),
        (('name = "dns"', 'name = "web"'), "two [[protect]] groups are named 'web'"),
        (("release_ratio = 0.25", "release_ratio = 2"), "release_ratio must be a number above 0 and at most 1"),
        (("udp_pps = 50000", "udp_pps = -1"), "udp_pps must be a number above 0"),
        (("udp_pps = 50000", ""), "no threshold"),
        (('"2001:db8::1"', '"nonsense"'), "allowlist entry 'nonsense'"),
        (("retries = 1", "retries = -1"), "retries must be a whole number"),
        (('"http://127.0.0.1:1/hook"', '"ftp://x"'), "webhooks must be"),
        (('ttl = "5m"', 'ttl = "5y"'), "ttl:"),
    ],
)
def test_protect_config_errors(tmp_path: Path, edit: tuple[str, str], says: str) -> None:
    p = tmp_path / "c.toml"
    assert edit[0] in GOOD
    p.write_text(GOOD.replace(edit[0], edit[1], 1))
    with pytest.raises(config.ConfigError) as e:
        config.load_config(str(p))
    assert says in str(e.value) and "\n" not in str(e.value) and str(p) in str(e.value)


def test_attack_json_round_trip() -> None:
    a = attack(pps=5.0)
    assert json.loads(json.dumps(a.json())) == Attack.from_json(a.json()).json()


def test_the_example_config_parses_with_mitigation_uncommented(tmp_path: Path) -> None:
    import re

    text = (Path(__file__).parents[2] / "contrib" / "xdpflow.toml").read_text().replace("# allowlist", "allowlist")
    head, tail = text.split("# --- automatic mitigation")
    p = tmp_path / "x.toml"
    p.write_text(head + "#" + re.sub(r"(?m)^# (?=[a-z\[])", "", tail))
    cfg = config.load_config(str(p))
    assert [g.name for g in cfg.protect] == ["web"] and cfg.protect[0].ttl == 300 and cfg.allowlist
    assert cfg.notify.command[0].endswith("xdpflow-exabgp")


def test_attack_metrics_only_with_groups_and_rates_of_active_attacks() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from xdpflow.export.metrics import ExporterStats, XdpflowCollector

    def samples(stats: ExporterStats) -> dict[tuple[str, frozenset[tuple[str, str]]], int]:
        reg = CollectorRegistry()
        reg.register(XdpflowCollector(PinRoot("/nonexistent/xdpflow-unit"), stats, 5, None))
        return metric_samples(generate_latest(reg).decode())

    assert not any(k[0].startswith("xdpflow_attack") for k in samples(ExporterStats()))
    stats = ExporterStats(
        protecting=True,
        attacks_active={"web": 1, "dns": 0},
        attacks_total={"web": 2, "dns": 0},
        mitigation_rules=3,
        attack_rates=[(VICTIM, "web", "pps", 123.4)],
        protect_overflow={"web": 7},
        notifications_failed=4,
    )
    s = samples(stats)
    web = frozenset({("group", "web")})
    assert s[("xdpflow_attacks_active", web)] == 1 and s[("xdpflow_attacks_total", web)] == 2
    assert s[("xdpflow_attacks_active", frozenset({("group", "dns")}))] == 0
    assert s[("xdpflow_mitigation_rules", frozenset())] == 3
    assert s[("xdpflow_notifications_failed_total", frozenset())] == 4
    assert s[("xdpflow_protect_overflow_packets_total", web)] == 7
    rates = {k: v for k, v in s.items() if k[0] == "xdpflow_attack_rate"}
    assert rates == {("xdpflow_attack_rate", frozenset({("victim", VICTIM), ("group", "web"), ("rate", "pps")})): 123}


def test_a_full_table_takes_well_under_a_second_a_read() -> None:
    import time

    n = 65536
    addr = np.zeros((n, 16), dtype=np.uint8)
    addr[:, :4] = np.frombuffer(np.arange(n, dtype=">u4").tobytes(), dtype=np.uint8).reshape(n, 4)
    base = {c: np.full(n, 10, dtype=np.uint64) for c, _ in RATES.values()}
    fam = np.full(n, 4, dtype=np.uint8)
    det = Detector([POLICY])
    det.update(HostCounts(family=fam, addr=addr, group=np.ones(n, dtype=np.uint32), **base), 0.0)
    more = {c: v * 2 for c, v in base.items()}
    more["packets"][5] += 10**6
    t0 = time.perf_counter()
    det.update(HostCounts(family=fam, addr=addr, group=np.ones(n, dtype=np.uint32), **more), 1.0)
    got = det.update(HostCounts(family=fam, addr=addr, group=np.ones(n, dtype=np.uint32), **more), 2.0)
    assert time.perf_counter() - t0 < 2 * 0.5  # two reads
    assert got == [] and list(det.rates) == []  # one second over: no attack yet; the next read is calm
    assert Detector([]).update(HostCounts(family=fam, addr=addr, group=np.ones(n, dtype=np.uint32), **base), 0.0) == []
    none = Detector([])
    none.update(HostCounts(family=fam, addr=addr, group=np.ones(n, dtype=np.uint32), **base), 0.0)
    assert none.update(HostCounts(family=fam, addr=addr, group=np.ones(n, dtype=np.uint32), **more), 1.0) == []


def test_ban_sources_bans_every_source_of_an_even_flood_but_not_a_slower_legitimate_one() -> None:
    flows = [FlowSample(str(ipaddress.ip_address("198.18.64.0") + i), 1, 9999, 17, 1000.0) for i in range(1000)]
    rules, why = plan(attack(pps=1e6, udp_pps=1e6), pol("ban_sources"), [*flows, LEGIT], expires_at=9)
    assert why is None and len(rules) == 1000 and LEGIT.src not in {str(r.src.network_address) for r in rules}  # type: ignore[union-attr]
    rules, why = plan(attack(pps=1e6, udp_pps=1e6), pol("ban_sources"), [*flows, *flows[:1]], expires_at=9)
    assert why is None and len(rules) == 1000
    more = [FlowSample(str(ipaddress.ip_address("198.18.80.0") + i), 1, 9999, 17, 1000.0) for i in range(1001)]
    assert "1001 carry" in (plan(attack(pps=1e6), pol("ban_sources"), more)[1] or "")
