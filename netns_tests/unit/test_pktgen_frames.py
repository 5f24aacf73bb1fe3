"""Tests of the traffic generator (xdpflow.testing.pktgen) that need no kernel:
the frames it builds, and how it re-sends what a driver refused, with the
kernel side simulated. Sending on a lab: e2e/test_pktgen.py.
"""

from __future__ import annotations

import errno
import ipaddress
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Dot1Q, Ether

from xdpflow.errors import XdpflowError
from xdpflow.testing import pktgen
from xdpflow.testing.pktgen import FlowMix, build_frames

ALLOWED = [ipaddress.ip_network(n) for n in ("198.18.0.0/15", "2001:2::/48")]


def five_tuple(frame: bytes) -> tuple[str, str, int, int, int]:
    p = Ether(frame)
    ip = p[IP] if IP in p else p[IPv6]
    if TCP in p or UDP in p:
        l4 = p[TCP] if TCP in p else p[UDP]
        return (ip.src, ip.dst, ip.proto if IP in p else ip.nh, l4.sport, l4.dport)
    icmp = p[ICMP] if ICMP in p else p[ICMPv6EchoRequest]
    return (ip.src, ip.dst, 1 if IP in p else 58, icmp.id, 0)


def recomputed(frame: bytes) -> bytes:
    """The frame as scapy builds it with every checksum computed afresh."""
    p = Ether(frame)
    for layer, field in ((IP, "chksum"), (TCP, "chksum"), (UDP, "chksum"), (ICMP, "chksum")):
        if layer in p:
            delattr(p[layer], field)
    if ICMPv6EchoRequest in p:
        del p[ICMPv6EchoRequest].cksum
    return bytes(p)


# --------------------------------------------------------------------------
# frames


def test_64000_flows_build_distinct_and_deterministic() -> None:
    mix = FlowMix(n_flows=64_000, families="46", protocols=("udp", "tcp", "icmp"), size=64)
    t0 = time.perf_counter()
    frames = build_frames(mix)
    print(f"building 64,000 frames took {time.perf_counter() - t0:.2f} s")  # speed: `make bench`, not asserted
    assert len(frames) == 64_000
    # flows differ only in source address, port and checksums: distinct
    # frames within a group mean distinct 5-tuples
    assert len(set(frames)) == 64_000
    assert frames == build_frames(mix)
    # 64 bytes asked; IPv6 + TCP needs 74 for its headers alone
    assert {len(f) for f in frames} == {64, 74}
    sample = sorted({*range(12), *range(0, 64_000, 997), 63_999})
    tuples = [five_tuple(frames[i]) for i in sample]
    assert len(set(tuples)) == len(tuples)
    for i, t in zip(sample, tuples, strict=True):
        version, proto = mix.groups[i % len(mix.groups)]
        j = i // len(mix.groups)
        assert ipaddress.ip_address(t[0]).version == version
        assert t[1] == ("198.18.0.2" if version == 4 else "2001:2::2")
        assert t[3] == pktgen.PORT_BASE + j
        assert any(ipaddress.ip_address(t[0]) in n for n in ALLOWED)
        assert ipaddress.ip_address(t[0]) != ipaddress.ip_address(t[1])


def test_patched_frames_have_correct_checksums() -> None:
    for mix in (
        FlowMix(n_flows=600, families="46", protocols=("udp", "tcp", "icmp"), size=128),
        FlowMix(n_flows=40_000, families="4", protocols=("udp",), vlan=5),
    ):
        frames = build_frames(mix)
        for i in list(range(30)) + list(range(0, mix.n_flows, 401)):
            assert recomputed(frames[i]) == frames[i], f"flow {i}: {Ether(frames[i]).summary()}"


def test_vlan_and_size() -> None:
    frames = build_frames(FlowMix(n_flows=3, families="6", protocols=("tcp",), size=200, vlan=5))
    assert [len(f) for f in frames] == [200] * 3
    p = Ether(frames[2])
    assert p[Dot1Q].vlan == 5 and p[TCP].dport == 80 and p[IPv6].dst == "2001:2::2"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_flows": 0},
        {"families": "5"},
        {"protocols": ("udp", "sctp")},
        {"size": 63},
        {"size": 1515},
        {"vlan": 4095},
        {"src_v4": "10.0.0.0/8"},  # outside the benchmarking ranges
        {"src_v6": "2001:2::/32"},  # reaches beyond 2001:2::/48
        {"dst_v4": "198.18.0.0/24"},
        {"src_mac": "02:00:c6:12:00"},
        {"protocols": "udp"},  # a tuple of names, not a string
    ],
)
def test_flowmix_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(XdpflowError) as e:
        FlowMix(**kwargs)  # type: ignore[arg-type]
    assert e.value.errno == errno.EINVAL


