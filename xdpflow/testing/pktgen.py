"""The traffic generator: many flows of test frames, out of one interface.

``build_frames(FlowMix(...))`` makes one Ethernet frame per flow; two senders
push them out:

- ``blast()`` is fast (millions of frames per second from one core). It runs
  ``xdp_tx`` from baseline.bpf.o under BPF_PROG_TEST_RUN with live frames
  (BPF_F_TEST_XDP_LIVE_FRAMES): the kernel builds a real frame from the test
  data for every repetition and transmits it out of the ingress interface,
  as if the program had run there and returned XDP_TX. One call sends copies
  of one frame, so a mix of N flows costs at least N calls, about 20 us each
  on top of the frames themselves: many flows sent few times each go slowly.
- ``send_exact()`` is slow (an AF_PACKET socket, one system call per frame)
  but sends each frame once, in order, through the normal transmit path.

On a veth, XDP frames go into a 256-slot ring of the peer, and only if the
peer runs an XDP program (or has GRO on); otherwise the kernel drops them
all without counting them anywhere. ``blast()`` reads veth's own counters of
what the ring took and refused (``ethtool -S``: ``tx_queue_N_xdp_xmit``,
``tx_queue_N_xdp_xmit_errors``) after every call and sends refused copies
again, so exactly the frames asked for go out; nothing taken at all raises
ENXIO. Repeat counts alone are not exact: a full ring refused about 0.1 % of
a 10,000,000-frame blast in testing.

Addresses come only from the benchmarking ranges 198.18.0.0/15 (RFC 2544) and
2001:2::/48 (RFC 5180), or the documentation ranges 198.51.100.0/24,
203.0.113.0/24 and 2001:db8::/32 (for spoofed sources a blocklist should
catch); ``FlowMix`` refuses anything else, so a mistyped prefix cannot flood
someone's real network.

CLI: ``python3 -m xdpflow.testing.pktgen --netns NS --dev IFACE --flows N ...``
(``--help`` lists the options); it prints frames sent and the rate.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import ipaddress
import math
import os
import re
import socket
import struct
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

from xdpflow.bindings import netlink
from xdpflow.bindings.libbpf import Object, Program
from xdpflow.dataplane import abi
from xdpflow.errors import XdpflowError
from xdpflow.testing.lab import DUT_MAC, DUT_V4, DUT_V6, GEN_MAC, Lab

__all__ = [
    "FlowMix",
    "Result",
    "blast",
    "build_frames",
    "main",
    "send_exact",
]

FAMILIES = ("4", "6", "46")
PROTOCOLS = ("udp", "tcp", "icmp")
MIN_SIZE = 64  # bytes from the destination MAC on, no FCS
MAX_SIZE = 1514  # a 1500-byte MTU; a VLAN tag adds 4
MAX_FLOWS = 1 << 20
MAX_BATCH = 256  # the kernel's limit for live frames
MAX_REPEAT = 1 << 30  # copies per test run: the kernel takes an int

# flow j of a (family, protocol) group: source address = the j-th host of the
# source prefix, wrapping; source port (ICMP: echo identifier) = PORT_BASE +
# j % PORT_SPAN. (host, port) pairs repeat only after lcm(hosts, PORT_SPAN)
# flows, far beyond MAX_FLOWS for the default prefixes.
PORT_BASE = 1024
PORT_SPAN = 65536 - PORT_BASE
UDP_DPORT = 9000
TCP_DPORT = 80

# where a frame generator may send from and to; see the module docstring
ALLOWED_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "2001:2::/48", "2001:db8::/32")
)

# linux/if_tun.h
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


# --------------------------------------------------------------------------
# the mix and its frames


@dataclass(frozen=True)
class FlowMix:
    """What to generate: ``n_flows`` flows spread round-robin over every
    (family, protocol) pair, one frame per flow.

    ``families`` is "4", "6" or "46"; ``protocols`` a subset of udp, tcp and
    icmp, in the order wanted. ``size`` is the frame length from the
    destination MAC on, without FCS (a VLAN tag counts); a frame whose headers
    alone are longer (IPv6 + TCP is 74 bytes) has just its headers. UDP goes
    to port 9000, TCP (PSH|ACK) to port 80, ICMP is an echo request.

    Sources are the hosts of ``src_v4`` / ``src_v6`` (network and last address
    left out); the defaults are the upper halves of the lab's subnets, so a
    source never equals the lab's own addresses. The destination is the lab's
    dut. Raises XdpflowError(EINVAL) for a value out of range, including an
    address outside the benchmarking and documentation ranges.
    """

    n_flows: int = 1
    families: str = "4"
    protocols: tuple[str, ...] = ("udp",)
    size: int = MIN_SIZE
    vlan: int | None = None
    src_v4: str = "198.18.128.0/17"
    dst_v4: str = DUT_V4
    src_v6: str = "2001:2:0:0:8000::/65"
    dst_v6: str = DUT_V6
    src_mac: str = GEN_MAC
    dst_mac: str = DUT_MAC

    def __post_init__(self) -> None:
        if not isinstance(self.protocols, tuple):
            _bad(f"protocols {self.protocols!r}: give a tuple of names, like ('udp', 'tcp')")
        if not 1 <= self.n_flows <= MAX_FLOWS:
            _bad(f"{self.n_flows} flows: give 1 to {MAX_FLOWS}")
        if self.families not in FAMILIES:
            _bad(f"family {self.families!r}: use 4, 6 or 46")
        if not self.protocols or any(p not in PROTOCOLS for p in self.protocols):
            _bad(f"protocols {','.join(self.protocols) or '(none)'}: use some of {', '.join(PROTOCOLS)}")
        if len(set(self.protocols)) != len(self.protocols):
            _bad(f"protocols {','.join(self.protocols)}: each may appear once")
        if self.vlan is not None and not 1 <= self.vlan <= 4094:
            _bad(f"VLAN id {self.vlan}: use 1 to 4094")
        if not MIN_SIZE <= self.size <= self.max_size:
            _bad(f"frame size {self.size}: use {MIN_SIZE} to {self.max_size} bytes, no FCS")
        for mac in (self.src_mac, self.dst_mac):
            if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", mac):
                _bad(f"MAC address {mac!r}: write it as 02:00:c6:12:00:01")
        for version, src_text, dst_text in ((4, self.src_v4, self.dst_v4), (6, self.src_v6, self.dst_v6)):
            src, dst = _network(src_text, version), _network(dst_text, version)
            if dst.num_addresses != 1:
                _bad(f"destination {dst}: give one address, not a prefix")
            per_group = -(-self.n_flows // len(self.groups))
            if version in self.versions and per_group > math.lcm(_host_count(src), PORT_SPAN):
                _bad(f"{per_group} flows per family and protocol from {src} would repeat: use a larger prefix")

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(int(f) for f in self.families)

    @property
    def groups(self) -> list[tuple[int, str]]:
        """(IP version, protocol) pairs in the order flows are dealt to them."""
        return [(v, p) for v in self.versions for p in self.protocols]

    @property
    def max_size(self) -> int:
        return MAX_SIZE + (4 if self.vlan is not None else 0)


def _bad(sentence: str) -> None:
    raise XdpflowError(errno.EINVAL, f"flow mix: {sentence}")


def _network(text: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise XdpflowError(errno.EINVAL, f"flow mix: {text!r} is not an IPv{version} prefix: {e}") from None
    if net.version != version:
        _bad(f"{text} is not an IPv{version} address")
    if not any(net.version == a.version and net.subnet_of(a) for a in ALLOWED_NETS):  # type: ignore[arg-type]
        _bad(
            f"{text} is outside the ranges a test generator may use; take addresses from "
            + ", ".join(str(a) for a in ALLOWED_NETS)
        )
    return net


def _first_host(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return int(net.network_address) + (1 if net.num_addresses > 2 else 0)


def _host_count(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return net.num_addresses - 2 if net.num_addresses > 2 else net.num_addresses


@dataclass(frozen=True)
class _Layout:
    """Where one template keeps the fields a flow changes."""

    template: bytes
    src_off: int  # source address
    addr_len: int
    port_off: int  # source port, or ICMP echo identifier
    ip_csum_off: int | None  # IPv4 header checksum
    l4_csum_off: int
    l4_covers_addr: bool  # pseudo-header: UDP, TCP, ICMPv6 yes; ICMPv4 no
    udp: bool


def _template(mix: FlowMix, version: int, proto: str) -> _Layout:
    eth: Packet = Ether(src=mix.src_mac, dst=mix.dst_mac)
    if mix.vlan is not None:
        eth = eth / Dot1Q(vlan=mix.vlan)
    net = _network(mix.src_v4 if version == 4 else mix.src_v6, version)
    src = str(ipaddress.ip_address(_first_host(net)))
    ip: Packet = IP(src=src, dst=mix.dst_v4, id=0) if version == 4 else IPv6(src=src, dst=mix.dst_v6)
    l4: Packet
    if proto == "udp":
        l4 = UDP(sport=PORT_BASE, dport=UDP_DPORT)
    elif proto == "tcp":
        l4 = TCP(sport=PORT_BASE, dport=TCP_DPORT, flags="PA", seq=1, ack=1)
    elif version == 4:
        l4 = ICMP(type=8, id=PORT_BASE, seq=1)
    else:
        l4 = ICMPv6EchoRequest(id=PORT_BASE, seq=1)
    headers = len(eth / ip / l4)
    frame = bytes(eth / ip / l4 / Raw(bytes(max(0, mix.size - headers))))
    l3 = 18 if mix.vlan is not None else 14
    l4_off = l3 + (20 if version == 4 else 40)
    return _Layout(
        template=frame,
        src_off=l3 + (12 if version == 4 else 8),
        addr_len=4 if version == 4 else 16,
        port_off=l4_off + (4 if proto == "icmp" else 0),
        ip_csum_off=l3 + 10 if version == 4 else None,
        l4_csum_off=l4_off + {"udp": 6, "tcp": 16, "icmp": 2}[proto],
        l4_covers_addr=proto != "icmp" or version == 6,
        udp=proto == "udp",
    )


def _words_sum(b: bytes) -> int:
    return sum(struct.unpack(f"!{len(b) // 2}H", b))


def _fold(x: int) -> int:
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def _csum_update(csum: int, removed: int, added: int) -> int:
    """RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), for fields spanning several
    words: ``removed`` and ``added`` are the plain sums of the old and new
    16-bit words, and ~m is the ones'-complement negation of the folded sum."""
    return ~_fold((~csum & 0xFFFF) + (~_fold(removed) & 0xFFFF) + added) & 0xFFFF


