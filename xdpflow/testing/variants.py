"""The program with a feature compiled out: what that feature's idle cost is
measured against (by scripts/bench_rules.py and bench_protect.py in ns, by
the path-length tests in instructions). Never shipped.

The defines: XF_BENCH_NO_RULES (the rules engine), XF_BENCH_NO_PROTECT
(per-destination counting for protected groups).
"""

from __future__ import annotations

import os
import subprocess

# a source checkout: bpf/ beside the package
BPF_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bpf")


def build_without(define: str, out_dir: str) -> str:
    """This tree's program built with ``-D{define}`` into ``out_dir``; returns
    the object's path. Raises subprocess.CalledProcessError if clang fails."""
    obj = os.path.join(out_dir, f"{define.lower()}.bpf.o")
    inc = f"-I/usr/include/{os.uname().machine}-linux-gnu"
    cflags = ["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror", f"-D{define}"]
    src = os.path.join(BPF_SRC, "xdpflow.bpf.c")
    subprocess.run(["clang", *cflags, inc, f"-I{BPF_SRC}", "-c", src, "-o", obj], check=True)
    return obj
