"""Helpers for blocklist-source tests: an HTTP feed on 127.0.0.1 (port 0)
served from a thread of this process, and the polling a daemon does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from xdpflow.rules.blockfile import rule_from_key
from xdpflow.rules.sources import SourceResult, SourceSet, Update


def cidrs(ks: list[int] | None) -> list[tuple[str, str]]:
    assert ks is not None
    return [(str(r.net), r.direction) for r in map(rule_from_key, ks)]


def poll_set(ss: SourceSet, now: float, polls: int = 3) -> tuple[Update | None, list[SourceResult]]:
    """Poll a set up to ``polls`` times in a row (a just-written file is read
    on the second), stopping at an Update; also every error reported."""
    errors: list[SourceResult] = []
    for _ in range(polls):
        up = ss.poll(now)
        errors += ss.errors
        if up is not None:
            return up, errors
    return None, errors


class Feed:
    """What the test server answers; it records every request's headers."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b""
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.send_length = True  # False: no Content-Length, the body ends at close
        self.endless = False  # stream valid lines until the client goes away
        self.trickle = 0.0  # endless: seconds between chunks
        self.redirects: dict[str, str] = {}  # path -> Location of a 301
        self.delay = 0.0  # before the status line
        self.body_delay = 0.0  # after the headers
        self.requests: list[dict[str, str]] = []
        self.sent = 0

    def set(self, text: str, etag: str | None = None, last_modified: str | None = None) -> None:
        self.status, self.body, self.etag, self.last_modified = 200, text.encode(), etag, last_modified


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        feed = self.server.feed
        feed.requests.append({k.lower(): v for k, v in self.headers.items()})
        try:
            self._answer(feed)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _answer(self, feed: Feed) -> None:
        time.sleep(feed.delay)
        if self.path in feed.redirects:
            self.send_response(301)
            self.send_header("Location", feed.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if feed.status != 200:
            self.send_response(feed.status)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"oops\n")
            return
        # RFC 9110 13.2.2: If-Modified-Since counts only without If-None-Match
        inm, ims = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
        if (inm is not None and inm == feed.etag) or (inm is None and ims and ims == feed.last_modified):
            self.send_response(304)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        if feed.etag:
            self.send_header("ETag", feed.etag)
        if feed.last_modified:
            self.send_header("Last-Modified", feed.last_modified)
        if feed.send_length and not feed.endless:
            self.send_header("Content-Length", str(len(feed.body)))
        self.end_headers()
        self.wfile.flush()
        time.sleep(feed.body_delay)
        if feed.endless:
            chunk = b"".join(b"10.%d.%d.0/24\n" % (i >> 8, i & 255) for i in range(4096))
            while feed.sent < 256 << 20:
                self.wfile.write(chunk)
                feed.sent += len(chunk)
                time.sleep(feed.trickle)
            return
        self.wfile.write(feed.body)
        feed.sent += len(feed.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    feed: Feed


@contextmanager
def serve_feed() -> Iterator[tuple[Feed, str]]:
    """A feed on 127.0.0.1 and its URL, shut down on leaving."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.feed = Feed()
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield server.feed, f"http://127.0.0.1:{server.server_address[1]}/drop.txt"
    finally:
        server.shutdown()
        server.server_close()
