"""A two-namespace veth lab for exercising xdpflow on real interfaces.

The test-suite and ``make demo`` attach the XDP program to the "dut" end of a
veth pair and push known frames into it from the "gen" end:

    [netns gen: gen_if] <==== veth ====> [dut_if: netns dut]  <- XDP here

The lab is built to make exact counting possible: the kernel itself stays
silent on the link (static neighbours, no DAD, no router solicitations, no
MLD reports), so every frame that arrives at ``dut_if`` is one the caller
sent.  Frames are injected with an AF_PACKET socket in the gen namespace and
observed with another in the dut namespace; a packet socket sees a frame
only after XDP has passed it, so ``Receiver`` counts what the program let
through.

Code runs inside a namespace through ``run_in_netns``, which forks and calls
setns(2) in the child.  Only the network namespace changes, so BPF objects
pinned under the host's /sys/fs/bpf stay reachable from inside the lab.

Addresses come only from the benchmarking ranges 198.18.0.0/15 (RFC 2544)
and 2001:2::/48 (RFC 5180), so a lab never collides with a real network.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import os
import pickle
import secrets
import select
import signal
import socket
import struct
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from xdpflow.bindings import netlink

__all__ = [
    "DUT_MAC",
    "DUT_V4",
    "DUT_V6",
    "GEN_MAC",
    "GEN_V4",
    "GEN_V6",
    "Lab",
    "Receiver",
    "run_in_netns",
    "send_frames",
    "set_gro",
    "traffic_mix",
]

T = TypeVar("T")

GEN_V4 = "198.18.0.1"
DUT_V4 = "198.18.0.2"
V4_PREFIXLEN = 24
GEN_V6 = "2001:2::1"
DUT_V6 = "2001:2::2"
V6_PREFIXLEN = 64
# both ends would otherwise get ifindex 2, the first free one in a fresh
# namespace; with a veth's ifindex equal to its peer's (its iflink), the kernel
# takes carrier changes for non-urgent and sets operstate up to 1 s late
GEN_IFINDEX = 3
# locally administered, and the same in every lab (labs never share a link),
# so frames built for one lab are byte-identical to those built for another;
# c6:12 is 198.18 in hex, to make them easy to spot in a capture
GEN_MAC = "02:00:c6:12:00:01"
DUT_MAC = "02:00:c6:12:00:02"

# linux/if_ether.h, if_packet.h, socket.h, prctl.h: `socket` lacks some
_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_PACKET_IGNORE_OUTGOING = 23
_PACKET_OUTGOING = 4
_SO_RCVBUFFORCE = 33
_PR_SET_PDEATHSIG = 1
_MAX_FRAME = 1 << 18

# IFF_NOARP alone keeps the link silent on 6.18; these keep it silent should
# NOARP ever be dropped (DAD probes, then router solicitations every 4 s)
_QUIET_SYSCTLS = {
    "ipv6/conf/{ifname}/accept_dad": "0",
    "ipv6/conf/{ifname}/router_solicitations": "0",
}

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

# labs not yet closed, so an interpreter exit without close() still cleans up
_open_labs: weakref.WeakSet[Lab] = weakref.WeakSet()
# the process whose SIGTERM handler closes labs; forked children inherit the
# handler and must not close their parent's labs
_sigterm_owner = 0


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        lab.close()


def _on_sigterm(signum: int, frame: object) -> None:
    if os.getpid() == _sigterm_owner:
        _close_open_labs()
    # then die of SIGTERM, as without the handler
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _close_labs_on_sigterm() -> None:
    # atexit does not run when SIGTERM (timeout(1), CI cancelling a job)
    # kills the process, and would leave the namespaces behind; take over
    # SIGTERM only if nobody else handles it
    global _sigterm_owner
    if _sigterm_owner == os.getpid() or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, _on_sigterm):
        return
    _sigterm_owner = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    # an interrupt in the middle of a step that spawns helper processes or
    # half-deletes state would leave something we cannot track; delivery
    # resumes (and KeyboardInterrupt is raised) as soon as the step is over
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _die_with_parent(parent_pid: int) -> None:
    # a child left behind (parent SIGKILLed, pytest timeout) would pin its
    # namespace and everything in it; note that "parent" here means the
    # forking *thread*, so fork only from threads that outlive the child
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_until_eof(fd: int, deadline: float) -> bytes | None:
    """Read fd until EOF; None if the deadline passes first."""
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reap(pid: int, kill: bool) -> int:
    """Wait for a child, killing it first if asked; return its wait status."""
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


def _portable(exc: BaseException) -> BaseException:
    """Return exc if it survives pickling, else a RuntimeError describing it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__qualname__}: {exc}")
    return exc