def build_frames(mix: FlowMix) -> list[bytes]:
    """One frame per flow, the same bytes on every call.

    Flow i goes to group i % len(groups) (see ``FlowMix.groups``) as that
    group's flow j = i // len(groups): source address = the j-th host of the
    source prefix (wrapping), source port (ICMP: echo identifier) = 1024 +
    j % 64512. Every flow thus has its own 5-tuple. Note that xdpflow keys an
    ICMP flow on type and code, not the identifier, so for xdpflow two ICMP
    flows are distinct only while j stays below the prefix's host count.

    scapy builds one template per group; flows are its bytes with address
    and port patched in, and the IPv4 header and L4 checksums updated
    incrementally (RFC 1624), so every frame is valid. 64,000 frames take a
    fraction of a second. Raises XdpflowError(EINVAL) only through FlowMix.
    """
    groups = mix.groups
    layouts = [_template(mix, v, p) for v, p in groups]
    firsts, counts = [], []
    for v, _ in groups:
        net = _network(mix.src_v4 if v == 4 else mix.src_v6, v)
        firsts.append(_first_host(net))
        counts.append(_host_count(net))
    frames: list[bytes] = []
    n_groups = len(groups)
    for i in range(mix.n_flows):
        g = i % n_groups
        j = i // n_groups
        lay = layouts[g]
        buf = bytearray(lay.template)
        old_addr = lay.template[lay.src_off : lay.src_off + lay.addr_len]
        new_addr = (firsts[g] + j % counts[g]).to_bytes(lay.addr_len, "big")
        port = PORT_BASE + j % PORT_SPAN
        buf[lay.src_off : lay.src_off + lay.addr_len] = new_addr
        struct.pack_into("!H", buf, lay.port_off, port)
        removed_addr, added_addr = _words_sum(old_addr), _words_sum(new_addr)
        if lay.ip_csum_off is not None:
            (c,) = struct.unpack_from("!H", buf, lay.ip_csum_off)
            struct.pack_into("!H", buf, lay.ip_csum_off, _csum_update(c, removed_addr, added_addr))
        removed, added = PORT_BASE, port
        if lay.l4_covers_addr:
            removed += removed_addr
            added += added_addr
        (c,) = struct.unpack_from("!H", buf, lay.l4_csum_off)
        c = _csum_update(c, removed, added)
        if lay.udp and c == 0:
            c = 0xFFFF  # zero means "no checksum" in UDP
        struct.pack_into("!H", buf, lay.l4_csum_off, c)
        frames.append(bytes(buf))
    return frames


