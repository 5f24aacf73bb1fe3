"""Contracts of the `xdpflow` command's text, checked through the console
script: `run --help` documents every option with a sentence and its default.
"""

from __future__ import annotations

import os
import re
import subprocess

from xdpflow.app.config import Config
from xdpflow.dataplane.lifecycle import FLOWS_DEFAULT

from .clitest import XDPFLOW

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
