"""In-kernel cost of per-destination counting (protected groups), measured
with BPF_PROG_TEST_RUN.

Two questions (issue 12's budget), each figure ns per frame above an
XDP_PASS program run in the same round:

- No group installed: the program against the same tree built without
  per-destination counting (``-DXF_BENCH_NO_PROTECT``), both with
  bench_kernel's distant blocklist: at most 2 ns more on every path
  (established UDP/IPv4, TCP/IPv6, a blocked source, a new flow). The object
  from the commit before protected groups existed (``--before REV``, default
  the parent of the commit that added bpf/protect.h) is shown beside them:
  it differs by everything changed since, not only by this feature.
- 100 protected prefixes (IPv4 /24s and /32s, IPv6 /64s and /128s, spread
  over the test ranges): a frame to a protected host (counted in its host
  entry) against the same frame to an unprotected host; at most 25 ns more.

Used by scripts/bench.py; runnable alone:

    python3 scripts/bench_protect.py [--runs 5] [--repeat 1000000]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import bench_kernel  # noqa: E402
import bench_rules  # noqa: E402
from scapy.layers.inet import IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from xdpflow.bindings.libbpf import Object  # noqa: E402
from xdpflow.dataplane import abi  # noqa: E402
from xdpflow.dataplane.protect import Group, ProtectTables  # noqa: E402
from xdpflow.rules.blockfile import Rule  # noqa: E402
from xdpflow.testing.variants import build_without  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BPF_CFLAGS = ["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror"]
NEW_FLOWS = 4096
AGAIN = "no group installed, the same program loaded again"

# the benchmark frames' destinations: 198.18.0.2 and 2001:2::2 (bench_kernel)
PROTECTED4, UNPROTECTED4 = "198.18.0.2", "198.19.200.2"
PROTECTED6, UNPROTECTED6 = "2001:2::2", "2001:2:ffff::2"


def hundred_groups(seed: int = 5) -> list[Group]:
    """100 prefixes in four groups; the protected frames' hosts lie inside
    a /24 and a /64 (and the IPv4 one also in a /32 of another group)."""
    rnd = random.Random(seed)
    p4: list[ipaddress.IPv4Network] = [ipaddress.IPv4Network("198.18.0.0/24")]
    while len(p4) < 40:
        a = (198 << 24 | 18 << 16) + rnd.randrange(1 << 16)  # 198.18.0.0/16: never 198.19.x
        p4.append(ipaddress.IPv4Network((a, rnd.choice((24, 32))), strict=False))
    p6: list[ipaddress.IPv6Network] = [ipaddress.IPv6Network("2001:2::/64")]
    while len(p6) < 40:
        a = (0x20010002 << 96) | (rnd.randrange(1, 1 << 16) << 64) | rnd.getrandbits(64)
        p6.append(ipaddress.IPv6Network((a, rnd.choice((64, 128))), strict=False))
    hosts4 = [ipaddress.IPv4Network(f"198.18.0.{i}/32") for i in range(2, 22)]
    uniq4 = list(dict.fromkeys(p4))
    uniq6 = list(dict.fromkeys(p6))
    return [
        Group("web4", tuple(uniq4[:20])),
        Group("nets4", tuple(uniq4[20:])),
        Group("hosts4", tuple(h for h in hosts4 if h not in uniq4)),
        Group("v6", tuple(uniq6)),
    ]


def build_before(rev: str, out_dir: str) -> str:
    """The xdpflow object as it was at ``rev`` (git archive + clang)."""
    src = os.path.join(out_dir, "src")
    os.makedirs(src, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "bpf"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    obj = os.path.join(out_dir, "before.bpf.o")
    inc = f"-I/usr/include/{os.uname().machine}-linux-gnu"
    subprocess.run(["clang", *BPF_CFLAGS, inc, "-c", os.path.join(src, "bpf", "xdpflow.bpf.c"), "-o", obj], check=True)
    return obj


def before_protect() -> str:
    """The commit before bpf/protect.h was added."""
    r = subprocess.run(
        ["git", "-C", ROOT, "log", "--diff-filter=A", "--format=%H", "--", "bpf/protect.h"],
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.split()[-1] + "~1"


# one figure and one table shape for every "this row versus that row" benchmark
ProtectFigure = bench_rules.RulesFigure
table = bench_rules.table


def frames() -> dict[str, bytes]:
    fr = bench_kernel.frames()
    eth = Ether(src=bench_kernel.MAC_A, dst=bench_kernel.MAC_B)
    pad = Raw(b"\0" * 18)
    fr["udp4_off"] = bytes(eth / IP(src="198.18.0.1", dst=UNPROTECTED4) / UDP(sport=1024, dport=2048) / pad)
    fr["tcp6_off"] = bytes(eth / IPv6(src="2001:2::1", dst=UNPROTECTED6) / TCP(sport=1024, dport=80, flags="A"))
    # inside a protected /16 but in no protected prefix: the level walk
    fr["udp4_near"] = bytes(eth / IP(src="198.18.0.1", dst="198.18.255.254") / UDP(sport=1024, dport=2048) / pad)
    return fr


def _flush_flows(o: bench_kernel.Loaded) -> None:
    for name in ("flows_v4", "flows_v6"):
        o.map(name).lookup_batch_raw(delete=True)


def load(prefixes: list[Rule], before_path: str, out_path: str) -> dict[str, bench_kernel.Loaded]:
    """Every object a round compares, loaded afresh (see bench_rules.load:
    each round takes its own placement in memory)."""
    objs: dict[str, bench_kernel.Loaded] = {}
    try:
        objs["before"] = bench_kernel.Loaded(prefixes, object_path=before_path)
        objs["out"] = bench_kernel.Loaded(prefixes, object_path=out_path)
        objs["off"] = bench_kernel.Loaded(prefixes, flows_of=objs["out"])
        objs["again"] = bench_kernel.Loaded(prefixes, flows_of=objs["out"])
        objs["on"] = bench_kernel.Loaded(prefixes)
        ProtectTables(objs["on"].map).install(hundred_groups())
    except BaseException:
        for o in objs.values():
            o.close()
        raise
    return objs


def measure(runs: int, repeat: int, before: str | None = None) -> list[ProtectFigure]:
    fr = frames()
    tuples = bench_kernel.distinct_udp4(NEW_FLOWS)
    base_obj = Object(abi.object_path("baseline"))
    base_obj.load()
    xdp_pass = base_obj.program("xdp_pass")
    prefixes = bench_kernel.random_prefixes(10000, 10000)
    tmp = tempfile.TemporaryDirectory(prefix="xfbench-")
    objs: dict[str, bench_kernel.Loaded] = {}
    rows: list[bench_rules.Row] = []
    for path, key in (
        ("established UDP/IPv4", "udp4"),
        ("established TCP/IPv6", "tcp6"),
        ("blocked source", "blocked4"),
        ("new flow UDP/IPv4", "new"),
    ):
        rows.append((f"before protected groups (git): {path}", "before", key, None, ""))
        rows.append((f"counting compiled out: {path}", "out", key, None, ""))
        rows.append((f"no group installed: {path}", "off", key, 2.0, f"counting compiled out: {path}"))
        if key == "new":
            # a control: what one program reads against itself
            rows.append((f"{AGAIN}: {path}", "again", key, None, f"no group installed: {path}"))
    rows += [
        ("100 prefixes: UDP/IPv4 to an unprotected host", "on", "udp4_off", None, ""),
        (
            "100 prefixes: UDP/IPv4 to a protected host",
            "on",
            "udp4",
            25.0,
            "100 prefixes: UDP/IPv4 to an unprotected host",
        ),  # fmt: skip
        ("100 prefixes: UDP/IPv4 to an unprotected host in a protected /16", "on", "udp4_near", None, ""),
        ("100 prefixes: TCP/IPv6 to an unprotected host", "on", "tcp6_off", None, ""),
        (
            "100 prefixes: TCP/IPv6 to a protected host",
            "on",
            "tcp6",
            25.0,
            "100 prefixes: TCP/IPv6 to an unprotected host",
        ),  # fmt: skip
    ]
    figs = {r[0]: ProtectFigure(r[0], r[3], r[4], []) for r in rows}
    where = {row[0]: row for row in rows}

    def frame(key: str) -> bytes:
        # a new flow's path: a tuple no run has put in the table yet (the
        # first one is the established UDP/IPv4 frame)
        return tuples[-1] if key == "new" else fr[key]

    def ns(which: str, key: str) -> float:
        o = objs[which]
        if key == "new":
            _flush_flows(o)
            return bench_kernel.new_flow_ns(o.prog, tuples)
        return bench_kernel.per_frame_ns(o.prog, fr[key], repeat)

    try:
        before_path = build_before(before or before_protect(), tmp.name)
        out_path = build_without("XF_BENCH_NO_PROTECT", tmp.name)
        for r in range(runs):
            for o in objs.values():
                o.close()
            objs = {}  # closed: not to be closed again if a load fails
            objs = load(prefixes, before_path, out_path)
            for o in objs.values():
                for k in ("udp4", "tcp6", "blocked4", "udp4_off", "tcp6_off", "udp4_near"):
                    o.prog.test_run(fr[k], repeat=1)
            if r == 0:
                bench_rules.count_paths(figs, rows, objs, frame)
            base = {k: bench_kernel.per_frame_ns(xdp_pass, f, repeat) for k, f in fr.items()}
            base["new"] = bench_kernel.new_flow_ns(xdp_pass, tuples)
            # every other round backwards: a figure measured right after
            # another read a few ns apart, depending on which came first
            for name, which, key, _t, _v in rows if r % 2 == 0 else rows[::-1]:
                figs[name].samples.append(ns(which, key) - base[key])
            # each judged figure (and control) again next to the one it is
            # judged against; in the new-flow ones each run empties the
            # table first, one table that "out", "off" and "again" share
            for i, (name, which, key, _target, versus) in enumerate(rows):
                if not versus:
                    continue
                vwhich, vkey = where[versus][1], where[versus][2]
                figs[name].diffs.append(
                    bench_rules.paired_diff(
                        lambda: ns(vwhich, vkey),  # noqa: B023
                        lambda: ns(which, key),  # noqa: B023
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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1_000_000)
    p.add_argument(
        "--before", help="git revision of the object without protected groups (default: before bpf/protect.h)"
    )
    args = p.parse_args()
    t = time.time()
    with bench_kernel.pinned():
        print("\n".join(table(measure(args.runs, args.repeat, args.before))))
    print(f"({time.time() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
