"""Blocklist sources: files and HTTP feeds polled into one union (applying
it to the kernel: e2e/test_sources_apply.py).

Pure: temp files and an HTTP server on 127.0.0.1 (port 0) in a thread of
this process. Expected keys come from
blocklist_file.parse_keys of the same text, or from ipaddress by hand.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path

import pytest

from xdpflow.rules import sources
from xdpflow.rules.blockfile import parse_keys
from xdpflow.rules.sources import FeedSource, FileSource, SourceResult, SourceSet, Update

from ..sourcetest import DROP, Feed, FeedServer, cidrs, poll_set

A = "192.0.2.0/24\n198.51.100.7\n"
B = "203.0.113.0/24\n2001:db8::/32 ; SBL1\n"


def keys(text: str, direction: str = "src") -> list[int]:
    return parse_keys(text.split("\n"), "-", direction)


def poll_until(src: FileSource, cond: Callable[[SourceResult], bool], within: float = 2.0) -> SourceResult:
    """Poll as a daemon does (every 50 ms here) until ``cond``; it must hold within ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        r = src.poll(time.monotonic())
        if cond(r):
            return r
        assert time.monotonic() < deadline, f"not within {within} s: {r}"
        time.sleep(0.05)


def changed(r: SourceResult) -> bool:
    return r.changed


def failed(r: SourceResult) -> bool:
    return r.error is not None


# --- files ---------------------------------------------------------------------


def test_file_first_poll_loads(tmp_path: Path) -> None:
    p = tmp_path / "bl.txt"
    p.write_text(A)
    src = FileSource(str(p))
    r = poll_until(src, changed)
    assert r.keys == keys(A) and r.error is None and r.source == str(p)
    assert cidrs(r.keys) == [("192.0.2.0/24", "src"), ("198.51.100.7/32", "src")]
    assert src.poll(0).changed is False


def test_file_content_edit(tmp_path: Path) -> None:
    p = tmp_path / "bl.txt"
    p.write_text(A)
    src = FileSource(str(p), direction="dst")
    assert poll_until(src, changed).keys == keys(A, "dst")
    p.write_text(A + B)  # in place: same inode
    assert poll_until(src, changed).keys == keys(A + B, "dst")


def test_file_edit_that_keeps_mtime_and_size(tmp_path: Path) -> None:
    # as `cp -p` over the file does: only the ctime tells
    p = tmp_path / "bl.txt"
    p.write_text("192.0.2.1\n")
    src = FileSource(str(p))
    poll_until(src, changed)
    st = p.stat()
    p.write_text("192.0.2.2\n")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert poll_until(src, changed).keys == keys("192.0.2.2")


def test_file_atomic_rename_replace(tmp_path: Path) -> None:
    p = tmp_path / "bl.txt"
    p.write_text(A)
    src = FileSource(str(p))
    poll_until(src, changed)
    tmp = tmp_path / ".bl.txt.new"
    tmp.write_text(B)
    os.utime(tmp, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns))  # only the inode tells
    os.replace(tmp, p)
    assert poll_until(src, changed).keys == keys(B)


def test_file_truncation(tmp_path: Path) -> None:
    p = tmp_path / "bl.txt"
    p.write_text(A + B)
    src = FileSource(str(p))
    poll_until(src, changed)
    os.truncate(p, len(A))
    assert poll_until(src, changed).keys == keys(A)
    os.truncate(p, 0)  # an empty file is an empty list: what the operator wrote
    r = poll_until(src, changed)
    assert r.keys == [] and r.error is None


def test_file_unchanged_is_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = sources.read_file_keys

    def counting(path: str, direction: str = "src") -> list[int]:
        reads.append(path)
        return real(path, direction)

    monkeypatch.setattr(sources, "read_file_keys", counting)
    p = tmp_path / "bl.txt"
    p.write_text(A)
    src = FileSource(str(p))
    poll_until(src, changed)
    time.sleep(sources.RACY_NS / 1e9 + 0.1)
    src.poll(0)  # the one re-read of a file changed less than RACY_NS before its read
    n = len(reads)
    assert 1 <= n <= 2
    for _ in range(20):
        r = src.poll(0)
        assert not r.changed and r.error is None and r.keys == keys(A)
    assert len(reads) == n


