"""`xdpflow run` end to end: the daemon in a lab's dut namespace, real frames
from gen, nfcapd as the IPFIX collector, /metrics scraped over HTTP, and
blocklist files and feeds changed under it.

Counts are exact: every flow's packets and IP bytes (IPv4 total length,
IPv6 40 + payload length) as nfdump reads them back equal what was sent,
split or not, and the end reasons say why each record went out (1 idle,
2 active timeout, 3 FIN/RST, 4 forced at shutdown).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from scapy.packet import Packet

from xdpflow.dataplane import maps
from xdpflow.dataplane.abi import bytes_key
from xdpflow.dataplane.pins import escape_ifname
from xdpflow.testing.lab import Lab, traffic_mix

from ..clitest import (
    DUT_V4,
    Cli,
    expect_counters,
    flow_key,
    ip_len,
    pins_under,
    raw,
    send_and_receive,
    tcp,
    udp4,
    udp6,
    wait_prog_gone,
    xdp_prog,
)
from ..daemontest import (
    COLLECTOR_PORT,
    METRICS_PORT,
    NFCAPD,
    NFDUMP,
    NONE,
    Collector,
    Daemon,
    Exported,
    iface,
    scrape,
    totals,
    wait_until,
)
from ..sourcetest import FeedServer

LAB_PREFIX = "xfdm"
COLLECT = ("--collector", f"127.0.0.1:{COLLECTOR_PORT}")
LISTEN = ("--listen", f"127.0.0.1:{METRICS_PORT}")
END_IDLE, END_ACTIVE, END_OF_FLOW, END_FORCED = 1, 2, 3, 4
CLOCK_SLACK_MS = 100  # jiffies -> wall time is good to a tick; the test's own clock reads bracket the sends

needs_nfdump = pytest.mark.skipif(
    NFCAPD is None or NFDUMP is None, reason="nfcapd/nfdump not installed (apt-get install nfdump)"
)


def sent(frames: Iterable[Packet]) -> dict[tuple[str, str, int, int, int], tuple[int, int]]:
    """(packets, IP bytes) per 5-tuple of frames the program tracks as flows."""
    out: dict[tuple[str, str, int, int, int], tuple[int, int]] = {}
    for f in frames:
        p, b = out.get(flow_key(f), (0, 0))
        out[flow_key(f)] = (p + 1, b + ip_len(f))
    return out


def write(path: str, text: str) -> None:
    """Replace ``path`` by rename, as an operator's tooling should."""
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def rules(cli: Cli) -> list[tuple[str, str]]:
    return [(cidr, direction) for cidr, direction, _hits in cli.blocklist()]


def hold(want: object, read: Callable[[], object], seconds: float, every: float = 0.1) -> int:
    """Assert ``read()`` keeps returning ``want`` for ``seconds``; return how often it was read."""
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got = read()
        assert got == want, f"changed after {n} reads: {got}"
        n += 1
        time.sleep(every)
    return n


def flows_gauge(lab: Lab) -> int:
    return scrape(lab)[("xdpflow_flows", iface(lab.dut_if))]


def exported(lab: Lab) -> int:
    """Records sent (flows_exported_total counts only flows that ended)."""
    return scrape(lab)[("xdpflow_records_exported_total", NONE)]


# --- export ----------------------------------------------------------------------


