"""The console script's entry point: whatever stops the package from loading
(a header, an object or a module it cannot read; a bug) ends in one line on
stderr and exit 1, the traceback only with --debug. Runs ``python3 -m
xdpflow`` from a copy of the package in a temp directory, damaged on purpose.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import xdpflow

from ..clitest import assert_one_error_line

PACKAGE = Path(xdpflow.__file__).resolve().parent


def copy_package(dest: Path) -> Path:
    shutil.copytree(PACKAGE, dest / "xdpflow", ignore=shutil.ignore_patterns("__pycache__"))
    return dest / "xdpflow"


def run(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("XDPFLOW_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "xdpflow", *args], cwd=tree, env=env, capture_output=True, text=True, timeout=60
    )


def test_a_missing_header_is_one_line(tmp_path: Path) -> None:
    pkg = copy_package(tmp_path)
    # a built tree carries the header compiled (dataplane/_abi_ffi.py): the
    # header is read only without it
    (pkg / "dataplane" / "_abi_ffi.py").unlink(missing_ok=True)
    (pkg / "bpf" / "xdpflow.h").unlink()
    r = run(tmp_path, "status", "--pin-root", str(tmp_path / "pins"))
    assert (r.returncode, r.stdout) == (1, "")
    assert_one_error_line(r.stderr)
    assert r.stderr == f"xdpflow: No such file or directory: {pkg / 'bpf' / 'xdpflow.h'}\n"


def test_a_module_that_cannot_load_is_one_line(tmp_path: Path) -> None:
    pkg = copy_package(tmp_path)
    (pkg / "dataplane" / "maps.py").write_text("raise ImportError('simulated', name='xdpflow.dataplane.maps')\n")
    r = run(tmp_path, "status", "--pin-root", str(tmp_path / "pins"))
    assert (r.returncode, r.stdout) == (1, "")
    assert_one_error_line(r.stderr)
    assert r.stderr.startswith("xdpflow: cannot load xdpflow.dataplane.maps: simulated; ")
    assert "run as root" in r.stderr


def test_a_bug_is_one_line_and_debug_adds_the_traceback(tmp_path: Path) -> None:
    pkg = copy_package(tmp_path)
    (pkg / "app" / "output.py").write_text("raise RuntimeError('boom')\n")
    r = run(tmp_path, "status", "--pin-root", str(tmp_path / "pins"))
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "xdpflow: internal error: RuntimeError('boom'); --debug shows the traceback\n"
    debug = run(tmp_path, "status", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1] == r.stderr.strip()
