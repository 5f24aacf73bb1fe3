"""Fixtures for the end-to-end tests: unique pin roots and namespace labs.

Every fixture removes what it created, on failure and on Ctrl-C too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from pyroute2 import netns as pyroute2_netns
from pyroute2.netns import listnetns

from xdpflow.dataplane import lifecycle
from xdpflow.dataplane.pins import PinRoot, ensure_bpffs
from xdpflow.testing.lab import Lab

from ..clitest import Cli


@pytest.fixture
def pin_root() -> Iterator[str]:
    """A pin root of this test's own under /sys/fs/bpf, removed afterwards."""
    ensure_bpffs("/sys/fs/bpf/xdpflow")
    root = f"/sys/fs/bpf/xftest-{uuid.uuid4().hex[:10]}"
    try:
        yield root
    finally:
        cleanup_pin_root(root)


def cleanup_pin_root(root: str) -> None:
    pins = PinRoot(root)
    for ifname in pins.interfaces():
        try:
            lifecycle.detach(ifname, pins)
        except OSError:
            pins.remove_iface(ifname)
    pins.remove_shared()
    if os.path.isdir(root):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A fresh namespace lab, its names prefixed with the test module's
    LAB_PREFIX (default "xfcli"); the test fails if a namespace outlives it."""
    with Lab(getattr(request.module, "LAB_PREFIX", "xfcli")) as lab:
        yield lab
    left = {lab.gen_ns, lab.dut_ns} & set(listnetns())
    assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def cli(lab: Lab, pin_root: str) -> Cli:
    """The `xdpflow` command bound to the lab's dut namespace and the pin root."""
    return Cli.of(lab, pin_root)


@pytest.fixture
def other_ns(request: pytest.FixtureRequest) -> Iterator[str]:
    """A third, empty network namespace; whatever was moved into it is deleted with it."""
    name = f"{getattr(request.module, 'LAB_PREFIX', 'xfcli')}-oth-{uuid.uuid4().hex[:6]}"
    pyroute2_netns.create(name)
    try:
        yield name
    finally:
        links = subprocess.run(["ip", "-n", name, "-j", "link", "show"], capture_output=True, text=True)
        for link in json.loads(links.stdout or "[]"):
            if link["ifname"] != "lo":
                subprocess.run(["ip", "-n", name, "link", "del", link["ifname"]], capture_output=True)
        pyroute2_netns.remove(name)


def ip(*args: str) -> None:
    """Run `ip ARGS`; fails the test when it fails."""
    subprocess.run(["ip", *args], capture_output=True, text=True, check=True)
