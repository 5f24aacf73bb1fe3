"""Attack notifications: a command and webhooks, off the detection path.

``Notifier.send(event)`` only puts the event on a bounded queue; one worker
thread runs the command (the event as one JSON object on stdin, killed after
``timeout``) and POSTs the same JSON to each webhook (``timeout`` per try,
``retries`` more tries after a failure). A full queue drops the event, and
every failure or drop is counted in ``failed`` and logged: detection and
mitigation never wait for a notification.
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("xdpflow")

NOTIFY_TIMEOUT = 5.0  # seconds: a command is killed, a webhook try abandoned, after this
NOTIFY_RETRIES = 2  # more tries of a webhook after a failed one
QUEUE_MAX = 256  # events waiting; more are dropped (and counted as failed)
RETRY_PAUSE = 0.5  # seconds before the first retry; doubles


@dataclass
class NotifyConfig:
    command: list[str] = field(default_factory=list)  # argv; empty: none
    webhooks: list[str] = field(default_factory=list)
    timeout: float = NOTIFY_TIMEOUT
    retries: int = NOTIFY_RETRIES


def event(kind: str, attack: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The notification object: ``{"event": "start"|"mitigation"|"end",
    "time": UNIX, "attack": {...}}`` (the attack as `xdpflow attacks --json`
    prints it)."""
    return {"event": kind, "time": time.time() if now is None else now, "attack": attack}


class Notifier:
    """A worker thread delivering events; ``close()`` stops it (events still
    queued are delivered first, each within its timeout)."""

    def __init__(self, cfg: NotifyConfig) -> None:
        self.cfg = cfg
        self.failed = 0
        self.sent = 0
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_MAX)
        self._thread = threading.Thread(target=self._run, name="xdpflow-notify", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.command or self.cfg.webhooks)

    def send(self, ev: dict[str, Any]) -> None:
        """Queue one event; never blocks."""
        if not self.enabled:
            return
        try:
            self._q.put_nowait(ev)
        except queue.Full:
            self.failed += 1
            log.error("notification dropped: %d events wait already event=%s", QUEUE_MAX, ev.get("event"))

    def close(self, wait: float = 0.0) -> None:
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(wait)

    def _run(self) -> None:
        while True:
            ev = self._q.get()
            if ev is None:
                return
            body = json.dumps(ev).encode() + b"\n"
            if self.cfg.command:
                self._command(self.cfg.command, body, ev)
            for url in self.cfg.webhooks:
                self._webhook(url, body, ev)

    def _command(self, argv: Sequence[str], body: bytes, ev: dict[str, Any]) -> None:
        try:
            r = subprocess.run(
                list(argv),
                input=body,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=self.cfg.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            self.failed += 1
            log.error("notify command killed after %gs event=%s command=%s", self.cfg.timeout, ev["event"], argv[0])
            return
        except OSError as e:
            self.failed += 1
            log.error("notify command cannot run command=%s: %s", argv[0], e.strerror)
            return
        if r.returncode != 0:
            self.failed += 1
            err = r.stderr.decode(errors="replace").strip().splitlines()
            log.error(
                "notify command failed exit=%d event=%s command=%s stderr=%r",
                r.returncode,
                ev["event"],
                argv[0],
                err[-1] if err else "",
            )
            return
        self.sent += 1

    def _webhook(self, url: str, body: bytes, ev: dict[str, Any]) -> None:
        # the HTTP client takes ~20 ms to import: only a daemon that posts pays for it
        import urllib.error
        import urllib.request

        pause = RETRY_PAUSE
        why = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(pause)
                pause *= 2
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                    resp.read(65536)
                self.sent += 1
                return
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code}"
            except (OSError, ValueError) as e:  # URLError, timeouts, refused connections
                why = str(getattr(e, "reason", e))
        self.failed += 1
        log.error("webhook failed after %d tries event=%s url=%s: %s", self.cfg.retries + 1, ev["event"], url, why)
