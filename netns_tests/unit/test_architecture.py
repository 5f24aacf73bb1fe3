"""The package's shape holds: every module imports alone, in a fresh
interpreter, and the import-linter contracts in pyproject.toml are kept
(imports only go down the layers; rules stay pure; the product never
imports the test tooling). Both would otherwise break only at run time,
in whichever process imports a module first.
"""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import xdpflow

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(xdpflow.__file__).resolve().parent


def modules() -> list[str]:
    found = pkgutil.walk_packages([str(PACKAGE)], prefix="xdpflow.")
    return ["xdpflow", *sorted(m.name for m in found)]


def test_the_walk_finds_every_layer() -> None:
    names = modules()
    for layer in ("errors", "bindings.libbpf", "bindings.netlink", "rules.blockfile", "dataplane.abi",
                  "export.ipfix", "app.cli", "app.commands", "testing.lab", "__main__"):  # fmt: skip
        assert f"xdpflow.{layer}" in names


def test_every_module_imports_alone() -> None:
    # all at once: each in a fresh interpreter, so no module can lean on
    # another one that happened to be imported first
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-c", f"import {m}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for m in modules()
    }
    failed = {}
    for m, p in procs.items():
        out, _ = p.communicate(timeout=120)
        if p.returncode != 0:
            failed[m] = out.strip().splitlines()[-1] if out.strip() else f"exit {p.returncode}"
    assert not failed, failed


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the package below ``root``, with ``root``'s pyproject.toml."""
    code = (
        "import sys\nfrom importlinter.cli import lint_imports\n"
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept() -> None:
    pytest.importorskip("importlinter", reason="import-linter is a test extra: make deps")
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_a_broken_contract_is_caught(tmp_path: Path) -> None:
    """The check above can fail: an upward import (rules -> app) in a copy breaks it."""
    pytest.importorskip("importlinter", reason="import-linter is a test extra: make deps")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(PACKAGE, tmp_path / "xdpflow", ignore=shutil.ignore_patterns("bpf", "__pycache__"))
    with open(tmp_path / "xdpflow" / "rules" / "blockfile.py", "a") as f:
        f.write("\nimport xdpflow.app.cli  # noqa\n")
    r = lint_imports(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "BROKEN" in r.stdout and "xdpflow.rules.blockfile -> xdpflow.app.cli" in r.stdout, r.stdout
