"""Helpers for blocklist-source tests: an HTTP feed on 127.0.0.1 (port 0),
here or in a lab namespace, served from a thread of this process; the
polling a daemon does; the rules a feed carries."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from xdpflow.bindings import netlink
from xdpflow.rules.blockfile import rule_from_key
from xdpflow.rules.sources import SourceResult, SourceSet, Update

DROP = "; Spamhaus DROP List 2024/01/01\n1.10.16.0/20 ; SBL256894\n2001:db8:100::/40 ; SBL1\n"


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
    """What the test server answers. Every request is logged: its headers in
    ``requests``, the status it got in ``answers``. Tests that change the
    answer while a daemon polls do so under ``lock``."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b""
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.send_length = True  # False: no Content-Length, the body ends at close
        self.endless = False  # stream valid lines until the client goes away
        self.trickle = 0.0  # endless: seconds between chunks
        self.redirects: dict[str, str] = {}  # path -> Location of a 301
        self.delay = 0.0  # before the status line: a feed that times out
        self.body_delay = 0.0  # after the headers
        self.requests: list[dict[str, str]] = []
        self.answers: list[int] = []
        self.sent = 0
        self.lock = threading.Lock()

    def set(self, text: str, etag: str | None = None, last_modified: str | None = None) -> None:
        """A new version, answered at once."""
        with self.lock:
            self.status, self.body, self.etag, self.last_modified = 200, text.encode(), etag, last_modified
            self.delay = self.body_delay = 0.0

    def answered(self, since: int = 0) -> list[int]:
        """Statuses of the requests from index ``since`` on."""
        with self.lock:
            return self.answers[since:]

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        feed = self.server.feed
        with feed.lock:
            status = self._status(feed)
            feed.requests.append({k.lower(): v for k, v in self.headers.items()})
            feed.answers.append(status)
        try:
            self._answer(feed, status)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout)

    def _status(self, feed: Feed) -> int:
        if self.path in feed.redirects:
            return 301
        if feed.status != 200:
            return feed.status
        # RFC 9110 13.2.2: If-Modified-Since counts only without If-None-Match
        inm, ims = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
        if (inm is not None and inm == feed.etag) or (inm is None and ims and ims == feed.last_modified):
            return 304
        return 200

    def _answer(self, feed: Feed, status: int) -> None:
        time.sleep(feed.delay)
        self.send_response(status)
        if status == 301:
            self.send_header("Location", feed.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if status not in (200, 304):
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"oops\n")
            return
        if status == 200:
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        if feed.etag:
            self.send_header("ETag", feed.etag)
        if feed.last_modified:
            self.send_header("Last-Modified", feed.last_modified)
        if status == 304:
            self.end_headers()
            return
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
    daemon_threads = True
    feed: Feed


class FeedServer:
    """An HTTP feed on 127.0.0.1 (port 0) of namespace ``netns`` (None: this
    one), served from a thread of this process: ``feed`` says what it
    answers at ``url``."""

    def __init__(self, netns: str | None = None) -> None:
        self.feed = Feed()
        # the listening socket belongs to the namespace it was opened in; the
        # serving thread may run anywhere
        with netlink.in_netns(netns):
            self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.feed = self.feed
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/drop.txt"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="feed-server", daemon=True
        )
        self.thread.start()

    def __enter__(self) -> FeedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
