"""Keep the blocklist in step with its sources: local files and HTTP(S) feeds.

A long-running caller polls a ``SourceSet`` about twice a second and applies
each ``Update`` it returns with ``dataplane.blocklist.apply_keys()``::

    sources = SourceSet([FileSource("/etc/xdpflow/local.txt"),
                         FeedSource("https://www.spamhaus.org/drop/drop.txt")])
    while True:
        update = sources.poll(time.monotonic())
        for r in sources.errors:
            log(r.error)
        if update is not None:
            apply_keys(update.keys, pin_root)   # on failure, retry with sources.snapshot()
        time.sleep(0.5)

The rules: the blocklist is never emptied or shrunk because a source failed.
A source that fails (unreadable file, bad line, HTTP error, timeout, oversized
body) keeps contributing the keys of its last good version. A source that has
never loaded contributes nothing, and the union of the others is still
applied when one of them changes: so if the daemon starts while a feed is
down, rules that feed put into the kernel during an earlier run are deleted
at the first update and come back when the feed loads (``Update.missing``
names such sources, for a caller that prefers to wait). The union covers both
directions and is the whole blocklist: rules added by hand with
``xdpflow block add`` are deleted by the next update.

Polling is userspace work only (stat, read, HTTP): this module never
touches the kernel. Feeds use the standard library's urllib, nothing else.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from xdpflow.defaults import FEED_INTERVAL, FEED_TIMEOUT, MAX_FEED_BYTES
from xdpflow.rules.blockfile import BlocklistFileError, check_direction, parse_keys, read_file_keys
from xdpflow.rules.rulespec import RulesFileError, RuleSpec
from xdpflow.rules.rulespec import parse_lines as parse_rules

__all__ = [
    "FeedSource",
    "FileSource",
    "RulesFileSource",
    "RulesResult",
    "Source",
    "SourceResult",
    "SourceSet",
    "Update",
]

SETTLE_NS = 200_000_000  # a file changed this recently may still be being written
RACY_NS = 1_000_000_000  # a change this close to a read may share its timestamps
USER_AGENT = "xdpflow/0.1 (blocklist sync)"
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class SourceResult:
    """What one poll of a source found.

    ``changed``: the source's good keys differ from what its previous poll
    reported (its first good version counts as a change; a new version with
    the same rules does not). ``keys``: the sorted rule keys of the last good
    version, also when this poll failed (shared with the source: do not
    modify it); None if the source never loaded.
    ``error``: one line for the operator when this poll failed, else None; a
    failure is reported on the attempt that met it, not on every later poll
    of an unchanged file. ``exception``: the error behind it, e.g. the
    BlocklistFileError whose ``errors`` list every bad line (see bad_lines).
    """

    source: str
    changed: bool
    keys: list[int] | None = field(repr=False)
    error: str | None = None
    exception: Exception | None = field(default=None, compare=False)

    def __str__(self) -> str:
        """The error line, or a short summary: what a log line wants."""
        if self.error is not None:
            return self.error
        n = "nothing loaded" if self.keys is None else f"{len(self.keys)} rules"
        return f"{self.source}: {'changed' if self.changed else 'unchanged'}, {n}"

    @property
    def bad_lines(self) -> list[BlocklistFileError]:
        """Every bad line of a refused version (path or URL, line number, reason), in order."""
        if isinstance(self.exception, BlocklistFileError):
            return list(self.exception.errors)
        return []


class Source(Protocol):
    """A blocklist source: ``poll(now)`` never raises for a failure of the
    source itself; it returns a SourceResult with ``error`` set.
    """

    name: str
    blocking: bool  # poll() may wait on the network

    def due(self, now: float) -> bool: ...

    def poll(self, now: float) -> SourceResult: ...


def _kept(keys: list[int] | None) -> str:
    if keys is None:
        return "nothing loaded yet"
    return f"keeping the last good version ({len(keys)} rules)"


def _bad_lines_message(e: BlocklistFileError) -> str:
    more = len(e.errors) - 1
    return f"{e}" + (f" (and {more} more bad line{'s' if more > 1 else ''})" if more else "")


class FileSource:
    """A local blocklist file (plain list, FireHOL .netset, Spamhaus DROP text).

    Each poll stats the file and reads it again only when its signature
    (mtime_ns, ctime_ns, size, inode, device) changed, so polling every 0.5 s
    costs one stat: edits in place, replacements by rename and truncations
    are all noticed. A missing or unreadable file, or a version with a bad
    line, is an error and the last good keys stay; an empty file is a valid
    empty list.

    Two guards against timing: a changed file is read once it has been left
    alone for SETTLE_NS or looked the same to two polls in a row, so a file
    being rewritten in place is rarely read half-written (replace it by
    rename to be sure); a change is still seen within two polls (the first
    poll reads at once). And a file
    whose ctime is within RACY_NS of a read is read again at the next poll,
    since a second change in the same timestamp tick would leave the
    signature as it was.
    """

    blocking = False

    def __init__(self, path: str, direction: str = "src") -> None:
        check_direction(direction)
        self.path = path
        self.name = path
        self.direction = direction
        self.keys: list[int] | None = None
        self.last_error: str | None = None
        self._sig: tuple[int, ...] | None = None  # of the last read attempt
        self._seen: tuple[int, ...] | None = None  # at the last poll
        self._recheck = False  # read again even if the signature stays

    def due(self, now: float) -> bool:
        return True

    def poll(self, now: float = 0.0) -> SourceResult:
        """Stat the file; read and parse it if it changed. ``now`` is unused."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            sig: tuple[int, ...] = (-1, e.errno or 0)
            if sig == self._sig:
                return self._unchanged()
            self._sig = self._seen = sig
            self._recheck = False
            return self._failed(f"cannot read blocklist file {self.path}: {e.strerror or e}", e)
        sig = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)
        if sig == self._sig and not self._recheck:
            self._seen = sig
            return self._unchanged()
        started = time.time_ns()
        # the first read is not put off: a set waits for every source's first try
        settled = self._sig is None or sig == self._seen or started - st.st_ctime_ns >= SETTLE_NS
        self._seen = sig
        if not settled:
            return self._unchanged()  # perhaps still being written: look again next poll
        again = sig == self._sig
        # stat before reading: a write racing the read changes the signature
        # again, so the next poll reads the file once more
        self._sig = sig
        self._recheck = st.st_ctime_ns > started - RACY_NS
        try:
            keys = read_file_keys(self.path, self.direction)
        except BlocklistFileError as e:
            return self._failed(_bad_lines_message(e), e, again)
        except OSError as e:
            self._recheck = True  # e.g. EACCES: nothing in the signature changes when it is fixed
            return self._failed(str(e.strerror or e), e, again)
        changed = keys != self.keys
        self.keys = keys
        self.last_error = None
        return SourceResult(self.name, changed, keys)

    def _unchanged(self) -> SourceResult:
        return SourceResult(self.name, False, self.keys)

    def _failed(self, msg: str, exc: Exception, again: bool = False) -> SourceResult:
        if again and msg == self.last_error:
            return self._unchanged()  # a second read of what was reported
        self.last_error = msg
        return SourceResult(self.name, False, self.keys, f"{msg}; {_kept(self.keys)}", exc)


