"""A command builds only its own subcommand's parser (build_parser(only)):
the whole parser and the one-subcommand parser must read every command line
alike, answer the same errors, and print the same help. Pure parsing: no
kernel, namespace or pin.
"""

from __future__ import annotations

import contextlib
import io
import random
from typing import Any

import pytest

from xdpflow.app.commands import _COMMANDS, build_parser, command_in

LINES = [
    ["stats", "--json"],
    ["--json", "stats", "eth0"],
    ["stats", "--watch"],
    ["stats", "--watch", "0.5", "--pin-root", "/x"],
    ["--pin-root", "/x", "--netns", "lab", "flows", "--top", "5", "--sort", "bytes"],
    ["--pin-root=/x", "flows", "--filter", "198.18.0.0/15"],
    ["--net", "lab", "status"],  # an abbreviated option that takes a value
    ["--pin", "flows", "stats"],  # its value is another command's name
    ["--netns", "detach", "attach", "veth0", "--mode", "native", "--flows", "4096"],
    ["--debug", "detach", "a", "b"],
    ["attach", "veth0", "--sink", "--then", "id:7", "--flow-budget", "0"],
    ["block", "add", "198.51.100.0/24", "--ttl", "10m"],
    ["block", "sync", "-", "--dry-run", "--dst"],
    ["block", "list", "--json"],
    ["rule", "add", "--src", "198.51.100.0/24", "--action", "drop", "--priority", "5"],
    ["rule", "del", "3", "4"],
    ["monitor", "on"],
    ["events", "--count", "3"],
    ["doctor"],
    ["attacks", "--json"],
    ["top", "--by", "flow", "--count", "3"],
    ["run", "--help-not-an-option"],
    # errors: each parser must say the same
    ["stats", "--top", "3"],
    ["flows", "--top", "0"],
    ["attach"],
    ["attach", "veth0", "--flows", "1"],
    ["block", "frobnicate"],
    ["rule", "del", "0"],
    ["monitor", "maybe"],
    ["-x", "stats"],
    ["stats", "extra", "args"],
    ["--json"],
    [],
    ["bogus"],
    ["-h"],
    ["--he"],
    ["--json", "--help", "stats"],
    ["stats", "--help"],
    ["block", "add", "-h"],
    ["rule", "--help"],
    ["run", "--help"],
    ["--", "stats"],
    ["-", "stats"],
    ["-1", "stats"],
    ["-.5", "stats"],
]


def parse(only: str | None, argv: list[str]) -> tuple[Any, str, str]:
    """(namespace as a dict, or the exit code), stdout, stderr"""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            got: Any = vars(build_parser(only).parse_args(argv))
        except SystemExit as e:
            got = ("exit", e.code)
    return got, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", LINES, ids=[" ".join(a) or "(none)" for a in LINES])
def test_one_subcommand_parses_like_the_whole_parser(argv: list[str]) -> None:
    whole = parse(None, argv)
    assert parse(command_in(argv), argv) == whole


def test_which_command_a_line_names() -> None:
    assert command_in(["--net", "lab", "status"]) == "status"
    assert command_in(["--pin", "stats", "flows"]) == "flows"
    assert command_in(["--pin-root=/x", "flows"]) == "flows"
    assert command_in(["--json", "--debug", "block", "add", "198.51.100.1"]) == "block"
    # help first, no command, an unknown one: the whole parser, which lists them
    for argv in (
        ["-h"],
        ["--he", "stats"],
        [],
        ["--json"],
        ["bogus"],
        ["--", "stats"],
        ["-", "stats"],
        ["-1", "stats"],
    ):
        assert command_in(argv) is None
    assert set(_COMMANDS) == {
        "attach", "detach", "status", "stats", "flows", "top", "block", "rule",
        "monitor", "events", "doctor", "attacks", "run",
    }  # fmt: skip


def test_the_whole_parser_lists_every_command() -> None:
    _, out, _ = parse(None, ["--help"])
    for name in _COMMANDS:
        assert f"    {name} " in out


TOKENS = [
    *_COMMANDS, "add", "del", "list", "sync", "flush", "on", "-", "--", "-h", "--help", "--he",
    "--json", "--j", "--debug", "--pin-root", "--pin", "--pin-root=/x", "--netns", "--n", "--netns=lab",
    "--top", "3", "-1", "eth0", "198.51.100.0/24", "--dst", "--ttl", "10m", "--watch", "--sort", "bytes",
    "--mode", "native", "--flows", "--action", "drop", "--src", "x",
]  # fmt: skip


def test_random_lines_parse_alike() -> None:
    rnd = random.Random(14)
    for _ in range(400):
        argv = [rnd.choice(TOKENS) for _ in range(rnd.randint(0, 6))]
        assert parse(command_in(argv), argv) == parse(None, argv), argv


def test_a_named_command_builds_only_its_own_parser() -> None:
    # the point of build_parser(only): the other twelve are never made
    sub = next(a for a in build_parser("stats")._actions if a.dest == "cmd")
    assert list(sub.choices) == ["stats"]
    sub = next(a for a in build_parser(None)._actions if a.dest == "cmd")
    assert list(sub.choices) == list(_COMMANDS)