@needs_nfdump
def test_exports_every_flow_exactly(lab: Lab, pin_root: str) -> None:
    """The traffic mix: one record per flow with exact counts; the FIN flow at
    the next scan (end of flow), the rest after the idle timeout (idle), and
    what is left at SIGTERM as forced ends; nothing more, nothing less."""
    cli = Cli(lab.dut_ns, pin_root)
    mix = traffic_mix(lab)
    tail = [udp4(sport=41000), udp4(sport=41000, payload=100), udp6(sport=41001, payload=7)]
    args = (*COLLECT, *LISTEN, "--idle-timeout", "2", "--active-timeout", "60", "--scan-interval", "0.5")
    with Collector(lab.dut_ns) as cap:
        with Daemon(lab, pin_root, *args) as d:
            d.wait_ready()
            t_sent = time.time()
            assert lab.send(mix) == len(mix)
            t_done = time.time()
            wait_until(lambda: exported(lab) == len(sent(mix)) == 7, 8, 0.1, "every flow of the mix exported")
            got = scrape(lab)
            assert got[("xdpflow_flows", iface(lab.dut_if))] == 0
            assert got[("xdpflow_flows_exported_total", NONE)] == 7
            assert got[("xdpflow_export_errors_total", NONE)] == 0
            # left in the table at SIGTERM: exported on the way out
            assert lab.send(tail) == len(tail)
            wait_until(lambda: cli.stats()["packets"] == len(mix) + len(tail), 5, 0.05, "tail counted")
            assert flows_gauge(lab) == 2
            assert d.stop() == 0
            assert d.matching(r"level=info stopped"), d.log()
            assert not d.matching(r"level=(error|warning)"), d.log()
        cap.stop()
        assert cap.drops == 0
        records = cap.records()
    stats = cli.stats()

    by_key: dict[tuple, list[Exported]] = {}
    for r in records:
        by_key.setdefault(r.key, []).append(r)
    want = sent(mix + tail)
    assert {k: [(r.packets, r.bytes) for r in rs] for k, rs in by_key.items()} == {k: [v] for k, v in want.items()}
    assert sum(r.packets for r in records) == stats["packets"] == len(mix) + len(tail)
    assert sum(r.packets for r in records if ":" not in r.key[0]) == stats["ipv4"]
    assert sum(r.packets for r in records if ":" in r.key[0]) == stats["ipv6"]
    assert sum(r.bytes for r in records) == sum(ip_len(f) for f in mix + tail) == 724 + 60 + 128 + 55

    fin_key = (lab.gen_v4, lab.dut_v4, 40002, 80, 6)
    tail_keys = set(sent(tail))
    reasons = {r.key: r.end_reason for r in records}
    want_reasons = {k: END_OF_FLOW if k == fin_key else END_FORCED if k in tail_keys else END_IDLE for k in want}
    assert reasons == want_reasons, reasons

    # timing, by nfcapd's receive stamps: FIN at the next scan, idle after 2 s
    (fin,) = by_key[fin_key]
    idle = [r for r in records if r.end_reason == END_IDLE]
    sent_ms, done_ms = int(t_sent * 1000), int(t_done * 1000)
    assert fin.received - done_ms <= 1500, fin
    assert all(fin.received < r.received for r in idle)
    for r in idle:
        assert sent_ms + 2000 - CLOCK_SLACK_MS <= r.received <= done_ms + 2000 + 1500, (r, sent_ms)
    for r in records:
        if r.key not in tail_keys:
            assert sent_ms - CLOCK_SLACK_MS <= r.first <= r.last <= done_ms + CLOCK_SLACK_MS, (r, sent_ms, done_ms)


@needs_nfdump
def test_active_timeout_splits_without_loss_or_double_count(lab: Lab, pin_root: str) -> None:
    """A flow in three bursts 2.5 s apart with a 2 s active timeout: several
    records, their deltas summing to exactly what was sent."""
    bursts = [[udp4(sport=42000, payload=10 + 7 * i + n) for i in range(n)] for n in (3, 4, 5)]
    frames = [f for b in bursts for f in b]
    (key,) = sent(frames)
    args = (*COLLECT, *LISTEN, "--idle-timeout", "30", "--active-timeout", "2", "--scan-interval", "0.5")
    with Collector(lab.dut_ns) as cap:
        with Daemon(lab, pin_root, *args) as d:
            d.wait_ready()
            for i, burst in enumerate(bursts):
                if i:
                    time.sleep(2.5)
                assert lab.send(burst) == len(burst)
            time.sleep(0.3)
            assert flows_gauge(lab) == 1  # an active export leaves the flow in the table
            assert d.stop() == 0
        cap.stop()
        records = sorted(cap.records(), key=lambda r: r.first)
    assert {r.key for r in records} == {key}
    assert totals(records) == sent(frames)
    assert len(records) >= 2, records
    assert all(r.packets > 0 for r in records), records
    reasons = [r.end_reason for r in records]
    assert END_ACTIVE in reasons and set(reasons) <= {END_ACTIVE, END_FORCED}, reasons
    assert END_FORCED not in reasons[:-1], reasons  # only the last can be the shutdown's
    for a, b in zip(records, records[1:]):
        assert b.first >= a.last - CLOCK_SLACK_MS, (a, b)  # deltas do not overlap