class FeedError(Exception):
    """A fetch that failed; its message is one line naming the URL."""


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib would follow one to ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise FeedError(f"{req.full_url}: redirected to {newurl}, which is not an http(s) URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class FeedSource:
    """An HTTP(S) blocklist feed, e.g. https://www.spamhaus.org/drop/drop.txt.

    Fetched on the first poll and then once every ``interval`` seconds
    (counted from the start of each attempt, failed or not). Requests carry
    If-None-Match and If-Modified-Since from the last good response, so an
    unchanged feed answers 304 and costs nothing. Only a 200 whose body is
    valid and holds at least one rule (unless ``allow_empty``) replaces the
    last good version; anything else is an error: HTTP 4xx/5xx, a connection
    error, ``timeout`` seconds without progress on one network operation,
    the whole fetch taking over ``total_timeout`` seconds, a body larger
    than ``max_bytes`` (reading stops there) or a bad line. The body is read
    as UTF-8 text, like a file. Proxies come from the usual environment
    variables (``https_proxy``, ``no_proxy``).
    """

    blocking = True

    def __init__(
        self,
        url: str,
        interval: float = FEED_INTERVAL,
        timeout: float = FEED_TIMEOUT,
        max_bytes: int = MAX_FEED_BYTES,
        direction: str = "src",
        *,
        total_timeout: float = 120.0,
        allow_empty: bool = False,
    ) -> None:
        check_direction(direction)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"{url}: a feed URL must start with http:// or https://")
        for what, v in (("interval", interval), ("timeout", timeout), ("total_timeout", total_timeout)):
            if not v > 0:
                raise ValueError(f"{what} must be a positive number of seconds, not {v!r}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes!r}")
        self.url = url
        self.name = url
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.total_timeout = float(total_timeout)
        self.max_bytes = max_bytes
        self.direction = direction
        self.allow_empty = allow_empty
        self.keys: list[int] | None = None
        self.last_error: str | None = None
        self.etag: str | None = None
        self.last_modified: str | None = None
        self._next: float | None = None  # when the next fetch is due; None: now

    def due(self, now: float) -> bool:
        return self._next is None or now >= self._next

    def poll(self, now: float) -> SourceResult:
        """Fetch the feed if ``interval`` has passed since the last attempt
        (``now`` on any monotonic clock in seconds, e.g. time.monotonic());
        otherwise return at once with ``changed`` False.
        """
        if not self.due(now):
            return SourceResult(self.name, False, self.keys)
        self._next = now + self.interval
        try:
            fetched = self._fetch()
            if fetched is None:  # 304 Not Modified
                self.last_error = None
                return SourceResult(self.name, False, self.keys)
            body, etag, last_modified = fetched
            keys = self._parse(body)
        except BlocklistFileError as e:
            return self._failed(_bad_lines_message(e), e)
        except FeedError as e:
            return self._failed(str(e), e)
        changed = keys != self.keys
        self.keys = keys
        self.etag, self.last_modified = etag, last_modified
        self.last_error = None
        return SourceResult(self.name, changed, keys)

    def _failed(self, msg: str, exc: Exception) -> SourceResult:
        self.last_error = msg
        return SourceResult(self.name, False, self.keys, f"{msg}; {_kept(self.keys)}", exc)

    def _parse(self, body: bytes) -> list[int]:
        if body.startswith(b"\xef\xbb\xbf"):
            body = body[3:]
        # surrogateescape, as for files: undecodable bytes pass inside
        # comments and are reported as "not valid UTF-8" anywhere else
        text = body.decode("utf-8", "surrogateescape")
        keys = parse_keys(text.split("\n"), self.url, self.direction)
        if not keys and not self.allow_empty:
            raise FeedError(f"{self.url}: the feed lists no rules ({len(body)} bytes); refusing an empty feed")
        return keys

    def _fetch(self) -> tuple[bytes, str | None, str | None] | None:
        """(body, ETag, Last-Modified) of a 200, or None for a 304.

        Raises FeedError for every failure.
        """
        headers = {"User-Agent": USER_AGENT, "Accept": "text/plain, */*;q=0.5"}
        if self.keys is not None:  # conditional only on a good version we hold
            if self.etag:
                headers["If-None-Match"] = self.etag
            if self.last_modified:
                headers["If-Modified-Since"] = self.last_modified
        req = urllib.request.Request(self.url, headers=headers)
        deadline = time.monotonic() + self.total_timeout
        try:
            opener = urllib.request.build_opener(_HttpRedirectsOnly)  # proxies as the environment says
            with opener.open(req, timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise FeedError(f"{self.url}: unexpected HTTP {resp.status} {resp.reason}")
                declared = resp.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise FeedError(self._too_big(f"announces {int(declared)} bytes, more than"))
                chunks: list[bytes] = []
                total = 0
                while True:
                    chunk = resp.read(min(_CHUNK, self.max_bytes + 1 - total))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise FeedError(self._too_big("is larger than"))
                    if time.monotonic() > deadline:
                        raise FeedError(f"{self.url}: fetch took longer than {self.total_timeout:g} s")
                return b"".join(chunks), resp.headers.get("ETag"), resp.headers.get("Last-Modified")
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 304 and self.keys is not None:
                return None
            raise FeedError(f"{self.url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, TimeoutError):
                raise FeedError(f"{self.url}: timed out after {self.timeout:g} s") from None
            what = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
            raise FeedError(f"{self.url}: cannot fetch: {what}") from None
        except TimeoutError:
            raise FeedError(f"{self.url}: timed out after {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise FeedError(f"{self.url}: fetch failed: {type(e).__name__}: {e}") from None

    def _too_big(self, what: str) -> str:
        return f"{self.url}: the response {what} the limit of {self.max_bytes} bytes; refusing it"


@dataclass(frozen=True)
class Update:
    """The whole blocklist as the sources now want it.

    ``keys``: the sorted union of every source's last good keys (both
    directions). ``changed``: names of the sources whose keys changed.
    ``missing``: names of sources that never loaded and so contribute nothing.
    """

    keys: list[int]
    changed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


class SourceSet:
    """Several sources, polled together; ``poll(now)`` returns an Update when
    any source's keys changed, else None.

    With ``background`` (the default) sources that wait on the network
    (feeds) are fetched in worker threads, at most one fetch per feed at a
    time, so a slow or dead feed never delays a file change; their results
    are collected by a later poll. No Update is returned before every source
    has been tried once, so starting up does not apply a union that lacks a
    feed merely because its first fetch is still running. With
    ``background=False`` everything is polled in the calling thread.

    After each poll, ``errors`` holds the failed results it collected (each
    failure once; see SourceResult). A poll returns quickly: it never waits
    for a worker. Use it as a context manager, or call close(), to let go of
    fetches in progress (their results are dropped).
    """

    def __init__(self, sources: Iterable[Source], background: bool = True) -> None:
        self.sources: list[Source] = list(sources)
        if not self.sources:
            raise ValueError("a source set needs at least one source")
        self.background = background
        self.errors: list[SourceResult] = []
        self._results: list[SourceResult | None] = [None] * len(self.sources)
        self._inflight: dict[int, concurrent.futures.Future[SourceResult]] = {}
        self._pending: set[int] = set()  # sources changed since the last Update
        self._closed = False

    def __enter__(self) -> SourceSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Forget fetches in progress. Workers are daemon threads: one still
        waiting on the network never delays the process's exit.
        """
        self._inflight.clear()
        self._closed = True

    def _submit(self, i: int, now: float) -> None:
        src = self.sources[i]
        fut: concurrent.futures.Future[SourceResult] = concurrent.futures.Future()

        def run() -> None:
            fut.set_running_or_notify_cancel()
            try:
                fut.set_result(src.poll(now))
            except BaseException as e:
                fut.set_exception(e)

        self._inflight[i] = fut
        threading.Thread(target=run, name=f"xdpflow-source-{i}", daemon=True).start()

    def poll(self, now: float) -> Update | None:
        """Poll every source that is due; the Update if any source changed.

        A failed source, even one whose poll raised (a bug), is reported in
        ``errors`` and keeps its last good keys. Raises ValueError after close().
        """
        if self._closed:
            raise ValueError("poll() on a closed SourceSet")
        collected: list[tuple[int, SourceResult]] = []
        for i, src in enumerate(self.sources):
            if not (self.background and src.blocking):
                try:
                    collected.append((i, src.poll(now)))
                except Exception as e:
                    collected.append((i, self._crashed(i, e)))
                continue
            fut = self._inflight.get(i)
            if fut is not None:
                if not fut.done():
                    continue
                del self._inflight[i]
                exc = fut.exception()
                collected.append((i, self._crashed(i, exc) if isinstance(exc, Exception) else fut.result()))
            if src.due(now):
                self._submit(i, now)
        errors = []
        for i, r in collected:
            self._results[i] = r
            if r.error is not None:
                errors.append(r)
            if r.changed:
                self._pending.add(i)
        self.errors = errors
        if not self._pending or any(r is None for r in self._results):
            return None
        names = tuple(self.sources[i].name for i in sorted(self._pending))
        self._pending.clear()
        return self._update(names)

    def _crashed(self, i: int, e: Exception) -> SourceResult:
        # a bug in one source must not lose the others' results of this poll
        prev = self._results[i]
        keys = prev.keys if prev is not None else None
        name = self.sources[i].name
        return SourceResult(name, False, keys, f"{name}: internal error: {e!r}; {_kept(keys)}", e)

    def carry_over(self, old: SourceSet) -> None:
        """Take the last results of sources this set shares with ``old`` (the
        same objects): a reload keeps a failing feed's last good list, and a
        feed not due for an hour does not hold back the first update."""
        for i, src in enumerate(self.sources):
            for j, prev in enumerate(old.sources):
                if src is prev and self._results[i] is None:
                    self._results[i] = old._results[j]

    def snapshot(self) -> Update:
        """The current union, changed or not: to retry after a failed apply."""
        return self._update(())

    def _update(self, changed: Sequence[str]) -> Update:
        union: set[int] = set()
        missing = []
        for src, r in zip(self.sources, self._results):
            if r is None or r.keys is None:
                missing.append(src.name)
            else:
                union.update(r.keys)
        return Update(sorted(union), tuple(changed), tuple(missing))


@dataclass(frozen=True)
class RulesResult:
    """What one poll of a rules file found: ``changed`` when its rules differ
    from the last good version's; ``rules`` the last good rules (None: never
    loaded); ``error`` one line (file:line: reason: 'text' for a bad line)
    when this poll failed, reported once per failure."""

    source: str
    changed: bool
    rules: list[RuleSpec] | None = field(repr=False)
    error: str | None = None


class RulesFileSource:
    """A watched rules file (one rule a line, see rules/rulespec.py), polled
    like a FileSource: a stat per poll, a read when the signature changed
    and the file has settled (or looked the same to two polls). A missing
    file or a version with a bad line is an error and the last good rules
    stay in force. A ``ttl=`` counts from the read that parsed it.
    """

    def __init__(self, path: str) -> None:
        self.path = self.name = path
        self.rules: list[RuleSpec] | None = None
        self.last_error: str | None = None
        self._sig: tuple[int, ...] | None = None
        self._seen: tuple[int, ...] | None = None
        self._recheck = False
        self._text: str | None = None  # of the last good version

    def poll(self, now: float = 0.0) -> RulesResult:
        """Stat the file; read and parse it if it changed. ``now`` is unused."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            sig: tuple[int, ...] = (-1, e.errno or 0)
            if sig == self._sig:
                return RulesResult(self.name, False, self.rules)
            self._sig = self._seen = sig
            return self._failed(f"cannot read rules file {self.path}: {e.strerror or e}")
        sig = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)
        if sig == self._sig and not self._recheck:
            self._seen = sig
            return RulesResult(self.name, False, self.rules)
        started = time.time_ns()
        settled = self._sig is None or sig == self._seen or started - st.st_ctime_ns >= SETTLE_NS
        self._seen = sig
        if not settled:
            return RulesResult(self.name, False, self.rules)
        self._sig = sig
        self._recheck = st.st_ctime_ns > started - RACY_NS
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
            rules = parse_rules(text.splitlines(), self.path)
        except RulesFileError as e:
            return self._failed(str(e))
        except OSError as e:
            self._recheck = True
            return self._failed(f"cannot read rules file {self.path}: {e.strerror or e}")
        # the text, not the rules: ttl= words give a new deadline at every read
        changed = text != self._text
        if changed:
            self.rules, self._text = rules, text
        self.last_error = None
        return RulesResult(self.name, changed, self.rules)

    def _failed(self, msg: str) -> RulesResult:
        if msg == self.last_error:
            return RulesResult(self.name, False, self.rules)
        self.last_error = msg
        kept = (
            "nothing loaded yet" if self.rules is None else f"keeping the last good version ({len(self.rules)} rules)"
        )
        return RulesResult(self.name, False, self.rules, f"{msg}; {kept}")
