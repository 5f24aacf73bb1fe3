"""Hostile frames: random bytes and mutated valid frames, checked exactly.

Every frame's verdict is compared with the reference model (frames.py), and
after each chunk so are the counters (every class, action and protocol,
packets and bytes), the flow tables, the rule hit counters and the event
accounting (delivered + suppressed + lost == events the model expects). The
flow tables are emptied between chunks so a long run never reaches LRU
eviction, which the model does not predict.

The fast variant runs a fixed-seed 40,000 frames; ``make fuzz`` runs the
``fuzz``-marked one with XDPFLOW_FUZZ_FRAMES frames (default 1,000,000).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable

import pytest

from xdpflow.dataplane import abi
from xdpflow.rules.blockfile import Rule, parse_cidr

from .. import frames
from ..frames import CLASSES, L4, Model, ModelRule, Mutator, check_model, classify

# loaded programs from a pool shared by the session, reset before each test (frames.py)
prog_pool_fixture = frames.prog_pool_fixture
make_prog_fixture = frames.make_prog_fixture

RULES = [
    Rule(parse_cidr("198.51.100.0/24"), "src"),  # the blocked-v4-udp template
    Rule(parse_cidr("203.0.113.0/25"), "dst"),  # the v4-gre template
    Rule(parse_cidr("198.19.1.1/32"), "src"),  # the v4opt-tcp template
    Rule(parse_cidr("2001:db8:bad::/48"), "dst"),  # the blocked-v6-tcp template
]

VARIANTS = {
    "default": ({}, False),
    "shared-sink-monitor": ({"shared_flows": True, "sink": True}, True),
}


def _dmesg() -> list[str]:
    r = subprocess.run(["dmesg"], capture_output=True, text=True, errors="replace", check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot read the kernel log: {r.stderr.strip()}")
    return r.stdout.splitlines()


def _kernel_complaints(before: list[str], after: list[str]) -> list[str]:
    seen = set(before)
    return [line for line in after if line not in seen and ("WARNING" in line or "BUG" in line)]


def run_hostile(prog, make_frame: Callable[[int], bytes], n: int, monitor: bool, sink: bool, chunk: int) -> Counter:
    """Run n frames in chunks; returns the totals of the model's counters."""
    if monitor:
        m = prog.map("config")
        cfg = m[0]
        cfg.flags |= abi.C.XF_CFG_MONITOR
        m[0] = cfg
    prog.blocklist.add(RULES)
    rules = [ModelRule(r.net, r.direction, i) for r, i in prog.blocklist.entries().items()]
    hits: Counter[int] = Counter()
    totals: Counter[str] = Counter()
    run = prog.prog.test_run
    done = 0
    while done < n:
        fs = [make_frame(done + i) for i in range(min(chunk, n - done))]
        done += len(fs)
        model = Model(rules=rules, monitor=monitor, sink=sink)
        before = prog.counters()
        got = [run(f, data_out=False).retval for f in fs]
        want = [model.feed(f) for f in fs]
        assert 0 not in got, "XDP_ABORTED"
        if got != want:
            bad = [(f.hex(), classify(f), g, w) for f, g, w in zip(fs, got, want, strict=True) if g != w]
            pytest.fail(f"{len(bad)} verdicts differ from the model; first: {bad[:3]}")
        check_model(prog, model, before)
        hits.update(model.hits)
        by_index = {i: f"{r.direction} {r.net}" for r, i in prog.blocklist.entries().items()}
        listing = {f"{r.direction} {r.net}": h for r, h in prog.blocklist.listing()}
        assert listing == {by_index[i]: hits.get(i, 0) for i in by_index}
        totals.update({k: v for k, v in model.counters.items() if not k.endswith("_bytes")})
        for name in ("flows_v4", "flows_v6"):
            prog.map(name).lookup_batch_raw(delete=True)
    c = prog.counters()
    frames.check_invariants(c)
    assert c["packets"] == n
    return totals


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hostile_frames(make_prog, variant):
    opts, monitor = VARIANTS[variant]
    prog = make_prog(**opts)
    mut = Mutator(seed=20240611)
    corpus = [mut.random_frame() for _ in range(20_000)] + [mut.mutated_frame() for _ in range(20_000)]
    before = _dmesg()
    totals = run_hostile(prog, corpus.__getitem__, len(corpus), monitor, opts.get("sink", False), chunk=10_000)
    assert _kernel_complaints(before, _dmesg()) == []
    # the corpus reaches every class and protocol, and the blocklist
    for name in (*CLASSES, *L4, "dropped" if not monitor else "monitored"):
        assert totals[name] >= 100, (name, totals)


@pytest.mark.fuzz
def test_fuzz_long():
    """``make fuzz``: XDPFLOW_FUZZ_FRAMES frames, half random, half mutated,
    on a fresh program (conftest's fixtures are not used so the run stands
    alone). Must finish within 10 minutes on two slow cores."""
    from .frames import ProgPool

    n = int(os.environ.get("XDPFLOW_FUZZ_FRAMES", "1000000"))
    seed = int(os.environ.get("XDPFLOW_FUZZ_SEED", "1"))
    mut = Mutator(seed=seed)

    def make(i: int) -> bytes:
        return mut.random_frame() if i & 1 else mut.mutated_frame()

    pool = ProgPool()
    try:
        prog = pool.get()
        before = _dmesg()
        t0 = time.monotonic()
        totals = run_hostile(prog, make, n, monitor=False, sink=False, chunk=20_000)
        elapsed = time.monotonic() - t0
        assert _kernel_complaints(before, _dmesg()) == []
    finally:
        pool.close()
    mix = {k: v for k, v in totals.items() if v and k != "packets"}
    print(f"\nfuzz: {n} frames (seed {seed}) in {elapsed:.1f} s: {mix}")
    assert elapsed < 600