@needs_nfdump
def test_restart_after_kill_resumes_export(lab: Lab, pin_root: str) -> None:
    """kill -9 after an active export, traffic while no daemon runs, a new
    daemon, more traffic, SIGTERM: per flow, exactly what was sent."""
    cli = Cli(lab.dut_ns, pin_root)
    f1 = [udp4(sport=43000, payload=20 + i) for i in range(5)]
    f2 = [udp6(sport=43001, payload=30 + i) for i in range(3)]
    f3 = [udp4(sport=43002, payload=40)]
    args = (*COLLECT, *LISTEN, "--idle-timeout", "30", "--active-timeout", "1.5", "--scan-interval", "0.5")
    with Collector(lab.dut_ns) as cap:
        with Daemon(lab, pin_root, *args) as a:
            a.wait_ready()
            assert lab.send(f1[:3] + f2[:2]) == 5
            wait_until(lambda: exported(lab) == 2, 6, 0.1, "active export")
            # the export state is written right after the records went out;
            # with no new packets there is nothing more to export meanwhile
            time.sleep(0.3)
            assert a.stop(signal.SIGKILL) == -signal.SIGKILL
        # no daemon: the data plane keeps counting
        assert lab.send(f1[3:] + f3) == 3
        with Daemon(lab, pin_root, *args) as b:
            b.wait_ready()
            assert b.matching(r"level=info attached .* upgraded=True"), b.log()
            assert lab.send(f2[2:]) == 1
            wait_until(lambda: cli.stats()["packets"] == 9, 5, 0.05, "all counted")
            assert b.stop() == 0
        cap.stop()
        records = cap.records()
    assert totals(records) == sent(f1 + f2 + f3), records
    # the first daemon's active exports carried what it had seen, once
    before = {r.key: r.packets for r in records if r.received <= min(x.received for x in records) + 300}
    assert before == {flow_key(f1[0]): 3, flow_key(f2[0]): 2}, records
    assert {r.end_reason for r in records} <= {END_ACTIVE, END_FORCED}
    assert sum(r.packets for r in records) == cli.stats()["packets"] == 9


# --- metrics ---------------------------------------------------------------------