def vary_frame(mix: FlowMix) -> tuple[bytes, int]:
    """For ``blast(vary=...)``: flow 0's frame and the offset of its source
    port. Copies of it with ports PORT_BASE .. PORT_BASE + n_flows - 1 are
    exactly the flows of a one-group mix with as many source hosts as flows
    are not needed: the port alone tells flows apart (n_flows <= 64512).
    Raises XdpflowError(EINVAL) for a mix of several groups or ICMP.
    """
    if len(mix.groups) != 1 or mix.groups[0][1] == "icmp":
        raise XdpflowError(errno.EINVAL, "vary: needs a mix of one family and one of udp/tcp")
    if mix.n_flows > PORT_SPAN:
        raise XdpflowError(errno.EINVAL, f"vary: at most {PORT_SPAN} flows (one per source port)")
    lay = _template(mix, *mix.groups[0])
    return build_frames(replace(mix, n_flows=1))[0], lay.port_off


# --------------------------------------------------------------------------
# sending


@dataclass(frozen=True)
class Result:
    """What a send did.

    ``sent``: frames transmitted, exactly. ``counted`` is True when the
    driver's own counters confirmed every one (``blast()`` on a veth); False
    means they were handed to the driver (other drivers) or accepted by it one
    by one (``send_exact()``). ``requested`` is what the caller asked for,
    ``refused`` the copies the driver refused (full queue) and that were sent
    again, so they are in ``sent`` once. ``seconds`` is the wall time of the
    sending calls alone, ``pps`` = sent / seconds, ``calls`` the number of
    sending system calls.
    """

    sent: int
    seconds: float
    pps: float
    requested: int = 0
    refused: int = 0
    calls: int = 0
    counted: bool = False


