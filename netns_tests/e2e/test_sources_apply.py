"""Blocklist sources applied to the kernel under the pin-root lock: the
union of files and a feed reaches a pinned blocklist through apply_keys."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdpflow.dataplane.blocklist import apply_keys
from xdpflow.dataplane.pins import PinRoot
from xdpflow.errors import XdpflowError
from xdpflow.rules.sources import FeedSource, FileSource, SourceSet
from xdpflow.testing.lab import Lab

from ..sourcetest import DROP, Feed, FeedServer, cidrs, poll_set


@pytest.fixture
def feed(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Feed, str]]:
    """A feed on 127.0.0.1 and its URL; no proxy from the environment sees it."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with FeedServer() as server:
        yield server.feed, server.url


def xdpflow(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "xdpflow", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", f"xdpflow {' '.join(args)}: exit {r.returncode}\n{r.stderr}"
    return r.stdout


def test_apply_keys_to_a_pin_root(tmp_path: Path, feed: tuple[Feed, str], pin_root: str) -> None:
    f, url = feed
    f.set(DROP, etag='"v1"')
    src_file, dst_file = tmp_path / "src.txt", tmp_path / "dst.txt"
    src_file.write_text("198.51.100.0/24\n2001:db8:1::/48\n")
    dst_file.write_text("203.0.113.9\n")
    ss = SourceSet(
        [FileSource(str(src_file)), FileSource(str(dst_file), "dst"), FeedSource(url, interval=10)],
        background=False,
    )
    up, _ = poll_set(ss, 0)
    assert up is not None and up.missing == ()
    want = {
        ("198.51.100.0/24", "src"),
        ("2001:db8:1::/48", "src"),
        ("203.0.113.9/32", "dst"),
        ("1.10.16.0/20", "src"),
        ("2001:db8:100::/40", "src"),
    }
    assert set(cidrs(up.keys)) == want

    with Lab("xfsrc") as lab:
        xdpflow("attach", lab.dut_if, "--netns", lab.dut_ns, "--pin-root", pin_root)

        def listing() -> set[tuple[str, str]]:
            out = json.loads(xdpflow("block", "list", "--json", "--pin-root", pin_root))
            assert all(r["hits"] == 0 for r in out)
            return {(r["cidr"], r["direction"]) for r in out}

        ch = apply_keys(up.keys, PinRoot(pin_root), dry_run=True)
        assert ch.added_keys == up.keys and ch.deleted_keys == []
        assert listing() == set()

        ch = apply_keys(up.keys, PinRoot(pin_root))
        assert ch.added_keys == up.keys and ch.deleted_keys == []
        assert listing() == want

        # the feed fails, a file drops a rule: only that rule goes
        f.status = 500
        src_file.write_text("198.51.100.0/24\n")
        up2, errors = poll_set(ss, 10)
        assert up2 is not None and [r.source for r in errors] == [url]
        ch = apply_keys(up2.keys, PinRoot(pin_root))
        assert ch.added_keys == [] and ch.added_cidrs() == [] and ch.deleted_cidrs() == ["2001:db8:1::/48"]
        assert listing() == want - {("2001:db8:1::/48", "src")}
        assert apply_keys(up2.keys, PinRoot(pin_root)).deleted_keys == []  # nothing left to do


def test_apply_keys_without_attach(pin_root: str) -> None:
    with pytest.raises(XdpflowError) as e:
        apply_keys([], PinRoot(pin_root))
    assert e.value.errno == errno.ENOENT and "xdpflow attach" in str(e.value)
