"""xdpflow attached through a pinned bpf_link: it follows the interface
through renames and moves to other namespaces, an earlier netlink
attachment moves to a link with the shortest possible gap, and a kill -9 of
`xdpflow attach` at any point never leaves the interface without a program.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from xdpflow.bindings import netlink
from xdpflow.bindings.libbpf import Link, Object
from xdpflow.testing.lab import Lab, run_in_netns, set_gro
from xdpflow.testing.lab import _wait_link_ready as wait_link_ready
from xdpflow.testing.pktgen import FlowMix, build_frames

from ..clitest import BASELINE_OBJ, Cli, pins_under, udp4, wait_prog_gone, xdp_prog
from ..reltest import Blaster, blasting
from .conftest import ip

LAB_PREFIX = "xflink"

# `xdpflow attach` as an earlier xdpflow (or a kernel without XDP links) did
# it: through netlink
NETLINK_ATTACH = """
import sys
from xdpflow.app import cli
from xdpflow.dataplane import attachment
attachment.create_link = lambda *args, **kwargs: False
sys.exit(cli.main(sys.argv[1:]))
"""


def netlink_attach(cli: Cli, ifname: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", NETLINK_ATTACH, *cli.argv("attach", ifname, "--json")[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    (res,) = json.loads(r.stdout)
    assert res["attach"] == "netlink"
    return res  # type: ignore[no-any-return]


def test_status_follows_a_rename_and_a_move(lab: Lab, cli: Cli, pin_root: str, other_ns: str) -> None:
    (r,) = cli.json("attach", lab.dut_if)
    assert r["attach"] == "link"
    new = "xr" + lab.dut_if[2:]
    ip("-n", lab.dut_ns, "link", "set", "dev", lab.dut_if, "down")
    ip("-n", lab.dut_ns, "link", "set", "dev", lab.dut_if, "name", new)
    ip("-n", lab.dut_ns, "link", "set", "dev", new, "up")
    run_in_netns(lab.dut_ns, wait_link_ready, new, 5.0)
    (st,) = cli.status()
    want = {"ifname": lab.dut_if, "attached": True, "mode": "native", "prog_id": r["prog_id"], "attach": "link"}
    assert {k: st[k] for k in want} == want
    assert (st["current_ifname"], st["netns"]) == (new, None)
    assert f"{lab.dut_if} (now {new})" in cli("status")

    ip("-n", lab.dut_ns, "link", "set", "dev", new, "netns", other_ns)
    assert xdp_prog(other_ns, new) == (r["prog_id"], "xdpflow")
    (st,) = cli.status()
    assert {k: st[k] for k in want} == want
    assert (st["current_ifname"], st["netns"]) == (new, other_ns)
    assert f"{lab.dut_if} (now {new} in namespace {other_ns})" in cli("status")
    # seen from the namespace it is in, the same
    (there,) = Cli(other_ns, pin_root).status()
    assert (there["attached"], there["current_ifname"], there["netns"]) == (True, new, None)

    assert cli("detach", lab.dut_if) == f"detached xdpflow from {lab.dut_if} (now {new} in namespace {other_ns})\n"
    assert xdp_prog(other_ns, new) is None
    assert pins_under(pin_root) == []
    assert wait_prog_gone(r["prog_id"])


def test_a_netlink_attachment_moves_to_a_link(lab: Lab, cli: Cli, pin_root: str) -> None:
    old = netlink_attach(cli, lab.dut_if)
    (st,) = cli.status()
    assert (st["attached"], st["attach"]) == (True, "netlink")
    assert "link" not in pins_under(pin_root + "/if_" + lab.dut_if)
    # GRO on: without a program the veth still takes the frames (the stack
    # gets them), so frames the switch lets by arrive uncounted, not refused
    set_gro(lab.dut_ns, lab.dut_if, True)
    frames = build_frames(FlowMix(n_flows=4, families="4"))
    blaster = Blaster(lab, frames, len(frames) * 4096, burst=256)
    with blasting(blaster):
        blaster.wait_first()
        time.sleep(0.1)
        out = cli("attach", lab.dut_if)
        time.sleep(0.1)
        sent = blaster.stop()
    assert "through bpf_link; moved from netlink" in out, out
    gap_us = int(out.split("moved from netlink, ")[1].split(" us")[0])
    deadline = time.monotonic() + 3
    while (stats := cli.stats())["packets"] < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    unseen = sent - stats["packets"]
    print(
        f"\nnetlink -> link under traffic: {gap_us} us from the detach to the link, "
        f"{unseen} of {sent:,} frames ({blaster.calls} calls) seen by no program"
    )
    # the kernel waits for RCU grace periods in both steps (~8-16 ms each here)
    assert gap_us < 200_000
    assert 0 <= unseen < sent // 20, "the switch may miss only the frames of its few milliseconds"
    (st,) = cli.status()
    assert (st["attached"], st["attach"]) == (True, "link") and st["prog_id"] != old["prog_id"]
    assert "link" in pins_under(pin_root + "/if_" + lab.dut_if)


def test_kill_9_of_attach_never_leaves_the_interface_without_a_program(lab: Lab, cli: Cli, pin_root: str) -> None:
    rng = random.Random(13)
    netlink_attach(cli, lab.dut_if)
    t0 = time.monotonic()
    cli("attach", lab.dut_if)  # the move, unkilled: how long it takes
    took = time.monotonic() - t0
    kills = {"netlink": 0, "link": 0}
    outcome = {"old program": 0, "new program": 0}
    for i in range(12):
        start = "netlink" if i % 2 == 0 else "link"
        cli("detach", lab.dut_if)
        if start == "netlink":
            netlink_attach(cli, lab.dut_if)
        else:
            cli("attach", lab.dut_if)
        before = xdp_prog(lab.dut_ns, lab.dut_if)
        assert before is not None and before[1] == "xdpflow"
        p = cli.popen("attach", lab.dut_if)
        time.sleep(rng.uniform(0, took * 1.2))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
        time.sleep(0.3)  # a switch the killed command started finishes on its own
        after = xdp_prog(lab.dut_ns, lab.dut_if)
        assert after is not None and after[1] == "xdpflow", (
            f"kill {i} ({start}): {lab.dut_if} runs no xdpflow program (had {before})"
        )
        kills[start] += 1
        outcome["old program" if after == before else "new program"] += 1
    print(
        f"\nkill -9 of attach: {kills} kills at random points in {took:.2f} s, leaving {outcome}; "
        "the interface always ran xdpflow"
    )
    # the pins settle with the next command; it still counts
    (r,) = cli.json("attach", lab.dut_if)
    (st,) = cli.status()
    assert (st["attached"], st["prog_id"], st["attach"]) == (True, r["prog_id"], "link")
    frame = udp4()
    assert lab.send([frame]) == 1
    time.sleep(0.2)
    assert cli.stats()["packets"] >= 1
    cli("detach", lab.dut_if)
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None


def test_a_program_held_by_another_link_is_left_alone(lab: Lab, cli: Cli, pin_root: str) -> None:
    pin = f"{pin_root}-foreign-link"
    with Object(BASELINE_OBJ) as obj:
        obj.load()
        prog = obj.program("xdp_pass")
        with netlink.in_netns(lab.dut_ns):
            link = Link.xdp(prog.fd, netlink.ifindex(lab.dut_if))
        link.pin(pin)
        link.close()
        prog_id = prog.id
        prog.close()
    try:
        for args in ((), ("--force",), ("--then", f"id:{prog_id}")):
            err = cli.fails(1, "attach", lab.dut_if, *args)
            assert f"runs another XDP program (id {prog_id}) held by another tool's bpf_link" in err, err
            assert xdp_prog(lab.dut_ns, lab.dut_if) == (prog_id, "xdp_pass")
        assert pins_under(pin_root) == []
    finally:
        os.unlink(pin)
