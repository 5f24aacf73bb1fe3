"""What the `xdpflow` command says when it cannot do what was asked: one line
on stderr, no traceback, exit 1 for a failed operation and 2 for bad input,
and nothing left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from xdpflow.testing.lab import Lab

from .clitest import Cli, xdp_prog


def test_unknown_interface(lab: Lab, cli: Cli, pin_root: str) -> None:
    err = cli.fails(1, "attach", "nosuch0")
    assert err == "xdpflow: no interface named 'nosuch0' in this network namespace; `ip link` lists them\n"
    assert not os.path.exists(pin_root)
    cli("attach", lab.dut_if)
    want = f"xdpflow: xdpflow is not attached to nosuch0 (pin root {pin_root})\n"
    assert cli.fails(1, "stats", "nosuch0") == want
    assert cli.fails(1, "flows", "nosuch0") == want
    assert cli.fails(1, "detach", "nosuch0") == want
    cli("detach", lab.dut_if)
    # a program the interface cannot take in the asked mode leaves nothing either
    cli.fails(1, "attach", lab.dut_if, "--mode", "hw")
    assert not os.path.exists(pin_root)
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None


def test_nothing_attached(cli: Cli, pin_root: str) -> None:
    want = f"xdpflow: nothing is attached under {pin_root}; run `xdpflow attach IFACE` first\n"
    failing = [
        ("stats",),
        ("flows",),
        ("block", "list"),
        ("block", "add", "198.51.100.0/24"),
        ("block", "sync", "-"),
        ("monitor", "on"),
        ("events", "--duration", "1"),
    ]
    *results, status, status_json = cli.run_all(*failing, ("status",), ("status", "--json"))
    for args, r in zip(failing, results, strict=True):
        assert (r.returncode, r.stdout, r.stderr) == (1, "", want), args
    assert (status.returncode, status.stdout) == (0, f"nothing attached under {pin_root}\n")
    assert (status_json.returncode, status_json.stdout) == (0, "[]\n")
    assert not os.path.exists(pin_root)


def test_bad_cidr_is_exit_2(cli: Cli) -> None:
    cases = {
        "198.51.100.0/33": "'198.51.100.0/33': prefix length must be a decimal number from 0 to 32",
        "198.51.100.256": "'198.51.100.256' is not an IPv4 or IPv6 address or CIDR: octet 256 (> 255) not permitted",
        "198.51.100.1/24": "'198.51.100.1/24' has host bits set; did you mean 198.51.100.0/24?",
        "2001:db8::/129": "'2001:db8::/129': prefix length must be a decimal number from 0 to 128",
        "2001:db8:::1": "'2001:db8:::1' is not an IPv4 or IPv6 address or CIDR",
        "example.com": "'example.com' is not an IPv4 or IPv6 address or CIDR",
    }
    results = cli.run_all(*[("block", "add", text) for text in cases])
    for (text, why), r in zip(cases.items(), results, strict=True):
        assert (r.returncode, r.stdout, r.stderr) == (2, "", f"xdpflow: {why}; nothing was changed\n"), text


def test_pin_root_not_on_bpffs(lab: Lab, tmp_path: Path) -> None:
    root = tmp_path / "x"
    cli = Cli.of(lab, str(root))
    err = cli.fails(1, "attach", lab.dut_if)
    assert err == (
        f"xdpflow: {tmp_path} is not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` "
        "or choose a --pin-root below a bpffs mount\n"
    )
    assert not root.exists()
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None


def test_unknown_namespace(pin_root: str) -> None:
    cli = Cli("xfcli-no-such-netns", pin_root)
    err = cli.fails(1, "status")
    assert err == "xdpflow: no network namespace named 'xfcli-no-such-netns'; `ip netns list` lists them\n"


def test_usage_errors_are_exit_2_and_debug_adds_the_traceback(cli: Cli) -> None:
    usage = [("flows", "--top", "0"), ("stats", "--watch", "-1"), ("frobnicate",), ("attach",)]
    *results, debug = cli.run_all(*usage, ("attach", "nosuch0", "--debug"))
    for args, r in zip(usage, results, strict=True):
        assert r.returncode == 2 and "usage: xdpflow" in r.stderr and "Traceback" not in r.stderr, args
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1] == (
        "xdpflow: no interface named 'nosuch0' in this network namespace; `ip link` lists them"
    )