def test_file_bad_edit_keeps_last_good(tmp_path: Path) -> None:
    p = tmp_path / "bl.txt"
    p.write_text(A)
    src = FileSource(str(p))
    poll_until(src, changed)
    p.write_text("192.0.2.0/24\n198.51.100.7/33\n# fine\n10.0.0.1/8\n")
    r = poll_until(src, failed)
    assert not r.changed and r.keys == keys(A)
    assert r.error is not None and "\n" not in r.error
    assert r.error.startswith(f"{p}:2: ")
    assert "and 1 more bad line" in r.error and "keeping the last good version (2 rules)" in r.error
    assert [(e.path, e.lineno) for e in r.bad_lines] == [(str(p), 2), (str(p), 4)]
    assert "host bits" in r.bad_lines[1].reason
    # reported once, not at every poll of the unchanged bad file
    time.sleep(sources.RACY_NS / 1e9 + 0.1)
    for _ in range(5):
        r = src.poll(0)
        assert r.error is None and r.keys == keys(A)
    assert src.last_error is not None
    p.write_text(B)
    r = poll_until(src, changed)
    assert r.keys == keys(B) and src.last_error is None


def test_file_missing_then_created(tmp_path: Path) -> None:
    p = tmp_path / "bl.txt"
    src = FileSource(str(p))
    r = src.poll(0)
    assert r.keys is None and not r.changed
    assert r.error == f"cannot read blocklist file {p}: No such file or directory; nothing loaded yet"
    assert isinstance(r.exception, FileNotFoundError)
    assert src.poll(0).error is None  # once
    p.write_text(A)
    assert poll_until(src, changed).keys == keys(A)
    p.unlink()  # deleted: an error, and the keys stay
    r = poll_until(src, failed)
    assert r.keys == keys(A) and r.error is not None and "No such file" in r.error


def test_file_bad_direction() -> None:
    with pytest.raises(ValueError, match="direction"):
        FileSource("/nonexistent", direction="both")


# --- feeds ---------------------------------------------------------------------


