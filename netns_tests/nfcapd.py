"""Debian's ``nfcapd`` (nfdump 1.7) as a test collector, here or inside a network namespace.

``Nfcapd(host, port, netns)`` starts ``nfcapd -w DIR -b HOST -p PORT -B 8388608``
writing to a temp dir of its own (under ``ip netns exec NETNS`` when a namespace
is given) and returns once its socket is bound. ``stop()`` waits until nfcapd
has read every queued datagram, then SIGTERMs it so it writes its file;
``nfdump()`` and the readers built on it read that file back. The socket is
watched in /proc/<pid>/net/udp[6], which is the table of nfcapd's own network
namespace, so the same code works in and out of one. ``close()`` (or leaving
the ``with`` block) kills what is left and removes the dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Self

from xdpflow.bindings import netlink

NFCAPD = shutil.which("nfcapd")
NFDUMP = shutil.which("nfdump")
SOCKET_BUFFER = 8 << 20  # nfcapd -B: 8 MiB, so bursts of datagrams are not dropped
START_TIMEOUT = 10.0  # s until the socket is bound
DRAIN_TIMEOUT = 10.0  # s stop() waits for the receive queue to empty
SETTLE = 0.3  # s after that: the last datagram read is processed, not just dequeued
EXIT_TIMEOUT = 20.0  # s for nfcapd to write its file and exit after SIGTERM
POLL = 0.02


def free_udp_port(host: str, netns: str | None = None) -> int:
    """A UDP port free on ``host`` right now (in namespace ``netns`` if given)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with netlink.in_netns(netns), socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _proc_local_address(host: str, port: int) -> str:
    """``host:port`` as /proc/net/udp[6] spells it: the address as 32-bit words in host byte order."""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def udp_socket_state(pid: int, host: str, port: int) -> tuple[int, int] | None:
    """(rx_queue bytes, drops) of the UDP socket bound to host:port in pid's network namespace.

    None if no such socket is bound, or pid is gone.
    """
    want = _proc_local_address(host, port)
    try:
        with open(f"/proc/{pid}/net/{'udp6' if ':' in host else 'udp'}") as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[1] == want:
                    return int(cols[4].split(":")[1], 16), int(cols[-1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class Nfcapd:
    """One nfcapd on ``host:port`` (port None: a free one), in namespace ``netns`` if given."""

    def __init__(self, host: str, port: int | None = None, netns: str | None = None) -> None:
        assert NFCAPD and NFDUMP, "nfcapd/nfdump not installed (apt-get install nfdump)"
        self.host, self.netns = host, netns
        self.dir = tempfile.mkdtemp(prefix="xf-nfcapd-")
        self.flows = os.path.join(self.dir, "flows")
        os.mkdir(self.flows)
        self.logfile = os.path.join(self.dir, "nfcapd.log")
        self.drops = 0
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            # a free port may be taken between the probe and nfcapd's bind: then try another
            for _attempt in range(1 if port else 3):
                self.port = port or free_udp_port(host, netns)
                if self._start():
                    return
                self.kill()
            raise AssertionError(f"nfcapd did not start: {self.output()}")
        except BaseException:
            self.close()
            raise

    def _start(self) -> bool:
        """Run nfcapd; True once its socket is bound, False if it exits or times out first."""
        args = [str(NFCAPD), "-w", self.flows, "-b", self.host, "-p", str(self.port), "-B", str(SOCKET_BUFFER)]
        if self.netns is not None:
            args = ["ip", "netns", "exec", self.netns, *args]  # ip execs nfcapd: the pid is nfcapd's
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while self.proc.poll() is None:
            if self.socket_state() is not None:
                return True
            if time.monotonic() > deadline:
                break
            time.sleep(POLL)
        return False

    def socket_state(self) -> tuple[int, int] | None:
        """(rx_queue bytes, drops) of nfcapd's socket; None if it is not bound."""
        assert self.proc is not None
        return udp_socket_state(self.proc.pid, self.host, self.port)

    def output(self) -> str:
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        """Wait until nfcapd has read every datagram, then SIGTERM it so it writes its file."""
        assert self.proc is not None
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            state = self.socket_state()
            assert state is not None, f"nfcapd went away: {self.output()}"
            if state[0] == 0 or time.monotonic() > deadline:
                break
            time.sleep(POLL)
        self.drops = state[1]
        time.sleep(SETTLE)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=EXIT_TIMEOUT)
        assert self.proc.returncode == 0, self.output()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Kill nfcapd if it still runs and remove its dir; twice is fine."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def nfdump(self, *args: str) -> str:
        """``nfdump -R FLOWS ARGS`` with TZ=UTC; its stdout."""
        env = dict(os.environ, TZ="UTC")
        return subprocess.run(
            [str(NFDUMP), "-R", self.flows, *args], env=env, check=True, capture_output=True, text=True
        ).stdout

    def json(self) -> list[dict]:
        """``-o json`` as a list of flows (empty output: none)."""
        text = self.nfdump("-o", "json")
        return json.loads(text) if text.strip() else []

    def raw(self) -> list[dict[str, str]]:
        """``-o raw`` as one dict per flow of its ``name = value`` lines."""
        out = []
        for block in self.nfdump("-o", "raw").split("Flow Record:")[1:]:
            fields = {}
            for line in block.splitlines():
                k, sep, v = line.partition("=")
                if sep:
                    fields[k.strip()] = v.strip()
            out.append(fields)
        return out

    def info(self) -> dict[str, str]:
        """``-I``: the file's summary as a dict."""
        return dict(line.split(": ", 1) for line in self.nfdump("-I").splitlines() if ": " in line)