@contextlib.contextmanager
def _in_xdp_dispatcher(prog: Program) -> Iterator[None]:
    """Keep ``prog`` installed in the kernel's XDP dispatcher meanwhile.

    Every test run with repeat > 1 installs its program in the XDP dispatcher
    and removes it afterwards, and each change waits for an RCU grace period:
    about 25 ms per call instead of 20 us, so sending each frame of a
    64,000-flow mix twice would take half an hour. A program attached to an
    interface stays installed, and the dispatcher then only counts
    references. So attach it to a throwaway TAP device (down, no traffic) in
    this thread's netns; the device, and the attachment with it, disappears
    when its fd is closed, even if this process dies. Attaching and closing
    wait for a grace period each, once per blast. If attaching fails, the
    blast still works, slowly.
    """
    fd = -1
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        ifr = fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", b"xfpgen%d", _IFF_TAP | _IFF_NO_PI).ljust(40, b"\0"))
        name = ifr[:16].split(b"\0")[0].decode()
        netlink.attach(name, prog.fd, "native")
    except OSError as e:
        warnings.warn(
            f"pktgen: cannot keep {prog.name} in the XDP dispatcher ({e}); "
            "each frame of the mix will cost about 25 ms more",
            RuntimeWarning,
            stacklevel=4,
        )
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def blast(
    ifname: str,
    frames: Sequence[bytes],
    total: int,
    netns: str | None = None,
    batch_size: int = 64,
    *,
    burst: int | None = None,
    vary: tuple[int, int] | None = None,
) -> Result:
    """Send ``total`` frames out of ``ifname`` at XDP speed: every frame of
    ``frames`` total // len(frames) times, the first total % len(frames)
    frames once more.

    Each frame is sent with one BPF_PROG_TEST_RUN call of baseline's
    ``xdp_tx`` in live-frames mode, its copies back to back; with ``burst``
    a call sends at most that many, in rounds over all frames, so flows
    interleave more (at the price of more calls). ``batch_size`` (1-256) is
    how many frames the kernel builds before flushing them to the driver.
    Everything, the interface lookup included, happens inside ``netns``
    (None: this thread's namespace); only this thread changes namespace, and
    only for the duration of the call.

    On a veth (whose driver counts what its peer's ring took and refused),
    copies refused because the ring was full are sent again at once, so
    exactly ``total`` frames go out and ``Result.sent`` == total, read from
    the driver; ``Result.refused`` says how many copies were re-sent. Another
    sender on the same interface meanwhile makes that count wrong (EBUSY).
    On other drivers ``sent`` is what was handed to the driver (``counted``
    False) and nothing is re-sent.

    With ``vary=(offset, count)`` the kernel rewrites the big-endian 16-bit
    field at ``offset`` of every copy to its value in the frame plus (copy
    number % count): one frame makes ``count`` flows at full speed (see
    ``vary_frame``). Copies a full ring refused are re-sent with the next
    values, so per-flow counts may differ by those few; the total is exact.

    Raises XdpflowError: ENOENT (no such netns), ENODEV (no such interface),
    EPERM (not root), EINVAL (bad arguments, or a frame longer than the
    kernel allows in one page), ENXIO (the veth silently dropped the frames:
    its peer runs no XDP program and has GRO off), ENOBUFS (the veth kept
    refusing a frame: longer than the peer's MTU?), EBUSY (another sender).
    """
    if not frames:
        raise XdpflowError(errno.EINVAL, "blast: no frames to send; build some with build_frames()")
    if total < 0:
        raise XdpflowError(errno.EINVAL, f"blast: cannot send {total} frames")
    if not 1 <= batch_size <= MAX_BATCH:
        raise XdpflowError(errno.EINVAL, f"blast: batch size {batch_size}: use 1 to {MAX_BATCH}")
    if burst is not None and burst < 1:
        raise XdpflowError(errno.EINVAL, f"blast: burst {burst}: use 1 or more, or None")
    calls = _plan(_shares(len(frames), total), burst)
    if not calls:
        return Result(sent=0, seconds=0.0, pps=0.0)

    with Object(abi.object_path("baseline")) as obj:
        obj.set_autoload("xdp_pass", False)
        obj.set_autoload("xdp_drop", False)
        if vary is not None:
            offset, count = vary
            if len(frames) != 1 or not 0 < offset <= len(frames[0]) - 2 or count < 1:
                raise XdpflowError(errno.EINVAL, "blast: vary needs one frame, a field inside it and a count")
            knobs = obj.map_spec(next(n for n in obj.maps if n.endswith(".rodata"))).initial_value(
                "struct xf_gen_knobs", abi.ffi
            )
            knobs.vary_offset = offset
            knobs.vary_count = count
            knobs.vary_base = struct.unpack_from("!H", frames[0], offset)[0]
        obj.load()
        prog = obj.program("xdp_tx")
        try:
            with netlink.in_netns(netns):
                idx = netlink.ifindex(ifname)
                counters = netlink.XdpXmitCounters.open(ifname)
                hold = _in_xdp_dispatcher(prog) if any(n > 1 for _, n in calls) else contextlib.nullcontext()
                try:
                    with hold:
                        pusher = _Pusher(prog, idx, batch_size, counters, ifname)
                        t0 = time.perf_counter()
                        for i, n in calls:
                            pusher.push(frames[i], n, i)
                        seconds = time.perf_counter() - t0
                finally:
                    if counters is not None:
                        counters.close()
        finally:
            prog.close()

    return Result(
        sent=total,
        seconds=seconds,
        pps=total / seconds if seconds > 0 else 0.0,
        requested=total,
        refused=pusher.refused,
        calls=pusher.calls,
        counted=counters is not None,
    )


