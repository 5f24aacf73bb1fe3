"""The `xdpflow` command end to end: attach, count, flows, status, upgrade in
place, foreign programs, detach, and independent pin roots.

Each test builds a fresh namespace lab, drives the installed console script
inside its dut namespace and checks exact counts against the frames sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from xdpflow.testing.lab import Lab, traffic_mix

from ..clitest import (
    FLOWS_MAX,
    RULES_MAX,
    Cli,
    all_ok,
    assert_one_error_line,
    attach_foreign,
    detach_link_of,
    expect_counters,
    expect_flows,
    fresh_lab,
    key_of,
    pins_under,
    raw,
    send_and_receive,
    tcp,
    together,
    udp,
    udp4,
    wait_prog_gone,
    without_times,
    xdp_prog,
)
from .conftest import cleanup_pin_root

IFACE_PINS = ["admission", "counters", "flows_v4", "flows_v6", "link", "next_prog", "prog", "take"]


@pytest.fixture
def lab2() -> Iterator[Lab]:
    yield from fresh_lab()


@pytest.fixture
def pin_root2() -> Iterator[str]:
    root = f"/sys/fs/bpf/xftest-{uuid.uuid4().hex[:10]}"
    try:
        yield root
    finally:
        cleanup_pin_root(root)


def iface_pins(ifname: str) -> list[str]:
    return [f"if_{ifname}"] + [f"if_{ifname}/{n}" for n in IFACE_PINS]


def test_attach_counts_the_mix_exactly(lab: Lab, cli: Cli) -> None:
    t0 = time.time()
    (attached,) = cli.json("attach", lab.dut_if)  # --mode auto: the kernel picks native on a veth
    running = xdp_prog(lab.dut_ns, lab.dut_if)
    assert running is not None and running[1] == "xdpflow"
    prog_id = running[0]
    assert attached == {"ifname": lab.dut_if, "prog_id": prog_id, "mode": "native", "replaced": False, "attach": "link"}
    mix = traffic_mix(lab)
    assert send_and_receive(lab, mix) == raw(mix)
    t1 = time.time()

    stats, flows, status, status_text, stats_text, flows_text = cli.json_all(("stats",), ("flows",), ("status",)) + [
        r.stdout for r in cli.run_all(("status",), ("stats",), ("flows",))
    ]
    stats = stats[lab.dut_if]
    assert stats == expect_counters(passed=mix)
    # the same, spelled out for the documented mix
    assert (stats["packets"], stats["passed"], stats["dropped"]) == (12, 12, 0)
    assert (stats["ipv4"], stats["ipv6"], stats["tcp"], stats["udp"], stats["icmp"]) == (8, 4, 4, 6, 2)
    assert stats["bytes"] == sum(len(bytes(f)) for f in mix) == 892
    assert stats["ipv4_bytes"] + stats["ipv6_bytes"] == stats["bytes"]

    assert without_times(flows) == expect_flows(mix, lab.dut_if)
    by_key = {key_of(f): f for f in flows}
    assert by_key[(lab.gen_v4, lab.dut_v4, 40002, 80, 6)]["tcp_flags"] == "FSA"
    assert by_key[(lab.gen_v4, lab.dut_v4, 40002, 80, 6)]["bytes"] == 3 * 40
    assert by_key[(lab.gen_v4, lab.dut_v4, 40000, 9000, 17)]["bytes"] == 60 + 61 + 62
    assert by_key[(lab.gen_v6, lab.dut_v6, 40000, 9000, 17)]["bytes"] == 80 + 81
    assert by_key[(lab.gen_v6, lab.dut_v6, 40002, 80, 6)]["tcp_flags"] == "S"
    assert by_key[(lab.gen_v4, lab.dut_v4, 8, 0, 1)]["packets"] == 1  # ICMP echo: type 8, code 0
    assert by_key[(lab.gen_v6, lab.dut_v6, 128, 0, 58)]["bytes"] == 40 + 8 + 32
    for f in flows:
        # coarse kernel clock (one jiffy) and a conversion to wall time
        assert t0 - 1 <= f["first_seen"] <= t1 + 1, f
        assert t0 - 1 <= f["last_seen"] <= t1 + 1, f
        assert f["first_seen"] <= f["last_seen"], f
        if f["packets"] == 1:
            # one kernel stamp: converted to wall time, both must still agree
            assert f["first_seen"] == f["last_seen"], f
    # default order: most packets first
    assert [f["packets"] for f in flows] == sorted((f["packets"] for f in flows), reverse=True)

    (st,) = status
    now = time.time()
    assert st == {
        "ifname": lab.dut_if,
        "mode": "native",
        "prog_id": prog_id,
        "attached": True,
        "attached_at": st["attached_at"],
        "attach": "link",
        "current_ifname": lab.dut_if,
        "netns": None,
        "then": None,
        "sink": False,
        "flows": 7,
        "flows_max": FLOWS_MAX,
        "blocklist": 0,
        "blocklist_max": RULES_MAX,
        "monitor": False,
    }
    assert now - 60 < st["attached_at"] <= now

    # the human views say the same
    assert status_text.splitlines()[1].split()[:3] == [lab.dut_if, "native", str(prog_id)]
    assert "7/524288" in status_text
    assert status_text.splitlines()[2] == "blocklist: 0/524288 rules, monitor mode off"
    rows = {line.split()[0]: line.split()[1:] for line in stats_text.splitlines()[2:]}
    assert rows["packets"] == ["12", "892"] and rows["ipv6"] == ["4", str(stats["ipv6_bytes"])]
    assert any(
        line.split()[:3] == [lab.dut_if, "tcp", f"{lab.gen_v4}:40002"] and "FSA" in line.split()
        for line in flows_text.splitlines()
    )


def test_flows_top_sort_and_filter(lab: Lab, cli: Cli) -> None:
    cli("attach", lab.dut_if, "--flows", "1024")
    # packets: a > c > b > d; bytes: b > d > c > a; sent d, b, a, c, a jiffy
    # (4 ms at HZ=250) and more apart, so last seen: c > a > b > d
    a = [udp(lab.gen_v4, lab.dut_v4, 41000, 9000, payload=10)] * 5
    b = [udp("198.19.0.7", lab.dut_v4, 41001, 9000, payload=1000)] * 2
    c = [tcp(lab.gen_v6, lab.dut_v6, 41002, 80, flags="PA", payload=100)] * 3
    d = [udp("2001:2:0:1::7", lab.dut_v6, 41003, 9000, payload=600)]
    for batch in (d, b, a, c):
        assert send_and_receive(lab, batch) == raw(batch)
        time.sleep(0.05)
    want = {name: expect_flows(frames, lab.dut_if)[0] for name, frames in zip("abcd", (a, b, c, d), strict=True)}
    assert [want[n]["bytes"] for n in "abcd"] == [5 * 38, 2 * 1028, 3 * 160, 648]
    assert want["c"]["tcp_flags"] == "PA"

    by_key = {key_of(w): n for n, w in want.items()}
    queries = {
        (): "acbd",  # most packets first
        ("--sort", "packets"): "acbd",
        ("--top", "2"): "ac",
        ("--sort", "bytes"): "bdca",
        ("--sort", "last-seen"): "cabd",
        ("--sort", "last-seen", "--top", "3"): "cab",
        ("--filter", "198.19.0.0/16"): "b",  # matches the source
        ("--filter", f"{lab.dut_v4}/32"): "ab",  # matches the destination
        ("--filter", "198.18.0.0/15", "--top", "1"): "a",
        ("--filter", lab.gen_v6): "c",  # a bare address is a /128
        ("--filter", "2001:2:0:1::/65"): "d",  # not on a byte boundary
        ("--filter", "2001:2::/48", "--sort", "bytes"): "dc",
        ("--filter", "0.0.0.0/0", "--sort", "last-seen"): "ab",
        ("--filter", "2001:db8::/32"): "",
    }
    *results, bad_host_bits, bad_plen = cli.run_all(
        *[("flows", *q, "--json") for q in queries],
        ("flows", "--filter", "198.51.100.7/24"),
        ("flows", "--filter", "2001:2::/129"),
    )
    for (query, letters), listed in zip(queries.items(), map(json.loads, all_ok(results)), strict=True):
        # each entry exact, then the order as letters
        for f in listed:
            assert without_times([f]) == [want[by_key[key_of(f)]]], (query, f)
        assert "".join(by_key[key_of(f)] for f in listed) == letters, query
    assert (bad_host_bits.returncode, bad_host_bits.stderr) == (
        2,
        "xdpflow: --filter: '198.51.100.7/24' has host bits set; did you mean 198.51.100.0/24?\n",
    )
    assert bad_plen.returncode == 2
    assert_one_error_line(bad_plen.stderr)


def test_reattach_upgrades_in_place_and_keeps_state(lab: Lab, cli: Cli) -> None:
    (first,) = cli.json("attach", lab.dut_if, "--mode", "native", "--flows", "1024")
    cli("block", "add", "198.51.100.0/24", "2001:db8::/32")
    mix = traffic_mix(lab)
    blocked = [udp("198.51.100.1", lab.dut_v4, 5001, 53), udp("2001:db8::1", lab.dut_v6, 5002, 53)]
    assert send_and_receive(lab, mix + blocked) == raw(mix)
    stats, flows, listing = cli.state()
    assert stats == expect_counters(passed=mix, dropped=blocked)
    assert listing == [("198.51.100.0/24", "src", 1), ("2001:db8::/32", "src", 1)]

    (second,) = cli.json("attach", lab.dut_if)
    assert second["replaced"] is True and second["mode"] == "native"
    assert second["prog_id"] != first["prog_id"]
    assert xdp_prog(lab.dut_ns, lab.dut_if) == (second["prog_id"], "xdpflow")
    (st,), (stats2, flows2, listing2) = cli.status(), cli.state()
    assert (st["prog_id"], st["attached"], st["mode"]) == (second["prog_id"], True, "native")
    assert (st["flows"], st["flows_max"], st["blocklist"]) == (7, 1024, 2)
    assert (stats2, without_times(flows2), listing2) == (stats, without_times(flows), listing)
    # the same kernel stamps; each command converts them to wall time anew, to
    # within a tick, with the HZ the new attach measured (once 1 in 4 wrong)
    seen = {key_of(f): (f["first_seen"], f["last_seen"]) for f in flows}
    for f in flows2:
        assert f["first_seen"] == pytest.approx(seen[key_of(f)][0], abs=0.02), f
        assert f["last_seen"] == pytest.approx(seen[key_of(f)][1], abs=0.02), f
    assert wait_prog_gone(first["prog_id"]), "the replaced program is still loaded"

    # the new program keeps counting into the same maps and blocking with the same rules
    assert send_and_receive(lab, mix + blocked) == raw(mix)
    stats, flows, listing = cli.state()
    assert stats == expect_counters(passed=mix + mix, dropped=blocked + blocked)
    assert without_times(flows) == expect_flows(mix + mix, lab.dut_if)
    assert listing == [("198.51.100.0/24", "src", 2), ("2001:db8::/32", "src", 2)]

    # a mode change or a new table size is not an upgrade; nothing changes
    skb, resize = cli.run_all(("attach", lab.dut_if, "--mode", "skb"), ("attach", lab.dut_if, "--flows", "4096"))
    assert (skb.returncode, resize.returncode) == (1, 1)
    assert skb.stderr == f"xdpflow: xdpflow runs on {lab.dut_if} in native mode; detach it first to change to skb\n"
    assert resize.stderr == (
        f"xdpflow: {lab.dut_if} already has flow tables for 1024 flows; detach it first to resize them to 4096\n"
    )
    (st,) = cli.status()
    assert (st["prog_id"], st["attached"], st["mode"]) == (second["prog_id"], True, "native")


def test_upgrade_keeps_sink_mode(lab: Lab, cli: Cli) -> None:
    cli("attach", lab.dut_if, "--sink", "--flows", "1024")
    frame = udp4()
    assert send_and_receive(lab, [frame]) == []
    cli("attach", lab.dut_if)
    assert send_and_receive(lab, [frame]) == []
    (st,), stats = cli.json_all(("status",), ("stats",))
    assert stats[lab.dut_if]["sunk"] == 2
    assert st["sink"] is True


def test_foreign_program_is_refused_unless_forced(lab: Lab, cli: Cli, pin_root: str) -> None:
    foreign = attach_foreign(lab.dut_ns, lab.dut_if)
    err = cli.fails(1, "attach", lab.dut_if)
    assert err == (
        f"xdpflow: {lab.dut_if} runs another XDP program (id {foreign}); use --force to replace it, "
        f"detach it with `ip link set dev {lab.dut_if} xdp off`, "
        f"or keep it: xdpflow attach {lab.dut_if} --then id:{foreign}\n"
    )
    assert xdp_prog(lab.dut_ns, lab.dut_if) == (foreign, "xdp_pass")
    assert not os.path.exists(pin_root), pins_under(pin_root)

    (r,) = cli.json("attach", lab.dut_if, "--force", "--flows", "1024")
    assert r["replaced"] is False and r["prog_id"] != foreign
    assert xdp_prog(lab.dut_ns, lab.dut_if) == (r["prog_id"], "xdpflow")
    mix = traffic_mix(lab)
    assert send_and_receive(lab, mix) == raw(mix)
    (st,), stats = cli.json_all(("status",), ("stats",))
    assert (st["prog_id"], st["attached"], st["mode"]) == (r["prog_id"], True, "native")
    assert stats[lab.dut_if] == expect_counters(passed=mix)
    assert wait_prog_gone(foreign)

    # the bpf_link keeps netlink tools from removing it; only the link can go
    off = ["ip", "-n", lab.dut_ns, "link", "set", "dev", lab.dut_if, "xdp", "off"]
    assert subprocess.run(off, capture_output=True).returncode != 0
    assert xdp_prog(lab.dut_ns, lab.dut_if) == (r["prog_id"], "xdpflow")
    # replaced behind our back: status says so, detach leaves the other program alone
    detach_link_of(r["prog_id"])
    other = attach_foreign(lab.dut_ns, lab.dut_if)
    status, text, again = cli.run_all(("status", "--json"), ("status",), ("attach", lab.dut_if))
    (st,) = json.loads(status.stdout)
    assert (st["attached"], st["mode"], st["prog_id"]) == (False, None, r["prog_id"])
    assert "NOT ATTACHED" in text.stdout
    assert again.returncode == 1 and f"runs another XDP program (id {other})" in again.stderr
    cli("detach", lab.dut_if)
    assert xdp_prog(lab.dut_ns, lab.dut_if) == (other, "xdp_pass")
    assert not os.path.exists(pin_root)


def test_detach_leaves_nothing_and_the_last_takes_the_blocklist(lab: Lab, lab2: Lab, pin_root: str) -> None:
    one, two = Cli.of(lab, pin_root), Cli.of(lab2, pin_root)
    (a,) = one.json("attach", lab.dut_if, "--flows", "1024")  # creates the shared maps
    (b,) = two.json("attach", lab2.dut_if, "--flows", "1024")
    one("block", "add", "198.51.100.0/24")
    pins = pins_under(pin_root)
    mine, theirs = iface_pins(lab.dut_if), iface_pins(lab2.dut_if)
    shared = [p for p in pins if not p.startswith("if_")]
    assert {"config", "bl4_src", "bl6_dst", "rule_hits", "events"} <= set(shared)
    assert pins == sorted(shared + mine + theirs)
    assert [s["ifname"] for s in two.status()] == sorted([lab.dut_if, lab2.dut_if])

    assert one("detach", lab.dut_if) == f"detached xdpflow from {lab.dut_if}\n"
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None
    assert pins_under(pin_root) == sorted(shared + theirs)
    # the blocklist is shared: it stays, and keeps working on the other interface
    ok, bad = udp(lab2.gen_v4, lab2.dut_v4), udp("198.51.100.9", lab2.dut_v4, 5001, 53)
    assert send_and_receive(lab2, [ok, bad]) == raw([ok])
    (st,), (stats, _flows, listing) = two.status(), two.state()
    assert (st["ifname"], st["attached"], st["blocklist"]) == (lab2.dut_if, True, 1)
    assert stats == expect_counters(passed=[ok], dropped=[bad])
    assert listing == [("198.51.100.0/24", "src", 1)]
    # nothing filters the detached interface any more
    assert send_and_receive(lab, [bad]) == raw([bad])
    assert wait_prog_gone(a["prog_id"])

    two("detach", lab2.dut_if)
    assert xdp_prog(lab2.dut_ns, lab2.dut_if) is None
    assert not os.path.exists(pin_root), pins_under(pin_root)
    assert send_and_receive(lab2, [bad]) == raw([bad])
    assert wait_prog_gone(b["prog_id"])
    status, detach = two.run_all(("status", "--json"), ("detach", lab2.dut_if))
    assert json.loads(status.stdout) == []
    assert detach.returncode == 1
    assert detach.stderr == f"xdpflow: xdpflow is not attached to {lab2.dut_if} (pin root {pin_root})\n"
    assert not os.path.exists(pin_root)


def test_two_pin_roots_are_independent(lab: Lab, lab2: Lab, pin_root: str, pin_root2: str) -> None:
    one, two = Cli.of(lab, pin_root), Cli.of(lab2, pin_root2)
    all_ok(
        together(
            (one, ("attach", lab.dut_if, "--flows", "1024")),
            (two, ("attach", lab2.dut_if, "--flows", "1024")),
        )
    )
    all_ok(together((one, ("block", "add", "198.51.100.0/24")), (two, ("block", "add", "--dst", "203.0.113.9"))))
    one("monitor", "on")
    s1, s2 = (json.loads(out) for out in all_ok(together((one, ("status", "--json")), (two, ("status", "--json")))))
    assert [(s["ifname"], s["blocklist"], s["monitor"]) for s in s1] == [(lab.dut_if, 1, True)]
    assert [(s["ifname"], s["blocklist"], s["monitor"]) for s in s2] == [(lab2.dut_if, 1, False)]

    one("monitor", "off")
    from_blocked = udp("198.51.100.9", "198.18.0.2", 5001, 53)
    to_blocked = udp("198.18.0.1", "203.0.113.9", 5002, 53)
    assert send_and_receive(lab, [from_blocked, to_blocked]) == raw([to_blocked])
    assert send_and_receive(lab2, [from_blocked, to_blocked]) == raw([from_blocked])
    (stats1, flows1, list1), (stats2, flows2, list2) = one.state(), two.state()
    assert stats1 == expect_counters(passed=[to_blocked], dropped=[from_blocked])
    assert stats2 == expect_counters(passed=[from_blocked], dropped=[to_blocked])
    assert list1 == [("198.51.100.0/24", "src", 1)]
    assert list2 == [("203.0.113.9/32", "dst", 1)]
    assert without_times(flows1) == expect_flows([to_blocked], lab.dut_if)
    assert without_times(flows2) == expect_flows([from_blocked], lab2.dut_if)

    one("detach", lab.dut_if)
    assert not os.path.exists(pin_root)
    assert send_and_receive(lab2, [from_blocked, to_blocked]) == raw([from_blocked])
    assert two.blocklist() == [("203.0.113.9/32", "dst", 2)]
