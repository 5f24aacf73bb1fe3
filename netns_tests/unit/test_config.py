"""The daemon's config file is only data: hostile names and paths are kept
verbatim, hostile values where a number, mode or address belongs are refused.
(What the daemon then does with such names: e2e/test_environment.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xdpflow.app import config

from ..clitest import hostile_config, hostile_lines


def test_config_values_are_only_data(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = hostile_lines(marker)[0]
    verbatim = tmp_path / "verbatim.toml"
    verbatim.write_text(hostile_config(hostile))
    cfg = config.load_config(str(verbatim))
    assert cfg.interfaces == [hostile] and cfg.netns == hostile and cfg.blocklist_files == [hostile]
    assert cfg.pin_root == "/sys/fs/bpf/" + hostile
    assert cfg.feeds[0].url == "http://127.0.0.1:1/" + hostile

    code = hostile_lines(marker)[2]
    for key, value in (("mode", code), ("listen", code), ("idle_timeout", hostile)):
        bad = tmp_path / f"bad-{key}.toml"
        section = "[metrics]\n" if key == "listen" else "[export]\n" if key == "idle_timeout" else ""
        bad.write_text(f'interfaces = ["eth0"]\n{section}{key} = {json.dumps(value)}\n')
        with pytest.raises(config.ConfigError):
            config.load_config(str(bad))
    assert not marker.exists()