def _shares(n_frames: int, total: int) -> list[int]:
    base, extra = divmod(total, n_frames)
    return [base + (1 if i < extra else 0) for i in range(n_frames)]


def _plan(shares: list[int], burst: int | None) -> list[tuple[int, int]]:
    """(frame index, copies) per call, in sending order."""
    if burst is None and max(shares) <= MAX_REPEAT:
        return [(i, n) for i, n in enumerate(shares) if n]
    burst = min(burst or MAX_REPEAT, MAX_REPEAT)
    calls = []
    left = list(shares)
    while any(left):
        for i, n in enumerate(left):
            if n:
                k = min(n, burst)
                calls.append((i, k))
                left[i] -= k
    return calls


class _Pusher:
    """Sends copies of a frame until the driver has taken exactly that many."""

    # a veth that takes nothing this many calls in a row will not take this frame
    STALLS = 200

    def __init__(
        self, prog: Program, ifindex: int, batch_size: int, counters: netlink.XdpXmitCounters | None, ifname: str
    ) -> None:
        self.prog = prog
        self.ifindex = ifindex
        self.batch_size = batch_size
        self.counters = counters
        self.ifname = ifname
        self.refused = 0
        self.calls = 0
        self._last = counters.read() if counters is not None else (0, 0)

    def push(self, frame: bytes, n: int, index: int) -> None:
        left, stalls = n, 0
        while left:
            interrupted = False
            try:
                self.prog.test_run(
                    frame, left, ingress_ifindex=self.ifindex, live_frames=True, batch_size=self.batch_size
                )
            except XdpflowError as e:
                # a signal stops a test run midway; the counters say how far it got
                if e.errno != errno.EINTR or self.counters is None:
                    raise
                interrupted = True
            self.calls += 1
            if self.counters is None:
                return
            now = self.counters.read()
            took, refused = now[0] - self._last[0], now[1] - self._last[1]
            self._last = now
            self.refused += refused
            if took > left:
                raise XdpflowError(
                    errno.EBUSY,
                    f"blast: {self.ifname} sent {took - left} frames more than asked: another program "
                    "transmits there too, so the counts would be wrong; stop it and send again",
                )
            left -= took
            if took or interrupted:
                stalls = 0
            elif not refused:
                raise XdpflowError(
                    errno.ENXIO,
                    f"blast: {self.ifname} dropped the frames without sending them: a veth passes XDP "
                    "frames only to a peer that runs an XDP program or has GRO on; attach one to the "
                    "peer (xdp_pass will do)",
                )
            else:
                stalls += 1
                if stalls >= self.STALLS:
                    raise XdpflowError(
                        errno.ENOBUFS,
                        f"blast: {self.ifname} refused frame {index} ({len(frame)} bytes) {stalls} times in "
                        "a row: is it longer than the peer's MTU, or does the peer not keep up?",
                    )
                time.sleep(min(0.0001 * stalls, 0.01))  # let the peer's softirq drain its ring


