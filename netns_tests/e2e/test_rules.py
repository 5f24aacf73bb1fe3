"""`xdpflow rule` end to end, through the console script: each action, TTLs
that run out with no xdpflow process left, rules against the blocklist's
priority, rate limiting at a measured rate, and rule-set syncs under
traffic (some killed midway) that never let a marked frame through.

Traffic uses only 198.18.0.0/15 and 2001:2::/48, between the lab's own
namespaces; blocklisted "hosts" are spoofed sources inside 198.18.0.0/15.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from xdpflow.bindings import netlink
from xdpflow.bindings.libbpf import BPF_MAP_TYPE_ARRAY, Map, map_info, obj_get
from xdpflow.dataplane import abi
from xdpflow.dataplane.abi import C
from xdpflow.dataplane.pins import PinRoot
from xdpflow.rules.rulespec import parse_lines
from xdpflow.testing.lab import DUT_V4, DUT_V6, GEN_V4, GEN_V6, Lab

from ..clitest import Cli, raw, send_and_receive, tcp, udp

RULE_KEYS = {
    "id", "priority", "action", "src", "dst", "proto", "sport", "dport", "icmp_type", "tcp_flags", "length",
    "iface", "pps", "bps", "expires_at", "packets", "bytes", "limited", "comment",
}  # fmt: skip


@pytest.fixture
def cli(lab: Lab, pin_root: str) -> Cli:
    c = Cli.of(lab, pin_root)
    c("attach", lab.dut_if, "--flows", "1024")
    return c


def add(cli: Cli, *args: str) -> int:
    """`rule add ARGS`: its output is the new rule's id, alone."""
    out = cli("rule", "add", *args)
    assert out.strip().isdigit(), out
    return int(out)


def rules_by_id(cli: Cli) -> dict[int, dict[str, Any]]:
    listing = cli.json("rule", "list")
    for r in listing:
        assert set(r) == RULE_KEYS, r
    return {r["id"]: r for r in listing}


def counts(cli: Cli) -> dict[int, tuple[int, int, int]]:
    return {i: (r["packets"], r["bytes"], r["limited"]) for i, r in rules_by_id(cli).items()}


def nbytes(frames: Sequence[Any]) -> int:
    return sum(len(bytes(f)) for f in frames)


