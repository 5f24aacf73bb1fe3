"""Contracts of the `xdpflow` command's text, checked through the console
script: `run --help` documents every option with a sentence and its default;
a malformed address is named whole, as the operator typed it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from xdpflow.app.config import Config
from xdpflow.dataplane.lifecycle import FLOWS_DEFAULT
from xdpflow.testing.lab import Lab

from ..clitest import XDPFLOW, Cli

_DEFAULTS = Config()

# what each `run` option's help must name as its default
RUN_DEFAULTS = {
    "--json": "default off",
    "--pin-root": "default $XDPFLOW_PIN_ROOT or /sys/fs/bpf/xdpflow",
    "--netns": "default: the namespace xdpflow runs in",
    "--debug": "default off",
    "--config": "default none",
    "--interface": "default none",
    "--mode": f"default {_DEFAULTS.mode}",
    "--flows": f"default {FLOWS_DEFAULT}",
    "--flow-budget": f"default {_DEFAULTS.flow_budget}",
    "--sink": "default off",
    "--monitor": "default off",
    "--detach-on-exit": "default off",
    "--collector": "default none",
    "--idle-timeout": f"default {_DEFAULTS.idle_timeout:g}",
    "--active-timeout": f"default {_DEFAULTS.active_timeout:g}",
    "--scan-interval": f"default {_DEFAULTS.scan_interval:g}",
    "--template-refresh": f"default {_DEFAULTS.template_refresh:g}",
    "--observation-domain": f"default {_DEFAULTS.observation_domain}",
    "--mtu": f"default {_DEFAULTS.mtu}",
    "--listen": f"default {_DEFAULTS.listen}",
    "--top-rules": f"default {_DEFAULTS.top_rules}",
    "--blocklist-file": "default none",
    "--blocklist-direction": f"default {_DEFAULTS.blocklist_direction}",
    "--feed": "default none",
    "--rules-file": "default none",
}


def _option_help(text: str) -> dict[str, str]:
    """{"--flag": help text on one line} from argparse's options section."""
    section = text.split("\noptions:\n", 1)[1]
    helps: dict[str, str] = {}
    flag = None
    for line in section.splitlines():
        m = re.match(r"^  (-[^\s,]+(?:, -[^\s,]+)*)(?: [^\s-]\S*)?(?:  +(.*))?$", line)
        if m:
            flag = m.group(1).split(", ")[-1]
            helps[flag] = m.group(2) or ""
        elif flag and line.startswith("    "):
            helps[flag] = (helps[flag] + " " + line.strip()).strip()
    return helps


def test_run_help_names_every_option_with_a_sentence_and_its_default() -> None:
    env = dict(os.environ, COLUMNS="100")
    r = subprocess.run([XDPFLOW, "run", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    helps = _option_help(r.stdout)
    helps.pop("--help")
    assert set(helps) == set(RUN_DEFAULTS), f"options without an expected default: {set(helps) ^ set(RUN_DEFAULTS)}"
    for flag, text in helps.items():
        words = re.sub(r"\(.*?\)", "", text).split()
        assert len(words) >= 4, f"{flag}: help is no sentence: {text!r}"
        assert RUN_DEFAULTS[flag] in text, f"{flag}: help does not name its default {RUN_DEFAULTS[flag]!r}: {text!r}"


def test_bad_address_names_the_whole_token(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    cli("attach", lab.dut_if)
    cli("block", "add", "198.51.100.0/24")
    before = cli.blocklist()
    bad = tmp_path / "bad.txt"
    bad.write_text("203.0.113.0/24\n2001:db8::g/64 ; typo\n198.51.100.07\n")
    add, mixed, sync, host_bits = cli.run_all(
        ("block", "add", "2001:db8::g/64"),
        ("block", "add", "203.0.113.0/24", "2001:db8::g/64", "198.51.100.0/33"),
        ("block", "sync", str(bad)),
        ("block", "add", "--dst", "2001:db8::1/32"),
    )
    assert (add.returncode, add.stdout, add.stderr) == (
        2,
        "",
        "xdpflow: '2001:db8::g/64' is not an IPv4 or IPv6 address or CIDR; nothing was changed\n",
    )
    assert (mixed.returncode, mixed.stdout, mixed.stderr) == (
        2,
        "",
        "xdpflow: '2001:db8::g/64' is not an IPv4 or IPv6 address or CIDR; "
        "'198.51.100.0/33': prefix length must be a decimal number from 0 to 32; nothing was changed\n",
    )
    assert (sync.returncode, sync.stdout) == (2, "")
    assert sync.stderr.splitlines() == [
        f"xdpflow: {bad}:2: '2001:db8::g/64' is not an IPv4 or IPv6 address or CIDR: '2001:db8::g/64 ; typo'",
        f"xdpflow: {bad}:3: '198.51.100.07' is not an IPv4 or IPv6 address or CIDR: leading zeros are not "
        "permitted: '198.51.100.07'",
        "xdpflow: the blocklist was not changed",
    ]
    assert (host_bits.returncode, host_bits.stderr) == (
        2,
        "xdpflow: '2001:db8::1/32' has host bits set; did you mean 2001:db8::/32?; nothing was changed\n",
    )
    assert cli.blocklist() == before
