"""Helpers for the attack tests (e2e/test_mitigation.py): floods from the
live-frames generator, legitimate traffic counted exactly at real sockets,
established TCP connections, and a local webhook receiver.

Legitimate frames go out with ``pktgen.send_exact`` (a frame the veth ring
refuses is sent again, never lost) to UDP sockets in the dut namespace with
receive buffers larger than everything a test sends, so "delivered" is
counted exactly: what the sockets read. Floods come from ``pktgen.blast``.
A spoofed flood is one frame whose 16-bit field at the source address's
low half the generator rewrites per copy (``blast(vary=...)``): 65,536
sources of 198.19.0.0/16, one frame per source and call. The generator does
not fix checksums, so the kernel stack drops those frames as corrupt (XDP,
which reads no checksum, sees them as they are): the flood costs the dut's
stack little, as a flood XDP drops would.

Addresses: 198.18.0.0/15 only.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from xdpflow.bindings import netlink
from xdpflow.testing.lab import DUT_MAC, GEN_MAC, Lab
from xdpflow.testing.pktgen import Result, blast, send_exact

SPOOF_NET = "198.19.0.0"  # the spoofed sources: 198.19.0.0/16
_SO_RCVBUFFORCE = 33
_ETH_IP_SRC_LOW = 14 + 12 + 2  # offset of the IPv4 source address's low 16 bits


def frame(src: str, dst: str, sport: int, dport: int, proto: str = "udp", flags: str = "S", size: int = 64) -> bytes:
    """One Ethernet frame from gen to dut, padded to ``size`` bytes (no FCS)."""
    l4 = UDP(sport=sport, dport=dport) if proto == "udp" else TCP(sport=sport, dport=dport, flags=flags)
    f = Ether(src=GEN_MAC, dst=DUT_MAC) / IP(src=src, dst=dst) / l4
    pad = size - len(f)
    return bytes(f / Raw(b"\0" * pad)) if pad > 0 else bytes(f)


def spoofed(lab: Lab, template: bytes, total: int) -> Result:
    """``total`` copies of ``template`` (source SPOOF_NET) from 65,536 sources, at full speed."""
    return blast(lab.gen_if, [template], total, netns=lab.gen_ns, vary=(_ETH_IP_SRC_LOW, 65536))


class Sinks:
    """UDP sockets in the dut namespace, one per (address, port), read by a
    thread: ``got()`` says how many datagrams each received."""

    def __init__(self, lab: Lab, where: Sequence[tuple[str, int]]) -> None:
        self.socks: dict[tuple[str, int], socket.socket] = {}
        with netlink.in_netns(lab.dut_ns):
            for addr in where:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 << 20)
                s.bind(addr)
                s.setblocking(False)
                self.socks[addr] = s
        self.counts: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._read, name="sinks", daemon=True)
        self._t.start()

    def _read(self) -> None:
        by_fd = {s.fileno(): a for a, s in self.socks.items()}
        while not self._stop.is_set():
            ready, _, _ = select.select(list(self.socks.values()), [], [], 0.1)
            for s in ready:
                while True:
                    try:
                        s.recv(2048)
                    except BlockingIOError:
                        break
                    with self._lock:
                        self.counts[by_fd[s.fileno()]] += 1

    def got(self, settle: float = 0.5) -> dict[tuple[str, int], int]:
        time.sleep(settle)
        with self._lock:
            return dict(self.counts)

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        for s in self.socks.values():
            s.close()


class Legit:
    """Legitimate UDP traffic from gen while the test runs: one frame to each
    of ``targets`` ((src, dst, sport, dport)) every ``every`` seconds, each
    sent exactly once (send_exact); ``sent`` counts per target."""

    def __init__(self, lab: Lab, targets: Sequence[tuple[str, str, int, int]], every: float = 0.01) -> None:
        self.lab = lab
        self.frames = [frame(*t, size=80) for t in targets]
        self.targets = list(targets)
        self.every = every
        self.sent: Counter[tuple[str, str, int, int]] = Counter()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="legit", daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                send_exact(self.lab, None, self.frames, len(self.frames))
                for t in self.targets:
                    self.sent[t] += 1
                time.sleep(self.every)
        except BaseException as e:  # reported by stop()
            self.error = e

    def stop(self) -> dict[tuple[str, str, int, int], int]:
        self._stop.set()
        self._t.join(30)
        if self.error is not None:
            raise self.error
        return dict(self.sent)


def _own_cpu(flood: bool) -> None:
    """Put the calling thread on a CPU of its side: the flood on the last,
    the traffic that must get through on the others. The generator's XDP
    frames land on the dut's receive ring of the CPU that sent them (see
    Lab), so a flood from the last CPU never fills ring 0, where the gen
    stack's connections arrive; and it leaves the other CPUs to the
    connections' threads and the daemon."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[-1]} if flood else set(cpus[:-1]))