def test_each_action(lab: Lab, cli: Cli) -> None:
    # a listed /24, one of whose hosts a pass rule exempts
    cli("block", "add", "198.18.7.0/24")
    exempt = add(cli, "--src", "198.18.7.7", "--action", "pass", "--priority", "10", "--comment", "our monitor")
    drop = add(cli, "--proto", "udp", "--dport", "5001", "--action", "drop")
    mon = add(cli, "--proto", "tcp", "--dport", "5002-5003", "--tcp-flags", "SYN,!ACK", "--action", "monitor")
    assert len({exempt, drop, mon}) == 3

    exempted = [udp("198.18.7.7", DUT_V4, 4000, 53), tcp("198.18.7.7", DUT_V4, 4001, 80, "S")]
    listed = [udp("198.18.7.8", DUT_V4, 4000, 53)]
    dropped = [udp(GEN_V4, DUT_V4, 4002, 5001), udp(GEN_V6, DUT_V6, 4003, 5001)]
    monitored = [tcp(GEN_V4, DUT_V4, 4004, 5002, "S"), tcp(GEN_V6, DUT_V6, 4005, 5003, "S")]
    unmatched = [
        udp(GEN_V4, DUT_V4, 4006, 5002),  # udp: the monitor rule's flags make it tcp-only
        tcp(GEN_V4, DUT_V4, 4007, 5002, "SA"),  # ACK set
        tcp(GEN_V4, DUT_V4, 4008, 5001, "S"),  # tcp to the udp drop rule's port
        udp(GEN_V4, DUT_V4, 4009, 5000),
    ]
    frames = [*exempted, *listed, *dropped, *monitored, *unmatched]
    passing = [*exempted, *monitored, *unmatched]
    assert send_and_receive(lab, frames) == raw(passing)

    got = rules_by_id(cli)
    assert {i: (r["packets"], r["bytes"], r["limited"]) for i, r in got.items()} == {
        exempt: (2, nbytes(exempted), 0),
        drop: (2, nbytes(dropped), 0),
        mon: (2, nbytes(monitored), 0),
    }
    assert got[exempt] == {
        "id": exempt, "priority": 10, "action": "pass", "src": "198.18.7.7/32", "dst": None, "proto": None,
        "sport": None, "dport": None, "icmp_type": None, "tcp_flags": None, "length": None, "iface": None,
        "pps": None, "bps": None, "expires_at": None, "packets": 2, "bytes": nbytes(exempted), "limited": 0,
        "comment": "our monitor",
    }  # fmt: skip
    assert (got[mon]["proto"], got[mon]["dport"], got[mon]["tcp_flags"]) == ("tcp", "5002-5003", "SYN,!ACK")
    stats = cli.stats()
    assert (stats["packets"], stats["passed"], stats["dropped"]) == (len(frames), len(passing), 3)
    # the blocklist counted its own drop, and nothing the pass rule exempted
    assert cli.blocklist() == [("198.18.7.0/24", "src", 1)]
    # dropped frames make no flows; passed and monitored ones do
    flows = {(f["src"], f["dport"], f["proto"]) for f in cli.flows()}
    assert ("198.18.7.7", 53, 17) in flows and (GEN_V4, 5002, 6) in flows
    assert (GEN_V4, 5001, 17) not in flows and (GEN_V6, 5001, 17) not in flows
    assert ("198.18.7.8", 53, 17) not in flows

    # del and flush
    assert cli("rule", "del", str(drop)) != ""
    assert set(rules_by_id(cli)) == {exempt, mon}
    assert send_and_receive(lab, dropped) == raw(dropped)
    cli("rule", "flush")
    assert rules_by_id(cli) == {}
    assert send_and_receive(lab, exempted) == []  # the blocklist takes its host back


def _wait_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def _add_timed(cli: Cli, *args: str) -> tuple[float, float]:
    """Run a command given ``--ttl 2s``; returns the earliest and latest
    expiry it can have set (listing it would cost time, and expire it once
    it has run out)."""
    t0 = time.time()
    cli(*args, "--ttl", "2s")
    t1 = time.time()
    return int(t0) + 2, int(t1) + 2


def test_ttl_expires_without_a_process(lab: Lab, cli: Cli) -> None:
    frame = udp(GEN_V4, DUT_V4, 4100, 5100)
    listed = udp("198.18.8.1", DUT_V4, 4101, 53)
    lo, hi = _add_timed(cli, "rule", "add", "--proto", "udp", "--dport", "5100", "--action", "drop")
    assert send_and_receive(lab, [frame]) == []
    assert time.time() < lo - 0.05, "too slow to send before the TTL ran out"
    blo, bhi = _add_timed(cli, "block", "add", "198.18.8.0/24")
    assert send_and_receive(lab, [listed]) == []
    assert time.time() < blo - 0.05, "too slow to send before the TTL ran out"

    # no xdpflow process runs from here on: the data plane alone stops
    # matching them
    _wait_until(max(hi, bhi) + 1.05)
    assert send_and_receive(lab, [frame, listed]) == raw([frame, listed])
    stats = cli.stats()
    assert (stats["dropped"], stats["passed"]) == (2, 2)
    # the next command tidies the expired entries away
    assert rules_by_id(cli) == {}
    assert [e for e in cli.json("block", "list") if e["cidr"] == "198.18.8.0/24"] == []


def test_lists_show_expiry(cli: Cli) -> None:
    t0 = time.time()
    rid = add(cli, "--proto", "udp", "--dport", "5150", "--action", "drop", "--ttl", "10m")
    assert cli.json("block", "add", "198.18.8.0/24", "--ttl", "1h") == {"added": ["198.18.8.0/24"], "deleted": []}
    t1 = time.time()
    assert int(t0) + 600 <= rules_by_id(cli)[rid]["expires_at"] <= int(t1) + 600
    (entry,) = [e for e in cli.json("block", "list") if e["cidr"] == "198.18.8.0/24"]
    assert int(t0) + 3600 <= entry["expires_at"] <= int(t1) + 3600
    assert entry["direction"] == "src"
    text = cli("rule", "list")
    assert " 9m5" in text or " 9m4" in text or "10m" in text, text  # "9m59s": time left, not the deadline


