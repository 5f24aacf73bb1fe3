"""Helpers for the reliability tests (test_reliability.py): a generator
thread that keeps blasting until told to stop, the two overlapping blocklist
files of the atomicity test, and careful ends for background commands.

Frames come from the lab's ranges; blocked sources only from 198.51.100.0/24,
203.0.113.0/24 and 2001:db8::/32. Blocklist rules that no frame ever comes
from also use 198.18.0.0/15 outside the lab's own 198.18.0.0/24.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from xdpflow.testing.lab import Lab
from xdpflow.testing.pktgen import blast

from .clitest import Cli


class Blaster(threading.Thread):
    """Calls ``pktgen.blast()`` from the lab's gen interface, over and over,
    until ``stop()`` (or ``seconds`` have passed). ``sent`` is the sum of
    ``Result.sent``: exactly what left gen. An error in blast() ends the
    thread and is raised again by ``stop()``.
    """

    def __init__(
        self,
        lab: Lab,
        frames: Sequence[bytes],
        per_call: int,
        *,
        seconds: float | None = None,
        vary: tuple[int, int] | None = None,
        burst: int | None = None,
    ) -> None:
        super().__init__(name="blaster", daemon=True)
        self.lab = lab
        self.frames = list(frames)
        self.per_call = per_call
        self.seconds = seconds
        self.vary = vary
        self.burst = burst
        self.sent = 0
        self.calls = 0
        self.refused = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._first = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            while not self._halt.is_set():
                if self.seconds is not None and time.monotonic() - t0 >= self.seconds:
                    break
                r = blast(
                    self.lab.gen_if,
                    self.frames,
                    self.per_call,
                    netns=self.lab.gen_ns,
                    vary=self.vary,
                    burst=self.burst,
                )
                assert r.sent == self.per_call and r.counted, r
                self.sent += r.sent
                self.refused += r.refused
                self.calls += 1
                self._first.set()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread by stop()
            self.error = e
        finally:
            self._first.set()

    def wait_first(self, timeout: float = 30) -> None:
        """Return once the first blast() call has finished."""
        assert self._first.wait(timeout), "the generator sent nothing"
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    @property
    def running(self) -> bool:
        return self.is_alive()

    def stop(self, timeout: float = 60) -> int:
        """Stop after the current call; return the frames sent in all."""
        self._halt.set()
        self.join(timeout)
        assert not self.is_alive(), "the generator thread did not stop"
        self.check()
        return self.sent


@contextlib.contextmanager
def blasting(blaster: Blaster) -> Iterator[Blaster]:
    """Start the thread; on the way out always stop and join it."""
    blaster.start()
    try:
        yield blaster
    finally:
        blaster._halt.set()
        blaster.join(60)


def kill_all(procs: Iterable[subprocess.Popen[str]]) -> None:
    """SIGKILL and reap our own children that are still running."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        with contextlib.suppress(Exception):
            p.communicate(timeout=10)


