"""xdp_vary (bpf/baseline.bpf.c), the benchmarks' flood of new tuples in one
test run: each run bumps the UDP source port (carrying into the source
address's low byte) and hands the frame to the program in vary_next. The
back-to-back rows of BENCHMARKS.md are only as good as this: every run
a tuple of its own, and the frame otherwise untouched."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from xdpflow.bindings.libbpf import Object
from xdpflow.dataplane import abi

from ..frames import ether, read_flows
from ..progtest import ProgHarness


@pytest.fixture
def vary() -> Iterator[tuple[Object, ProgHarness]]:
    base = Object(abi.object_path("baseline"))
    h = ProgHarness()
    try:
        base.load()
        yield base, h
    finally:
        h.close()
        base.close()


def frame(src: str, sport: int) -> bytes:
    return bytes(ether() / IP(src=src, dst="198.18.0.2") / UDP(sport=sport, dport=2048) / Raw(b"\0" * 18))


def run(base: Object, h: ProgHarness, data: bytes, repeat: int) -> None:
    slots = base.map("vary_next", "__u32", "__u32", abi.ffi)
    prog = base.program("xdp_vary")
    try:
        slots[0] = h.prog.fd
        prog.test_run(data, repeat=repeat, data_out=False)
    finally:
        prog.close()
        slots.close()


def test_each_run_is_a_tuple_of_its_own(vary: tuple[Object, ProgHarness]) -> None:
    base, h = vary
    run(base, h, frame("198.18.0.1", 65000), 1000)
    flows = read_flows(h)
    want = set()
    for i in range(1, 1001):
        port = 65000 + i
        src = ipaddress.ip_address("198.18.0.1") + (port >> 16)
        want.add((4, src.packed, bytes([198, 18, 0, 2]), port & 0xFFFF, 2048, 17))
    assert set(flows) == want
    # one frame each, every byte as sent: the IP length is the frame's
    assert {tuple(v[:2]) for v in flows.values()} == {(1, len(frame("198.18.0.1", 1)) - 14)}
