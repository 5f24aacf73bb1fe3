"""Reliability under load, end to end: exact counts while the CLI reads and
rewrites state, program upgrades while frames flow, blocklist changes (some
killed half-way, some racing) that must never unblock a listed address, and
the table limits seen from the command line.

Frames come from ``pktgen.blast()`` (live frames, exact counts read from the
veth's own transmit counters) in a thread, or from ``send_exact()``. xdpflow
is driven through its console script; only the blocklist test also reads the
rule store and the flow table in-process, to see at once where each killed
sync stopped. Each test prints its figures (run with ``-s`` or ``-rP``).
"""

from __future__ import annotations

import ipaddress
import json
import random
import signal
import struct
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.l2 import Ether

from xdpflow.dataplane.abi import bytes_key
from xdpflow.dataplane.blocklist import Blocklist
from xdpflow.dataplane.flows import top_flows
from xdpflow.dataplane.maps import PinnedMaps
from xdpflow.dataplane.pins import PinRoot
from xdpflow.testing.lab import DUT_V4, DUT_V6, Lab
from xdpflow.testing.pktgen import FlowMix, build_frames, send_exact, vary_frame

from ..clitest import (
    COUNTERS,
    Cli,
    assert_one_error_line,
    flow_key,
    send_and_receive,
    udp,
    wait_prog_gone,
    xdp_prog,
)
from ..reltest import (
    ONLY_A_SOURCES,
    ONLY_B_SOURCES,
    SHARED_SOURCES,
    UNLISTED_SOURCES,
    Blaster,
    blasting,
    canonical,
    overlapping_lists,
    reaped,
    rule_set,
    write_rules,
)

LAB_PREFIX = "xfrel"
# counters whose value depends on timing (event rate limit, unread ring), not on the frames
EVENT_COUNTERS = {"events_suppressed", "events_lost", "events_suppressed_bytes", "events_lost_bytes"}


def expected(**packets_and_bytes: tuple[int, int]) -> dict[str, int]:
    """A whole `stats --json` entry: the named counters (packets, bytes), the rest 0."""
    out = dict.fromkeys(COUNTERS, 0)
    out.update({bytes_key(n): 0 for n in COUNTERS})
    for name, (n, b) in packets_and_bytes.items():
        assert name in COUNTERS, name
        out[name], out[bytes_key(name)] = n, b
    return out


def timing_free(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k not in EVENT_COUNTERS}


def assert_not_decreasing(before: dict[Any, int], after: dict[Any, int], what: str) -> None:
    """Every key of ``before`` is still there in ``after``, with a value no smaller."""
    gone = [k for k in before if k not in after]
    assert not gone, f"{what}: {len(gone)} entries disappeared, e.g. {gone[:3]}"
    down = {k: (before[k], after[k]) for k in before if after[k] < before[k]}
    assert not down, f"{what}: {len(down)} went backwards, e.g. {list(down.items())[:3]}"


def flow_packets(flows: list[dict[str, Any]]) -> dict[tuple[Any, ...], int]:
    out = {(f["src"], f["dst"], f["sport"], f["dport"], f["proto"]): f["packets"] for f in flows}
    assert len(out) == len(flows), "a flow is listed twice"
    return out


def settled_stats(cli: Cli, packets: int) -> dict[str, int]:
    """`stats` once ``packets`` frames are counted, or after 3 s: the last
    frames a blast() handed over may still wait in the dut's ring."""
    deadline = time.monotonic() + 3
    while (stats := cli.stats())["packets"] < packets and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats


def one_iface(stats: dict[str, dict[str, int]], ifname: str) -> dict[str, int]:
    assert list(stats) == [ifname], stats
    return stats[ifname]


# --- 1. counting under load -----------------------------------------------------