def send_exact(
    lab_or_ns: Lab | str | None,
    ifname: str | None,
    frames: Sequence[bytes],
    count: int,
    *,
    timeout: float = 60.0,
) -> Result:
    """Send ``count`` frames, frames[0], frames[1], ... (starting over when
    they run out), each exactly once and in order, through an AF_PACKET socket.

    ``lab_or_ns`` is a Lab (its gen namespace; ``ifname`` None means its gen
    interface), a netns name, or None for this thread's namespace. When the
    interface refuses a frame (ENOBUFS: a veth whose peer's 256-slot XDP
    ring is full; it was not sent) the same frame is sent again after a
    short pause, so nothing is lost or duplicated: ``Result.sent`` == count
    on return, and ``Result.refused`` counts the refusals.

    With ``vary=(offset, count)`` the kernel rewrites the big-endian 16-bit
    field at ``offset`` of every copy to its value in the frame plus (copy
    number % count): one frame makes ``count`` flows at full speed (see
    ``vary_frame``). Copies a full ring refused are re-sent with the next
    values, so per-flow counts may differ by those few; the total is exact.

    Raises XdpflowError: ENOENT (no such netns), ENODEV (no such
    interface), EMSGSIZE (a frame longer than the MTU), ETIMEDOUT (the
    interface would not take frames for ``timeout`` seconds), EPERM (not root).
    """
    if isinstance(lab_or_ns, Lab):
        netns: str | None = lab_or_ns.gen_ns
        ifname = ifname or lab_or_ns.gen_if
    else:
        netns = lab_or_ns
    if not ifname:
        raise XdpflowError(errno.EINVAL, "send_exact: name the interface to send from")
    if count < 0 or (count and not frames):
        raise XdpflowError(errno.EINVAL, f"send_exact: cannot send {count} frames from {len(frames)}")
    n = len(frames)
    with netlink.in_netns(netns):
        netlink.ifindex(ifname)  # ENODEV with a sentence, before the socket's bare one
        try:
            # protocol 0: this socket only sends, so nothing is queued on it
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError:
            raise XdpflowError(errno.EPERM, "send_exact: opening a packet socket: run as root") from None
        with sock:
            sock.bind((ifname, 0))
            calls = 0
            t0 = time.perf_counter()
            for k in range(count):
                calls += _send_one(sock, frames[k % n], ifname, k, timeout)
            seconds = time.perf_counter() - t0
    return Result(
        sent=count,
        seconds=seconds,
        pps=count / seconds if seconds > 0 else 0.0,
        requested=count,
        refused=calls - count,
        calls=calls,
    )