def test_rule_ttl_exact_to_a_second(lab: Lab, cli: Cli) -> None:
    """--ttl 2s: the rule matches until its expiry and not after it (to
    within the 50 ms each probe takes to send)."""
    frame = udp(GEN_V4, DUT_V4, 4200, 5200)
    lo, hi = _add_timed(cli, "rule", "add", "--proto", "udp", "--dport", "5200", "--action", "drop")
    probes = []
    while time.time() < hi + 1.0:
        t = time.time()
        got = send_and_receive(lab, [frame])
        probes.append((t, time.time(), bool(got)))
        time.sleep(0.05)
    for t_start, t_end, passed in probes:
        if t_end < lo - 0.02:
            assert not passed, (lo, hi, probes)
        if t_start > hi + 0.02:
            assert passed, (lo, hi, probes)
    assert any(p for *_, p in probes) and any(not p for *_, p in probes), probes


def test_priorities_against_the_blocklist(lab: Lab, cli: Cli) -> None:
    cli("block", "add", "198.18.9.0/24", "2001:2:0:9::/64")
    below = add(cli, "--src", "198.18.9.1", "--action", "pass", "--priority", "999")
    at = add(cli, "--src", "198.18.9.2", "--action", "pass", "--priority", "1000")
    above = add(cli, "--src", "198.18.9.3", "--action", "pass", "--priority", "1001")
    v6_below = add(cli, "--src", "2001:2:0:9::1", "--action", "monitor", "--priority", "0")
    v6_above = add(cli, "--src", "2001:2:0:9::2/128", "--action", "pass")  # default priority: 1000
    drop_late = add(cli, "--src", "198.18.10.1", "--action", "drop", "--priority", "5000")

    f = {
        below: udp("198.18.9.1", DUT_V4, 4300, 53),
        at: udp("198.18.9.2", DUT_V4, 4301, 53),
        above: udp("198.18.9.3", DUT_V4, 4302, 53),
        v6_below: udp("2001:2:0:9::1", DUT_V6, 4303, 53),
        v6_above: udp("2001:2:0:9::2", DUT_V6, 4304, 53),
        drop_late: udp("198.18.10.1", DUT_V4, 4305, 53),
    }
    unlisted = udp("198.18.10.2", DUT_V4, 4306, 53)
    passing = [f[below], f[v6_below], unlisted]
    assert send_and_receive(lab, [*f.values(), unlisted]) == raw(passing)
    # a rule at or after the blocklist does not see a listed frame at all
    assert counts(cli) == {
        below: (1, nbytes([f[below]]), 0),
        at: (0, 0, 0),
        above: (0, 0, 0),
        v6_below: (1, nbytes([f[v6_below]]), 0),
        v6_above: (0, 0, 0),
        drop_late: (1, nbytes([f[drop_late]]), 0),
    }
    # the listed frames no rule before the blocklist exempted
    assert sorted(cli.blocklist()) == [("198.18.9.0/24", "src", 2), ("2001:2:0:9::/64", "src", 1)]


# --------------------------------------------------------------------------
# paced traffic from the gen namespace


class Sender:
    """Send frames from the lab's gen interface in a thread, each frame of
    ``mix`` in turn at ``pps`` in all, until stopped; counts what went out
    per frame of the mix. ENOBUFS (a full ring) is retried, so every count
    is exact."""

    def __init__(self, lab: Lab, mix: Sequence[bytes], pps: float) -> None:
        self.lab, self.mix, self.pps = lab, list(mix), pps
        self.sent = [0] * len(mix)
        self.first = self.last = 0.0
        self.behind = 0.0  # the most the pace fell behind, seconds
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            with netlink.in_netns(self.lab.gen_ns):
                with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
                    sock.bind((self.lab.gen_if, 0))
                    self._loop(sock)
        except BaseException as e:  # reported by stop()
            self._error = e

    def _loop(self, sock: socket.socket) -> None:
        gap = 1.0 / self.pps
        k = 0
        t0 = time.perf_counter()
        self.first = time.time()
        while not self._stop.is_set():
            due = t0 + k * gap
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
                continue
            self.behind = max(self.behind, now - due)
            i = k % len(self.mix)
            while True:
                try:
                    sock.send(self.mix[i])
                    break
                except OSError as e:
                    if e.errno not in (errno.ENOBUFS, errno.EAGAIN):
                        raise
                    time.sleep(0.0001)
            self.sent[i] += 1
            self.last = time.time()
            k += 1