# Source rules that never match the generator's 198.18.128.1 but rewrite the
# IPv4 table entries its lookups walk through (the /16 of 198.18 gets the D24
# and HOSTS flags, its /24 an L2 entry, neighbours L3 entries), and IPv6 tries.
RULES_X = [
    "198.51.100.0/24", "203.0.113.0/25", "2001:db8::/32",
    "198.18.128.2", "198.18.129.0/24", "198.19.0.0/16",
]  # fmt: skip
RULES_Y = [
    "203.0.113.0/24", "198.51.100.128/25", "2001:db8:1::/48",
    "198.18.128.128/25", "198.18.128.3", "198.18.130.0/23",
]  # fmt: skip


def test_counts_stay_exact_while_the_cli_reads_and_syncs(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    """~10 s of 1,000 flows at full speed into a sink-mode dut while `stats`,
    `flows` and `block sync` (rules that miss the traffic) run concurrently in
    a loop: every frame is counted, and no flow's count ever goes down.

    Sink mode, not pass: frames passed would climb the dut's stack (UDP to a
    closed port, no route back) and slow the generator; sink drops them after
    counting and tracking, so `sunk` must equal `packets`: a frame the
    blocklist wrongly caught would show in `dropped`, one it let through to
    the stack in `passed`.
    """
    cli("attach", lab.dut_if, "--sink")
    files = [tmp_path / "x.txt", tmp_path / "y.txt"]
    write_rules(str(files[0]), RULES_X)
    write_rules(str(files[1]), RULES_Y)
    cli("block", "sync", str(files[1]))

    mix = FlowMix(n_flows=1000)
    frame, port_off = vary_frame(mix)
    assert len(frame) == 64
    blaster = Blaster(lab, [frame], 400_000, seconds=10, vary=(port_off, 1000))
    iterations = 0
    last_flows: dict[tuple[Any, ...], int] = {}
    last_stats: dict[str, int] = {}
    most_flows = 0
    t0 = time.monotonic()
    with blasting(blaster):
        blaster.wait_first()
        while blaster.running:
            rules = files[iterations % 2]
            stats_r, flows_r, sync_r = cli.run_all(
                ("stats", "--json"), ("flows", "--json"), ("block", "sync", str(rules))
            )
            for r in (stats_r, flows_r, sync_r):
                assert (r.returncode, r.stderr) == (0, ""), f"{r.args}: exit {r.returncode}\n{r.stderr}"
            stats = one_iface(json.loads(stats_r.stdout), lab.dut_if)
            flows = flow_packets(json.loads(flows_r.stdout))
            assert_not_decreasing(last_stats, stats, f"stats, iteration {iterations}")
            assert_not_decreasing(last_flows, flows, f"flows, iteration {iterations}")
            assert (stats["passed"], stats["dropped"]) == (0, 0), stats
            last_stats, last_flows = stats, flows
            most_flows = max(most_flows, len(flows))
            iterations += 1
        sent = blaster.stop()
    seconds = time.monotonic() - t0

    settled_stats(cli, sent)
    final_stats, final_flows, listing = cli.state()
    print(
        f"\ncounting under load: {sent:,} frames sent in {seconds:.1f} s ({blaster.calls} blast calls, "
        f"{blaster.refused} copies refused and re-sent); {iterations} loop iterations, each one "
        f"`stats --json`, `flows --json` and `block sync` at once ({iterations} syncs, {iterations} flow "
        f"snapshots of up to {most_flows} flows); events suppressed/lost: "
        f"{final_stats['events_suppressed']}/{final_stats['events_lost']}"
    )
    assert iterations >= 3, "the loop ran too few times to mean anything"
    assert timing_free(final_stats) == timing_free(
        expected(
            packets=(sent, 64 * sent),
            ipv4=(sent, 64 * sent),
            udp=(sent, 64 * sent),
            sunk=(sent, 64 * sent),
        )
    )
    # the 1,000 flows, each 50 IP bytes a frame, together exactly the frames sent
    assert sorted(flow_packets(final_flows)) == sorted(
        ("198.18.128.1", DUT_V4, 1024 + i, 9000, 17) for i in range(1000)
    )
    assert sum(f["packets"] for f in final_flows) == sent
    assert all(f["bytes"] == 50 * f["packets"] and f["tcp_flags"] == "" for f in final_flows)
    assert_not_decreasing(last_flows, flow_packets(final_flows), "flows, final")
    last_file = RULES_X if (iterations - 1) % 2 == 0 else RULES_Y
    assert {(c, d) for c, d, _h in listing} == canonical(last_file)
    assert all(h == 0 for _c, _d, h in listing), listing


# --- 2. upgrades while traffic flows ----------------------------------------------

RULES_UPGRADE = [
    "198.51.100.0/24", "203.0.113.0/25", "203.0.113.99", "2001:db8::/48", "2001:db8:1::/48",
    "2001:db8:ff00::/40", "2001:db8:5::5", "198.19.0.0/16", "2001:db8:dead::/48",
]  # fmt: skip
# blocked source -> the rule it must hit (the longest prefix holding it)
BLOCKED_UPGRADE = {
    "198.51.100.7": "198.51.100.0/24",
    "198.51.100.77": "198.51.100.0/24",
    "203.0.113.9": "203.0.113.0/25",
    "203.0.113.99": "203.0.113.99/32",
    "2001:db8::7": "2001:db8::/48",
    "2001:db8:1::7": "2001:db8:1::/48",
    "2001:db8:ffff::1": "2001:db8:ff00::/40",
    "2001:db8:5::5": "2001:db8:5::5/128",
}
UPGRADES = 5


def test_upgrades_under_traffic_lose_nothing(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    """Five in-place upgrades (`xdpflow attach IFACE` again) while 8 passing
    and 8 blocked flows arrive at full speed: counters, flows and rule hits
    read during and between upgrades never go backwards, the blocklist is
    whole at every read, and at the end every frame sent is counted once, by
    the right verdict, and every blocked one as a hit of the right rule.

    Attached normally (pass), not with --sink: an upgrade without --sink
    drops sink mode (see test_cli_attach.test_upgrade_keeps_sink_mode), so
    sink would change the verdicts mid-test.
    """
    (first,) = cli.json("attach", lab.dut_if, "--flows", "4096")
    rules_file = tmp_path / "rules.txt"
    write_rules(str(rules_file), RULES_UPGRADE)
    cli("block", "sync", str(rules_file))
    listed = canonical(RULES_UPGRADE)
    assert rule_set(cli) == listed

    passing = build_frames(FlowMix(n_flows=8, families="46"))
    blocked = [bytes(udp(src, DUT_V6 if ":" in src else DUT_V4, 5000 + i, 53)) for i, src in enumerate(BLOCKED_UPGRADE)]
    frames = passing + blocked
    per_call = len(frames) * 4096
    blaster = Blaster(lab, frames, per_call, burst=256)

    prog_ids = [first["prog_id"]]
    reads = 0
    last_stats: dict[str, int] = {}
    last_flows: dict[tuple[Any, ...], int] = {}
    last_hits: dict[str, int] = {}

    def read_all() -> None:
        nonlocal reads, last_stats, last_flows, last_hits
        stats, flows, listing = cli.state()
        hits = {c: h for c, _d, h in listing}
        assert {(c, d) for c, d, _h in listing} == listed, f"read {reads}: the blocklist changed: {listing}"
        assert_not_decreasing(last_stats, stats, f"stats, read {reads}")
        assert_not_decreasing(last_flows, flow_packets(flows), f"flows, read {reads}")
        assert_not_decreasing(last_hits, hits, f"rule hits, read {reads}")
        last_stats, last_flows, last_hits = stats, flow_packets(flows), hits
        reads += 1

    with blasting(blaster), reaped() as procs:
        blaster.wait_first()
        read_all()
        for n in range(UPGRADES):
            time.sleep(0.2)
            up = cli.popen("attach", lab.dut_if, "--json")
            procs.append(up)
            while up.poll() is None:  # read while the upgrade is under way
                read_all()
            out, err = up.communicate(timeout=60)
            assert (up.returncode, err) == (0, ""), f"upgrade {n + 1}: exit {up.returncode}\n{err}"
            (res,) = json.loads(out)
            assert (res["replaced"], res["mode"]) == (True, "native"), res
            assert res["prog_id"] not in prog_ids
            prog_ids.append(res["prog_id"])
            assert xdp_prog(lab.dut_ns, lab.dut_if) == (res["prog_id"], "xdpflow")
            read_all()
            blaster.check()
        time.sleep(0.2)
        sent = blaster.stop()
    settled_stats(cli, sent)
    read_all()

    print(
        f"\nupgrades under traffic: {UPGRADES} upgrades (program ids {prog_ids}), {sent:,} frames sent "
        f"({blaster.calls} blast calls, {blaster.refused} copies refused and re-sent), "
        f"{reads} reads of stats + flows + block list, none went backwards"
    )
    # blast() sends each frame per_call / len(frames) times per call
    copies = sent // len(frames)
    assert copies * len(frames) == sent
    pass_bytes = copies * sum(len(f) for f in passing)
    drop_bytes = copies * sum(len(f) for f in blocked)
    v4_bytes = copies * sum(len(f) for f in frames if f[12:14] == b"\x08\x00")
    v6_bytes = pass_bytes + drop_bytes - v4_bytes
    half = sent // 2
    assert timing_free(last_stats) == timing_free(
        expected(
            packets=(sent, pass_bytes + drop_bytes),
            passed=(half, pass_bytes),
            dropped=(half, drop_bytes),
            ipv4=(half, v4_bytes),
            ipv6=(half, v6_bytes),
            udp=(sent, pass_bytes + drop_bytes),
        )
    )
    want_flows = {flow_key(Ether(f)): copies for f in passing}
    assert last_flows == want_flows
    want_hits = dict.fromkeys((c for c, _d in listed), 0)
    for rule in BLOCKED_UPGRADE.values():
        want_hits[rule] += copies
    assert last_hits == want_hits
    (st,) = cli.status()
    assert (st["prog_id"], st["attached"], st["mode"], st["sink"]) == (prog_ids[-1], True, "native", False)
    assert (st["flows"], st["flows_max"], st["blocklist"]) == (8, 4096, len(RULES_UPGRADE))
    assert all(wait_prog_gone(p) for p in prog_ids[:-1]), "a replaced program is still loaded"


# `xdpflow attach` run as the console script does, except that the process
# SIGKILLs itself when it is about to rename its new program's pin into place:
# the moment after the kernel switched programs and before the pins say so
# (an operator's Ctrl-C lands there just the same: KeyboardInterrupt, no undo)
KILLED_AT_PIN_RENAME = """
import os, signal, sys
from xdpflow.app import cli
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == "prog":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.exit(cli.main(sys.argv[1:]))
"""


def _upgrade_killed_at_the_switch(lab: Lab, cli: Cli) -> tuple[int, int]:
    """Attach, list 198.51.100.0/24, then an upgrade killed at the switch;
    returns (old, new) program ids once the new one is seen running and blocking."""
    (first,) = cli.json("attach", lab.dut_if)
    cli("block", "add", "198.51.100.0/24")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT_PIN_RENAME, *cli.argv("attach", lab.dut_if)[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if killed.returncode != -signal.SIGKILL:
        pytest.skip(f"attach no longer renames a pin into place (exit {killed.returncode}): no kill point here")
    running = xdp_prog(lab.dut_ns, lab.dut_if)
    assert running is not None and running[1] == "xdpflow" and running[0] != first["prog_id"]
    assert send_and_receive(lab, [udp("198.51.100.1", DUT_V4, 5001, 53)]) == [], "the new program must block"
    print(f"\nupgrade killed at the switch: program {first['prog_id']} -> {running[0]}, killed by SIGKILL")
    return first["prog_id"], running[0]


KILLED_UPGRADE = (
    "BUG: an upgrade killed (SIGKILL; Ctrl-C too: KeyboardInterrupt has no undo) after controller.attach() "
    "replaced the program on the interface but before it renamed the new program's pin over if_IFACE/prog "
    "leaves the interface running an xdpflow program the pins do not name (they still name the replaced one); "
)


def test_an_upgrade_killed_at_the_switch_can_be_retried(lab: Lab, cli: Cli) -> None:
    _old, _new = _upgrade_killed_at_the_switch(lab, cli)
    # the operator retries: it is xdpflow's own program, so no --force
    retry = cli.run("attach", lab.dut_if, "--json")
    assert (retry.returncode, retry.stderr) == (0, ""), retry.stderr
    (again,) = json.loads(retry.stdout)
    assert again["replaced"] is True
    (st,) = cli.status()
    assert (st["attached"], st["prog_id"]) == (True, again["prog_id"])
    assert cli.stats()["dropped"] == 1, "the upgrades must keep the counters"


def test_an_upgrade_killed_at_the_switch_can_be_detached(lab: Lab, cli: Cli) -> None:
    _old, new = _upgrade_killed_at_the_switch(lab, cli)
    cli("detach", lab.dut_if)
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None, f"detach left program {new} attached"
    frame = udp("198.51.100.1", DUT_V4, 5002, 53)
    assert send_and_receive(lab, [frame]) == [bytes(frame)]


# --- 3. blocklist atomicity ---------------------------------------------------------

SYNCS = 30
RACES = 5


def _rules_now(bl: Blocklist) -> set[tuple[str, str]]:
    """The rule store as the kernel holds it, read in-process: a CLI round
    trip per kill would take longer than the sync it checks."""
    return {(str(r.net), r.direction) for r in bl.rules()}


def _listed_v4(maps: PinnedMaps, cidr: str) -> bool:
    """Whether the IPv4 source trie holds exactly this prefix: one lookup."""
    net = ipaddress.IPv4Network(cidr)
    return maps("bl4_src").lookup(struct.pack("<I", net.prefixlen) + net.network_address.packed) is not None


# a rule of each file alone, outside every shared one: its IPv4 trie entry
# comes with the adds and goes with the deletes
V4_MARK = {"A": "198.51.100.128/26", "B": "198.51.100.192/27"}


# probed after every sync; the unlisted ones last, so once they are seen the
# others have been judged too (one socket, one veth queue: frames stay in order)
PROBES = ONLY_A_SOURCES + ONLY_B_SOURCES + UNLISTED_SOURCES


def _probe(lab: Lab, pin_root: str, tag: int) -> tuple[list[bytes], dict[str, bool]]:
    """Send one frame from each probe source, source port 20000 + 16 tag + k;
    return the frames and source -> passed. A passed frame leaves a flow
    entry (a dropped one never does), so the flow table tells."""
    ports = {20000 + 16 * tag + k: s for k, s in enumerate(PROBES)}
    frames = [udp(s, DUT_V6 if ":" in s else DUT_V4, port, 53) for port, s in ports.items()]
    assert lab.send(frames) == len(frames)
    last = set(list(ports)[-len(UNLISTED_SOURCES) :])
    deadline = time.monotonic() + 3
    while True:
        seen = {f.sport for f in top_flows(PinRoot(pin_root), lab.dut_if)} & set(ports)
        if last <= seen or time.monotonic() > deadline:
            return [bytes(f) for f in frames], {s: port in seen for port, s in ports.items()}
        time.sleep(0.005)


def test_blocklist_changes_never_unblock_a_shared_prefix(lab: Lab, cli: Cli, pin_root: str, tmp_path: Path) -> None:
    """Frames from 17 sources inside prefixes listed by both A and B arrive
    without pause while `block sync A` / `sync B` alternate 30 times, most of
    them SIGKILLed (at a random point of a sync's run time, or as soon as its
    first rules land in the kernel), then race in pairs: not one such frame
    may pass (each is counted `dropped`, none reaches the dut's stack), one
    more sync converges to exactly A, each race ends with exactly A or B, and
    what the program enforces afterwards matches what `block list` says.
    """
    cli("attach", lab.dut_if)
    lists = overlapping_lists()
    file_a, file_b = tmp_path / "a.txt", tmp_path / "b.txt"
    write_rules(str(file_a), lists.a)
    write_rules(str(file_b), lists.b)
    want = {"A": canonical(lists.a), "B": canonical(lists.b)}
    shared = want["A"] & want["B"]
    path = {"A": str(file_a), "B": str(file_b)}
    cli("block", "sync", path["A"])
    assert rule_set(cli) == want["A"]

    frames = [bytes(udp(s, DUT_V6 if ":" in s else DUT_V4, 6000 + i, 53)) for i, s in enumerate(SHARED_SOURCES)]
    blaster = Blaster(lab, frames, len(frames) * 2000, burst=100)
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    outcomes = {m: {"before": 0, "mid-change": 0, "after": 0} for m in ("random", "on-change")}
    modes = {"none": 0, "random": 0, "on-change": 0}
    durations: list[float] = []
    winners = []
    state = want["A"]
    nets = {c: ipaddress.ip_network(c) for c, _d in want["A"] | want["B"]}
    probe_frames: list[bytes] = []
    probes_passed: list[bytes] = []
    lagging: list[str] = []  # sources listed by a killed sync's leftovers, not yet enforced

    def check_probes(tag: int, rules: set[tuple[str, str]], exact: bool) -> None:
        frames, passed = _probe(lab, pin_root, tag)
        probe_frames.extend(frames)
        probes_passed.extend(f for f, ok in zip(frames, passed.values()) if ok)
        for src, ok in passed.items():
            listed = any(ipaddress.ip_address(src) in nets[c] for c, _d in rules)
            # a frame is never dropped by a rule `block list` does not show
            assert ok or listed, f"after sync {tag}: {src} is dropped, but no listed rule holds it"
            if exact:
                assert ok != listed, f"after sync {tag}: {src} is {'listed' if listed else 'not listed'}, " + (
                    "yet passes" if ok else "yet dropped"
                )
            elif ok and listed:
                lagging.append(src)

    with closing(PinnedMaps(PinRoot(pin_root))) as maps, lab.receiver() as rx, blasting(blaster), reaped() as procs:
        bl = Blocklist(maps)
        blaster.wait_first()
        for i in range(SYNCS):
            # always a change: to the other file, or from a mix left by a kill to either
            target = "B" if state == want["A"] else "A" if state == want["B"] else "AB"[i % 2]
            # the first syncs run whole: their run time places the random kills
            mode = "none" if i < 2 else rng.choice(["none", "random", "random", "on-change", "on-change"])
            modes[mode] += 1
            other = "A" if target == "B" else "B"
            t0 = time.monotonic()
            p = cli.popen("block", "sync", path[target])
            procs.append(p)
            if mode == "none":
                out, err = p.communicate(timeout=60)
                durations.append(time.monotonic() - t0)
                assert (p.returncode, err) == (0, ""), f"sync {i}: exit {p.returncode}\n{err}"
                assert out.startswith("added ") and out.endswith(" rules\n"), out
                assert _rules_now(bl) == want[target], f"sync {i} did not converge"
                state = want[target]
                check_probes(i, state, exact=True)
                blaster.check()
                continue
            if mode == "random":
                time.sleep(rng.uniform(0, 1.1 * sorted(durations)[len(durations) // 2]))
            elif not _listed_v4(maps, V4_MARK[target]):  # kill as soon as the adds land
                while p.poll() is None and not _listed_v4(maps, V4_MARK[target]):
                    pass
            else:  # a killed sync left both files' rules: kill as soon as the deletes start
                while p.poll() is None and _listed_v4(maps, V4_MARK[other]):
                    pass
            p.kill()
            _out, err = p.communicate(timeout=30)
            assert p.returncode in (0, -9) and err == "", f"sync {i}: exit {p.returncode}\n{err}"
            now = _rules_now(bl)
            if now == want[target]:
                outcome = "after"
            elif now == state:
                outcome = "before"
            else:
                outcome = "mid-change"
            outcomes[mode][outcome] += 1
            # adds come before deletes: whatever is left holds every shared rule
            assert now >= shared, f"sync {i} ({mode}) killed {outcome} lost {len(shared - now)} shared rules"
            state = now
            check_probes(i, state, exact=False)
            blaster.check()

        cli("block", "sync", path["A"])
        assert rule_set(cli) == want["A"], "one sync after the kills did not converge to A"

        for _ in range(RACES):
            ra, rb = cli.run_all(("block", "sync", path["A"]), ("block", "sync", path["B"]))
            assert (ra.returncode, ra.stderr, rb.returncode, rb.stderr) == (0, "", 0, ""), (ra, rb)
            now = rule_set(cli)
            assert now in (want["A"], want["B"]), (
                f"two racing syncs left a mix: {len(now - want['A'])} rules not in A, "
                f"{len(now - want['B'])} not in B, of {len(now)}"
            )
            winners.append("A" if now == want["A"] else "B")
            blaster.check()
        sent = blaster.stop()
        seen = rx.stop()

    print(
        f"\nblocklist atomicity: {len(lists.shared)} shared rules, {len(lists.only_a)} only in A, "
        f"{len(lists.only_b)} only in B; {SYNCS} syncs ({modes['none']} run whole in "
        f"{min(durations):.2f}-{max(durations):.2f} s, {modes['random']} SIGKILLed at a random point, "
        f"{modes['on-change']} SIGKILLed once their first rules landed; "
        + "; ".join(
            f"{m} kills: {o['before']} before any change, {o['mid-change']} mid-change, {o['after']} after finishing"
            for m, o in outcomes.items()
        )
        + f"; seed {seed}); {RACES} races, final lists {''.join(winners)}; "
        f"{sent:,} frames from {len(frames)} shared sources sent ({blaster.calls} blast calls), "
        f"none passed; {len(probe_frames)} probe frames after the syncs, {len(lagging)} of them "
        f"({sum(':' not in x for x in lagging)} IPv4, {sum(':' in x for x in lagging)} IPv6) from a rule a killed "
        "sync had listed but not yet enforced (allowed: the other way round is not)"
    )
    # the dut's stack got the probes that passed, and nothing else
    assert rx.dropped == 0 and seen == probes_passed
    stats = settled_stats(cli, sent + len(probe_frames))
    nbytes = sum(len(f) for f in frames) * (sent // len(frames))
    npass, pbytes = len(probes_passed), sum(map(len, probes_passed))
    ndrop, dbytes = len(probe_frames) - npass, sum(map(len, probe_frames)) - pbytes
    assert (stats["packets"], stats["passed"], stats["dropped"]) == (sent + npass + ndrop, npass, sent + ndrop)
    assert (stats["passed_bytes"], stats["dropped_bytes"]) == (pbytes, nbytes + dbytes)

    # what the program enforces after all that is exactly the list it shows
    final = winners[-1]
    probes = SHARED_SOURCES + ONLY_A_SOURCES + ONLY_B_SOURCES + UNLISTED_SOURCES
    last_probes = [udp(s, DUT_V6 if ":" in s else DUT_V4, 7000 + i, 53) for i, s in enumerate(probes)]
    listed_only = ONLY_A_SOURCES if final == "A" else ONLY_B_SOURCES
    want_pass = [bytes(f) for s, f in zip(probes, last_probes) if s not in SHARED_SOURCES + listed_only]
    assert send_and_receive(lab, last_probes) == want_pass
    after = cli.stats()
    assert (after["passed"], after["dropped"]) == (
        npass + len(want_pass),
        sent + ndrop + len(probes) - len(want_pass),
    )


# --- 4. table limits at the CLI --------------------------------------------------------

BLOCK_MAX = 131072


def test_small_flow_table_and_a_too_big_blocklist(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    """`--flows 128` with 500 distinct flows (250 per family) sent exactly once
    each: every frame is counted, each family's table holds at most 64 flows
    (the LRU evicts, so no insert fails), the newest flow of each family is
    there. A `block sync` of one IPv6 rule more than a trie holds fails with
    one line and leaves the blocklist, and what it blocks, as it was.
    """
    cli("attach", lab.dut_if, "--flows", "128")  # 64 per family
    mix = FlowMix(n_flows=500, families="46")
    frames = build_frames(mix)
    r = send_exact(lab, None, frames, len(frames))
    assert r.sent == 500
    stats = settled_stats(cli, 500)
    v4 = [f for f in frames if f[12:14] == b"\x08\x00"]
    v6 = [f for f in frames if f[12:14] == b"\x86\xdd"]
    assert (len(v4), len(v6)) == (250, 250)
    b4, b6 = sum(map(len, v4)), sum(map(len, v6))
    assert timing_free(stats) == timing_free(
        expected(packets=(500, b4 + b6), passed=(500, b4 + b6), ipv4=(250, b4), ipv6=(250, b6), udp=(500, b4 + b6))
    )
    flows = cli.flows()
    (st,) = cli.status()
    per_family = {4: [f for f in flows if ":" not in f["src"]], 6: [f for f in flows if ":" in f["src"]]}
    print(
        f"\nsmall flow table: 500 flows sent once each ({r.refused} refusals re-sent), table of 64 per family "
        f"holds {len(per_family[4])} IPv4 + {len(per_family[6])} IPv6 flows; "
        f"flow_insert_failed {stats['flow_insert_failed']}"
    )
    assert (st["flows"], st["flows_max"]) == (len(flows), 128)
    assert 1 <= len(per_family[4]) <= 64 and 1 <= len(per_family[6]) <= 64
    # flow i is group i % 2 (v4, v6), number j = i // 2 there: source host j and port 1024 + j
    sent_keys = {flow_key(Ether(f)): i for i, f in enumerate(frames)}
    assert len(sent_keys) == 500
    held = flow_packets(flows)
    assert set(held) <= set(sent_keys), set(held) - set(sent_keys)
    assert set(held.values()) == {1}
    assert {sent_keys[k] for k in held} >= {498, 499}, "the newest flow of a family is missing"
    assert stats["flow_insert_failed"] == 0

    # the blocklist: one IPv6 source rule more than its trie holds
    cli("block", "add", "198.51.100.0/24", "2001:db8:ffff::/48")
    cli("block", "add", "--dst", "203.0.113.7")
    blocked = [udp("198.51.100.9", DUT_V4, 5001, 53), udp("2001:db8:ffff::9", DUT_V6, 5002, 53)]
    assert send_and_receive(lab, blocked) == []
    before = cli.json("block", "list")
    big = tmp_path / "big6.txt"
    # 2001:db8:1::/48 hosts: none inside the listed /48
    big.write_text("".join(f"2001:db8:1::{i >> 16:x}:{i & 0xFFFF:x}\n" for i in range(BLOCK_MAX + 1)))
    msg = (
        f"xdpflow: the blocklist holds at most {BLOCK_MAX} IPv6 src rules; "
        f"this change needs {BLOCK_MAX + 1}; nothing was changed\n"
    )
    real, dry = cli.run_all(("block", "sync", str(big)), ("block", "sync", str(big), "--dry-run"))
    for res in (real, dry):
        assert (res.returncode, res.stdout, res.stderr) == (1, "", msg), res
        assert_one_error_line(res.stderr)
    assert cli.json("block", "list") == before
    assert cli.status()[0]["blocklist"] == 3
    passing = udp("2001:db8:1::1:1", DUT_V6, 5003, 53)  # listed in the refused file only
    assert send_and_receive(lab, [*blocked, passing]) == [bytes(passing)]
    hits = {r["cidr"]: r["hits"] for r in cli.json("block", "list")}
    assert hits == {"198.51.100.0/24": 2, "2001:db8:ffff::/48": 2, "203.0.113.7/32": 0}
    print(f"blocklist over capacity: sync of {BLOCK_MAX + 1:,} IPv6 rules refused, {len(before)} rules kept")
