"""Automatic mitigation against a real data plane: the Mitigator reads the
flow tables, installs its rules at the mitigation priority with a TTL and
the attack's comment, extends them, leaves pass rules in force, and a dry
run installs nothing. (Detection from the per-host counters and the whole
loop through `xdpflow run`: the daemon tests.)

Traffic uses only 198.18.0.0/15, between the lab's own namespaces.
"""

from __future__ import annotations

import ipaddress
import time

from xdpflow.dataplane.pins import PinRoot
from xdpflow.export.detect import RATES, Attack, Policy
from xdpflow.export.mitigate import Mitigator
from xdpflow.rules.rulespec import MITIGATION_PRIORITY
from xdpflow.testing.lab import DUT_V4, GEN_V4, Lab

from ..clitest import Cli, send_and_receive, tcp, udp

LAB_PREFIX = "xfmit"
FLOODERS = ["198.18.5.1", "198.18.5.2"]


def policy(kind: str, dry_run: bool = False) -> Policy:
    return Policy(
        name="web",
        prefixes=(ipaddress.ip_network(f"{DUT_V4}/32"),),
        thresholds={"pps": 100},
        mitigation=kind,
        ttl=60,
        dry_run=dry_run,
    )


def attack(attack_id: int, **rates: float) -> Attack:
    r = {k: 0.0 for k in RATES} | rates
    return Attack(id=attack_id, victim=DUT_V4, group="web", start=time.time(), rates=r, peak=r)


def flood() -> list:  # type: ignore[type-arg]
    frames = [udp(s, DUT_V4, 1000 + i, 9999) for s in FLOODERS for i in range(100)]
    return frames + [udp(GEN_V4, DUT_V4, 40000, 80)]


def test_ban_fingerprint_dry_run_and_extend(lab: Lab, pin_root: str) -> None:
    cli = Cli.of(lab, pin_root)
    cli("attach", lab.dut_if, "--flows", "4096")
    cli("rule", "add", "--src", FLOODERS[1], "--action", "pass", "--priority", "10")
    assert len(send_and_receive(lab, flood())) == 201
    mit = Mitigator(PinRoot(pin_root), [lab.dut_if], allowlist=[ipaddress.ip_network("198.18.9.0/24")])

    ban = mit.apply(attack(1, pps=200, udp_pps=200), policy("ban_sources"))
    assert ban.declined is None and len(ban.rules) == 1, ban
    rules = {r["id"]: r for r in cli.json("rule", "list")}
    r = rules[ban.rules[0]]
    assert (r["action"], r["src"], r["dst"], r["priority"], r["comment"]) == (
        "drop",
        f"{FLOODERS[0]}/32",
        f"{DUT_V4}/32",
        MITIGATION_PRIORITY,
        "attack 1",
    )
    assert abs(r["expires_at"] - (time.time() + 60)) < 5
    # the banned flooder is dropped; the pass-ruled one and the legitimate flow pass
    assert len(send_and_receive(lab, flood())) == 101

    dry = mit.apply(attack(2, pps=200, udp_pps=200), policy("fingerprint", dry_run=True))
    assert dry.dry_run and dry.rules == [] and dry.lines, dry
    assert "proto=udp dport=9999" in dry.lines[-1] and "pass src=198.18.9.0/24" in dry.lines[0]
    assert {x["id"] for x in cli.json("rule", "list")} == set(rules)

    fp = mit.apply(attack(3, pps=200, udp_pps=200), policy("fingerprint"))
    assert fp.declined is None and len(fp.rules) == 2, fp
    # the fingerprint drops the rest of the flood but not the pass-ruled source (pass rules win),
    # the legitimate flow or TCP to the same port
    got = send_and_receive(lab, flood() + [tcp(GEN_V4, DUT_V4, 40001, 9999, "S")])
    assert len(got) == 100 + 1 + 1
    assert mit.installed() == 3

    # `rule sync` of an empty file leaves mitigation rules to their TTL
    cli("rule", "sync", "-", input="")
    assert {x["id"] for x in cli.json("rule", "list")} == {*ban.rules, *fp.rules}

    # extension: once half the TTL is gone the expiry moves, the ids stay
    a = attack(3)
    a.mitigation = fp
    gone = mit.extend([(a, policy("fingerprint"))], now=time.time() + 40)
    assert gone == [] and fp.rules == sorted(fp.rules)
    after = {x["id"]: x for x in cli.json("rule", "list")}
    assert all(after[i]["expires_at"] > rules[ban.rules[0]]["expires_at"] + 30 for i in fp.rules)
    # rules deleted by hand: the attack is handed back to be mitigated again
    cli("rule", "del", *map(str, fp.rules))
    assert mit.extend([(a, policy("fingerprint"))], now=time.time() + 200) == [a]