def _child_result(ns_name: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> bytes:
    try:
        netlink.enter_netns(ns_name)
        value = fn(*args, **kwargs)
        return pickle.dumps((True, value, ""))
    except BaseException as exc:
        return pickle.dumps((False, _portable(exc), traceback.format_exc()))


def run_in_netns(
    ns_name: str,
    fn: Callable[..., T],
    *args: Any,
    timeout: float = 60.0,
    **kwargs: Any,
) -> T:
    """Call fn(*args, **kwargs) in a child process inside network namespace ns_name.

    The child forks from this process, so fn, its arguments and open file
    descriptors (e.g. a BPF map fd) need not be picklable; only the return
    value must be.  Only the network namespace changes: the mount namespace,
    and with it /sys/fs/bpf, is the caller's.  ``timeout`` is taken by this
    function, not passed on; wrap fn in functools.partial if it needs one.

    Raises whatever fn raised (with the child's traceback as a note), or
    FileNotFoundError if ns_name does not exist (it is never created),
    TimeoutError if fn did not return within timeout seconds (the child is
    killed), ChildProcessError if the child died without answering.
    """
    parent_pid = os.getpid()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller's stack
        try:
            os.close(read_fd)
            _die_with_parent(parent_pid)
            _write_all(write_fd, _child_result(ns_name, fn, args, kwargs))
        finally:
            os._exit(0)

    payload: bytes | None = None
    try:
        os.close(write_fd)
        payload = _read_until_eof(read_fd, time.monotonic() + timeout)
    finally:
        os.close(read_fd)
        status = _reap(pid, kill=payload is None)
    if payload is None:
        raise TimeoutError(
            errno.ETIMEDOUT,
            f"{getattr(fn, '__name__', fn)!s} in netns {ns_name} "
            f"did not return within {timeout} s; the child was killed",
        )
    if not payload:
        raise ChildProcessError(
            f"child running {getattr(fn, '__name__', fn)!s} in netns {ns_name} "
            f"died without an answer (wait status {status:#x})"
        )
    ok, value, child_tb = pickle.loads(payload)
    if ok:
        return value  # type: ignore[no-any-return]
    value.add_note(f"raised in netns {ns_name} (pid {pid}):\n{child_tb}")
    raise value


def _send_in_netns(ifname: str, frames: list[bytes], inter: float) -> int:
    # protocol 0: this socket only sends, so it queues nothing
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((ifname, 0))
        for i, frame in enumerate(frames):
            if i and inter:
                time.sleep(inter)
            sent = sock.send(frame)
            if sent != len(frame):
                raise OSError(
                    errno.EMSGSIZE,
                    f"frame {i} on {ifname}: sent {sent} of {len(frame)} bytes",
                )
    return len(frames)


def send_frames(
    ns_name: str,
    ifname: str,
    frames: Iterable[bytes | Packet],
    inter: float = 0,
    *,
    timeout: float = 60.0,
) -> int:
    """Send each frame once, unchanged, out of ifname in netns ns_name.

    Frames are whole Ethernet frames (scapy packets or bytes); ``inter`` is the
    pause between two frames in seconds.  Returns the number of frames handed
    to the driver.  A veth drops, without telling the sender, what the peer
    cannot queue (about 1000 frames per CPU without XDP, a 256-slot ring with
    native XDP); pace large bursts with ``inter`` or compare counters.

    Raises OSError if a frame cannot be sent (EMSGSIZE above the MTU, ENODEV
    if ifname does not exist), plus the errors of run_in_netns.
    """
    raw = [bytes(frame) for frame in frames]
    return run_in_netns(ns_name, _send_in_netns, ifname, raw, inter, timeout=timeout)


class Receiver:
    """Collect the frames that arrive at one interface, after XDP has run.

    An AF_PACKET socket in a child process inside the namespace takes a copy
    of every frame the interface receives (frames it sends are ignored).
    Packet sockets sit after XDP, so a frame dropped, redirected or
    transmitted back by the XDP program is not seen; a frame it passed is.

    Use as ``with Receiver(ns, ifname) as rx: ...; frames = rx.stop()``.
    ``start()`` returns once the socket is bound, so nothing sent afterwards
    is missed.  ``stop()`` keeps reading until the link has been idle for
    ``idle`` seconds and returns the frames in arrival order.  ``dropped`` is
    the number of frames the socket itself had to drop (0 unless its
    32 MiB buffer overflowed).

    The child is killed when the thread that started it exits, so start and
    stop from a thread that outlives the capture (the main thread will do).
    """

    def __init__(
        self,
        ns_name: str,
        ifname: str,
        *,
        idle: float = 0.2,
        timeout: float = 30.0,
    ) -> None:
        self.ns_name = ns_name
        self.ifname = ifname
        self.idle = idle
        self.timeout = timeout
        self.dropped = 0
        self._pid: int | None = None
        self._ctrl_w = -1
        self._data_r = -1

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Receiver:
        """Fork the capturing child; return once its socket is bound.

        Raises RuntimeError if already started, OSError (e.g. ENODEV,
        ENOENT for a missing namespace) if the socket cannot be set up,
        TimeoutError if the child does not report within ``timeout``.
        """
        if self._pid is not None:
            raise RuntimeError("receiver already started")
        parent_pid = os.getpid()
        ctrl_r, ctrl_w = os.pipe()
        data_r, data_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                _close_fds_except({0, 1, 2, ctrl_r, data_w})
                _die_with_parent(parent_pid)
                _capture(self.ns_name, self.ifname, ctrl_r, data_w, self.idle, self.timeout)
            finally:
                os._exit(0)
        os.close(ctrl_r)
        os.close(data_w)
        self._pid, self._ctrl_w, self._data_r = pid, ctrl_w, data_r
        try:
            ready, _, _ = select.select([data_r], [], [], self.timeout)
            first = os.read(data_r, 1) if ready else None
            if first == b"R":
                return self
            if first == b"E":
                rest = _read_until_eof(data_r, time.monotonic() + self.timeout)
                exc = pickle.loads(rest) if rest else None
                raise (
                    exc
                    if isinstance(exc, BaseException)
                    else ChildProcessError(f"receiver on {self.ifname} in netns {self.ns_name} failed")
                )
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"receiver on {self.ifname} in netns {self.ns_name} not ready within {self.timeout} s",
            )
        except BaseException:
            self.close()
            raise

    def stop(self) -> list[bytes]:
        """Stop capturing and return the frames received since start().

        Raises RuntimeError if not started, TimeoutError if the child does
        not deliver within ``timeout`` (it is killed).
        """
        if self._pid is None:
            raise RuntimeError("receiver not started")
        payload = None
        try:
            _write_all(self._ctrl_w, b"S")
            payload = _read_until_eof(self._data_r, time.monotonic() + self.timeout + self.idle)
        finally:
            self.close(kill=payload is None)
        if payload is None:
            raise TimeoutError(errno.ETIMEDOUT, f"receiver on {self.ifname} did not stop within {self.timeout} s")
        if not payload:
            raise ChildProcessError(f"receiver on {self.ifname} died without an answer")
        frames, self.dropped = pickle.loads(payload)
        return frames  # type: ignore[no-any-return]

    def close(self, kill: bool = True) -> None:
        """Kill the child if it still runs and release everything; idempotent."""
        for fd in (self._ctrl_w, self._data_r):
            if fd >= 0:
                os.close(fd)
        self._ctrl_w = self._data_r = -1
        if self._pid is not None:
            _reap(self._pid, kill=kill)
            self._pid = None


