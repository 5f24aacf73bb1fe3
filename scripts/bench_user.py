"""Userspace figures: what an operator waits for, as wall time of whole
`xdpflow` commands (interpreter start-up included), next to the start-up of a
bare interpreter measured in the same rounds.

    python3 scripts/bench_user.py [--runs 5]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from xdpflow.bindings.netlink import in_netns  # noqa: E402
from xdpflow.dataplane.abi import ffi  # noqa: E402
from xdpflow.dataplane.maps import open_map  # noqa: E402
from xdpflow.dataplane.pins import PinRoot  # noqa: E402
from xdpflow.testing.lab import Lab  # noqa: E402


@dataclass
class Timing:
    name: str
    samples: list[float]
    base: list[float]

    def row(self) -> str:
        med = statistics.median(self.samples)
        return (
            f"| {self.name} | {statistics.median(self.base):.3f} | {med:.3f} | "
            f"{min(self.samples):.3f}–{max(self.samples):.3f} |"
        )


def wall(cmd: list[str], stdin: bytes | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, input=stdin, capture_output=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed: {r.stderr.decode().strip()}")
    return dt


def fill_flows(ifname: str, pin_root: str, n: int) -> None:
    """n distinct IPv4 flows written straight into the pinned table."""
    with open_map(PinRoot(pin_root), "flows_v4", ifname) as m:
        ks = ffi.sizeof("struct xf_flow4")
        stride = m.ncpu * m.value_stride
        chunk = 65536
        rng = np.random.default_rng(1)
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            keys = np.zeros((k, ks), dtype=np.uint8)
            idx = np.arange(start, start + k, dtype=np.uint32)
            # 198.18.0.0/15 sources, distinct (source, port) pairs
            src = (0xC6120000 | (idx >> 4)).astype(">u4").view(np.uint8).reshape(k, 4)
            keys[:, 0:4] = src
            keys[:, 4:8] = np.frombuffer(bytes([198, 18, 0, 2]), dtype=np.uint8)
            keys[:, 8:10] = (1024 + (idx & 15)).astype(">u2").view(np.uint8).reshape(k, 2)
            keys[:, 10:12] = np.frombuffer((53).to_bytes(2, "big"), dtype=np.uint8)
            keys[:, 12] = 17
            vals = np.zeros((k, stride), dtype=np.uint8)
            pk = rng.integers(1, 1_000_000, size=k, dtype=np.uint64)
            vals[:, 0:8] = pk.view(np.uint8).reshape(k, 8)
            vals[:, 8:16] = (pk * 64).view(np.uint8).reshape(k, 8)
            now = np.full(k, 1, dtype=np.uint64).view(np.uint8).reshape(k, 8)
            vals[:, 16:24] = now
            vals[:, 24:32] = now
            m.update_batch_raw(ffi.from_buffer(keys.tobytes()), ffi.from_buffer(vals.tobytes()), k)


def prefix_file(path: str, n: int, seed: int) -> None:
    rnd = random.Random(seed)
    lines: set[str] = set()
    while len(lines) < n:
        r = rnd.random()
        if r < 0.6:
            lines.add(str(ipaddress.IPv4Network((rnd.getrandbits(24) << 8, 24))))
        elif r < 0.9:
            lines.add(str(ipaddress.IPv4Address(rnd.getrandbits(32))))
        else:
            lines.add(str(ipaddress.IPv6Network(((0x2001 << 112) | (rnd.getrandbits(32) << 80), 48))))
    with open(path, "w") as f:
        f.write("# benchmark blocklist\n")
        for line in sorted(lines):
            f.write(f"{line} ; bench\n")


def measure(runs: int, flows: int = 1_000_000, prefixes: int = 100_000) -> list[Timing]:
    pin_root = f"/sys/fs/bpf/xfbench-{uuid.uuid4().hex[:8]}"
    tmp = tempfile.mkdtemp(prefix="xfbench")
    out: list[Timing] = []
    py = [sys.executable, "-c", "pass"]
    with Lab("xfbench") as lab:
        cli = [sys.executable, "-m", "xdpflow", "--netns", lab.dut_ns, "--pin-root", pin_root]
        try:
            subprocess.run([*cli, "attach", lab.dut_if, "--flows", str(1 << 20)], check=True, capture_output=True)
            with in_netns(lab.dut_ns):
                fill_flows(lab.dut_if, pin_root, flows)
            files = [os.path.join(tmp, f"block{i}.txt") for i in range(2)]
            prefix_file(files[0], prefixes, 1)
            prefix_file(files[1], prefixes, 2)

            top = Timing(f"`flows --top 20` of {flows:,} flows", [], [])
            stats = Timing("`stats --json`", [], [])
            status = Timing(f"`status --json` with {flows:,} flows", [], [])
            sync = Timing(f"`block sync` {prefixes:,} prefixes (from empty)", [], [])
            resync = Timing(f"`block sync` {prefixes:,} prefixes (replacing {prefixes:,} others)", [], [])
            for _ in range(runs):
                base = wall(py)
                top.samples.append(wall([*cli, "flows", "--top", "20", "--json"]))
                top.base.append(base)
                stats.samples.append(wall([*cli, "stats", "--json"]))
                stats.base.append(base)
                status.samples.append(wall([*cli, "status", "--json"]))
                status.base.append(base)
                subprocess.run([*cli, "block", "flush"], check=True, capture_output=True)
                sync.samples.append(wall([*cli, "block", "sync", files[0]]))
                sync.base.append(base)
                resync.samples.append(wall([*cli, "block", "sync", files[1]]))
                resync.base.append(base)
            out = [top, sync, resync, stats, status]
        finally:
            subprocess.run([*cli, "detach", lab.dut_if], capture_output=True)
            shutil.rmtree(pin_root, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--flows", type=int, default=1_000_000)
    p.add_argument("--prefixes", type=int, default=100_000)
    args = p.parse_args()
    print("| command | bare interpreter s | wall s (median) | min–max |")
    print("| --- | --- | --- | --- |")
    for t in measure(args.runs, args.flows, args.prefixes):
        print(t.row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
