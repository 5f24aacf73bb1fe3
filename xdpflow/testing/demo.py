"""`make demo`: xdpflow end to end in a throw-away namespace lab.

Builds two namespaces joined by a veth (or uses a real NIC given with
``--dev``, only to attach, count and detach: no traffic is sent on it),
attaches xdpflow to the lab's receiving side through the `xdpflow` command,
blocks one documentation prefix, sends a known scapy mix plus frames from the
blocked prefix, prints what was counted, checks the counts equal what was
sent, and tears everything down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from xdpflow.testing.lab import Lab, traffic_mix

BLOCKED_NET = "198.51.100.0/24"


def xdpflow(*args: str, capture: bool = False) -> str:
    """Run the installed command the way an operator would, echoing it."""
    cmd = [sys.executable, "-m", "xdpflow", *args]
    shown = " ".join(["xdpflow", *args])
    if not capture:
        print(f"\n$ {shown}", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"demo: `{shown}` failed with exit code {r.returncode}")
    if not capture:
        sys.stdout.write(r.stdout)
    return r.stdout


def run_lab() -> int:
    pin_root = f"/sys/fs/bpf/xdpflow-demo-{uuid.uuid4().hex[:8]}"
    with Lab("xfdemo") as lab:
        common = ["--netns", lab.dut_ns, "--pin-root", pin_root]
        print(f"lab: {lab.gen_ns} ({lab.gen_if} {lab.gen_v4}) <-> {lab.dut_ns} ({lab.dut_if} {lab.dut_v4})")
        try:
            xdpflow("attach", lab.dut_if, "--mode", "native", *common)
            xdpflow("block", "add", BLOCKED_NET, *common)

            mix = traffic_mix(lab)
            blocked = [
                Ether(src=lab.gen_mac, dst=lab.dut_mac)
                / IP(src=f"198.51.100.{i}", dst=lab.dut_v4)
                / UDP(sport=5000 + i, dport=53)
                / Raw(b"\0" * 20)
                for i in range(1, 6)
            ]
            frames = [bytes(f) for f in mix] + [bytes(f) for f in blocked]
            with lab.receiver() as rx:
                sent = lab.send(frames)
                received = rx.stop()
            print(
                f"\nsent {sent} frames ({len(mix)} in the mix, {len(blocked)} from {BLOCKED_NET}); "
                f"{len(received)} reached {lab.dut_ns}"
            )

            xdpflow("stats", *common)
            xdpflow("flows", *common)
            xdpflow("block", "list", *common)
            xdpflow("status", *common)

            stats = json.loads(xdpflow("stats", "--json", *common, capture=True))[lab.dut_if]
            want = {
                "packets": len(frames),
                "bytes": sum(len(f) for f in frames),
                "dropped": len(blocked),
                "passed": len(mix),
                "ipv4": sum(1 for f in mix if f.haslayer(IP)) + len(blocked),
            }
            bad = {k: (stats[k], v) for k, v in want.items() if stats[k] != v}
            if bad or len(received) != len(mix):
                print(f"\ndemo: MISMATCH (counted, sent): {bad}, received {len(received)} of {len(mix)}")
                return 1
            print(
                f"\nOK: counted exactly what was sent: {want['packets']} frames, "
                f"{want['bytes']} bytes; {want['dropped']} blocked, {want['passed']} passed"
            )
            if not blast_check(lab, common):
                return 1
        finally:
            subprocess.run([sys.executable, "-m", "xdpflow", "detach", lab.dut_if, *common], capture_output=True)
            shutil.rmtree(pin_root, ignore_errors=True)
    print("lab torn down")
    return 0


def blast_check(lab: Lab, common: list[str], total: int = 1_000_000, flows: int = 1000) -> bool:
    """The live-frames generator: `total` frames of `flows` flows at kernel
    speed into the DUT, switched to sink mode (counted, tracked, dropped) so
    the namespace's stack is not what gets measured."""
    from xdpflow.testing.pktgen import FlowMix, blast, vary_frame

    xdpflow("attach", lab.dut_if, "--sink", *common)
    before = json.loads(xdpflow("stats", "--json", *common, capture=True))[lab.dut_if]["packets"]
    mix = FlowMix(n_flows=flows, families="4", protocols=("udp",), src_mac=lab.gen_mac, dst_mac=lab.dut_mac)
    frame, offset = vary_frame(mix)
    r = blast(lab.gen_if, [frame], total, netns=lab.gen_ns, vary=(offset, flows))
    after = json.loads(xdpflow("stats", "--json", *common, capture=True))[lab.dut_if]["packets"]
    print(
        f"\nlive-frames generator: sent {r.sent:,} frames of {flows:,} flows in {r.seconds:.2f} s "
        f"({r.pps / 1e6:.2f} Mpps); xdpflow counted {after - before:,}"
    )
    xdpflow("flows", "--top", "5", *common)
    if after - before != r.sent:
        print("demo: MISMATCH between frames sent and counted")
        return False
    return True


def run_dev(dev: str, seconds: float) -> int:
    """On a real NIC: attach, watch counters for a while, detach."""
    pin_root = f"/sys/fs/bpf/xdpflow-demo-{uuid.uuid4().hex[:8]}"
    common = ["--pin-root", pin_root]
    try:
        xdpflow("attach", dev, *common)
        time.sleep(seconds)
        xdpflow("stats", *common)
        xdpflow("flows", "--top", "10", *common)
    finally:
        subprocess.run([sys.executable, "-m", "xdpflow", "detach", dev, *common], capture_output=True)
        shutil.rmtree(pin_root, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xdpflow-demo", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--dev", default=os.environ.get("DEV"), help="a real interface to watch instead of the lab")
    p.add_argument("--seconds", type=float, default=5.0, help="how long to count on --dev")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: needs root (namespaces, BPF, XDP)", file=sys.stderr)
        return 1
    if args.dev:
        return run_dev(args.dev, args.seconds)
    return run_lab()


if __name__ == "__main__":
    sys.exit(main())
