"""`xdpflow rule` and `block add --ttl` through the console script: the
commands, their output shapes and their refusals. What the rules do to
traffic is tested elsewhere (actions, TTL expiry, rate limits, atomic sync).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from xdpflow.testing.lab import Lab

from ..clitest import Cli
from ..daemontest import METRICS_PORT, Daemon

JSON_KEYS = [
    "id", "priority", "action", "src", "dst", "proto", "sport", "dport", "icmp_type", "tcp_flags",
    "length", "iface", "pps", "bps", "expires_at", "packets", "bytes", "limited", "comment",
]  # fmt: skip


@pytest.fixture
def cli(lab: Lab, pin_root: str) -> Cli:
    c = Cli.of(lab, pin_root)
    c("attach", lab.dut_if, "--flows", "1024")
    return c


def test_rule_add_list_del_flush(cli: Cli) -> None:
    first = cli("rule", "add", "--proto", "udp", "--sport", "123", "--dst", "203.0.113.5", "--action", "drop",
                "--ttl", "1h", "--comment", "NTP reflection")  # fmt: skip
    second = cli("rule", "add", "--src", "198.18.0.0/15", "--action", "pass", "--priority", "10")
    third = cli("rule", "add", "--src", "2001:2::/48", "--tcp-flags", "SYN,!ACK", "--dport", "443",
                "--action", "rate-limit", "--pps", "2k")  # fmt: skip
    ids = [int(x) for x in (first, second, third)]
    assert ids == sorted(set(ids)), ids

    listing = cli.json("rule", "list")
    assert [r["id"] for r in listing] == [ids[1], ids[0], ids[2]]  # priority, then id
    assert all(list(r) == JSON_KEYS for r in listing)
    ntp = listing[1]
    assert ntp["action"] == "drop" and ntp["proto"] == "udp" and ntp["sport"] == "123"
    assert ntp["dst"] == "203.0.113.5/32" and ntp["comment"] == "NTP reflection"
    assert 3590 < ntp["expires_at"] - time.time() <= 3600
    assert (ntp["packets"], ntp["bytes"], ntp["limited"]) == (0, 0, 0)
    assert listing[2]["pps"] == 2000 and listing[2]["tcp_flags"] == "SYN,!ACK" and listing[2]["bps"] is None

    text = cli("rule", "list").splitlines()
    assert text[0].split() == ["id", "priority", "action", "match", "packets", "bytes", "limited", "ttl", "comment"]
    assert "59m" in text[2] and "NTP reflection" in text[2]

    # the same rule again keeps its id
    assert cli("rule", "add", "--src", "198.18.0.0/15", "--action", "pass", "--priority", "10") == second

    assert cli("rule", "del", str(ids[0])) == "deleted 1 rules\n"
    assert [r["id"] for r in cli.json("rule", "list")] == [ids[1], ids[2]]
    err = cli.fails(2, "rule", "del", str(ids[0]), str(ids[1]))
    assert "no rule with id" in err and "nothing was changed" in err
    assert [r["id"] for r in cli.json("rule", "list")] == [ids[1], ids[2]]

    assert cli.json("rule", "flush") == {"deleted": [ids[1], ids[2]]}
    assert cli.json("rule", "list") == []
    # new ids never repeat old ones
    assert int(cli("rule", "add", "--action", "monitor", "--length", "1000-1500")) > ids[2]


def test_rule_sync_and_dry_run(cli: Cli) -> None:
    cli("rule", "add", "--action", "drop", "--dst", "203.0.113.9")
    keep = int(cli("rule", "add", "--action", "pass", "--src", "198.18.0.1", "--priority", "5"))
    rules = "\n".join(
        [
            "# the wanted set",
            "pass src=198.18.0.1 priority=5",
            "drop proto=udp sport=123 dst=203.0.113.5 ttl=1h # NTP reflection",
            "",
            "monitor proto=icmp icmp-type=8",
        ]
    )
    dry = cli("rule", "sync", "-", "--dry-run", input=rules)
    assert dry.splitlines()[-1] == "would add 2, would delete 1 rules"
    assert "+ drop dst=203.0.113.5/32 proto=udp sport=123" in dry and "- " in dry
    assert len(cli.json("rule", "list")) == 2  # nothing changed

    out = cli.json("rule", "sync", "-", input=rules)
    assert [r["dst"] for r in out["deleted"]] == ["203.0.113.9/32"]
    assert sorted(r["action"] for r in out["added"]) == ["drop", "monitor"]
    listing = cli.json("rule", "list")
    assert [r["action"] for r in listing] == ["pass", "drop", "monitor"]
    assert listing[0]["id"] == keep  # kept: same id, same counters
    assert cli("rule", "sync", "-", input=rules).splitlines()[-1] == "added 0, deleted 0 rules"

    # a bad line refuses the whole file
    bad = rules + "\ndrop sport=70000\n"
    err = cli.fails(2, "rule", "sync", "-", input=bad)
    assert err.startswith("xdpflow: -:6: ") and "70000" in err and "not changed" in err
    # (ttl= counts from each sync that reads it, so the second sync moved that deadline)
    assert [{**r, "expires_at": None} for r in cli.json("rule", "list")] == [{**r, "expires_at": None} for r in listing]


@pytest.mark.parametrize(
    "args",
    [
        ("--action", "drop", "--color", "red"),  # unknown flag
        ("--action", "drop", "--dport", "70000"),  # port outside 0-65535
        ("--action", "drop", "--dport", "90-80"),  # reversed range
        ("--action", "drop", "--proto", "udp", "--tcp-flags", "SYN"),  # flags on a non-TCP rule
        ("--action", "drop", "--pps", "100"),  # rate without rate-limit
        ("--action", "drop", "--ttl", "soon"),  # unparsable TTL
        ("--action", "drop", "--ttl", "0s"),  # TTL not in the future
        ("--action", "drop", "--src", "198.51.100.0/24", "--dst", "2001:db8::/32"),  # families differ
        ("--action", "block"),  # unknown action
        ("--src", "198.51.100.0/24"),  # no action
    ],
)
def test_rule_add_bad_input(cli: Cli, args: tuple[str, ...]) -> None:
    r = cli.run("rule", "add", *args)
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert cli.json("rule", "list") == []


def test_block_add_ttl(cli: Cli) -> None:
    cli("block", "add", "198.51.100.0/24")
    assert cli.json("block", "add", "--ttl", "10m", "203.0.113.7", "--dst") == {
        "added": ["203.0.113.7/32"],
        "deleted": [],
    }
    listing = cli.json("block", "list")
    assert [(r["cidr"], r["direction"], r["hits"]) for r in listing] == [
        ("198.51.100.0/24", "src", 0),
        ("203.0.113.7/32", "dst", 0),
    ]
    assert listing[0]["expires_at"] is None and 590 < listing[1]["expires_at"] - time.time() <= 600
    text = cli("block", "list").splitlines()
    assert text[0].split() == ["cidr", "direction", "hits", "ttl"] and "9m" in text[2]
    # a rule at the blocklist's priority, and `rule flush` leaves it to `block`
    (rule,) = cli.json("rule", "list")
    assert (rule["action"], rule["priority"], rule["dst"], rule["comment"]) == ("drop", 1000, "203.0.113.7/32", "block")
    cli("rule", "flush")
    assert len(cli.json("rule", "list")) == 1
    assert cli.json("block", "del", "--dst", "203.0.113.7") == {"added": [], "deleted": ["203.0.113.7/32"]}
    assert cli.json("rule", "list") == []
    assert cli.fails(2, "block", "add", "--ttl", "later", "203.0.113.8").startswith("xdpflow: --ttl: ")
    assert [r["cidr"] for r in cli.json("block", "list")] == ["198.51.100.0/24"]


def test_rule_not_attached(pin_root: str) -> None:
    err = Cli(None, pin_root).fails(1, "rule", "list")
    assert "nothing is attached" in err


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_daemon_rules_file(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    """The daemon keeps the rule set equal to its rules file; a bad edit keeps
    the running set (file:line logged); an expired rule is removed on its tick."""
    cli = Cli(lab.dut_ns, pin_root)
    path = tmp_path / "rules.txt"
    _replace(path, "pass src=198.18.0.1 priority=5\ndrop proto=udp dport=53 ttl=2s # short\n")
    with Daemon(lab, pin_root, "--listen", f"127.0.0.1:{METRICS_PORT}", "--rules-file", str(path)) as d:
        d.wait_ready()
        d.wait_log(r"level=info rules synced rules=2 added=2 deleted=0")
        first = [r["action"] for r in cli.json("rule", "list")]
        assert first in (["pass", "drop"], ["pass"])  # the 2 s rule may be gone already
        d.wait_log(r"level=info rule expired id=\d+ rule='drop proto=udp dport=53", 5.0)
        assert [r["action"] for r in cli.json("rule", "list")] == ["pass"]

        mark = d.mark()
        _replace(path, "pass src=198.18.0.1 priority=5\ndrop sport=65536\n")
        d.wait_log(rf"level=warning rules source error: {re.escape(str(path))}:2: ", 3.0, since=mark)
        assert not d.matching(r"rules synced", since=mark), d.log()
        assert [r["action"] for r in cli.json("rule", "list")] == ["pass"]

        _replace(path, "monitor proto=icmp\n")
        d.wait_log(r"level=info rules synced rules=1 added=1 deleted=1", 3.0, since=mark)
        assert d.stop() == 0
    # the rule set stays in force after the daemon
    assert [r["action"] for r in cli.json("rule", "list")] == ["monitor"]
