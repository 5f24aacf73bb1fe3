"""`xdpflow attach IFACE --then PROG`: xdpflow first, then every frame it
passes goes to PROG through a tail call, and PROG's verdict is the frame's
fate. Counted by a small pinned XDP program (bpf/test_next.bpf.c) that
counts what it gets and passes it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from xdpflow.bindings.libbpf import Map, Object
from xdpflow.testing.lab import DUT_V4, Lab, traffic_mix
from xdpflow.testing.pktgen import FlowMix, build_frames

from ..clitest import (
    Cli,
    attach_foreign,
    expect_counters,
    raw,
    send_and_receive,
    udp,
    udp4,
    xdp_prog,
)
from ..reltest import Blaster, blasting

LAB_PREFIX = "xfchain"
NEXT_OBJ = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "xdpflow", "bpf", "test_next.bpf.o"
)


class NextProg:
    """test_next loaded and pinned at ``path``; ``seen()`` is its count."""

    def __init__(self, path: str, name: str = "test_next") -> None:
        self.path = path
        self.obj = Object(NEXT_OBJ)
        for p in ("test_next", "test_next_frags"):
            self.obj.set_autoload(p, p == name)
        self.obj.load()
        prog = self.obj.program(name)
        self.id = prog.id
        prog.pin(path)
        prog.close()
        self.counter: Map = self.obj.map("seen", "__u32", "__u64")

    def seen(self) -> int:
        return int(self.counter.sum(0))

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.counter.close()
        self.obj.close()


@pytest.fixture
def make_next(pin_root: str) -> Iterator:
    made: list[NextProg] = []

    def make(tag: str, name: str = "test_next") -> NextProg:
        n = NextProg(f"{pin_root}-{tag}", name)
        made.append(n)
        return n

    try:
        yield make
    finally:
        for n in made:
            n.close()


def settled(cli: Cli, packets: int) -> dict[str, int]:
    deadline = time.monotonic() + 3
    while (stats := cli.stats())["packets"] < packets and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats


def test_then_counts_exactly_what_xdpflow_passed(lab: Lab, cli: Cli, make_next) -> None:
    nxt = make_next("a")
    (r,) = cli.json("attach", lab.dut_if, "--then", nxt.path)
    assert r["attach"] == "link"
    cli("block", "add", "198.51.100.0/24", "2001:db8::/32")
    mix = traffic_mix(lab)
    blocked = [udp("198.51.100.7", DUT_V4, 5000 + i, 53) for i in range(5)]
    assert send_and_receive(lab, mix + blocked) == raw(mix)
    assert cli.stats() == expect_counters(passed=mix, dropped=blocked)
    assert nxt.seen() == len(mix), "the next program must get exactly the frames xdpflow passed"
    (st,) = cli.status()
    assert st["then"] == {"prog_id": nxt.id, "name": "test_next"}
    assert f"{nxt.id} test_next" in cli("status")


def test_swapping_under_traffic_loses_and_duplicates_nothing(lab: Lab, cli: Cli, make_next) -> None:
    a, b = make_next("a"), make_next("b")
    cli("attach", lab.dut_if, "--then", a.path)
    prog = xdp_prog(lab.dut_ns, lab.dut_if)
    cli("block", "add", "198.51.100.0/24")
    passing = build_frames(FlowMix(n_flows=8, families="46"))
    blocked = [bytes(udp("198.51.100.9", DUT_V4, 6000 + i, 53)) for i in range(8)]
    frames = passing + blocked
    blaster = Blaster(lab, frames, len(frames) * 2048, burst=256)
    swaps = []
    with blasting(blaster):
        blaster.wait_first()
        for target in (b, a, b, a, b, a, b):
            t0 = time.monotonic()
            out = cli("attach", lab.dut_if, "--then", target.path)
            swaps.append(time.monotonic() - t0)
            assert out == f"xdpflow on {lab.dut_if}: frames it passes go to program {target.id} (test_next) now\n"
            assert xdp_prog(lab.dut_ns, lab.dut_if) == prog, "a swap of the next program reloads nothing"
            time.sleep(0.05)
            blaster.check()
        sent = blaster.stop()
    stats = settled(cli, sent)
    print(
        f"\n{len(swaps)} swaps under traffic ({max(swaps) * 1000:.0f} ms the slowest command): {sent:,} frames, "
        f"{stats['passed']:,} passed, next programs saw a {a.seen():,} + b {b.seen():,}"
    )
    assert (stats["packets"], stats["passed"], stats["dropped"]) == (sent, sent // 2, sent // 2)
    assert a.seen() > 0 and b.seen() > 0
    assert a.seen() + b.seen() == stats["passed"], "each passed frame reaches exactly one next program"


def test_then_none_restores_plain_passing(lab: Lab, cli: Cli, make_next) -> None:
    nxt = make_next("a")
    cli("attach", lab.dut_if, "--then", nxt.path)
    first = [udp4(sport=41000 + i) for i in range(3)]
    assert send_and_receive(lab, first) == raw(first)
    assert (
        cli("attach", lab.dut_if, "--then", "none")
        == f"xdpflow on {lab.dut_if}: frames it passes pass (no next program) now\n"
    )
    (st,) = cli.status()
    assert st["then"] is None
    later = [udp4(sport=42000 + i) for i in range(4)]
    assert send_and_receive(lab, later) == raw(later)
    assert nxt.seen() == 3
    assert cli.stats()["passed"] == 7


def test_an_upgrade_keeps_the_chain(lab: Lab, cli: Cli, make_next) -> None:
    nxt = make_next("a")
    (first,) = cli.json("attach", lab.dut_if, "--then", nxt.path)
    (up,) = cli.json("attach", lab.dut_if)
    assert up["replaced"] is True and up["prog_id"] != first["prog_id"] and up["attach"] == "link"
    assert xdp_prog(lab.dut_ns, lab.dut_if) == (up["prog_id"], "xdpflow")
    (st,) = cli.status()
    assert st["then"] == {"prog_id": nxt.id, "name": "test_next"}
    frames = [udp4(sport=43000 + i) for i in range(5)]
    assert send_and_receive(lab, frames) == raw(frames)
    assert nxt.seen() == 5


def test_a_next_program_that_is_gone_or_refused(lab: Lab, cli: Cli, make_next, pin_root: str) -> None:
    cli("attach", lab.dut_if)
    missing = f"{pin_root}-nothing"
    err = cli.fails(1, "attach", lab.dut_if, "--then", missing)
    assert err == (
        f"xdpflow: --then {missing}: no such program (gone, or never loaded); `bpftool prog` lists the loaded ones\n"
    )
    assert "no such program" in cli.fails(1, "attach", lab.dut_if, "--then", "id:999999999")
    assert "a program id is a positive number" in cli.fails(2, "attach", lab.dut_if, "--then", "id:x")
    frags = make_next("f", "test_next_frags")
    err = cli.fails(1, "attach", lab.dut_if, "--then", frags.path)
    assert f"the kernel refused program {frags.id} (test_next_frags) as the next program of xdpflow" in err
    assert "xdp.frags" in err
    # xdpflow keeps passing frames itself
    (st,) = cli.status()
    assert st["then"] is None and st["attached"]
    frames = [udp4(sport=44000 + i) for i in range(3)]
    assert send_and_receive(lab, frames) == raw(frames)
    assert cli.stats()["passed"] == 3


def test_keep_a_foreign_program_behind_xdpflow(lab: Lab, cli: Cli) -> None:
    foreign = attach_foreign(lab.dut_ns, lab.dut_if)
    err = cli.fails(1, "attach", lab.dut_if)
    assert f"or keep it: xdpflow attach {lab.dut_if} --then id:{foreign}" in err
    (r,) = cli.json("attach", lab.dut_if, "--then", f"id:{foreign}")
    assert xdp_prog(lab.dut_ns, lab.dut_if) == (r["prog_id"], "xdpflow")
    (st,) = cli.status()
    assert st["then"] == {"prog_id": foreign, "name": "xdp_pass"} and st["attach"] == "link"
    mix = traffic_mix(lab)
    assert send_and_receive(lab, mix) == raw(mix)
    assert cli.stats() == expect_counters(passed=mix)
