"""`make demo`, one of the README's two commands, runs as the README says:
it builds its lab, counts exactly what it sent, and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys

from pyroute2.netns import listnetns


def test_make_demo_counts_exactly_and_cleans_up() -> None:
    before = set(listnetns())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    r = subprocess.run(
        [sys.executable, "-m", "xdpflow.testing.demo"], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "OK: counted exactly what was sent" in r.stdout
    assert "lab torn down" in r.stdout
    assert set(listnetns()) == before
    assert not [p for p in os.listdir("/sys/fs/bpf") if p.startswith("xdpflow-demo")]