@pytest.fixture
def feed() -> Iterator[tuple[Feed, str]]:
    """A feed on 127.0.0.1 and its URL."""
    with FeedServer() as server:
        yield server.feed, server.url


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # loopback only: a proxy from the environment must not see these requests
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_feed_200_applied(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.set(DROP)
    src = FeedSource(url)
    r = src.poll(0.0)
    assert r.changed and r.error is None and r.source == url
    assert cidrs(r.keys) == [("1.10.16.0/20", "src"), ("2001:db8:100::/40", "src")]
    (req,) = f.requests
    assert "if-none-match" not in req and "if-modified-since" not in req
    assert req["user-agent"].startswith("xdpflow/")


def test_feed_conditional_get_and_304(feed: tuple[Feed, str]) -> None:
    f, url = feed
    lm = formatdate(1_700_000_000, usegmt=True)
    f.set(DROP, etag='"v1"', last_modified=lm)
    src = FeedSource(url, interval=60, direction="dst")
    first = src.poll(0.0)
    assert first.changed and first.keys == keys(DROP, "dst")
    r = src.poll(60.0)
    assert not r.changed and r.error is None and r.keys == first.keys
    assert f.requests[1]["if-none-match"] == '"v1"'
    assert f.requests[1]["if-modified-since"] == lm
    # only Last-Modified from the server: still conditional
    f.set(B, last_modified=lm)
    src2 = FeedSource(url, interval=60)
    src2.poll(0.0)
    assert src2.poll(60.0).keys == keys(B)
    assert "if-none-match" not in f.requests[-1] and f.requests[-1]["if-modified-since"] == lm
    # a new version: a 200 with new validators, sent on the poll after
    f.set(A, etag='"v2"', last_modified=lm)
    r = src.poll(120.0)
    assert r.changed and r.keys == keys(A, "dst")
    src.poll(180.0)
    assert f.requests[-1]["if-none-match"] == '"v2"'


def test_feed_same_rules_new_version_is_no_change(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.set(DROP, etag='"v1"')
    src = FeedSource(url, interval=1)
    assert src.poll(0).changed
    f.set("# regenerated\n" + DROP, etag='"v2"')
    r = src.poll(1)
    assert not r.changed and r.keys == keys(DROP) and src.etag == '"v2"'


def test_feed_500_keeps_keys(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.set(DROP, etag='"v1"')
    src = FeedSource(url, interval=1)
    src.poll(0)
    f.status = 500
    r = src.poll(1)
    assert not r.changed and r.keys == keys(DROP)
    assert r.error == f"{url}: HTTP 500 Internal Server Error; keeping the last good version (2 rules)"
    assert src.last_error is not None
    # the validators are still those of the last good version
    f.status = 200
    r = src.poll(2)
    assert f.requests[-1]["if-none-match"] == '"v1"' and r.error is None and not r.changed
    assert src.last_error is None


def test_feed_4xx_before_any_version(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.status = 404
    r = FeedSource(url).poll(0)
    assert r.keys is None and not r.changed
    assert r.error == f"{url}: HTTP 404 Not Found; nothing loaded yet"


def test_feed_timeout_before_headers(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.set(DROP)
    src = FeedSource(url, interval=1, timeout=0.3)
    src.poll(0)
    f.delay = 1.5
    t0 = time.monotonic()
    r = src.poll(1)
    assert time.monotonic() - t0 < 1.2
    assert r.keys == keys(DROP) and not r.changed
    assert r.error == f"{url}: timed out after 0.3 s; keeping the last good version (2 rules)"


def test_feed_timeout_in_body(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.set(DROP)
    src = FeedSource(url, interval=1, timeout=0.3)
    src.poll(0)
    f.set(B)
    f.body_delay = 1.5
    r = src.poll(1)
    assert r.keys == keys(DROP) and r.error is not None and "timed out" in r.error


def test_feed_total_timeout(feed: tuple[Feed, str]) -> None:
    # every read makes progress, but the whole fetch takes too long
    f, url = feed
    f.endless, f.trickle = True, 0.02
    r = FeedSource(url, timeout=5, max_bytes=1 << 30, total_timeout=0.2).poll(0)
    assert r.keys is None and r.error is not None and "longer than 0.2 s" in r.error


def test_feed_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    r = FeedSource(url).poll(0)
    assert r.error == f"{url}: cannot fetch: Connection refused; nothing loaded yet"


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "until-close"])
def test_feed_oversized_body_refused(feed: tuple[Feed, str], send_length: bool) -> None:
    f, url = feed
    f.set(DROP)
    src = FeedSource(url, interval=1, max_bytes=len(DROP))
    assert src.poll(0).keys == keys(DROP)  # exactly the limit is fine
    f.set(DROP + "192.0.2.0/24\n")
    f.send_length = send_length
    r = src.poll(1)
    assert r.keys == keys(DROP) and not r.changed
    announced = f"announces {len(f.body)} bytes, more" if send_length else "is larger"
    assert r.error == (
        f"{url}: the response {announced} than the limit of {len(DROP)} bytes; refusing it; "
        "keeping the last good version (2 rules)"
    )


def test_feed_reading_stops_at_the_limit(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.endless = True  # 256 MiB of valid lines, no Content-Length
    t0 = time.monotonic()
    r = FeedSource(url, max_bytes=1 << 20).poll(0)
    assert time.monotonic() - t0 < 5
    assert r.keys is None and r.error is not None and "larger than the limit of 1048576 bytes" in r.error
    time.sleep(0.2)
    assert f.sent < 64 << 20, "the client kept reading past its limit"


def test_feed_bad_line_refused(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.set(DROP, etag='"v1"')
    src = FeedSource(url, interval=1)
    src.poll(0)
    f.set("; header\n1.10.16.0/20\n1.10.16.1/20 ; SBL2\n", etag='"v2"')
    r = src.poll(1)
    assert r.keys == keys(DROP) and not r.changed
    assert r.error is not None and r.error.startswith(f"{url}:3: '1.10.16.1/20' has host bits set")
    assert [(e.path, e.lineno, e.line) for e in r.bad_lines] == [(url, 3, "1.10.16.1/20 ; SBL2")]
    assert src.etag == '"v1"'  # the next request still asks relative to the good version


def test_feed_body_is_utf8(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.status, f.body = 200, b"\xef\xbb\xbf# caf\xc3\xa9 \xff\r\n192.0.2.0/24\r\n"
    r = FeedSource(url).poll(0)
    assert r.error is None and r.keys == keys("192.0.2.0/24")
    f.body = b"192.0.2.0/24\n19\xff2.0.2.1\n"
    r = FeedSource(url).poll(0)
    assert [(e.lineno, e.reason) for e in r.bad_lines] == [(2, "line is not valid UTF-8")]


def test_feed_empty_refused_unless_allowed(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.set(DROP)
    src = FeedSource(url, interval=1)
    src.poll(0)
    f.set("; nothing today\n")
    r = src.poll(1)
    assert r.keys == keys(DROP) and r.error is not None and "refusing an empty feed" in r.error
    r = FeedSource(url, allow_empty=True).poll(0)
    assert r.changed and r.keys == [] and r.error is None


def test_feed_interval_respected(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.set(DROP, etag='"v1"')
    src = FeedSource(url, interval=60)
    for now in (1000.0, 1000.0, 1030.0, 1059.9):
        src.poll(now)
    assert len(f.requests) == 1
    assert not src.due(1059.9) and src.due(1060.0)
    src.poll(1060.0)
    assert len(f.requests) == 2
    # a failed attempt waits the interval too
    f.status = 503
    assert src.poll(1120.0).error is not None
    src.poll(1150.0)
    assert len(f.requests) == 3
    f.status = 200
    src.poll(1180.0)
    assert len(f.requests) == 4


def test_feed_redirects(feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.set(DROP)
    base = url.removesuffix("/drop.txt")
    f.redirects = {"/old": url, "/ftp": "ftp://127.0.0.1/drop.txt"}
    assert FeedSource(base + "/old").poll(0).keys == keys(DROP)
    r = FeedSource(base + "/ftp").poll(0)
    assert r.keys is None
    want = "redirected to ftp://127.0.0.1/drop.txt, which is not an http(s) URL; nothing loaded yet"
    assert r.error == f"{base}/ftp: {want}"


def test_feed_rejects_bad_arguments() -> None:
    for url in ("file:///etc/passwd", "ftp://example.org/x", "drop.txt"):
        with pytest.raises(ValueError, match="http"):
            FeedSource(url)
    with pytest.raises(ValueError, match="interval"):
        FeedSource("http://127.0.0.1/", interval=0)
    with pytest.raises(ValueError, match="timeout"):
        FeedSource("http://127.0.0.1/", timeout=-1)
    with pytest.raises(ValueError, match="max_bytes"):
        FeedSource("http://127.0.0.1/", max_bytes=0)
    with pytest.raises(ValueError, match="direction"):
        FeedSource("http://127.0.0.1/", direction="out")


# --- source sets ---------------------------------------------------------------


def test_set_union_of_file_and_feed(tmp_path: Path, feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.set(DROP, etag='"v1"')
    p = tmp_path / "local.txt"
    p.write_text(A + "1.10.16.0/20\n")  # one rule also in the feed
    feed_src = FeedSource(url, interval=3600)
    ss = SourceSet([FileSource(str(p)), feed_src], background=False)
    up, errors = poll_set(ss, 0.0)
    assert up == Update(sorted(set(keys(A + "1.10.16.0/20")) | set(keys(DROP))), (str(p), url), ())
    assert len(up.keys) == 4 and errors == []
    assert ss.poll(0.0) is None

    # the feed fails and the file changes: the feed's keys stay in the union
    f.status = 500
    p.write_text(B)
    up, errors = poll_set(ss, 3600.0)
    assert [r.source for r in errors] == [url] and "HTTP 500" in str(errors[0])
    assert up == Update(sorted(set(keys(B)) | set(keys(DROP))), (str(p),), ())
    assert ss.snapshot() == Update(up.keys)
    assert feed_src.last_error is not None and "HTTP 500" in feed_src.last_error
    # the interval holds inside a set too
    n = len(f.requests)
    for now in (3601.0, 5000.0, 7199.0):
        ss.poll(now)
    assert len(f.requests) == n


def test_set_source_never_loaded_contributes_nothing(tmp_path: Path, feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.status = 503
    p = tmp_path / "local.txt"
    p.write_text(A)
    ss = SourceSet([FileSource(str(p)), FeedSource(url)], background=False)
    up, errors = poll_set(ss, 0)
    assert [str(r) for r in errors] == [f"{url}: HTTP 503 Service Unavailable; nothing loaded yet"]
    assert up == Update(keys(A), (str(p),), (url,))


def test_set_nothing_applied_while_nothing_loads(tmp_path: Path, feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.status = 500
    absent = str(tmp_path / "absent")
    ss = SourceSet([FileSource(absent), FeedSource(url, interval=1)], background=False)
    for now in range(5):
        assert ss.poll(now) is None
    assert ss.snapshot() == Update([], (), (absent, url))


def test_set_background_feed_does_not_block_files(tmp_path: Path, feed: tuple[Feed, str]) -> None:
    f, url = feed
    f.set(DROP)
    f.delay = 1.0
    p = tmp_path / "local.txt"
    p.write_text(A)
    slowest = 0.0

    def poll_within(ss: SourceSet, seconds: float) -> Update:
        nonlocal slowest
        deadline = time.monotonic() + seconds
        while True:
            t0 = time.monotonic()
            up = ss.poll(t0)
            slowest = max(slowest, time.monotonic() - t0)
            if up is not None:
                return up
            assert time.monotonic() < deadline, f"no update within {seconds} s"
            time.sleep(0.05)

    with SourceSet([FileSource(str(p)), FeedSource(url, interval=0.3, timeout=5)]) as ss:
        # not before the feed's first fetch finished: the first update has both
        up = poll_within(ss, 5)
        assert up.keys == sorted(set(keys(A)) | set(keys(DROP))) and up.missing == ()
        # while the feed's next fetch hangs, a file change is applied at once
        f.delay = 3.0
        time.sleep(0.35)
        ss.poll(time.monotonic())
        p.write_text(B)
        up = poll_within(ss, 2)
        assert up.changed == (str(p),)
        assert up.keys == sorted(set(keys(B)) | set(keys(DROP)))
    assert slowest < 0.5
    with pytest.raises(ValueError, match="closed"):
        ss.poll(0)


def test_set_survives_a_source_that_raises(tmp_path: Path) -> None:
    class Broken:
        name = "broken"
        blocking = False

        def due(self, now: float) -> bool:
            return True

        def poll(self, now: float) -> SourceResult:
            raise RuntimeError("bug")

    p = tmp_path / "local.txt"
    p.write_text(A)
    ss = SourceSet([Broken(), FileSource(str(p))], background=False)
    up, errors = poll_set(ss, 0)
    assert up == Update(keys(A), (str(p),), ("broken",))
    assert errors[0].error == "broken: internal error: RuntimeError('bug'); nothing loaded yet"


def test_set_needs_a_source() -> None:
    with pytest.raises(ValueError):
        SourceSet([])


def test_result_str_and_repr_stay_short() -> None:
    r = SourceResult("x.txt", True, list(range(100000)))
    assert str(r) == "x.txt: changed, 100000 rules"
    assert len(repr(r)) < 200
