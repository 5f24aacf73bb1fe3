"""In-kernel cost of the rules engine, measured with BPF_PROG_TEST_RUN.

Objects, each with the distant blocklist of bench_kernel loaded and all
loaded afresh every round (see load()): the engine compiled out, no rules
(the engine idle), the same once more (a control), 64 rules and 1,024 rules
of mixed shapes. The rule
sets are built to be hard for the classifier: most rules share the test
frames' /16, /24 or /48 (so the address lookups return classes with live
bits and the port, flag and length fields have to rule them out), the rest
are feed-like CIDRs elsewhere, flag rules and port-only rules. None matches
the established frames; one rate-limit rule (limit far above the test rate,
so every frame conforms) matches the rate-limit frame.

Used by scripts/bench.py; runnable alone:

    python3 scripts/bench_rules.py [--runs 5] [--repeat 1000000]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import bench_kernel  # noqa: E402
from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from xdpflow.bindings.libbpf import Object  # noqa: E402
from xdpflow.dataplane import abi  # noqa: E402
from xdpflow.dataplane.rules import RuleTables  # noqa: E402
from xdpflow.rules.blockfile import Rule  # noqa: E402
from xdpflow.rules.rulespec import RuleSpec, parse_words  # noqa: E402
from xdpflow.testing import interp  # noqa: E402
from xdpflow.testing.variants import build_without  # noqa: E402

RATE_SRC = "198.18.9.9"  # the rate-limit frame's source (inside the traffic's /16)
LIMITED_SRC = "198.18.9.10"  # a source far over its limit: every frame dropped


def mixed_rules(n: int, seed: int = 11) -> list[RuleSpec]:
    """n rules, none matching bench_kernel's udp4 (198.18.0.1:1024 ->
    198.18.0.2:2048) or tcp6 (2001:2::1:1024 -> 2001:2::2:80, ACK) frames,
    plus a rate-limit rule for RATE_SRC (never reached) and one for
    LIMITED_SRC (1 pps: every measured frame is over it)."""
    rnd = random.Random(seed)
    out: list[RuleSpec] = [
        parse_words(["rate-limit", f"src={RATE_SRC}/32", "pps=1000000000", "priority=5"]),
        parse_words(["rate-limit", f"src={LIMITED_SRC}/32", "pps=1", "priority=6"]),
    ]
    actions = ("drop", "monitor", "pass", "drop")
    while len(out) < n:
        kind = len(out) % 8
        act = actions[len(out) % 4]
        prio = f"priority={rnd.randrange(1, 2000)}"
        if kind == 0:  # the frames' own /24 or host, ports elsewhere
            plen = rnd.choice((16, 24, 28, 32))
            net = ipaddress.ip_network(f"198.18.0.2/{plen}", strict=False)
            lo = rnd.randrange(3000, 60000)
            w = [act, f"dst={net}", "proto=udp", f"dport={lo}-{lo + rnd.randrange(0, 500)}", prio]
        elif kind == 1:  # the IPv6 frames' /48, /64 or host, ports elsewhere
            plen = rnd.choice((48, 56, 64, 128))
            net = ipaddress.ip_network(f"2001:2::2/{plen}", strict=False)
            lo = rnd.randrange(1000, 60000)
            w = [act, f"dst={net}", "proto=tcp", f"dport={lo}-{lo + rnd.randrange(0, 200)}", prio]
        elif kind == 2:  # sources inside the traffic's /16, other hosts
            host = f"198.18.{rnd.randrange(10, 255)}.{rnd.randrange(1, 255)}"
            net = ipaddress.ip_network(f"{host}/{rnd.choice((24, 32))}", strict=False)
            w = [act, f"src={net}", prio]
        elif kind == 3:  # feed-like IPv4 sources elsewhere
            a = rnd.randrange(1, 224) << 24 | rnd.getrandbits(24)
            if a >> 17 == (198 << 24 | 18 << 16) >> 17:
                continue
            net = ipaddress.ip_network((a, rnd.choice((8, 12, 16, 20, 24, 32))), strict=False)
            w = [act, f"src={net}", prio]
        elif kind == 4:  # feed-like IPv6 sources elsewhere
            net = ipaddress.ip_network((0x2A00 << 112 | rnd.getrandbits(112), rnd.choice((32, 48, 64))), strict=False)
            w = [act, f"src={net}", prio]
        elif kind == 5:  # SYN-only rules: established traffic carries ACK
            w = [act, "tcp-flags=SYN,!ACK", f"dport={rnd.randrange(1, 65535)}", prio]
        elif kind == 6:  # port-only rules elsewhere
            lo = rnd.randrange(3000, 60000)
            w = [act, "proto=udp", f"sport={lo}-{lo + 100}", prio]
        else:  # length ranges the frames do not have
            lo = rnd.randrange(600, 1400)
            w = [act, f"length={lo}-{lo + 50}", "proto=udp", prio]
        out.append(parse_words(w))
    return out


# what a rate-limit hit is compared with: a frame the same rules pass
PASSED = "1,024 rules, none matching: established UDP/IPv4"


@dataclass
class RulesFigure:
    name: str
    target: float | None  # ns above `versus`
    versus: str  # the figure it is compared with
    samples: list[float]  # ns above XDP_PASS, one per round
    # ns more than `versus`, one per round (paired_diff: measured next to
    # it); empty: the difference of the two figures' samples per round
    diffs: list[float] = field(default_factory=list)
    # BPF instructions the frame executes (xdpflow/testing/interp.py):
    # exact, where the ns figures move with the host
    insns: int | None = None
    # the frame runs the very instructions `versus` runs, opcode for opcode
    same_path: bool = False


OUT = "rules engine compiled out"


QUADS = 3  # A B B A quads per judged figure and round


def paired_diff(a: Callable[[], float], b: Callable[[], float], flip: bool) -> float:
    """How much more b measures than a, right next to each other: the
    median of QUADS quads A B B A (B A A B when flip, so neither always
    comes first). A host that speeds up or slows down steadily cancels out
    of a quad, and the median drops a quad that a burst of noise hit, where
    two figures measured rows apart each take a different share of both."""
    out = []
    for _ in range(QUADS):
        first, second = (b, a) if flip else (a, b)
        x = [first(), second(), second(), first()]
        d = (x[1] + x[2] - x[0] - x[3]) / 2
        out.append(-d if flip else d)
    return statistics.median(out)


AGAIN = "no rules, the same program loaded again"

# a judged table's row: name, object, frame, target (ns more than `versus`,
# None: not judged) and the row it is compared with ("": none)
Row = tuple[str, Any, str, float | None, str]


def count_paths(
    figs: dict[str, RulesFigure],
    rows: list[Row],
    objs: Mapping[Any, bench_kernel.Loaded],
    frame: Callable[[str], bytes],
) -> None:
    """Each row's instructions (xdpflow/testing/interp.py), and whether its
    frame runs the very instructions of the row it is compared with."""
    where = {row[0]: row for row in rows}
    for name, o, key, _target, versus in rows:
        ops = interp.opcodes(objs[o].obj, frame(key))
        figs[name].insns = len(ops)
        if versus:
            _, vo, vkey, _, _ = where[versus]
            figs[name].same_path = ops == interp.opcodes(objs[vo].obj, frame(vkey))


def load(prefixes: list[Rule], out_path: str) -> dict[int | str, bench_kernel.Loaded]:
    """Every object a round compares, loaded afresh: a load decides where
    the JITed program and its maps lie, and two loads of one program read
    up to ~5 ns apart for that alone (the AGAIN rows show it), so each
    round takes its own placement and the median over rounds spans them."""
    objs: dict[int | str, bench_kernel.Loaded] = {}
    try:
        for n in (0, AGAIN, 64, 1024):
            objs[n] = bench_kernel.Loaded(prefixes)
        objs[OUT] = bench_kernel.Loaded(prefixes, object_path=out_path)
        for n, o in objs.items():
            if isinstance(n, int) and n:
                RuleTables(o.map).install(mixed_rules(n))
    except BaseException:
        for o in objs.values():
            o.close()
        raise
    return objs


def measure(runs: int, repeat: int) -> list[RulesFigure]:
    fr = bench_kernel.frames()
    eth = Ether(src=bench_kernel.MAC_A, dst=bench_kernel.MAC_B)
    fr["rate"] = bytes(eth / IP(src=RATE_SRC, dst="198.18.0.2") / UDP(sport=1024, dport=2048) / Raw(b"\0" * 18))
    fr["limited"] = bytes(eth / IP(src=LIMITED_SRC, dst="198.18.0.2") / UDP(sport=1024, dport=2048) / Raw(b"\0" * 18))
    base_obj = Object(abi.object_path("baseline"))
    base_obj.load()
    xdp_pass = base_obj.program("xdp_pass")
    prefixes = bench_kernel.random_prefixes(10000, 10000)
    tmp = tempfile.TemporaryDirectory(prefix="xfbench-")
    out_path = build_without("XF_BENCH_NO_RULES", tmp.name)
    objs: dict[int | str, bench_kernel.Loaded] = {}
    rows: list[Row] = [
        (f"{OUT}: established UDP/IPv4", OUT, "udp4", None, ""),
        (f"{OUT}: established TCP/IPv6", OUT, "tcp6", None, ""),
        (f"{OUT}: blocked source", OUT, "blocked4", None, ""),
        ("no rules: established UDP/IPv4", 0, "udp4", 2.0, f"{OUT}: established UDP/IPv4"),
        ("no rules: established TCP/IPv6", 0, "tcp6", 2.0, f"{OUT}: established TCP/IPv6"),
        ("no rules: blocked source", 0, "blocked4", 2.0, f"{OUT}: blocked source"),
        # controls, no target: one program against itself, loaded twice
        (f"{AGAIN}: established UDP/IPv4", AGAIN, "udp4", None, "no rules: established UDP/IPv4"),
        (f"{AGAIN}: established TCP/IPv6", AGAIN, "tcp6", None, "no rules: established TCP/IPv6"),
        ("64 rules, none matching: established UDP/IPv4", 64, "udp4", None, ""),
        ("64 rules, none matching: established TCP/IPv6", 64, "tcp6", None, ""),
        ("1,024 rules, none matching: established UDP/IPv4", 1024, "udp4", 30.0, "no rules: established UDP/IPv4"),
        ("1,024 rules, none matching: established TCP/IPv6", 1024, "tcp6", 30.0, "no rules: established TCP/IPv6"),
        ("1,024 rules: a rate-limit hit (conforming)", 1024, "rate", 60.0, PASSED),
        ("1,024 rules: a rate-limit hit (over the limit, dropped)", 1024, "limited", 60.0, PASSED),
    ]
    figs = {name: RulesFigure(name, target, versus, []) for name, _, _, target, versus in rows}
    where = {name: (n, key) for name, n, key, _, _ in rows}
    try:
        for r in range(runs):
            for o in objs.values():
                o.close()
            objs = {}  # closed: not to be closed again if a load fails
            objs = load(prefixes, out_path)
            for o in objs.values():
                for k in ("udp4", "tcp6", "rate", "limited"):
                    o.prog.test_run(fr[k], repeat=1)
            if r == 0:
                count_paths(figs, rows, objs, fr.__getitem__)
            keys = ("udp4", "tcp6", "blocked4", "rate", "limited")
            base = {k: bench_kernel.per_frame_ns(xdp_pass, fr[k], repeat) for k in keys}
            # every other round backwards, so no figure always follows the one it is compared with
            for name, n, key, _, _ in rows if r % 2 == 0 else rows[::-1]:
                figs[name].samples.append(bench_kernel.per_frame_ns(objs[n].prog, fr[key], repeat) - base[key])
            for i, (name, n, key, _, versus) in enumerate(row for row in rows if row[4]):
                vn, vkey = where[versus]
                figs[name].diffs.append(
                    paired_diff(
                        lambda: bench_kernel.per_frame_ns(objs[vn].prog, fr[vkey], repeat),  # noqa: B023
                        lambda: bench_kernel.per_frame_ns(objs[n].prog, fr[key], repeat),  # noqa: B023
                        flip=(r + i) % 2 == 1,
                    )
                )
    finally:
        for o in objs.values():
            o.close()
        xdp_pass.close()
        base_obj.close()
        tmp.cleanup()
    return list(figs.values())


def table(figs: list[RulesFigure]) -> list[str]:
    by = {f.name: f for f in figs}
    lines = [
        "| path | ns above XDP_PASS (median) | min–max | instructions | more than (median of per-round differences) "
        "| target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in figs:
        med = statistics.median(f.samples)
        span = f"{min(f.samples):.1f}–{max(f.samples):.1f}"
        insns = "" if f.insns is None else f"{f.insns}"
        if not f.versus:
            lines.append(f"| {f.name} | {med:.1f} | {span} | {insns} | | | |")
            continue
        # paired: both figures of a pair come from one round (back to back
        # where diffs were recorded), so the median of the per-round
        # differences cancels what they share (the host's speed at that
        # moment), which the difference of medians does not
        more = statistics.median(f.diffs or [a - b for a, b in zip(f.samples, by[f.versus].samples)])
        more = round(more, 1) + 0.0  # no "-0.0"
        met = "" if f.target is None else "yes" if more <= f.target else "NO"
        vi = by[f.versus].insns
        extra = "" if f.insns is None or vi is None else f", {f.insns - vi:+d} instructions"
        extra += ": the same ones" if f.same_path else ""
        target = "none: a control" if f.target is None else f"≤ +{f.target:.0f}"
        lines.append(
            f"| {f.name} | {med:.1f} | {span} | {insns} | {more:+.1f} ({f.versus}{extra}) | {target} | {met} |"
        )
    return lines


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1_000_000)
    args = p.parse_args()
    t = time.time()
    with bench_kernel.pinned():
        print("\n".join(table(measure(args.runs, args.repeat))))
    print(f"({time.time() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