def _close_fds_except(keep: set[int]) -> None:
    # the capture child must not hold other pipes open: another Receiver
    # would never see EOF on its control pipe
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _capture(ns_name: str, ifname: str, ctrl_r: int, data_w: int, idle: float, timeout: float) -> None:
    try:
        netlink.enter_netns(ns_name)
        # protocol 0 until bind, so no frame of another interface slips in
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 32 << 20)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        sock.bind((ifname, _ETH_P_ALL))  # Python applies htons() itself
        sock.setblocking(False)
    except BaseException as exc:
        _write_all(data_w, b"E" + pickle.dumps(_portable(exc)))
        return
    _write_all(data_w, b"R")

    frames: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                frame, addr = sock.recvfrom(_MAX_FRAME)
            except BlockingIOError:
                return
            if addr[2] != _PACKET_OUTGOING:
                frames.append(frame)

    sock_fd = sock.fileno()
    while True:
        ready, _, _ = select.select([sock_fd, ctrl_r], [], [])
        if sock_fd in ready:
            drain()
        if ctrl_r in ready:
            break
    # frames still in flight (veth hands over through a softirq) are caught
    # by waiting for the link to go quiet, bounded in case it never does
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock_fd], [], [], idle)
        if not ready:
            break
        drain()
    _, drops = struct.unpack("II", sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8))
    _write_all(data_w, pickle.dumps((frames, drops)))


