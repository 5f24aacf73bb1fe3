"""Notifications: a command gets the event on stdin, webhooks get it POSTed;
a hanging command or webhook never delays the sender, failures are counted."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from xdpflow.export import notify as nt
from xdpflow.export.notify import Notifier, NotifyConfig, event

ATTACK = {"id": 3, "victim": "198.18.0.2", "group": "web", "mitigation": None}


class Hook:
    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status, self.delay = status, delay
        hook = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(hook.delay)
                hook.bodies.append(json.loads(body))
                self.send_response(hook.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_command_and_webhook_get_every_event(tmp_path: Path, hook: Hook) -> None:
    out = tmp_path / "events"
    cmd = [sys.executable, "-c", f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read())"]
    n = Notifier(NotifyConfig(command=cmd, webhooks=[hook.url], timeout=5))
    for kind in ("start", "mitigation", "end"):
        n.send(event(kind, ATTACK, now=1.0))
    wait_for(lambda: len(hook.bodies) == 3)
    n.close(wait=5)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["start", "mitigation", "end"]
    assert lines[0] == {"event": "start", "time": 1.0, "attack": ATTACK} == hook.bodies[0]
    assert n.failed == 0 and n.sent == 6


def test_hanging_command_never_blocks_and_is_killed(tmp_path: Path, hook: Hook) -> None:
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    n = Notifier(NotifyConfig(command=cmd, webhooks=[hook.url], timeout=0.5))
    t0 = time.monotonic()
    for _ in range(3):
        n.send(event("start", ATTACK))
    assert time.monotonic() - t0 < 0.1  # the sender never waits
    wait_for(lambda: len(hook.bodies) == 3)
    n.close(wait=5)
    assert n.failed == 3  # each run killed after its timeout


def test_failing_command_and_webhook_retries_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nt, "RETRY_PAUSE", 0.01)
    bad = Hook(status=500)
    try:
        cmd = [sys.executable, "-c", "import sys; sys.exit(3)"]
        n = Notifier(NotifyConfig(command=cmd, webhooks=[bad.url], timeout=2, retries=2))
        n.send(event("end", ATTACK))
        wait_for(lambda: n.failed == 2)
        n.close(wait=5)
        assert len(bad.bodies) == 3  # one try and two retries
    finally:
        bad.close()


def test_hanging_webhook_times_out_and_a_full_queue_drops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nt, "QUEUE_MAX", 2)
    slow = Hook(delay=3)
    try:
        n = Notifier(NotifyConfig(webhooks=[slow.url], timeout=0.3, retries=0))
        t0 = time.monotonic()
        for _ in range(6):
            n.send(event("start", ATTACK))
        assert time.monotonic() - t0 < 0.1
        wait_for(lambda: n.failed == 6)  # three dropped at once (one taken, two queued), three timed out
        n.close(wait=5)
    finally:
        slow.close()


def test_nothing_configured_sends_nothing() -> None:
    n = Notifier(NotifyConfig())
    n.send(event("start", ATTACK))
    n.close(wait=1)
    assert (n.sent, n.failed) == (0, 0)


def test_exabgp_example_announces_on_start_and_withdraws_on_end() -> None:
    import subprocess

    script = Path(__file__).parents[2] / "contrib" / "xdpflow-exabgp"

    def run(kind: str, victim: str, dry_run: bool = False) -> str:
        attack = {**ATTACK, "victim": victim, "mitigation": {"kind": "fingerprint", "dry_run": dry_run}}
        body = json.dumps(event(kind, attack, now=1.0))
        return subprocess.run(
            [sys.executable, str(script), "-"], input=body, capture_output=True, text=True, check=True
        ).stdout

    assert run("start", "198.18.0.2") == "announce route 198.18.0.2/32 next-hop self community [65535:666]\n"
    assert run("mitigation", "198.18.0.2") == ""
    assert run("end", "2001:2::5") == "withdraw route 2001:2::5/128 next-hop self\n"
    assert run("start", "198.18.0.2", dry_run=True) == ""
