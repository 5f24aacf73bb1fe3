"""The long-running commands: `xdpflow events` streams new flows and blocked
frames as JSON lines; `xdpflow stats --watch` prints counters until Ctrl-C.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from typing import Any

import pytest

from xdpflow.dataplane.abi import bytes_key
from xdpflow.testing.lab import DUT_V4, DUT_V6, GEN_V4, GEN_V6, Lab, traffic_mix

from ..clitest import (
    COUNTERS,
    Cli,
    expect_counters,
    flow_key,
    icmp,
    interrupt,
    raw,
    send_and_receive,
    stop,
    tcp,
    udp,
    udp4,
)

READY = 1.0  # time the command gets to open the ring buffer before traffic starts


@pytest.fixture
def cli(lab: Lab, pin_root: str) -> Cli:
    c = Cli.of(lab, pin_root)
    c("attach", lab.dut_if)
    return c


def event(kind: str, frame: Any, ifname: str, rule: str | None = None) -> dict[str, Any]:
    """The expected event, without its time."""
    src, dst, sport, dport, proto = flow_key(frame)
    e = {"type": kind, "ifname": ifname, "src": src, "dst": dst, "sport": sport, "dport": dport,
         "proto": proto, "len": len(bytes(frame))}  # fmt: skip
    if rule is not None:
        e["rule"] = rule
    return e


def collect(proc: subprocess.Popen[str], timeout: float = 15) -> list[dict[str, Any]]:
    """Wait for an events command to end by itself; its JSON lines."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err
    assert err == ""
    return [json.loads(line) for line in out.splitlines()]


def test_events_stream_new_flows_and_blocked_frames(lab: Lab, cli: Cli) -> None:
    cli("block", "add", "198.51.100.0/24")
    cli("block", "add", "--dst", "2001:db8::/32")
    proc = cli.popen("events", "--json", "--count", "6", "--duration", "5")
    try:
        time.sleep(READY)
        cli("block", "add", "203.0.113.0/24")  # a rule newer than the stream
        flow4 = udp4()
        flow6 = tcp(GEN_V6, DUT_V6, 40002, 80, flags="S")
        ping = icmp(GEN_V4, DUT_V4)
        b4 = udp("198.51.100.9", DUT_V4, 5001, 53)
        b6 = udp(GEN_V6, "2001:db8::9", 5002, 53)
        b4new = tcp("203.0.113.7", DUT_V4, 5003, 80)
        frames = [flow4, flow4, flow6, ping, b4, b6, flow4, b4new]
        t0 = time.time()
        assert send_and_receive(lab, frames) == raw([flow4, flow4, flow6, ping, flow4])
        t1 = time.time()
        events = collect(proc)
    finally:
        stop(proc, signal.SIGKILL)

    want = [
        event("new_flow", flow4, lab.dut_if),  # once per flow, not per frame
        event("new_flow", flow6, lab.dut_if),
        event("new_flow", ping, lab.dut_if),
        event("blocked", b4, lab.dut_if, "198.51.100.0/24"),
        event("blocked", b6, lab.dut_if, "2001:db8::/32"),
        event("blocked", b4new, lab.dut_if, "203.0.113.0/24"),
    ]
    for e in events:
        assert t0 - 1 <= e.pop("time") <= t1 + 1
    # the ports of blocked frames: see test_blocked_events_carry_the_frames_ports
    for e, w in zip(events, want, strict=False):
        if e["type"] == "blocked":
            e["sport"], e["dport"] = w["sport"], w["dport"]
    assert events == want
    assert cli.blocklist() == [
        ("198.51.100.0/24", "src", 1),
        ("203.0.113.0/24", "src", 1),
        ("2001:db8::/32", "dst", 1),
    ]


def test_blocked_events_carry_the_frames_ports(lab: Lab, cli: Cli) -> None:
    cli("block", "add", "198.51.100.0/24")
    proc = cli.popen("events", "--json", "--count", "1", "--duration", "5")
    try:
        time.sleep(READY)
        blocked = udp("198.51.100.9", DUT_V4, 5001, 53)
        assert send_and_receive(lab, [blocked]) == []
        (e,) = collect(proc)
    finally:
        stop(proc, signal.SIGKILL)
    e.pop("time")
    assert e == event("blocked", blocked, lab.dut_if, "198.51.100.0/24")


def test_events_name_the_rule_that_matched_after_a_change(lab: Lab, cli: Cli) -> None:
    cli("block", "add", "198.51.100.0/24")
    proc = cli.popen("events", "--json", "--count", "1", "--duration", "5")
    try:
        time.sleep(READY)
        cli("block", "del", "198.51.100.0/24")
        cli("block", "add", "203.0.113.0/24")
        assert send_and_receive(lab, [udp("203.0.113.7", DUT_V4, 5001, 53)]) == []
        (e,) = collect(proc)
    finally:
        stop(proc, signal.SIGKILL)
    assert cli.blocklist() == [("203.0.113.0/24", "src", 1)]
    assert (e["type"], e["src"], e["rule"]) == ("blocked", "203.0.113.7", "203.0.113.0/24")


def test_events_start_with_what_happens_next(lab: Lab, cli: Cli) -> None:
    mix = traffic_mix(lab)
    assert send_and_receive(lab, mix) == raw(mix)
    t0 = time.monotonic()
    assert cli("events", "--json", "--duration", "1") == ""
    assert 1 <= time.monotonic() - t0 < 5


class Lines:
    """The stdout lines of a running command, read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        self._t = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self._t.start()

    def _pump(self, f: Any) -> None:
        for line in f:
            self.q.put(line)

    def next(self, timeout: float = 10) -> str:
        return self.q.get(timeout=timeout)


def test_stats_watch_json_until_sigint(lab: Lab, cli: Cli) -> None:
    proc = cli.popen("stats", "--watch", "0.5", "--json")
    try:
        lines = Lines(proc)
        first = json.loads(lines.next())
        assert list(first) == [lab.dut_if]
        assert list(first[lab.dut_if]) == list(COUNTERS)
        for v in first[lab.dut_if].values():
            assert v == {"packets": 0, "bytes": 0, "pps": 0.0, "bps": 0.0}

        mix = traffic_mix(lab)
        t0 = time.monotonic()
        assert send_and_receive(lab, mix) == raw(mix)
        want = expect_counters(passed=mix)
        seen = 1
        while True:
            now = json.loads(lines.next())[lab.dut_if]
            seen += 1
            if now["packets"]["packets"]:
                break
        assert {n: now[n]["packets"] for n in COUNTERS} == {n: want[n] for n in COUNTERS}
        assert {n: now[n]["bytes"] for n in COUNTERS} == {n: want[bytes_key(n)] for n in COUNTERS}
        # the rate is over one interval: every frame arrived within the last one
        assert 12 / 1.0 < now["packets"]["pps"] <= 12 / 0.4
        assert now["packets"]["bps"] == pytest.approx(8 * 892 * now["packets"]["pps"] / 12)
        then = json.loads(lines.next())[lab.dut_if]
        assert then["packets"] == {"packets": 12, "bytes": 892, "pps": 0.0, "bps": 0.0}
        assert time.monotonic() - t0 < 5
    finally:
        interrupt(proc)
    assert seen >= 2
