"""`xdpflow top`: current rates of the heaviest sources, destinations or flows,
through the console script, with scapy frames (exact counts) and a
live-frames flood (pktgen.blast, about a million frames a second).

Each refresh reports what arrived between two reads of the flow tables, so
the refreshes of a run add up to every frame sent, exactly.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import pytest

from xdpflow.testing.lab import DUT_V4, GEN_V4, Lab
from xdpflow.testing.pktgen import FlowMix, blast, vary_frame

from ..clitest import Cli, interrupt, stop, udp

LAB_PREFIX = "xftop"


@pytest.fixture
def cli(lab: Lab, pin_root: str) -> Cli:
    c = Cli.of(lab, pin_root)
    c("attach", lab.dut_if)
    return c


class Refreshes:
    """The JSON objects a running `top --json` prints, read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, f: Any) -> None:
        for line in f:
            self.q.put(json.loads(line))

    def next(self, timeout: float = 15) -> dict[str, Any]:
        return self.q.get(timeout=timeout)

    def until_quiet(self, quiet: int = 2, timeout: float = 30) -> list[dict[str, Any]]:
        """Refreshes until ``quiet`` in a row had no rows, after at least one that had."""
        got: list[dict[str, Any]] = []
        empty = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.next()
            got.append(r)
            seen = any(x["rows"] for x in got)
            empty = empty + 1 if not r["rows"] else 0
            if seen and empty >= quiet:
                return got
        raise AssertionError(f"top never went quiet: {got[-3:]}")


def running(cli: Cli, *args: str) -> tuple[subprocess.Popen[str], Refreshes]:
    proc = cli.popen("top", "--json", *args)
    return proc, Refreshes(proc)


def test_top_by_source_adds_up_to_every_frame_and_rates_match(lab: Lab, cli: Cli) -> None:
    sent = {"198.18.0.10": 30, "198.18.0.11": 20, "198.18.0.12": 10}
    frames = [udp(src, DUT_V4, 40000 + i, 9000, payload=18) for src, n in sent.items() for i in range(n)]
    proc, tops = running(cli, "--by", "src", "--interval", "0.5")
    try:
        first = tops.next()
        assert first == {"by": "src", "interval": first["interval"], "rows": []}
        assert 0.45 < first["interval"] < 1.5
        assert lab.send(frames, 0.002) == len(frames)
        got = tops.until_quiet()
    finally:
        interrupt(proc)
    packets: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for r in got:
        assert r["by"] == "src"
        for row in r["rows"]:
            assert set(row) == {"src", "pps", "bps", "packets", "bytes"}
            assert row["pps"] == pytest.approx(row["packets"] / r["interval"])
            assert row["bps"] == pytest.approx(8 * row["bytes"] / r["interval"])
            packets[row["src"]] += row["packets"]
            nbytes[row["src"]] += row["bytes"]
        pps = [row["pps"] for row in r["rows"]]
        assert pps == sorted(pps, reverse=True)
    # every flow is new during the run: each counts from 0, nothing lost or counted twice
    assert dict(packets) == sent
    assert dict(nbytes) == {src: n * 46 for src, n in sent.items()}  # IP bytes: 20 + 8 + 18


def test_top_by_flow_and_destination_with_count(lab: Lab, cli: Cli) -> None:
    # in any stretch of A A B A A B ..., A has at least as many frames as B, and longer ones:
    # whatever the intervals cut, A ranks first wherever it sent anything
    heavy, light = udp(GEN_V4, DUT_V4, 5000, 9000, payload=64), udp(GEN_V4, DUT_V4, 5001, 53, payload=8)
    frames = [heavy, heavy, light] * 6
    proc, tops = running(cli, "--by", "flow", "--count", "1", "--interval", "0.5")
    try:
        tops.next()
        assert lab.send(frames, 0.001) == len(frames)
        got = tops.until_quiet()
    finally:
        interrupt(proc)
    seen: Counter[tuple[Any, ...]] = Counter()
    for r in got:
        assert len(r["rows"]) <= 1
        for row in r["rows"]:
            assert set(row) == {"ifname", "src", "dst", "sport", "dport", "proto", "pps", "bps", "packets", "bytes"}
            seen[(row["ifname"], row["src"], row["dst"], row["sport"], row["dport"], row["proto"])] += row["packets"]
    assert seen[(lab.dut_if, GEN_V4, DUT_V4, 5000, 9000, 17)] == 12


def test_top_flood_rates_and_text_view(lab: Lab, cli: Cli) -> None:
    mix = FlowMix(n_flows=1000, size=64, dst_v4=DUT_V4)
    frame, offset = vary_frame(mix)
    proc, tops = running(cli, "--by", "dst", "--interval", "1")
    try:
        tops.next()
        r = blast(lab.gen_if, [frame], 2_000_000, netns=lab.gen_ns, vary=(offset, 1000))
        got = tops.until_quiet()
    finally:
        interrupt(proc)
    total = sum(row["packets"] for x in got for row in x["rows"])
    assert total == r.sent
    peak = max(row["pps"] for x in got for row in x["rows"])
    assert {row["dst"] for x in got for row in x["rows"]} == {DUT_V4}
    assert peak > 300_000, (peak, r.pps)

    # the text view of a terminal, piped here: a header line, then a table, per refresh
    text = cli.popen("top", "--by", "flow", "--count", "5", "--interval", "0.3")
    time.sleep(0.2)
    blast(lab.gen_if, [frame], 400_000, netns=lab.gen_ns, vary=(offset, 1000))
    time.sleep(0.8)
    out, err = stop(text, signal.SIGINT)
    assert text.returncode == 0 and err == ""
    assert "Ctrl-C to stop" in out
    assert "iface  proto  source" in out and "pps" in out and "bit/s" in out
    assert f"{lab.dut_if}  udp" in out and f"{DUT_V4}:9000" in out


def test_top_of_a_missing_interface_is_one_line(lab: Lab, cli: Cli) -> None:
    err = cli.fails(1, "top", "--iface", "xfnope0")
    assert "xfnope0" in err
    for bad in (["--by", "port"], ["--count", "0"], ["--interval", "-1"]):
        r = cli.run("top", *bad)
        assert r.returncode == 2 and r.stdout == "" and "xdpflow top: error: argument" in r.stderr