@contextlib.contextmanager
def reaped() -> Iterator[list[subprocess.Popen[str]]]:
    """A list to put background commands in; all are killed and reaped on exit."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        kill_all(procs)


def rule_set(cli: Cli) -> set[tuple[str, str]]:
    """(cidr, direction) of every rule, through `block list --json`; each once."""
    listing = cli.json("block", "list")
    out = {(r["cidr"], r["direction"]) for r in listing}
    assert len(out) == len(listing), listing
    return out


def canonical(cidrs: Iterable[str]) -> set[tuple[str, str]]:
    """Source rules as `block list` names them (hosts get /32 or /128)."""
    return {(str(ipaddress.ip_network(c)), "src") for c in cidrs}


def write_rules(path: str, cidrs: Iterable[str]) -> None:
    with open(path, "w") as f:
        f.write("# written by test_reliability\n")
        f.writelines(c + "\n" for c in cidrs)


# --- the two overlapping blocklists of the atomicity test ---------------------


@dataclass
class OverlappingLists:
    """Files A and B: ``shared`` rules in both, ``only_a`` / ``only_b`` in one.

    The differing rules sit next to and inside shared ones (a /25 and hosts
    inside a shared /24, a /80 inside a shared /64, a /64 inside a shared /48),
    so switching files rewrites the same IPv4 table entries and trie nodes
    that frames from shared prefixes walk through.
    """

    shared: list[str] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    @property
    def a(self) -> list[str]:
        return self.shared + self.only_a

    @property
    def b(self) -> list[str]:
        return self.shared + self.only_b


def overlapping_lists() -> OverlappingLists:
    s = OverlappingLists()
    # 198.51.100.0/24: shared hosts .1-.60 and the /26 .64; A adds .61-.63 and
    # .128/26, B the /27 .192, the /28 .224 and hosts .240-.250
    s.shared += [f"198.51.100.{i}" for i in range(1, 61)] + ["198.51.100.64/26"]
    s.only_a += [f"198.51.100.{i}" for i in range(61, 64)] + ["198.51.100.128/26"]
    s.only_b += ["198.51.100.192/27", "198.51.100.224/28"] + [f"198.51.100.{i}" for i in range(240, 251)]
    # 203.0.113.0/24 shared; A adds the lower /25 and hosts .200-.209, B the
    # upper /25 and hosts .10-.19: each /24's L2 entry and L3 hosts change
    s.shared += ["203.0.113.0/24"]
    s.only_a += ["203.0.113.0/25"] + [f"203.0.113.{i}" for i in range(200, 210)]
    s.only_b += ["203.0.113.128/25"] + [f"203.0.113.{i}" for i in range(10, 20)]
    # rules no frame comes from: 256 /24s, 600 hosts, 30 hosts each side
    s.shared += [f"198.19.{i}.0/24" for i in range(256)]
    s.shared += [f"198.18.{64 + i // 200}.{1 + i % 200}" for i in range(600)]
    s.only_a += [f"198.18.70.{i}" for i in range(1, 31)]
    s.only_b += [f"198.18.71.{i}" for i in range(1, 31)]
    # IPv6: 1000 shared /64s, 100 shared hosts, a shared /48 with a /64 and a
    # host of A's and a /64 of B's inside, /80s of each side inside shared /64s
    s.shared += [f"2001:db8:0:{i:x}::/64" for i in range(1000)]
    s.shared += [f"2001:db8:aaaa::{i:x}" for i in range(1, 101)]
    s.shared += ["2001:db8:ffff::/48"]
    s.only_a += [f"2001:db8:1:{i:x}::/64" for i in range(40)]
    s.only_a += ["2001:db8:ffff:1::/64", "2001:db8:ffff:2::5", "2001:db8:0:5:1::/80"]
    s.only_b += [f"2001:db8:2:{i:x}::/64" for i in range(40)]
    s.only_b += ["2001:db8:ffff:3::/64", "2001:db8:0:7:2::/80"]
    return s


# sources inside prefixes of both files (many of them also inside a rule of
# one file only): a frame from any of them must be dropped at every moment
SHARED_SOURCES = [
    "198.51.100.1", "198.51.100.30", "198.51.100.60", "198.51.100.69", "198.51.100.127",
    "203.0.113.5", "203.0.113.15", "203.0.113.130", "203.0.113.205", "203.0.113.255",
    "2001:db8:0:5:1::9", "2001:db8:0:7:2::1", "2001:db8:0:3e7::1", "2001:db8:aaaa::7",
    "2001:db8:ffff:1::1", "2001:db8:ffff:2::5", "2001:db8:ffff:3::9",
]  # fmt: skip
# probes after the fact: listed by one file only, or by neither
ONLY_A_SOURCES = ["198.51.100.62", "198.51.100.130", "2001:db8:1:3::1", "2001:db8:1:27::9"]
ONLY_B_SOURCES = ["198.51.100.200", "198.51.100.230", "198.51.100.245", "2001:db8:2:3::1"]
UNLISTED_SOURCES = ["198.51.100.0", "198.51.100.254", "2001:db8:3::1", "2001:db8:aaaa::200"]