def test_rate_limit(lab: Lab, cli: Cli) -> None:
    """A source sending 10,000 pps against 1,000 pps gets 1,000 +-10% through
    per second; every frame is passed or limited, counted exactly. Another
    source under the same rule has a bucket of its own."""
    rid = add(cli, "--src", "198.18.0.0/15", "--proto", "udp", "--dport", "6000", "--action", "rate-limit",
              "--pps", "1000")  # fmt: skip
    flood = raw([udp(GEN_V4, DUT_V4, 4400, 6000)])[0]
    quiet = raw([udp("198.18.0.9", DUT_V4, 4401, 6000)])[0]
    # 200 flood frames per quiet one: 10,000 + 50 pps (a sender that falls
    # behind catches up in a burst; at 50 pps a 100 ms lag bunches 5 quiet
    # frames, within the bucket's tolerance)
    mix = [flood] * 200 + [quiet]
    with lab.receiver(timeout=60) as rx, Sender(lab, mix, 10_050) as s:
        time.sleep(4.0)
        s.stop()
        got = rx.stop()
    n_flood, n_quiet = sum(s.sent[:200]), s.sent[200]
    seconds = s.last - s.first
    by_src = Counter(bytes(f)[26:30] for f in got)
    through = by_src[socket.inet_aton(GEN_V4)]
    quiet_through = by_src[socket.inet_aton("198.18.0.9")]
    rate = through / seconds
    print(f"\nrate limit: sent {n_flood} in {seconds:.2f} s ({n_flood / seconds:.0f} pps, pace behind by at most "
          f"{s.behind * 1e3:.1f} ms), {through} through: {rate:.0f} pps")  # fmt: skip
    assert n_flood / seconds > 5000, "the sender could not keep up: no overload to limit"
    # under the limit: all of it, unless a loaded machine made the sender
    # lag so far that its catch-up burst beat the bucket's tolerance
    if s.behind < 0.09:
        assert quiet_through == n_quiet, (quiet_through, n_quiet, s.behind)
    assert quiet_through >= 0.9 * n_quiet, (quiet_through, n_quiet, s.behind)
    assert 900 <= rate <= 1100, (through, seconds)

    packets, nbytes_, limited = counts(cli)[rid]
    assert packets == n_flood + n_quiet
    assert nbytes_ == n_flood * len(flood) + n_quiet * len(quiet)
    assert packets - limited == through + quiet_through == len(got)
    stats = cli.stats()
    assert stats["passed"] + stats["dropped"] == packets == stats["packets"]
    assert stats["dropped"] == limited


# --------------------------------------------------------------------------
# atomic syncs

# Marked frames: UDP to port 1500. Both sets drop them, by different rules;
# any mix of the two (one set's tables with the other's actions, part of a
# set, the other's pass rules around this one's drop) passes them.
SET_A = """\
drop proto=udp dport=1000-1999 priority=10 # marked
pass proto=udp priority=20
"""
SET_B = """\
pass proto=udp dport=0-999 priority=5
pass proto=udp dport=2000-65535 priority=5
pass src=198.18.0.0/15 proto=udp dport=1000-1499 priority=6
pass src=2001:2::/48 proto=udp dport=1501-1999 priority=6
drop proto=udp priority=30 # everything else: the marked frames
"""


MATCH_KEYS = ("action", "priority", "src", "dst", "proto", "sport", "dport", "icmp_type", "tcp_flags", "length",
              "iface", "pps", "bps")  # fmt: skip