def _set_sysctls(ifname: str) -> None:
    for key, value in _QUIET_SYSCTLS.items():
        with open(f"/proc/sys/net/{key.format(ifname=ifname)}", "w") as f:
            f.write(value)


def _configure_side(
    ifname: str,
    v4: str,
    v6: str,
    peer_v4: str,
    peer_v6: str,
    peer_mac: str,
) -> int:
    """Runs inside one lab namespace; returns the ifindex of ifname."""
    _set_sysctls(ifname)
    netlink.set_link_up("lo")
    # NOARP: no ARP, and with it no solicited-node MLD reports and no DAD
    return netlink.configure_link(
        ifname,
        arp=False,
        addresses=[(v4, V4_PREFIXLEN), (v6, V6_PREFIXLEN)],
        neighbours=[(peer_v4, peer_mac), (peer_v6, peer_mac)],
    )


def _wait_link_ready(ifname: str, timeout: float) -> None:
    """Runs inside a lab namespace; returns once ifname can carry frames.

    Carrier on a veth is set at once, but the kernel attaches the real
    (noqueue) qdisc and sets operstate UP later, from the linkwatch work
    queue; until then the device's qdisc is "noop", which drops every frame
    sent through it.
    """
    deadline = time.monotonic() + timeout
    while True:
        operstate, qdisc = netlink.link_state(ifname)
        if qdisc != "noop" and operstate == "UP":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"{ifname} not ready after {timeout} s (operstate {operstate}, qdisc {qdisc})",
            )
        time.sleep(0.002)


def _delete_link(ifname: str) -> None:
    try:
        netlink.delete_link(ifname)
    except OSError as err:
        # deleting one end of a veth takes the other with it
        if err.errno != errno.ENODEV:
            raise


def set_gro(ns_name: str, ifname: str, on: bool) -> None:
    """Turn generic receive offload of ifname in netns ns_name on or off.

    On a veth, GRO switches receive to NAPI even without an XDP program.
    Frames sent with XDP_TX, or redirected into a veth, are dropped unless
    the receiving end runs NAPI, so e.g. XDP_TX on dut needs GRO (or an XDP
    program) on gen.  Raises OSError if the interface or namespace does not
    exist.
    """
    run_in_netns(ns_name, netlink.set_gro, ifname, on)