def _send_one(sock: socket.socket, frame: bytes, ifname: str, k: int, timeout: float) -> int:
    """Send ``frame`` until the interface takes it; returns the attempts."""
    deadline = 0.0
    pause = 50e-6
    attempts = 0
    while True:
        attempts += 1
        try:
            sent = sock.send(frame)
        except OSError as e:
            if e.errno not in (errno.ENOBUFS, errno.EAGAIN):
                hint = "; is it longer than the MTU?" if e.errno == errno.EMSGSIZE else ""
                raise XdpflowError(e.errno or errno.EIO, f"sending frame {k} on {ifname}: {e.strerror}{hint}") from None
            now = time.monotonic()
            deadline = deadline or now + timeout
            if now > deadline:
                raise XdpflowError(
                    errno.ETIMEDOUT,
                    f"sending frame {k} on {ifname}: the interface took no frame for {timeout} s; "
                    "is its peer (or the link) up?",
                ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
            continue
        if sent != len(frame):
            raise XdpflowError(errno.EMSGSIZE, f"sending frame {k} on {ifname}: sent {sent} of {len(frame)} bytes")
        return attempts


# --------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m xdpflow.testing.pktgen",
        description="Send a mix of test flows out of an interface (needs root).",
    )
    p.add_argument("--netns", help="network namespace of the interface (default: this one)")
    p.add_argument("--dev", required=True, help="interface to send from")
    p.add_argument("--flows", type=int, default=1, help="distinct flows, one frame each (default 1)")
    p.add_argument("--family", default="4", choices=FAMILIES, help="IP versions: 4, 6 or 46 (default 4)")
    p.add_argument("--proto", default="udp", help="comma-separated: udp,tcp,icmp (default udp)")
    p.add_argument("--size", type=int, default=MIN_SIZE, help="frame bytes, Ethernet header on, no FCS (default 64)")
    p.add_argument("--count", type=int, default=1_000_000, help="frames to send in all (default 1000000)")
    p.add_argument("--vlan", type=int, help="put frames in this 802.1Q VLAN")
    p.add_argument("--exact", action="store_true", help="send through a packet socket, each frame once, in order")
    p.add_argument("--batch-size", type=int, default=64, help="live-frames batch, 1-256 (default 64)")
    p.add_argument("--burst", type=int, help="at most this many copies of a frame back to back")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code: 0, 1 for a failed send, 2 for bad input."""
    args = build_parser().parse_args(argv)
    try:
        mix = FlowMix(
            n_flows=args.flows,
            families=args.family,
            protocols=tuple(p.strip().lower() for p in args.proto.split(",") if p.strip()),
            size=args.size,
            vlan=args.vlan,
        )
        if args.count < 0:
            raise XdpflowError(errno.EINVAL, f"--count {args.count}: give 0 or more")
    except XdpflowError as e:
        print(f"pktgen: {e}", file=sys.stderr)
        return 2
    try:
        frames = build_frames(mix)
        if args.exact:
            r = send_exact(args.netns, args.dev, frames, args.count)
        else:
            r = blast(args.dev, frames, args.count, args.netns, args.batch_size, burst=args.burst)
    except OSError as e:
        print(f"pktgen: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    line = f"sent {r.sent} frames in {r.seconds:.3f} s: {r.pps:,.0f} pps ({mix.n_flows} flows, {r.calls} calls)"
    if r.refused:
        line += f"; {r.refused} copies refused (queue full) and sent again"
    if not args.exact and not r.counted:
        line += f"; {args.dev} has no XDP transmit counters, so this is what was handed to the driver"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
