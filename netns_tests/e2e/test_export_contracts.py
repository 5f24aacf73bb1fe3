"""Export contracts: an IPFIX record's flowStartMilliseconds (IE 152) is the
time of the first packet it counts, also after an active-timeout export;
xdpflow_flows_exported_total counts every flow whose export ended, once.

The daemon against a real collector (nfcapd); the data plane's part is in
prog/test_prog_take.py.
"""

from __future__ import annotations

import time

import pytest

from xdpflow.testing.lab import GEN_V4, Lab

from ..clitest import DUT_V4, flow_key, tcp, udp4
from ..daemontest import COLLECTOR_PORT, METRICS_PORT, NFCAPD, NFDUMP, NONE, Collector, Daemon, scrape, wait_until

COLLECT = ("--collector", f"127.0.0.1:{COLLECTOR_PORT}")
LISTEN = ("--listen", f"127.0.0.1:{METRICS_PORT}")
END_IDLE, END_ACTIVE, END_OF_FLOW = 1, 2, 3

needs_nfdump = pytest.mark.skipif(
    NFCAPD is None or NFDUMP is None, reason="nfcapd/nfdump not installed (apt-get install nfdump)"
)


# --- the daemon and a real collector --------------------------------------------------


def _flows_exported(lab: Lab) -> int:
    return scrape(lab)[("xdpflow_flows_exported_total", NONE)]


def _a_scan_seen(lab: Lab) -> float:
    """Wait for a scan and return when it was seen (time.time()): a FIN'd
    probe flow leaves the table at the next scan, as the metrics show."""
    before = _flows_exported(lab)
    assert lab.send([tcp(GEN_V4, DUT_V4, sport=47999, flags="F")]) == 1
    return float(wait_until(lambda: _flows_exported(lab) > before and time.time(), 3, 0.01, "probe flow exported"))


@needs_nfdump
def test_record_after_an_active_export_starts_at_its_first_packet(lab: Lab, pin_root: str) -> None:
    """One packet a second from +0 s to +10 s, active timeout 4 s, scans every
    1 s, half-way between the packets: the scans at +4.5 and +8.5 s export
    packets 0-4 and 5-8, the idle end at +12.5 s packets 9-10. Each record
    starts at its first packet: +0, +5, +9 s (not at the previous export),
    and ends at its last: +4, +8, +10 s."""
    frames = [udp4(sport=46000, payload=20 + i) for i in range(11)]
    args = (*COLLECT, *LISTEN, "--active-timeout", "4", "--idle-timeout", "2", "--scan-interval", "1")
    with Collector(lab.dut_ns) as cap:
        with Daemon(lab, pin_root, *args) as d:
            d.wait_ready()
            t0 = _a_scan_seen(lab) + 0.5
            sent_at = []
            for i, frame in enumerate(frames):
                time.sleep(max(0.0, t0 + i - time.time()))
                before = time.time()
                assert lab.send([frame]) == 1
                sent_at.append((before + time.time()) / 2)
            wait_until(lambda: _flows_exported(lab) == 2, 6, 0.1, "the flow ended idle")
            assert d.stop() == 0
        cap.stop()
        records = sorted((r for r in cap.records() if r.key == flow_key(frames[0])), key=lambda r: r.first)
    ms = [round(t * 1000) for t in sent_at]
    assert [(r.packets, r.end_reason) for r in records] == [(5, END_ACTIVE), (4, END_ACTIVE), (2, END_IDLE)], records
    for r, (first, last) in zip(records, [(0, 4), (5, 8), (9, 10)], strict=True):
        assert abs(r.first - ms[first]) <= 20, (r, [m - ms[0] for m in ms])
        assert abs(r.last - ms[last]) <= 20, (r, [m - ms[0] for m in ms])


@needs_nfdump
def test_a_flow_counts_once_when_it_ends_after_an_active_record(lab: Lab, pin_root: str) -> None:
    """A flow exported on active timeout that then ends idle with nothing new
    to send: no second record, and xdpflow_flows_exported_total counts it,
    once."""
    frames = [udp4(sport=46100, payload=20 + i) for i in range(3)]
    args = (*COLLECT, *LISTEN, "--active-timeout", "1", "--idle-timeout", "3", "--scan-interval", "0.5")
    with Collector(lab.dut_ns) as cap:
        with Daemon(lab, pin_root, *args) as d:
            d.wait_ready()
            assert lab.send(frames) == 3
            wait_until(lambda: scrape(lab)[("xdpflow_records_exported_total", NONE)] == 1, 4, 0.05, "active record")
            assert _flows_exported(lab) == 0  # still in the table
            wait_until(lambda: flows_gauge(lab) == 0, 6, 0.05, "the flow ended idle")
            time.sleep(1.2)  # two more scans: nothing more to count
            got = scrape(lab)
            assert got[("xdpflow_flows_exported_total", NONE)] == 1
            assert got[("xdpflow_records_exported_total", NONE)] == 1
            assert d.stop() == 0
        cap.stop()
        records = cap.records()
    assert [(r.key, r.packets, r.end_reason) for r in records] == [(flow_key(frames[0]), 3, END_ACTIVE)]


def flows_gauge(lab: Lab) -> int:
    return scrape(lab)[("xdpflow_flows", frozenset({("interface", lab.dut_if)}))]