def test_metrics_equal_stats(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    """After the traffic stops, every counter of /metrics equals `stats`, and
    both equal what was sent; the gauges equal `status` and `block list`."""
    cli = Cli(lab.dut_ns, pin_root)
    bl = str(tmp_path / "drop.txt")
    write(bl, "198.51.100.0/24\n")
    with Daemon(lab, pin_root, *LISTEN, "--idle-timeout", "30", "--blocklist-file", bl) as d:
        d.wait_ready()
        d.wait_log(r"level=info blocklist synced rules=1 added=1 deleted=0")
        mix = traffic_mix(lab)
        blocked = [udp4(src="198.51.100.7"), udp4(src="198.51.100.9", payload=50), tcp("198.51.100.7", DUT_V4)]
        assert lab.send(mix + blocked) == len(mix) + len(blocked)
        wait_until(lambda: cli.stats()["packets"] == len(mix) + len(blocked), 5, 0.05, "all counted")
        # the FIN'd flow leaves the table at the next scan (exported nowhere: no collector); then nothing moves
        wait_until(lambda: cli.status()[0]["flows"] == len(sent(mix)) - 1, 3, 0.05, "FIN'd flow ended")
        got = scrape(lab)
        stats = cli.stats()
        (status,) = cli.status()
        listing = cli.blocklist()
        assert d.stop() == 0
    assert stats == expect_counters(passed=mix, dropped=blocked)
    for name in maps.STAT_NAMES:
        assert got[(f"xdpflow_{name}_packets_total", iface(lab.dut_if))] == stats[name], name
        assert got[(f"xdpflow_{name}_bytes_total", iface(lab.dut_if))] == stats[bytes_key(name)], name
    assert got[("xdpflow_flows", iface(lab.dut_if))] == status["flows"] == 6  # blocked frames make no flow
    assert got[("xdpflow_flows_max", iface(lab.dut_if))] == status["flows_max"]
    assert got[("xdpflow_attached", iface(lab.dut_if))] == int(status["attached"]) == 1
    assert got[("xdpflow_blocklist_rules", NONE)] == status["blocklist"] == 1
    assert got[("xdpflow_monitor_mode", NONE)] == int(status["monitor"]) == 0
    assert listing == [("198.51.100.0/24", "src", 3)]
    rule = frozenset({("cidr", "198.51.100.0/24"), ("direction", "src")})
    assert {k: v for (n, k), v in got.items() if n == "xdpflow_blocklist_rule_hits_total"} == {rule: 3}
    assert got[("xdpflow_blocklist_syncs_total", NONE)] == 1
    assert got[("xdpflow_blocklist_sync_errors_total", NONE)] == 0
    assert got[("xdpflow_flows_exported_total", NONE)] == 0  # nothing expired yet
    assert got[("xdpflow_export_errors_total", NONE)] == 0


@needs_nfdump
def test_metrics_count_exported_records(lab: Lab, pin_root: str) -> None:
    frames = [udp4(sport=44000), udp6(sport=44001)]
    args = (*COLLECT, *LISTEN, "--idle-timeout", "1", "--scan-interval", "0.5")
    with Collector(lab.dut_ns) as cap:
        with Daemon(lab, pin_root, *args) as d:
            d.wait_ready()
            assert lab.send(frames) == 2
            wait_until(lambda: exported(lab) == 2, 5, 0.1, "exported")
            got = scrape(lab)
            assert d.stop() == 0
        cap.stop()
        assert len(cap.records()) == 2
    assert got[("xdpflow_export_errors_total", NONE)] == 0
    # one collector: every record exported is one data record sent
    assert got[("xdpflow_records_exported_total", NONE)] == 2


@needs_nfdump
def test_export_errors_counter_survives_reload(lab: Lab, pin_root: str) -> None:
    # nobody listens on the collector port: every other send is refused (ICMP port unreachable)
    args = (*COLLECT, *LISTEN, "--idle-timeout", "1", "--scan-interval", "0.5")
    with Daemon(lab, pin_root, *args) as d:
        d.wait_ready()
        assert lab.send([udp4(sport=46001)]) == 1
        wait_until(lambda: exported(lab) == 1, 3, 0.1, "first export")
        assert lab.send([udp4(sport=46002)]) == 1
        wait_until(lambda: exported(lab) == 2, 3, 0.1, "second export")
        # the first send went out, the second met the first's port unreachable
        assert scrape(lab)[("xdpflow_export_errors_total", NONE)] == 1
        mark = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log(r"level=info reloaded", 5, since=mark)
        assert lab.send([udp4(sport=46010)]) == 1
        wait_until(lambda: exported(lab) == 3, 3, 0.1, "exported")
        # the new exporter's first send goes out: still one error in all (a counter never goes down)
        assert scrape(lab)[("xdpflow_export_errors_total", NONE)] == 1
        assert d.stop() == 0


# --- blocklist sources -------------------------------------------------------------


def test_blocklist_file_follows_edits(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    """The kernel blocklist equals the file within 2 s of a replacement; a bad
    edit changes nothing and is logged with its file and line."""
    cli = Cli(lab.dut_ns, pin_root)
    path = str(tmp_path / "blocklist.txt")
    write(path, "198.51.100.0/24\n")
    a, b, ok = udp4(src="198.51.100.7"), udp4(src="203.0.113.7", sport=40003), udp4(sport=40004)
    with Daemon(lab, pin_root, *LISTEN, "--blocklist-file", path) as d:
        d.wait_ready()
        d.wait_log(r"level=info blocklist synced rules=1 added=1 deleted=0")
        assert rules(cli) == [("198.51.100.0/24", "src")]
        assert send_and_receive(lab, [a, b, ok]) == raw([b, ok])

        write(path, "203.0.113.0/24\n")
        t0 = time.monotonic()
        while rules(cli) != [("203.0.113.0/24", "src")]:
            assert time.monotonic() - t0 < 2.0, f"blocklist still {rules(cli)} 2 s after the edit"
            time.sleep(0.1)
        assert send_and_receive(lab, [a, b, ok]) == raw([a, ok])
        assert cli.blocklist() == [("203.0.113.0/24", "src", 1)]

        # bad edits: the last good version stays, the log names file:line
        for text, lineno, seconds in (
            ("203.0.113.0/24\n10.1.2.3/8\n", 2, 3.0),
            ("# ours\n203.0.113.0/24\nthis is not a cidr\n", 3, 1.5),
        ):
            mark = d.mark()
            write(path, text)
            hold([("203.0.113.0/24", "src")], lambda: rules(cli), seconds)
            d.wait_log(rf"level=warning blocklist source error: {re.escape(path)}:{lineno}: ", 1.0, since=mark)
            assert not d.matching(r"blocklist synced", since=mark), d.log()
        assert send_and_receive(lab, [a, b, ok]) == raw([a, ok])
        assert d.stop() == 0
    # the daemon's exit leaves the blocklist in force
    assert rules(cli) == [("203.0.113.0/24", "src")]


def test_feed_is_applied_and_never_emptied(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    """A feed polled every second: applied, 304 when unchanged (no sync), a
    change applied, and a 500 or a timeout keep the last good list."""
    cli = Cli(lab.dut_ns, pin_root)
    seen: list[list[tuple[str, str]]] = []

    def observe() -> list[tuple[str, str]]:
        r = rules(cli)
        seen.append(r)
        return r

    v1 = [("198.51.100.0/24", "src")]
    v2 = [("198.51.100.0/25", "src"), ("203.0.113.0/24", "src")]
    with FeedServer(lab.dut_ns) as server:
        feed = server.feed
        feed.set("# v1\n198.51.100.0/24\n", '"v1"')
        config = str(tmp_path / "xdpflow.toml")
        with open(config, "w") as f:
            f.write(f'[blocklist]\nfeeds = [{{ url = "{server.url}", interval = 1, timeout = 1 }}]\n')
        with Daemon(lab, pin_root, "--config", config, *LISTEN) as d:
            d.wait_ready()
            wait_until(lambda: observe() == v1, 5, 0.1, "feed v1 applied")
            assert feed.answered()[0] == 200 and set(feed.answered()[1:]) <= {304}, feed.answered()

            # unchanged: conditional requests answered 304, no sync
            n = feed.count()
            wait_until(lambda: len(feed.answered(n)) >= 2, 4, 0.1, "two more polls")
            assert set(feed.answered(n)) == {304}
            with feed.lock:
                assert all(h.get("if-none-match") == '"v1"' for h in feed.requests[n:])
            assert observe() == v1
            assert len(d.matching(r"level=info blocklist synced")) == 1, d.log()

            feed.set("203.0.113.0/24\n198.51.100.0/25\n", '"v2"')
            wait_until(lambda: observe() == v2, 4, 0.1, "feed v2 applied")
            assert len(d.matching(r"level=info blocklist synced rules=2 added=2 deleted=1")) == 1, d.log()

            # a server error: the last good list stays
            mark, n = d.mark(), feed.count()
            with feed.lock:
                feed.status = 500
            wait_until(lambda: observe() == v2 and len(feed.answered(n)) >= 2, 5, 0.1, "two 500s")
            assert set(feed.answered(n)) == {500}
            d.wait_log(rf"level=warning blocklist source error: {re.escape(server.url)}: HTTP 500", 1, since=mark)
            hold(v2, observe, 0.5)

            # a timeout: a new version that comes too slowly is not applied
            mark, n = d.mark(), feed.count()
            feed.set("192.0.2.0/24\n", '"v3"')
            with feed.lock:
                feed.delay = 3.0
            wait_until(lambda: observe() == v2 and feed.count() > n, 4, 0.1, "a slow request")
            d.wait_log(rf"level=warning blocklist source error: {re.escape(server.url)}: timed out", 3, since=mark)
            hold(v2, observe, 1.0)
            assert not d.matching(r"blocklist synced", since=mark), d.log()
            assert d.stop() == 0
    # from the first application on, every read found rules
    first = next(i for i, r in enumerate(seen) if r)
    assert all(seen[first:]), "the blocklist was empty at some point"
    assert rules(cli) == v2


# --- configuration and life cycle --------------------------------------------------


@needs_nfdump
def test_sighup_reloads_config(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    """SIGHUP: a shorter idle timeout and a new blocklist file take effect; a
    broken config is refused and the running one kept."""
    cli = Cli(lab.dut_ns, pin_root)
    config = str(tmp_path / "xdpflow.toml")
    bl = str(tmp_path / "drop.txt")
    write(bl, "198.51.100.0/24\n2001:db8::/32\n")
    export = f'[export]\ncollectors = ["127.0.0.1:{COLLECTOR_PORT}"]\nscan_interval = 0.5\n'
    write(config, export + "idle_timeout = 30\n")
    frames = [udp4(sport=45000), udp4(sport=45000, payload=64)]
    with Collector(lab.dut_ns) as cap:
        with Daemon(lab, pin_root, "--config", config, *LISTEN) as d:
            d.wait_ready()
            assert d.matching(r"level=info exporting collectors=127\.0\.0\.1:4739 idle=30s active=60s")
            assert lab.send(frames) == 2
            time.sleep(1.5)
            assert flows_gauge(lab) == 1  # idle 1.5 s < 30 s
            assert rules(cli) == []

            write(config, export + f'idle_timeout = 1\n[blocklist]\nfiles = ["{bl}"]\n')
            mark = d.mark()
            d.proc.send_signal(signal.SIGHUP)
            d.wait_log(rf"level=info reloaded config={re.escape(config)}", 5, since=mark)
            assert d.matching(r"level=info exporting collectors=127\.0\.0\.1:4739 idle=1s active=60s", since=mark)
            wait_until(lambda: flows_gauge(lab) == 0, 2.5, 0.1, "flow expired under the new idle timeout")
            wait_until(
                lambda: rules(cli) == [("198.51.100.0/24", "src"), ("2001:db8::/32", "src")], 2, 0.1, "file applied"
            )

            # a broken config: refused, the daemon keeps running as it was
            write(config, "[export\nidle_timeout = \n")
            mark = d.mark()
            d.proc.send_signal(signal.SIGHUP)
            d.wait_log(r"level=error reload failed, keeping the running config: .*not valid TOML", 5, since=mark)
            assert d.proc.poll() is None
            assert rules(cli) == [("198.51.100.0/24", "src"), ("2001:db8::/32", "src")]
            assert scrape(lab)[("xdpflow_flows_exported_total", NONE)] == 1
            assert d.stop() == 0
        cap.stop()
        (rec,) = cap.records()
    assert (rec.key, rec.packets, rec.bytes, rec.end_reason) == (flow_key(frames[0]), 2, 60 + 92, END_IDLE)


def test_reload_refuses_a_bad_feed_and_keeps_running(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    cli = Cli(lab.dut_ns, pin_root)
    config = str(tmp_path / "xdpflow.toml")
    bl = str(tmp_path / "drop.txt")
    write(bl, "198.51.100.0/24\n")
    write(config, f'[blocklist]\nfiles = ["{bl}"]\n')
    with Daemon(lab, pin_root, "--config", config, *LISTEN) as d:
        d.wait_ready()
        wait_until(lambda: rules(cli) == [("198.51.100.0/24", "src")], 3, 0.1, "file applied")
        write(config, f'[blocklist]\nfiles = ["{bl}"]\n[[blocklist.feeds]]\nurl = "ftp://127.0.0.1/drop.txt"\n')
        mark = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log(r"level=error reload failed, keeping the running config", 5, since=mark)
        time.sleep(0.5)
        assert d.proc.poll() is None, d.log()
        assert rules(cli) == [("198.51.100.0/24", "src")]
        assert d.stop() == 0


def test_reload_during_feed_outage_keeps_feed_rules(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    cli = Cli(lab.dut_ns, pin_root)
    config = str(tmp_path / "xdpflow.toml")
    bl = str(tmp_path / "drop.txt")
    write(bl, "203.0.113.0/24\n")
    both = [("198.51.100.0/24", "src"), ("203.0.113.0/24", "src")]
    with FeedServer(lab.dut_ns) as server:
        server.feed.set("198.51.100.0/24\n", '"v1"')
        feeds = f'feeds = [{{ url = "{server.url}", interval = 1, timeout = 1 }}]\n'
        write(config, f'[blocklist]\nfiles = ["{bl}"]\n{feeds}')
        with Daemon(lab, pin_root, "--config", config, *LISTEN) as d:
            d.wait_ready()
            wait_until(lambda: rules(cli) == both, 5, 0.1, "file and feed applied")
            n = server.feed.count()
            with server.feed.lock:
                server.feed.status = 500
            wait_until(lambda: 500 in server.feed.answered(n), 4, 0.1, "the feed fails")
            mark = d.mark()
            d.proc.send_signal(signal.SIGHUP)
            d.wait_log(r"level=info reloaded", 5, since=mark)
            hold(both, lambda: rules(cli), 2.0)
            assert d.stop() == 0


def test_detach_on_exit(lab: Lab, pin_root: str) -> None:
    """Without detach_on_exit the program keeps running and its pins stay after
    SIGTERM; with it, the interface is clean and the pin root gone."""
    cli = Cli(lab.dut_ns, pin_root)
    with Daemon(lab, pin_root, *LISTEN) as d:
        d.wait_ready()
        (st,) = cli.status()
        assert d.stop() == 0
    (after,) = cli.status()
    assert after["attached"] is True and after["prog_id"] == st["prog_id"]
    assert xdp_prog(lab.dut_ns, lab.dut_if) == (st["prog_id"], "xdpflow")
    d_if = escape_ifname(lab.dut_if)
    left = pins_under(pin_root)
    assert {f"{d_if}/prog", f"{d_if}/flows_v4", f"{d_if}/exported_v4", "clock"} <= set(left), left
    # still counting with no daemon
    assert lab.send([udp4(), udp6()]) == 2
    assert cli.stats()["packets"] == 2

    with Daemon(lab, pin_root, *LISTEN, "--detach-on-exit") as d:
        d.wait_ready()
        assert d.matching(r"level=info attached .* upgraded=True"), d.log()
        (st2,) = cli.status()
        assert st2["attached"] is True
        assert d.stop() == 0
        assert d.matching(rf"level=info detached iface={lab.dut_if}$"), d.log()
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None
    assert pins_under(pin_root) == [] and not os.path.exists(pin_root)
    assert cli.status() == []
    assert wait_prog_gone(st2["prog_id"]) and wait_prog_gone(st["prog_id"])
