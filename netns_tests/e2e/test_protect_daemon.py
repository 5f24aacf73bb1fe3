"""`xdpflow run` with a [[protect]] group: a flood from gen is detected from
the per-destination counters, fingerprinted and dropped, notified (command
and webhook), reported by `xdpflow attacks` and the metrics, ends, and its
rules expire by their TTL; a dry run installs nothing; a restarted daemon
resumes the attack.

Traffic uses only 198.18.0.0/15, between the lab's own namespaces. (The
issue's full-rate scenarios are the console-script tests of `top` and
mitigation at 1 Mpps.)
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from xdpflow.testing.lab import DUT_V4, GEN_V4, Lab
from xdpflow.testing.pktgen import blast

from ..clitest import Cli, send_and_receive, udp
from ..daemontest import METRICS_PORT, NONE, Daemon, scrape, wait_until

LAB_PREFIX = "xfprot"
LISTEN = ("--listen", f"127.0.0.1:{METRICS_PORT}")


def config(tmp_path: Path, mitigation: str = "fingerprint", dry_run: bool = False) -> str:
    out = tmp_path / "events.jsonl"
    writer = f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read())"
    path = tmp_path / "xdpflow.toml"
    path.write_text(
        f"""
[[protect]]
name = "web"
prefixes = ["{DUT_V4}/32"]
pps = 20000
trigger_seconds = 1
release_seconds = 2
mitigation = "{mitigation}"
ttl = 4
dry_run = {str(dry_run).lower()}

[notify]
command = {json.dumps([sys.executable, "-c", writer])}
timeout = 5
"""
    )
    return str(path)


def events(tmp_path: Path) -> list[dict[str, Any]]:
    p = tmp_path / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


@contextmanager
def flood(lab: Lab) -> Iterator[None]:
    """UDP to DUT_V4:9999 from ten sources at roughly 100 kpps until the block ends."""
    frames = [bytes(udp(f"198.18.5.{i}", DUT_V4, 1000 + i, 9999)) for i in range(1, 11)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            while not stop.is_set():
                blast(lab.gen_if, frames, 2000, netns=lab.gen_ns)
                time.sleep(0.02)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(10)
    if errors:
        raise errors[0]


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "run"
    monkeypatch.setenv("XDPFLOW_STATE_DIR", str(d))
    return d


def attacks(cli: Cli) -> list[dict[str, Any]]:
    return list(cli.json("attacks"))


def mitigation_rules(cli: Cli) -> list[dict[str, Any]]:
    return [r for r in cli.json("rule", "list") if (r["comment"] or "").startswith("attack ")]


def test_flood_detected_mitigated_notified_and_expired(
    lab: Lab, pin_root: str, tmp_path: Path, state_dir: Path
) -> None:
    cli = Cli(lab.dut_ns, pin_root)
    with Daemon(lab, pin_root, "--config", config(tmp_path), *LISTEN) as d:
        d.wait_ready()
        with flood(lab):
            t0 = time.monotonic()
            try:
                (a,) = wait_until(lambda: [x for x in attacks(cli) if x["mitigation"]], 8, 0.1, "attack mitigated")
            except AssertionError as e:
                raise AssertionError(f"{e}; stats {cli.stats()}; daemon log:\n{d.log()}") from None
            assert time.monotonic() - t0 < 5
            assert (a["victim"], a["group"], a["active"], a["exceeded"]) == (DUT_V4, "web", True, ["pps"])
            m = a["mitigation"]
            assert (m["kind"], m["dry_run"], m["declined"]) == ("fingerprint", False, None) and len(m["rules"]) == 1
            (r,) = mitigation_rules(cli)
            assert (r["id"], r["action"], r["proto"], r["dport"], r["priority"], r["comment"]) == (
                m["rules"][0],
                "drop",
                "udp",
                "9999",
                60000,
                f"attack {a['id']}",
            )
            # the flood is dropped, other traffic to the victim passes
            assert len(send_and_receive(lab, [udp(GEN_V4, DUT_V4, 40000, 80)] * 5)) == 5
            wait_until(lambda: r["packets"] < mitigation_rules(cli)[0]["packets"], 3, 0.1, "flood dropped")
            s = scrape(lab)
            assert s[("xdpflow_attacks_active", frozenset({("group", "web")}))] == 1
            assert s[("xdpflow_attacks_total", frozenset({("group", "web")}))] == 1
            assert s[("xdpflow_mitigation_rules", NONE)] == 1
            rate = frozenset({("victim", DUT_V4), ("group", "web"), ("rate", "pps")})
            assert s[("xdpflow_attack_rate", rate)] > 20000
            # the TTL is extended while the attack lasts (ttl 4: more than 4 s of flood)
            time.sleep(5)
            assert mitigation_rules(cli), "rules expired during the attack"
        (a,) = wait_until(lambda: [x for x in attacks(cli) if not x["active"]], 8, 0.1, "attack ended")
        assert a["peak"]["pps"] > 20000 and a["end"] > a["start"]
        wait_until(lambda: not mitigation_rules(cli), 10, 0.2, "mitigation rules expired")
        wait_until(lambda: len(events(tmp_path)) == 3, 5, 0.1, "three notifications")
        evs = events(tmp_path)
        assert [e["event"] for e in evs] == ["start", "mitigation", "end"]
        assert all(e["attack"]["id"] == a["id"] and e["attack"]["victim"] == DUT_V4 for e in evs)
        assert evs[1]["attack"]["mitigation"]["rules"] == m["rules"]
        assert scrape(lab).get(("xdpflow_attack_rate", rate)) is None  # active attacks only
        assert d.stop() == 0
    text = cli("attacks")
    assert DUT_V4 in text and "ended" in text and "fingerprint" in text


def test_dry_run_and_restart_resumes(lab: Lab, pin_root: str, tmp_path: Path, state_dir: Path) -> None:
    cli = Cli(lab.dut_ns, pin_root)
    cfg = config(tmp_path, dry_run=True)
    d = Daemon(lab, pin_root, "--config", cfg)
    try:
        d.wait_ready()
        with flood(lab):
            (a,) = wait_until(lambda: [x for x in attacks(cli) if x["mitigation"]], 8, 0.1, "attack reported")
            m = a["mitigation"]
            assert m["dry_run"] and m["rules"] == [] and "proto=udp dport=9999" in m["lines"][0]
            assert mitigation_rules(cli) == []
            d.proc.kill()  # kill -9 mid-attack; the data plane keeps counting
            d.close()
            d = Daemon(lab, pin_root, "--config", cfg)
            d.wait_log(rf"attack resumed id={a['id']} victim={DUT_V4}", 20)
            time.sleep(3)
            (b,) = attacks(cli)
            assert b["id"] == a["id"] and b["active"]
        wait_until(lambda: not attacks(cli)[0]["active"], 10, 0.2, "resumed attack ended")
    finally:
        d.close()
    assert [e["event"] for e in events(tmp_path)].count("start") == 1