def test_blocklist_example_sources_are_allowed() -> None:
    frames = build_frames(FlowMix(n_flows=4, families="46", src_v4="203.0.113.0/24", src_v6="2001:db8::/64"))
    assert Ether(frames[0])[IP].src == "203.0.113.1"
    assert Ether(frames[1])[IPv6].src == "2001:db8::1"


# --------------------------------------------------------------------------
# re-sending what the driver refused, with the kernel side simulated


class FakeProg:
    """Stands in for xdp_tx: the 'driver' takes up to ``take[i]`` copies on call i."""

    name = "xdp_tx"

    def __init__(self, takes: list[int], counters: FakeCounters, silent: bool = False, interrupt: int = -1) -> None:
        self.takes = takes
        self.counters = counters
        self.silent = silent
        self.interrupt = interrupt  # this call stops early, as on a signal
        self.repeats: list[int] = []

    def test_run(self, frame: bytes, repeat: int, **kwargs: object) -> None:
        self.repeats.append(repeat)
        took = min(repeat, self.takes.pop(0))
        self.counters.taken += took
        if len(self.repeats) - 1 == self.interrupt:
            raise XdpflowError(errno.EINTR, "test-running program xdp_tx: Interrupted system call")
        if not self.silent:
            self.counters.refused += repeat - took


class FakeCounters:
    def __init__(self) -> None:
        self.taken = self.refused = 0

    def read(self) -> tuple[int, int]:
        return self.taken, self.refused


def pusher(prog: FakeProg, counters: FakeCounters) -> pktgen._Pusher:
    return pktgen._Pusher(prog, 1, 64, counters, "xg0")  # type: ignore[arg-type]


def test_refused_copies_are_sent_again() -> None:
    counters = FakeCounters()
    prog = FakeProg([700, 0, 200, 1000], counters)
    p = pusher(prog, counters)
    p.push(b"frame", 1000, 0)
    assert prog.repeats == [1000, 300, 300, 100]
    assert counters.taken == 1000 and p.refused == 300 + 300 + 100 and p.calls == 4


def test_a_test_run_stopped_by_a_signal_is_finished() -> None:
    counters = FakeCounters()
    prog = FakeProg([400, 0, 1000], counters, interrupt=0)
    p = pusher(prog, counters)
    p.push(b"frame", 1000, 0)
    assert prog.repeats == [1000, 600, 600] and counters.taken == 1000 and p.refused == 600


def test_plan() -> None:
    assert pktgen._plan([3, 2, 0], None) == [(0, 3), (1, 2)]
    assert pktgen._plan([3, 2, 0], 2) == [(0, 2), (1, 2), (0, 1)]
    big = pktgen.MAX_REPEAT
    assert pktgen._plan([2 * big + 1], None) == [(0, big), (0, big), (0, 1)]
    assert pktgen._shares(3, 7) == [3, 2, 2]


def test_frames_dropped_uncounted_raise_enxio() -> None:
    counters = FakeCounters()
    p = pusher(FakeProg([0], counters, silent=True), counters)
    with pytest.raises(XdpflowError) as e:
        p.push(b"frame", 10, 0)
    assert e.value.errno == errno.ENXIO


def test_a_frame_refused_again_and_again_raises_enobufs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pktgen.time, "sleep", lambda s: None)
    counters = FakeCounters()
    p = pusher(FakeProg([0] * pktgen._Pusher.STALLS, counters), counters)
    with pytest.raises(XdpflowError) as e:
        p.push(b"frame", 10, 7)
    assert e.value.errno == errno.ENOBUFS and "frame 7" in str(e.value)


def test_another_sender_raises_ebusy() -> None:
    counters = FakeCounters()
    prog = FakeProg([10], counters)
    p = pusher(prog, counters)
    counters.taken += 5  # someone else's frames
    with pytest.raises(XdpflowError) as e:
        p.push(b"frame", 10, 0)
    assert e.value.errno == errno.EBUSY


class FakeSocket:
    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.sent: list[bytes] = []

    def send(self, frame: bytes) -> int:
        if self.refusals:
            self.refusals -= 1
            raise OSError(errno.ENOBUFS, "No buffer space available")
        self.sent.append(frame)
        return len(frame)


def test_send_exact_retries_a_refused_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pktgen.time, "sleep", lambda s: None)
    sock = FakeSocket(refusals=3)
    assert pktgen._send_one(sock, b"frame", "xg0", 0, 1.0) == 4  # type: ignore[arg-type]
    assert sock.sent == [b"frame"]
