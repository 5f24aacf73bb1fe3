"""Helpers for the `xdpflow run` end-to-end tests: the daemon as a child
process inside a lab's dut namespace, an IPFIX collector (nfcapd) in that
namespace, and /metrics scrapes from it (the blocklist feed server, here or
in a namespace: sourcetest.FeedServer).

With ``--netns`` the daemon lives entirely in the dut namespace, so its
collector address and its metrics listener are that namespace's loopback:
nfcapd runs there under ``ip netns exec`` (it needs no bpffs), scrapes go
through ``run_in_netns``. Every helper is a context manager that leaves nothing running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from xdpflow.testing.lab import Lab, run_in_netns

from .clitest import metric_samples
from .nfcapd import NFCAPD as NFCAPD  # re-exported: test_daemon skips on them
from .nfcapd import NFDUMP as NFDUMP
from .nfcapd import Nfcapd

COLLECTOR_PORT = 4739  # every lab namespace is fresh: fixed ports are free
METRICS_PORT = 9437
_PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def wait_until(cond: Callable[[], Any], timeout: float, every: float = 0.05, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something true; return that. AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true within {timeout} s")
        time.sleep(every)


# --- the daemon ----------------------------------------------------------------


class Daemon:
    """``python -m xdpflow run --interface DUT --netns DUT_NS --pin-root ROOT ARGS``.

    Its stderr is read by a thread into ``lines`` as (monotonic time, line).
    ``stop()`` sends a signal and waits; leaving the ``with`` block kills
    what is still running (SIGTERM, then SIGKILL after 10 s).
    """

    def __init__(self, lab: Lab, pin_root: str, *args: str) -> None:
        self.argv = [
            sys.executable, "-m", "xdpflow", "run",
            "--interface", lab.dut_if, "--netns", lab.dut_ns, "--pin-root", pin_root, *args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        self._reader = threading.Thread(target=self._read, name="daemon-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def log(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def mark(self) -> int:
        """Index of the next log line: pass it to wait_log() to look only at what follows."""
        with self._cond:
            return len(self.lines)

    def matching(self, pattern: str, since: int = 0) -> list[str]:
        rx = re.compile(pattern)
        with self._cond:
            return [line for _, line in self.lines[since:] if rx.search(line)]

    def wait_log(self, pattern: str, timeout: float = 10.0, since: int = 0) -> tuple[float, str]:
        """(monotonic time it was read, line) of the first line from ``since`` on matching ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, line in self.lines[since:]:
                    if rx.search(line):
                        return t, line
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"daemon exited ({self.proc.returncode}) before {pattern!r}:\n{self.log()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no log line {pattern!r} within {timeout} s:\n{self.log()}")
                self._cond.wait(min(left, 0.2))

    def wait_ready(self, timeout: float = 20.0) -> None:
        self.wait_log(r"level=info metrics listen=", timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the daemon and wait for it; return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not exit within {timeout} s of signal {sig}:\n{self.log()}") from None
        self._reader.join(5)
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


# --- metrics -------------------------------------------------------------------


def _fetch(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        assert r.status == 200
        return str(r.read().decode())


def scrape(lab: Lab, port: int = METRICS_PORT) -> dict[tuple[str, frozenset[tuple[str, str]]], int]:
    """The xdpflow_ samples of one scrape from inside the dut namespace, as exact ints."""
    return metric_samples(run_in_netns(lab.dut_ns, _fetch, f"http://127.0.0.1:{port}/metrics", timeout=20))


def iface(ifname: str) -> frozenset[tuple[str, str]]:
    return frozenset({("interface", ifname)})


NONE: frozenset[tuple[str, str]] = frozenset()


# --- the IPFIX collector ---------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """One flow record as nfdump read it back; times in Unix ms."""

    key: tuple[str, str, int, int, int]  # src, dst, sport, dport, proto; ICMP: type, code as ports
    packets: int
    bytes: int
    first: int
    last: int
    received: int
    end_reason: int


class Collector(Nfcapd):
    """nfcapd on 127.0.0.1:COLLECTOR_PORT inside ``ns`` (see nfcapd.py); ``records()`` reads its file back."""

    def __init__(self, ns: str, port: int = COLLECTOR_PORT) -> None:
        super().__init__("127.0.0.1", port, netns=ns)

    def records(self) -> list[Exported]:
        """Every record, in file order: fields from ``-o json``, end reason and
        exact times from ``-o raw`` (the same records in the same order)."""
        js = self.json()
        raws = self.raw()
        assert len(js) == len(raws), (js, raws)
        out = []
        for j, raw in zip(js, raws):
            a = "4" if "src4_addr" in j else "6"
            src, dst = j[f"src{a}_addr"], j[f"dst{a}_addr"]
            assert raw["src addr"] == src and int(raw["in packets"]) == j["in_packets"], (j, raw)
            if j["proto"] in (1, 58):
                ports = (j["icmp_type"], j["icmp_code"])
            else:
                ports = (j["src_port"], j["dst_port"])
            out.append(
                Exported(
                    key=(src, dst, *ports, j["proto"]),
                    packets=j["in_packets"],
                    bytes=j["in_bytes"],
                    first=int(raw["first"].split()[0]),
                    last=int(raw["last"].split()[0]),
                    received=int(raw["received at"].split()[0]),
                    end_reason=int(raw["end reason"].split()[0], 16),
                )
            )
        return out


def totals(records: list[Exported]) -> dict[tuple[str, str, int, int, int], tuple[int, int]]:
    """(packets, bytes) per 5-tuple, summed over its records."""
    out: dict[tuple[str, str, int, int, int], tuple[int, int]] = {}
    for r in records:
        p, b = out.get(r.key, (0, 0))
        out[r.key] = (p + r.packets, b + r.bytes)
    return out