class Flood:
    """A flood in a thread: ``send()`` (a pktgen sender) called until ``stop()``;
    what it sent adds up in ``sent``."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.sent = 0
        self.calls = 0
        self.seconds = 0.0
        self.error: BaseException | None = None
        self.first_frame: float | None = None  # monotonic time the first frame left, once known
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="flood", daemon=True)
        self._t.start()

    def _run(self) -> None:
        try:
            _own_cpu(flood=True)
            while not self._stop.is_set():
                r = self.send()
                if self.first_frame is None:
                    # Result.seconds covers the sending alone: not loading the
                    # generator's program nor parking it in the dispatcher
                    self.first_frame = time.monotonic() - r.seconds
                self.sent += r.sent
                self.seconds += r.seconds
                self.calls += 1
        except BaseException as e:
            self.error = e

    @property
    def pps(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def stop(self) -> int:
        self._stop.set()
        self._t.join(60)
        if self.error is not None:
            raise self.error
        return self.sent


@contextmanager
def flooding(send: Any) -> Iterator[Flood]:
    f = Flood(send)
    try:
        yield f
    finally:
        f.stop()


class Connections:
    """``n`` established TCP connections from gen to ``dst:port`` (a server in
    the dut namespace echoes), exchanging a line every ``every`` seconds;
    ``exchanged`` counts the echoes that came back, ``failed`` the errors."""

    def __init__(self, lab: Lab, dst: str, port: int, n: int = 4, every: float = 0.05) -> None:
        with netlink.in_netns(lab.dut_ns):
            self.server = socket.create_server((dst, port), backlog=64)
        self.conns: list[socket.socket] = []
        self._accepted: list[socket.socket] = []
        with netlink.in_netns(lab.gen_ns):
            for _ in range(n):
                c = socket.create_connection((dst, port), timeout=5)
                self.conns.append(c)
                a, _ = self.server.accept()
                self._accepted.append(a)
        self.every = every
        self.exchanged = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._echo, args=(a,), daemon=True) for a in self._accepted]
        self._threads.append(threading.Thread(target=self._talk, daemon=True))
        for t in self._threads:
            t.start()

    def _echo(self, a: socket.socket) -> None:
        _own_cpu(flood=False)
        a.settimeout(0.5)
        while not self._stop.is_set():
            try:
                data = a.recv(4096)
            except TimeoutError:
                continue
            except OSError as e:
                self.failed.append(f"server: {e}")
                return
            if not data:
                return
            a.sendall(data)

    def _talk(self) -> None:
        _own_cpu(flood=False)
        k = 0
        while not self._stop.is_set():
            for c in self.conns:
                msg = f"{k:08d}\n".encode()
                try:
                    c.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        part = c.recv(len(msg) - len(got))
                        if not part:
                            raise OSError(errno.ECONNRESET, "closed")
                        got += part
                except OSError as e:
                    self.failed.append(f"client: {e}")
                    return
                if got != msg:
                    self.failed.append(f"client: sent {msg!r}, got {got!r}")
                    return
                self.exchanged += 1
                k += 1
            time.sleep(self.every)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for s in [*self.conns, *self._accepted, self.server]:
            s.close()


class Webhook:
    """An HTTP server on 127.0.0.1 inside the dut namespace (where the daemon
    runs) that records the JSON bodies POSTed to it; with ``hang`` it reads
    them and never answers."""

    def __init__(self, lab: Lab, port: int, hang: bool = False) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.hang = hang
        self._release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                outer.bodies.append(json.loads(body))
                if outer.hang:
                    outer._release.wait(30)
                    return
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        with netlink.in_netns(lab.dut_ns):
            self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{port}/xdpflow"
        self._t = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._t.start()

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._t.join(5)