def _set_of(text: str) -> list[tuple[Any, ...]]:
    """What `rule list --json` shows of a rules file, counters aside."""
    return sorted(tuple(str(r.json()[k]) for k in MATCH_KEYS) for r in parse_lines(text.splitlines()))


def _active(cli: Cli) -> list[tuple[Any, ...]]:
    return sorted(tuple(str(r[k]) for k in MATCH_KEYS) for r in cli.json("rule", "list"))


@pytest.mark.slow
def test_atomic_sync_under_traffic(lab: Lab, cli: Cli, tmp_path: Any) -> None:
    files = {"A": tmp_path / "a.rules", "B": tmp_path / "b.rules"}
    files["A"].write_text(SET_A)
    files["B"].write_text(SET_B)
    want = {k: _set_of(v) for k, v in (("A", SET_A), ("B", SET_B))}
    cli("rule", "sync", str(files["A"]))
    assert _active(cli) == want["A"]

    marked = raw([udp(GEN_V4, DUT_V4, 4500, 1500), udp(GEN_V6, DUT_V6, 4501, 1500)])
    unmarked = raw([udp(GEN_V4, DUT_V4, 4502, 999), udp(GEN_V6, DUT_V6, 4503, 2000),
                    udp(GEN_V4, DUT_V4, 4504, 1499), udp(GEN_V6, DUT_V6, 4505, 1501)])  # fmt: skip
    # in set A 1499 and 1501 are marked too: they only check the sets' shapes below
    rng = random.Random(7)
    syncs = killed = 0
    current = "A"
    log = []
    took: list[float] = []  # how long whole syncs take here and now: the kills aim inside that
    with Sender(lab, marked + unmarked[:2], 4000) as s:
        time.sleep(0.3)
        for i in range(40):
            if syncs >= 20 and killed >= 3:
                break
            nxt = "B" if current == "A" else "A"
            if i % 4 == 2 or (syncs >= 20 and killed < 3):
                # SIGKILL somewhere between start-up and the end of the change
                # (most of a sync's time is Python starting)
                p = cli.popen("rule", "sync", str(files[nxt]))
                delay = rng.uniform(0.5, 0.98) * (sorted(took)[len(took) // 2] if took else 1.0)
                try:
                    p.wait(delay)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    p.communicate(timeout=10)
                    killed += 1
                else:
                    p.communicate(timeout=10)
                active = _active(cli)
                assert active in (want["A"], want["B"]), active  # old or new, never a mix
                log.append((nxt, round(delay, 2), p.returncode, "B" if active == want["B"] else "A"))
                current = "B" if active == want["B"] else "A"
                continue
            t0 = time.monotonic()
            cli("rule", "sync", str(files[nxt]))
            took.append(time.monotonic() - t0)
            syncs += 1
            assert _active(cli) == want[nxt]  # a sync after a killed one converges
            current = nxt
        time.sleep(0.3)
        s.stop()
    print(f"\natomic sync: {syncs} syncs, {killed} killed ({log}); sent {s.sent}")
    assert syncs >= 20 and killed >= 3

    stats = cli.stats()
    n_marked, n_unmarked = sum(s.sent[:2]), sum(s.sent[2:])
    assert n_marked > 1000
    # every marked frame dropped, every other passed: a mixed set would show
    assert (stats["dropped"], stats["passed"]) == (n_marked, n_unmarked)
    assert stats["packets"] == n_marked + n_unmarked
    # what each set makes of the other frames (with no sync running)
    cli("rule", "sync", str(files["A"]))
    assert send_and_receive(lab, marked + unmarked) == unmarked[:2]
    cli("rule", "sync", str(files["B"]))
    assert send_and_receive(lab, marked + unmarked) == unmarked


@pytest.mark.slow
def test_sync_killed_leaves_old_set_and_next_converges(lab: Lab, cli: Cli, tmp_path: Any) -> None:
    """A `rule sync` killed at many points of its run: the set in force is
    always the old or the new one whole, and the next sync converges."""
    big = "\n".join(f"drop proto=udp dport={6000 + i} priority={i % 50}" for i in range(800)) + "\n"
    files = {"small": tmp_path / "s.rules", "big": tmp_path / "b.rules"}
    files["small"].write_text(SET_A)
    files["big"].write_text(big)
    want = {"small": _set_of(SET_A), "big": _set_of(big)}
    cli("rule", "sync", str(files["small"]))
    t0 = time.monotonic()
    cli("rule", "sync", str(files["big"]))
    full = time.monotonic() - t0
    cli("rule", "sync", str(files["small"]))
    outcomes = []
    # most of a sync's time is Python starting: the kills crowd its end
    for k in range(12):
        p = cli.popen("rule", "sync", str(files["big"]))
        time.sleep(full * (0.4 + 0.7 * k / 11))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=10)
        active = _active(cli)
        assert active in (want["small"], want["big"])
        outcomes.append("new" if active == want["big"] else "old")
        cli("rule", "sync", str(files["small"]))
        assert _active(cli) == want["small"]
    print(f"\nkilled syncs (full run {full:.2f} s): {outcomes}")
    frames = [udp(GEN_V4, DUT_V4, 4600, 1500), udp(GEN_V4, DUT_V4, 4601, 6001)]
    assert send_and_receive(lab, frames) == raw(frames[1:])


def test_rule_list_json_after_sync(cli: Cli, tmp_path: Any) -> None:
    f = tmp_path / "r.rules"
    f.write_text("drop proto=udp sport=123 dst=198.18.0.2 ttl=1h # NTP reflection\n")
    cli("rule", "sync", str(f))
    (r,) = rules_by_id(cli).values()
    assert (r["action"], r["proto"], r["sport"], r["dst"], r["comment"]) == (
        "drop", "udp", "123", "198.18.0.2/32", "NTP reflection",
    )  # fmt: skip
    assert time.time() + 3500 < r["expires_at"] <= time.time() + 3600
    # the same file again changes nothing: the rule keeps its id
    cli("rule", "sync", str(f))
    assert set(rules_by_id(cli)) == {r["id"]}
    assert json.loads(cli("rule", "list", "--json"))[0]["id"] == r["id"]


def test_upgrade_across_table_layouts_keeps_the_rules(lab: Lab, cli: Cli, pin_root: str) -> None:
    """An attach over an instance whose rule tables another build laid out
    otherwise (here: one table pinned with 32-bit entries, as before they
    carried summaries) gives the new program fresh tables written from the
    rule store before it runs: the same rules, ids and counters judge
    every frame after the switch, and nothing is left pinned aside."""
    drop = add(cli, "--proto", "udp", "--dport", "5001", "--action", "drop")
    keep = add(cli, "--src", GEN_V6, "--proto", "udp", "--dport", "5002", "--action", "drop", "--ttl", "1h")
    dropped = [udp(GEN_V4, DUT_V4, 4000, 5001), udp(GEN_V6, DUT_V6, 4001, 5002)]
    passing = [udp(GEN_V4, DUT_V4, 4002, 5002), udp(GEN_V6, DUT_V6, 4003, 5003)]
    assert send_and_receive(lab, dropped + passing) == raw(passing)
    before = rules_by_id(cli)

    pins = PinRoot(pin_root)
    os.unlink(pins.shared("rl_sport"))
    with Map.create(BPF_MAP_TYPE_ARRAY, "rl_sport", "__u32", "__u32", 2 * C.XF_RPORT_SIZE, abi.ffi) as m:
        m.pin(pins.shared("rl_sport"))
    cli("attach", lab.dut_if)

    assert send_and_receive(lab, dropped + passing) == raw(passing)
    after = rules_by_id(cli)
    assert sorted(after) == sorted(before) == sorted([drop, keep])
    for i in (drop, keep):
        assert after[i]["expires_at"] == before[i]["expires_at"]
        assert after[i]["packets"] == before[i]["packets"] + 1
    assert not [n for n in os.listdir(pin_root) if n.endswith("_old")]
    fd = obj_get(pins.shared("rl_sport"))
    try:
        assert map_info(fd).value_size == 8 * C.XF_RPORT_SIZE
    finally:
        os.close(fd)
