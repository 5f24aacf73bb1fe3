"""Prometheus metrics end to end: what `/metrics` says equals what the
`xdpflow` command says, promtool accepts it without a lint warning, and
vanished pins never fail a scrape.

xdpflow is driven through the console script inside a lab's dut namespace;
the metrics server runs in this test process, in the host namespace, and
enters the dut namespace only around each collect (``netns=``) to ask netlink
which program runs. Scrapes go over HTTP to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from xdpflow.app.config import parse_hostport
from xdpflow.dataplane import abi, maps
from xdpflow.dataplane.pins import PinRoot
from xdpflow.export import metrics
from xdpflow.testing.lab import Lab, traffic_mix

from ..clitest import XDPFLOW, detach_link_of, metric_samples, scrape, xdp_prog

LAB_PREFIX = "xfmet"

# rule -> frames that hit it; 198.51.100.7 is inside the /24 but its own /32
# is longer, so it counts there; two rules tie at 3 hits
RULES = [
    ("198.51.100.0/24", "src"),
    ("198.51.100.7/32", "src"),
    ("203.0.113.0/24", "dst"),
    ("2001:db8::/32", "src"),
    ("192.0.2.0/24", "src"),  # never hit
]


def xdpflow(lab: Lab, pin_root: str, *args: str) -> str:
    r = subprocess.run(
        [XDPFLOW, *args, "--netns", lab.dut_ns, "--pin-root", pin_root], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and r.stderr == "", f"xdpflow {' '.join(args)}: exit {r.returncode}\n{r.stderr}"
    return r.stdout


def xdpflow_json(lab: Lab, pin_root: str, *args: str) -> Any:
    return json.loads(xdpflow(lab, pin_root, *args, "--json"))


def _udp(l3: Packet) -> Packet:
    return Ether(bytes(Ether(src=Lab.gen_mac, dst=Lab.dut_mac) / l3 / UDP(sport=5000, dport=53) / Raw(b"\0" * 20)))


def blocked_frames(lab: Lab) -> list[Packet]:
    return (
        [_udp(IP(src="198.51.100.9", dst=lab.dut_v4))] * 5
        + [_udp(IP(src="198.51.100.7", dst=lab.dut_v4))]
        + [_udp(IP(src=lab.gen_v4, dst="203.0.113.9"))] * 3
        + [_udp(IPv6(src="2001:db8::5", dst=lab.dut_v6))] * 3
    )


def populate(lab: Lab, pin_root: str) -> int:
    """Attach, block RULES, send the traffic mix and frames the rules drop;
    returns how many frames were dropped."""
    xdpflow(lab, pin_root, "attach", lab.dut_if)
    # rules that see the mix without changing its fate: monitor passes, a pass rule after the
    # blocklist (priority 2000) exempts nothing
    xdpflow(lab, pin_root, "rule", "add", "--proto", "udp", "--action", "monitor", "--priority", "2000")
    xdpflow(lab, pin_root, "rule", "add", "--proto", "tcp", "--action", "pass", "--priority", "2000")
    for direction in ("src", "dst"):
        cidrs = [c for c, d in RULES if d == direction]
        xdpflow(lab, pin_root, "block", "add", *cidrs, *(["--dst"] if direction == "dst" else []))
    blocked = blocked_frames(lab)
    frames = [bytes(f) for f in traffic_mix(lab)] + [bytes(f) for f in blocked]
    assert lab.send(frames) == len(frames)
    return len(blocked)


samples = metric_samples


def by_name(got: dict[tuple[str, frozenset[tuple[str, str]]], int], name: str) -> dict[frozenset, int]:
    return {labels: v for (n, labels), v in got.items() if n == name}


def iface(ifname: str) -> frozenset[tuple[str, str]]:
    return frozenset({("interface", ifname)})


NONE: frozenset[tuple[str, str]] = frozenset()


def assert_matches_cli(text: str, lab: Lab, pin_root: str) -> None:
    """Every counter equals `stats`, the gauges equal `status`, hits equal `block list`."""
    got = samples(text)
    stats = xdpflow_json(lab, pin_root, "stats")
    (status,) = xdpflow_json(lab, pin_root, "status")
    listing = xdpflow_json(lab, pin_root, "block", "list")
    c = stats[lab.dut_if]
    for name in maps.STAT_NAMES:
        assert got[(f"xdpflow_{name}_packets_total", iface(lab.dut_if))] == c[name], name
        assert got[(f"xdpflow_{name}_bytes_total", iface(lab.dut_if))] == c[abi.bytes_key(name)], name
    assert got[("xdpflow_flows", iface(lab.dut_if))] == status["flows"]
    assert got[("xdpflow_flows_max", iface(lab.dut_if))] == status["flows_max"]
    assert got[("xdpflow_attached", iface(lab.dut_if))] == int(status["attached"]) == 1
    assert got[("xdpflow_blocklist_rules", NONE)] == status["blocklist"]
    assert got[("xdpflow_blocklist_rules_max", NONE)] == status["blocklist_max"]
    assert got[("xdpflow_monitor_mode", NONE)] == int(status["monitor"])
    want_hits = {
        frozenset({("cidr", r["cidr"]), ("direction", r["direction"])}): r["hits"] for r in listing if r["hits"]
    }
    assert by_name(got, "xdpflow_blocklist_rule_hits_total") == want_hits
    rules = xdpflow_json(lab, pin_root, "rule", "list", "--json")
    assert got[("xdpflow_rules", NONE)] == len(rules)
    for metric, key in (("packets", "packets"), ("bytes", "bytes"), ("limited", "limited")):
        want = {frozenset({("id", str(r["id"])), ("action", r["action"])}): r[key] for r in rules if r["packets"]}
        assert by_name(got, f"xdpflow_rule_{metric}_total") == want, metric


def test_metrics_equal_cli(lab: Lab, pin_root: str) -> None:
    n_blocked = populate(lab, pin_root)
    stats = metrics.ExporterStats(
        flows_exported=7, records_exported=9, export_errors=1, blocklist_syncs=4, blocklist_sync_errors=2
    )
    with metrics.serve(parse_hostport("127.0.0.1:0"), PinRoot(pin_root), stats=stats, netns=lab.dut_ns) as server:
        assert server.port != 0
        text = scrape(server)
        assert_matches_cli(text, lab, pin_root)
        got = samples(text)
        # the numbers are the frames sent, not only what the CLI says
        assert got[("xdpflow_dropped_packets_total", iface(lab.dut_if))] == n_blocked
        assert got[("xdpflow_passed_packets_total", iface(lab.dut_if))] == len(traffic_mix(lab))
        assert got[("xdpflow_blocklist_rules", NONE)] == len(RULES)
        assert by_name(got, "xdpflow_blocklist_rule_hits_total") == {
            frozenset({("cidr", "198.51.100.0/24"), ("direction", "src")}): 5,
            frozenset({("cidr", "198.51.100.7/32"), ("direction", "src")}): 1,
            frozenset({("cidr", "203.0.113.0/24"), ("direction", "dst")}): 3,
            frozenset({("cidr", "2001:db8::/32"), ("direction", "src")}): 3,
        }
        exporter = {
            "xdpflow_flows_exported_total": 7,
            "xdpflow_records_exported_total": 9,
            "xdpflow_export_errors_total": 1,
            "xdpflow_blocklist_syncs_total": 4,
            "xdpflow_blocklist_sync_errors_total": 2,
        }
        assert {n: got[(n, NONE)] for n in exporter} == exporter

        # nothing is cached: more frames, a mode switch and the daemon's
        # counters show on the next scrape
        more = [bytes(f) for f in traffic_mix(lab)[:3]] + [bytes(blocked_frames(lab)[0])]
        assert lab.send(more) == len(more)
        xdpflow(lab, pin_root, "monitor", "on")
        stats.flows_exported += 5
        stats.blocklist_sync_errors += 1
        text = scrape(server)
        assert_matches_cli(text, lab, pin_root)
        got = samples(text)
        assert got[("xdpflow_packets_packets_total", iface(lab.dut_if))] == len(traffic_mix(lab)) + n_blocked + 4
        assert got[("xdpflow_monitor_mode", NONE)] == 1
        assert got[("xdpflow_flows_exported_total", NONE)] == 12
        assert got[("xdpflow_blocklist_sync_errors_total", NONE)] == 3


def test_top_n_bounds_rule_series(lab: Lab, pin_root: str) -> None:
    populate(lab, pin_root)
    listing = xdpflow_json(lab, pin_root, "block", "list")
    # most hits first; `block list` is in rule order, which breaks ties
    ranked = sorted(((r["cidr"], r["direction"], r["hits"]) for r in listing if r["hits"]), key=lambda t: -t[2])
    assert len(ranked) == 4
    for n in (0, 1, 2, 3, 20):
        collector = metrics.XdpflowCollector(PinRoot(pin_root), top_n=n, netns=lab.dut_ns)
        (fam,) = [f for f in collector.collect() if f.name == "xdpflow_blocklist_rule_hits"]
        got = [(s.labels["cidr"], s.labels["direction"], int(s.value)) for s in fam.samples]
        assert got == ranked[:n], n
    with pytest.raises(ValueError):
        metrics.XdpflowCollector(PinRoot(pin_root), top_n=-1)


def test_promtool_accepts_scrape(lab: Lab, pin_root: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    populate(lab, pin_root)
    with metrics.serve(
        parse_hostport("127.0.0.1:0"), PinRoot(pin_root), stats=metrics.ExporterStats(), netns=lab.dut_ns
    ) as server:
        text = scrape(server)
    assert "xdpflow_blocklist_rule_hits_total{" in text and "xdpflow_attached{" in text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", f"exit {r.returncode}\n{r.stdout}{r.stderr}"


def test_vanished_pins_are_skipped(lab: Lab, pin_root: str) -> None:
    populate(lab, pin_root)
    pins = PinRoot(pin_root)
    # listed under the root, but its pins are gone (a detach mid-scrape)
    ghost = pins.iface_dir("xfghost0")
    os.mkdir(ghost)
    try:
        assert pins.interfaces() == sorted([lab.dut_if, "xfghost0"])
        with metrics.serve(parse_hostport("127.0.0.1:0"), PinRoot(pin_root), netns=lab.dut_ns) as server:
            got = samples(scrape(server))
            assert set(by_name(got, "xdpflow_attached")) == {iface(lab.dut_if)}
            assert set(by_name(got, "xdpflow_packets_packets_total")) == {iface(lab.dut_if)}
            xdpflow(lab, pin_root, "detach", lab.dut_if)
            got = samples(scrape(server))
            assert not by_name(got, "xdpflow_attached") and not by_name(got, "xdpflow_flows"), got
            assert got[("xdpflow_blocklist_rules", NONE)] == len(RULES)
            # the shared maps gone too (as after the last detach): no blocklist numbers, no error
            pins.remove_shared()
            assert samples(scrape(server)) == {}
    finally:
        os.rmdir(ghost)


def test_attached_follows_the_interface(lab: Lab, pin_root: str) -> None:
    populate(lab, pin_root)
    collector = metrics.XdpflowCollector(PinRoot(pin_root), netns=lab.dut_ns)

    def attached() -> int:
        (fam,) = [f for f in collector.collect() if f.name == "xdpflow_attached"]
        (s,) = fam.samples
        return int(s.value)

    assert attached() == 1
    # the program removed behind xdpflow's back: pins stay, it runs no more
    running = xdp_prog(lab.dut_ns, lab.dut_if)
    assert running is not None
    detach_link_of(running[0])
    assert attached() == 0
    (status,) = xdpflow_json(lab, pin_root, "status")
    assert status["attached"] is False


@pytest.mark.slow
def test_scrape_is_cheap(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    """Four interfaces and 10^5 blocklist rules with hits: well under a second."""
    extra = [f"xfm{i}" for i in range(3)]
    for name in extra:  # veth pairs inside the dut namespace, gone with it
        subprocess.run(
            ["ip", "-n", lab.dut_ns, "link", "add", name, "type", "veth", "peer", "name", f"{name}p"], check=True
        )
        for dev in (name, f"{name}p"):
            subprocess.run(["ip", "-n", lab.dut_ns, "link", "set", dev, "up"], check=True)
    xdpflow(lab, pin_root, "attach", lab.dut_if, *extra)
    feed = tmp_path / "feed.txt"
    feed.write_text(
        "".join(f"10.{i >> 8}.{i & 255}.0/24\n" for i in range(65536))
        + "".join(f"11.{i >> 8}.{i & 255}.0/24\n" for i in range(100_000 - 65536))
    )
    xdpflow(lab, pin_root, "block", "sync", str(feed))
    xdpflow(lab, pin_root, "block", "add", "198.51.100.0/24", "198.51.100.7/32", "2001:db8::/32")
    frames = [bytes(f) for f in traffic_mix(lab)] + [bytes(f) for f in blocked_frames(lab)]
    assert lab.send(frames) == len(frames)

    with metrics.serve(parse_hostport("127.0.0.1:0"), PinRoot(pin_root), netns=lab.dut_ns) as server:
        scrape(server)  # the first one imports pyroute2
        times = []
        for _ in range(5):
            t = time.monotonic()
            text = scrape(server)
            times.append(time.monotonic() - t)
    got = samples(text)
    assert got[("xdpflow_blocklist_rules", NONE)] == 100_003
    assert by_name(got, "xdpflow_attached") == {iface(n): 1 for n in [lab.dut_if, *extra]}
    assert len(by_name(got, "xdpflow_blocklist_rule_hits_total")) == 3
    times.sort()
    print(f"scrape of 4 interfaces, 100003 rules: median {times[2]:.3f} s, min {times[0]:.3f} s, max {times[-1]:.3f} s")
    # wall time is for `make bench` to record; a shared machine makes asserting it flaky
