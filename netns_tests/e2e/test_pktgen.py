"""Tests of the traffic generator (xdpflow.testing.pktgen), on a namespace lab.

The receiver is ``xdp_drop`` from baseline.bpf.o, attached natively to the
dut end: a veth counts every frame its XDP program ran on in the interface's
rx_packets (IFLA_STATS64), and frames its ring refused in rx_dropped, so the
count is exact at any rate. An AF_PACKET capture (lab.Receiver behind
xdp_pass) is exact too but only while its socket buffer keeps up: it lost
about 60 % of a 1,000,000-frame blast here. It is used below only where order
and content matter, on a few frames.

Frame building and the re-sending logic need no kernel: unit/test_pktgen_frames.py.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from xdpflow.bindings import netlink
from xdpflow.bindings.libbpf import Object, Program
from xdpflow.dataplane import abi
from xdpflow.errors import XdpflowError
from xdpflow.testing import pktgen
from xdpflow.testing.lab import Lab
from xdpflow.testing.pktgen import FlowMix, blast, build_frames, send_exact

LAB_PREFIX = "xfpg"


@pytest.fixture(scope="module")
def baseline() -> Iterator[Object]:
    with Object(abi.object_path("baseline")) as obj:
        obj.load()
        yield obj


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(prefix=LAB_PREFIX) as lab:
        yield lab


@contextlib.contextmanager
def on_dut(lab: Lab, baseline: Object, name: str) -> Iterator[Program]:
    """Attach baseline's program ``name`` natively to dut_if; always detach."""
    prog = baseline.program(name)
    try:
        with netlink.in_netns(lab.dut_ns):
            netlink.attach(lab.dut_if, prog.fd, "native")
        try:
            yield prog
        finally:
            with netlink.in_netns(lab.dut_ns):
                netlink.detach(lab.dut_if)
    finally:
        prog.close()


def dut_rx(lab: Lab) -> tuple[int, int]:
    """(rx_packets, rx_dropped) of dut_if."""
    with netlink.in_netns(lab.dut_ns), IPRoute() as ipr:
        (link,) = ipr.get_links(ifname=lab.dut_if)
        stats = link.get_attr("IFLA_STATS64")
        return stats["rx_packets"], stats["rx_dropped"]


def settled_rx(lab: Lab, want: int, before: tuple[int, int]) -> tuple[int, int]:
    """dut_if's counters since ``before``, once ``want`` frames arrived or 1 s passed.

    XDP_TX frames sit in the peer's ring until its NAPI poll runs, which can
    be a little after the sending call returned.
    """
    deadline = time.monotonic() + 1.0
    while True:
        now = dut_rx(lab)
        got = (now[0] - before[0], now[1] - before[1])
        if got[0] >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.01)


# --------------------------------------------------------------------------
# sending, on a lab


def test_blast_1000_flows_arrive_exactly(lab: Lab, baseline: Object) -> None:
    frames = build_frames(FlowMix(n_flows=1000, families="46", protocols=("udp", "tcp", "icmp")))
    with on_dut(lab, baseline, "xdp_drop"):
        before = dut_rx(lab)
        r = blast(lab.gen_if, frames, 100_000, netns=lab.gen_ns)
        got, refused = settled_rx(lab, 100_000, before)
    assert r.counted
    assert r.sent == r.requested == 100_000
    assert r.calls >= 1000  # one per distinct frame, more if copies were refused
    assert got == 100_000
    # copies the ring refused were counted as drops by dut, and sent again
    assert refused == r.refused
    assert r.pps > 0


def test_blast_remainder_and_burst_order(lab: Lab, baseline: Object) -> None:
    frames = build_frames(FlowMix(n_flows=3))
    with on_dut(lab, baseline, "xdp_pass"), lab.receiver() as rx:
        r = blast(lab.gen_if, frames, 7, netns=lab.gen_ns, burst=1)
        received = rx.stop()
    assert r.sent == 7 and r.calls >= 7
    # 7 = 3 + 2 + 2; burst 1 deals them in rounds
    assert received == [frames[0], frames[1], frames[2]] * 2 + [frames[0]]


def test_send_exact_50(lab: Lab, baseline: Object) -> None:
    frames = build_frames(FlowMix(n_flows=50, families="46", protocols=("udp", "icmp")))
    with on_dut(lab, baseline, "xdp_drop"):
        before = dut_rx(lab)
        r = send_exact(lab, None, frames, 50)
        got, dropped = settled_rx(lab, 50, before)
    assert r.sent == 50 and got == 50 and dropped == 0


def test_send_exact_in_order(lab: Lab, baseline: Object) -> None:
    frames = build_frames(FlowMix(n_flows=20, families="46", protocols=("tcp", "udp")))
    with on_dut(lab, baseline, "xdp_pass"), lab.receiver() as rx:
        assert send_exact(lab.gen_ns, lab.gen_if, frames, 30).sent == 30
        received = rx.stop()
    assert received == frames + frames[:10]


def test_blast_without_a_receiving_program_says_so(lab: Lab) -> None:
    # a veth whose peer runs no XDP program (GRO off) drops XDP frames uncounted
    frames = build_frames(FlowMix(n_flows=2))
    with pytest.raises(XdpflowError) as e:
        blast(lab.gen_if, frames, 1000, netns=lab.gen_ns)
    assert e.value.errno == errno.ENXIO
    assert "xdp_pass" in str(e.value)


def test_blast_errors() -> None:
    frames = build_frames(FlowMix())
    with pytest.raises(XdpflowError) as e:
        blast("xfpg-none", frames, 10, netns="xfpg-no-such-netns")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(XdpflowError) as e:
        blast("lo", frames, 10, batch_size=257)
    assert e.value.errno == errno.EINVAL


def test_cli(lab: Lab, baseline: Object, capsys: pytest.CaptureFixture[str]) -> None:
    with on_dut(lab, baseline, "xdp_drop"):
        before = dut_rx(lab)
        argv = ["--netns", lab.gen_ns, "--dev", lab.gen_if, "--flows", "100", "--family", "46"]
        assert pktgen.main([*argv, "--proto", "udp,tcp", "--count", "20000", "--vlan", "5"]) == 0
        assert pktgen.main([*argv, "--proto", "icmp", "--count", "25", "--exact"]) == 0
        got, _ = settled_rx(lab, 20_025, before)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sent 20000 frames in ") and " pps " in out[0]
    assert out[1].startswith("sent 25 frames in ")
    assert got == 20_025
    assert pktgen.main(["--dev", "x", "--size", "10"]) == 2
    assert pktgen.main(["--netns", lab.gen_ns, "--dev", "nosuchdev", "--count", "1"]) == 1
    assert "no interface named 'nosuchdev'" in capsys.readouterr().err
