"""New-flow admission control end to end: `attach --flow-budget`, the
untracked counters of `stats`, upgrades, and the daemon's IPFIX reliability
statistics (RFC 7011 section 4.2) decoded byte by byte.

Frames are sent from one CPU: a veth runs XDP on the sender's CPU, and the
budget is per CPU.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from scapy.packet import Packet

from xdpflow.bindings import netlink
from xdpflow.testing.lab import Lab

from ..clitest import Cli, expect_counters, ip_len, pins_under, raw, send_and_receive, udp4, udp6
from ..daemontest import COLLECTOR_PORT, Daemon, wait_until
from ..unit.test_ipfix import SO_RCVBUFFORCE, Message, decode

WINDOW = 1.05  # s: past the budget's one-second window


@contextmanager
def one_cpu() -> Iterator[None]:
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def new_flows(n: int, base: int) -> list[Packet]:
    """n frames, each a new flow: UDP/IPv4 and UDP/IPv6 by turns, payloads of different sizes."""
    return [(udp4 if i % 2 == 0 else udp6)(sport=base + i, payload=10 + i) for i in range(n)]


def untracked(stats: dict[str, int]) -> tuple[int, int]:
    return stats["untracked"], stats["untracked_bytes"]


def test_attach_flow_budget_counts_untracked_frames(lab: Lab, cli: Cli) -> None:
    cli("attach", lab.dut_if, "--flow-budget", "3")
    frames = new_flows(8, 50000)
    with one_cpu():
        t0 = time.monotonic()
        assert send_and_receive(lab, frames) == raw(frames)  # passed, tracked or not
        assert time.monotonic() - t0 < 0.9, "the frames must fall in one window"
    stats = cli.stats()
    # the interface counters count every frame; untracked: IP bytes, past the first 3
    assert stats == {
        **expect_counters(passed=frames),
        "untracked": 5,
        "untracked_bytes": sum(ip_len(f) for f in frames[3:]),
    }
    assert len(cli.json("flows")) == 3
    text = cli("stats")
    assert ["untracked", "5", str(stats["untracked_bytes"])] in [line.split() for line in text.splitlines()], text


def test_budget_kept_by_an_upgrade_and_changed_by_one(lab: Lab, cli: Cli) -> None:
    cli("attach", lab.dut_if, "--flow-budget", "2", "--flows", "1024")
    first, second, third = new_flows(5, 51000), new_flows(5, 52000), new_flows(5, 53000)
    with one_cpu():
        t0 = time.monotonic()
        send_and_receive(lab, first)
        assert untracked(cli.stats()) == (3, sum(ip_len(f) for f in first[2:]))
        # an upgrade keeps the budget, the untracked counts and the window's state
        (up,) = cli.json("attach", lab.dut_if)
        assert up["replaced"]
        time.sleep(max(0.0, WINDOW - (time.monotonic() - t0)))
        send_and_receive(lab, second)
        assert untracked(cli.stats()) == (6, sum(ip_len(f) for f in first[2:] + second[2:]))
        # an upgrade with --flow-budget 0: unlimited
        cli("attach", lab.dut_if, "--flow-budget", "0")
        send_and_receive(lab, third)
    assert cli.stats()["untracked"] == 6
    assert len(cli.json("flows")) == 2 + 2 + 5


def test_upgrade_from_a_version_without_admission_control(lab: Lab, cli: Cli) -> None:
    """An interface attached by a version before admission control has no
    "admission" pin: stats read zero untracked, and attaching again (the
    upgrade) adds the pin and keeps the counters."""
    cli("attach", lab.dut_if, "--flows", "1024")
    root_dir = f"if_{lab.dut_if}"
    os.unlink(os.path.join(cli.pin_root, root_dir, "admission"))
    frames = new_flows(4, 54000)
    send_and_receive(lab, frames)
    assert cli.stats() == {**expect_counters(passed=frames), "untracked": 0, "untracked_bytes": 0}
    (up,) = cli.json("attach", lab.dut_if)
    assert up["replaced"]
    assert f"{root_dir}/admission" in pins_under(cli.pin_root)
    assert cli.stats() == {**expect_counters(passed=frames), "untracked": 0, "untracked_bytes": 0}


def test_bad_flow_budget_is_refused(cli: Cli, lab: Lab) -> None:
    r = cli.run("attach", lab.dut_if, "--flow-budget", "-1")  # argparse: usage, then the error
    assert r.returncode == 2 and "argument --flow-budget: '-1' must be at least 0" in r.stderr, r.stderr
    err = cli.fails(2, "attach", lab.dut_if, "--flow-budget", str(2**32))
    assert "flow budget 4294967296 is not 0 (unlimited) .. 4294967295" in err
    assert pins_under(cli.pin_root) == []


# --- IPFIX -------------------------------------------------------------------


class RawCollector:
    """A UDP socket on 127.0.0.1:COLLECTOR_PORT inside the lab's dut
    namespace, decoding every message strictly (unit/test_ipfix.py's reader)."""

    def __init__(self, ns: str) -> None:
        with netlink.in_netns(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self.sock.bind(("127.0.0.1", COLLECTOR_PORT))
        self.sock.settimeout(0.1)
        self.known: dict[int, list[tuple[int, int]]] = {}
        self.messages: list[Message] = []

    def poll(self) -> list[Message]:
        while True:
            try:
                self.messages.append(decode(self.sock.recv(70000), self.known))
            except TimeoutError:
                return self.messages

    def close(self) -> None:
        self.sock.close()


def test_daemon_exports_reliability_statistics(lab: Lab, pin_root: str) -> None:
    cli = Cli(lab.dut_ns, pin_root)
    frames = new_flows(10, 55000)
    args = (
        "--collector", f"127.0.0.1:{COLLECTOR_PORT}", "--flow-budget", "4",
        "--template-refresh", "1", "--scan-interval", "0.2", "--idle-timeout", "30",
    )  # fmt: skip
    col = RawCollector(lab.dut_ns)
    try:
        with Daemon(lab, pin_root, *args) as d:
            d.wait_ready()
            with one_cpu():
                t_sent = time.time()
                assert lab.send(frames) == len(frames)
                t_done = time.time()
            wait_until(lambda: cli.stats()["packets"] == len(frames), 5, 0.05, "frames counted")
            wait_until(lambda: [m for m in col.poll() if m.stats], 5, 0.1, "reliability statistics")
            assert d.stop() == 0
        with netlink.in_netns(lab.dut_ns):
            ifindex = netlink.ifindex(lab.dut_if)
        msgs = col.poll()
    finally:
        col.close()
    with_stats = [m for m in msgs if m.stats]
    # announced by an options template with two scope fields, before its first record
    first = next(i for i, m in enumerate(msgs) if m.options)
    assert first <= msgs.index(with_stats[0])
    assert msgs[first].options == {258: (2, [(149, 4), (143, 4), (164, 8), (165, 8), (323, 8), (323, 8)])}
    # the totals: domain 1 (the default), this interface, the 6 frames past the budget, IP bytes
    (domain, process, packets, octets, first_ms, last_ms), *_ = with_stats[-1].stats
    assert (domain, process, packets, octets) == (1, ifindex, 6, sum(ip_len(f) for f in frames[4:]))
    assert all(m.domain == 1 and len(m.stats) == 1 for m in with_stats)
    slack = 100  # ms: jiffies to wall time is good to a tick
    assert int(t_sent * 1000) - slack <= first_ms <= last_ms <= int(t_done * 1000) + slack
    assert cli.stats()["untracked"] == 6
