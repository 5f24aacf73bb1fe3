"""Input the `xdpflow` command refuses before it touches the kernel, a
namespace or a pin: exit 2, one line on stderr, no traceback. Runs as any
user, in this process's own network namespace; the pin root is never made.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..clitest import Cli


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(None, str(tmp_path / "pins"))


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
    assert not Path(cli.pin_root).exists()


def test_usage_errors_are_exit_2(cli: Cli) -> None:
    usage = [("flows", "--top", "0"), ("stats", "--watch", "-1"), ("frobnicate",), ("attach",)]
    for args, r in zip(usage, cli.run_all(*usage), strict=True):
        assert r.returncode == 2 and "usage: xdpflow" in r.stderr and "Traceback" not in r.stderr, args