class Lab:
    """Two fresh network namespaces, "gen" and "dut", joined by a veth pair.

    ``Lab(prefix)`` builds everything before returning and undoes all of it
    if any step fails or is interrupted (KeyboardInterrupt included).  Use it
    as a context manager, or call ``close()``; a lab still open at interpreter
    exit, or when SIGTERM arrives, is closed then (for SIGTERM, only if the
    process had no handler of its own: the lab installs one that closes all
    labs and then dies of SIGTERM as before).

    Names carry a random suffix shared by all of them, so labs can run side
    by side: namespaces ``{prefix}-gen-{suffix}`` and ``{prefix}-dut-{suffix}``,
    interfaces ``xg{suffix}`` (gen) and ``xd{suffix}`` (dut).

    The dut end has a receive queue per CPU, like a NIC with RSS, and the
    gen end one transmit queue: the generator's XDP frames land on the
    sending CPU's ring, the gen stack's frames (connections, scapy) on ring
    0. With one ring, a flood from another CPU kept it full, and the gen
    stack's TCP segments were refused at the sender and sent again 200 ms
    later, by the probe timer, whatever the program on the dut decided.

    Each side has lo and its veth end up, one IPv4 /24 and one IPv6 /64
    address (GEN_V4/GEN_V6, DUT_V4/DUT_V6), fixed MAC addresses
    (GEN_MAC/DUT_MAC), and permanent neighbour entries for the other side.
    The veth ends are IFF_NOARP and neither side does DAD or router
    solicitation, so the kernel sends nothing on the link of its own accord.
    A consequence of NOARP: kernel-stack traffic to any on-link address other
    than the peer's leaves with the sender's own MAC as destination.

    Raises OSError (errno from the kernel) if a namespace or link cannot be
    created or configured.
    """

    gen_v4 = GEN_V4
    dut_v4 = DUT_V4
    gen_v6 = GEN_V6
    dut_v6 = DUT_V6
    gen_mac = GEN_MAC
    dut_mac = DUT_MAC

    def __init__(self, prefix: str = "xf") -> None:
        if not prefix or "/" in prefix or len(prefix) > 200:
            raise ValueError(f"bad namespace prefix {prefix!r}")
        suffix = secrets.token_hex(3)
        self.gen_ns = f"{prefix}-gen-{suffix}"
        self.dut_ns = f"{prefix}-dut-{suffix}"
        self.gen_if = f"xg{suffix}"
        self.dut_if = f"xd{suffix}"
        self.dut_ifindex = 0
        self.gen_ifindex = 0
        # namespaces this lab created: the only ones close() may remove
        self._namespaces: list[str] = []
        self._owner_pid = os.getpid()
        self._closing = False
        _open_labs.add(self)
        _close_labs_on_sigterm()
        try:
            self._build()
        except BaseException as exc:
            try:
                self.close()
            except Exception as cleanup:
                exc.add_note(f"and cleaning up after it failed too: {cleanup!r}")
            raise

    def _build(self) -> None:
        for name in (self.gen_ns, self.dut_ns):
            if name in netlink.named_netns():
                raise FileExistsError(errno.EEXIST, f"netns {name} already exists")
            # netns.create forks a helper that could finish after an
            # interrupt; run it to completion so the name is tracked
            with _signals_deferred():
                self._namespaces.append(name)
                try:
                    netlink.create_netns(name)
                except FileExistsError:
                    self._namespaces.remove(name)
                    raise
        # both ends are born in their namespaces: nothing ever appears in
        # the host namespace, even if we are interrupted
        netlink.add_veth(
            self.gen_if,
            self.dut_if,
            index=GEN_IFINDEX,
            address=self.gen_mac,
            netns=self.gen_ns,
            peer_address=self.dut_mac,
            peer_netns=self.dut_ns,
            peer_rx_queues=max(os.cpu_count() or 1, 1),
        )
        self.gen_ifindex = run_in_netns(
            self.gen_ns,
            _configure_side,
            self.gen_if,
            self.gen_v4,
            self.gen_v6,
            self.dut_v4,
            self.dut_v6,
            self.dut_mac,
        )
        self.dut_ifindex = run_in_netns(
            self.dut_ns,
            _configure_side,
            self.dut_if,
            self.dut_v4,
            self.dut_v6,
            self.gen_v4,
            self.gen_v6,
            self.gen_mac,
        )
        for ns, ifname in ((self.gen_ns, self.gen_if), (self.dut_ns, self.dut_if)):
            run_in_netns(ns, _wait_link_ready, ifname, 5.0)

    def __enter__(self) -> Lab:
        return self

    def __del__(self) -> None:
        # a lab dropped without close() (an interrupt between construction
        # and assignment) must not outlive its last reference; but a forked
        # child collecting its copy of the object must not tear down the lab
        if getattr(self, "_namespaces", None) and os.getpid() == self._owner_pid:
            self.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Lab(gen={self.gen_ns}:{self.gen_if}, dut={self.dut_ns}:{self.dut_if})"

    def close(self) -> None:
        """Delete the veth pair and both namespaces; safe to call again.

        The veth is deleted explicitly, because a namespace outlives its
        name while any process (a stray child, an XDP loader) is still in it.
        Every step is attempted; the first unexpected error is raised after.
        """
        if self._closing:
            return  # re-entered from the SIGTERM handler: the outer call finishes
        self._closing = True
        try:
            self._close()
        finally:
            self._closing = False

    def _close(self) -> None:
        with _signals_deferred():
            first_error: BaseException | None = None
            if self._namespaces:
                ns, ifname = (
                    (self.dut_ns, self.dut_if) if self.dut_ns in self._namespaces else (self.gen_ns, self.gen_if)
                )
                try:
                    run_in_netns(ns, _delete_link, ifname, timeout=10)
                except FileNotFoundError:
                    pass  # the namespace is already gone, and the veth with it
                except Exception as exc:
                    first_error = exc
            for name in list(self._namespaces):
                try:
                    netlink.remove_netns(name)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    first_error = first_error or exc
                    continue
                self._namespaces.remove(name)
            _open_labs.discard(self)
            if first_error is not None:
                raise first_error

    def receiver(self, **kwargs: Any) -> Receiver:
        """A (not yet started) Receiver on the dut interface."""
        return Receiver(self.dut_ns, self.dut_if, **kwargs)

    def send(self, frames: Iterable[bytes | Packet], inter: float = 0) -> int:
        """send_frames() from the gen interface towards dut."""
        return send_frames(self.gen_ns, self.gen_if, frames, inter)


def traffic_mix(lab: Lab, *, payload: int = 32) -> list[Packet]:
    """A fixed mix of 12 frames from gen to dut, the same on every call.

    Per flow, in order (sizes are Ethernet frame lengths with payload=32):

    - IPv4 UDP 40000 -> 9000, 3 frames, payloads payload, payload+1, payload+2
      (74, 75, 76 bytes)
    - IPv4 UDP 40001 -> 9001, 1 frame (74)
    - IPv4 TCP 40002 -> 80, SYN, ACK, FIN|ACK without payload (54 each)
    - IPv4 ICMP echo request id 1 seq 1 (74)
    - IPv6 UDP 40000 -> 9000, 2 frames (94, 95)
    - IPv6 TCP 40002 -> 80, SYN (74)
    - IPv6 ICMPv6 echo request id 1 seq 1 (94)
    """
    eth = Ether(src=lab.gen_mac, dst=lab.dut_mac)
    ip4 = IP(src=lab.gen_v4, dst=lab.dut_v4, id=1)
    ip6 = IPv6(src=lab.gen_v6, dst=lab.dut_v6)

    def pad(n: int) -> Raw:
        return Raw(bytes(range(256)) * (n // 256) + bytes(range(n % 256)))

    frames: list[Packet] = [
        eth / ip4 / UDP(sport=40000, dport=9000) / pad(payload),
        eth / ip4 / UDP(sport=40000, dport=9000) / pad(payload + 1),
        eth / ip4 / UDP(sport=40000, dport=9000) / pad(payload + 2),
        eth / ip4 / UDP(sport=40001, dport=9001) / pad(payload),
        eth / ip4 / TCP(sport=40002, dport=80, flags="S", seq=1000),
        eth / ip4 / TCP(sport=40002, dport=80, flags="A", seq=1001, ack=1),
        eth / ip4 / TCP(sport=40002, dport=80, flags="FA", seq=1001, ack=1),
        eth / ip4 / ICMP(type="echo-request", id=1, seq=1) / pad(payload),
        eth / ip6 / UDP(sport=40000, dport=9000) / pad(payload),
        eth / ip6 / UDP(sport=40000, dport=9000) / pad(payload + 1),
        eth / ip6 / TCP(sport=40002, dport=80, flags="S", seq=1000),
        eth / ip6 / ICMPv6EchoRequest(id=1, seq=1) / pad(payload),
    ]
    # build once so callers see final lengths and checksums
    return [Ether(bytes(frame)) for frame in frames]
