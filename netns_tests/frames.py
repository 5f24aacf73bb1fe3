"""Frames for the BPF_PROG_TEST_RUN tests, and a reference model of the program.

``classify()`` reads a frame the way bpf/parsing.h and bpf/xdpflow.bpf.c are
specified to: Ethernet with up to two VLAN tags, IPv4 with options, IPv6 with
up to six extension headers, then the L4 ports. ``Model`` adds the blocklist,
monitor and sink modes on top and accumulates the counters, flows, rule hits
and events the program should end up with, so hostile-frame runs can compare
every counter and every flow exactly instead of checking "> 0".

The ``prog``/``make_prog`` fixtures here replace conftest's in the modules
that import them: same harness, but loaded once per session and option set
and reset between tests, which keeps the suite fast.

Only addresses from the documentation/benchmark ranges are used:
198.18.0.0/15, 198.51.100.0/24, 203.0.113.0/24, 2001:2::/48, 2001:db8::/32.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from xdpflow.bindings.libbpf import RingBuffer, lib
from xdpflow.dataplane import abi, events
from xdpflow.dataplane.abi import bytes_key, ffi
from xdpflow.dataplane.flows import read_table

MAC_SRC = "02:00:00:00:00:01"
MAC_DST = "02:00:00:00:00:02"

COUNTERS = tuple(abi.COUNTER_NAMES.values())
CLASSES = ("non_ip", "parse_errors", "ipv4", "ipv6")
ACTIONS = ("passed", "dropped", "sunk")
L4 = ("tcp", "udp", "icmp", "other")

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
VLAN_MAX, IPV6_EXT_MAX = abi.C.XF_VLAN_MAX, abi.C.XF_IPV6_EXT_MAX
IPV6_EXT = (0, 43, 60, 44)  # hop-by-hop, routing, destination options, fragment

FlowKey = tuple[int, bytes, bytes, int, int, int]  # family, src, dst, sport, dport, proto


def ether(*vlans: tuple[int, int]) -> Any:
    """Ethernet with explicit MACs (no scapy route lookups) and VLAN tags
    given as (tpid, vid), outermost first."""
    pkt = Ether(src=MAC_SRC, dst=MAC_DST)
    for tpid, vid in vlans:
        pkt = pkt / (Dot1AD(vlan=vid) if tpid == ETH_P_8021AD else Dot1Q(vlan=vid))
    return pkt


def arp() -> bytes:
    return bytes(ether() / ARP(hwsrc=MAC_SRC, hwdst=MAC_DST, psrc="198.18.0.1", pdst="198.18.0.2", op=1))


def pad(frame: bytes, n: int = 60) -> bytes:
    """Ethernet minimum-size padding: zero bytes after the IP packet."""
    return frame + b"\0" * max(0, n - len(frame))


# --------------------------------------------------------------------------
# counters


def zero_counters() -> dict[str, int]:
    out = dict.fromkeys(COUNTERS, 0)
    out.update({bytes_key(n): 0 for n in COUNTERS})
    return out


def expect(*frames: tuple[int, str, str, str | None], **extra: int) -> dict[str, int]:
    """The whole counters dict for frames given as (length, class, action, l4).

    ``extra`` sets side counters' packet counts (monitored=1...); their
    bytes must be given as ``<name>_bytes`` when they are not zero (the
    total's are "bytes", as `stats --json` names them).
    """
    out = zero_counters()
    for length, cls, act, l4 in frames:
        for name in ("packets", cls, act) + ((l4,) if l4 else ()):
            out[name] += 1
            out[bytes_key(name)] += length
    for k, v in extra.items():
        out[k] += v
    return out


def check_invariants(c: dict[str, int]) -> None:
    """The class invariants of struct xf_counters, packets and bytes."""
    for key in (lambda n: n, bytes_key):
        total = c[key("packets")]
        assert total == sum(c[key(n)] for n in CLASSES), c
        assert total == sum(c[key(n)] for n in ACTIONS), c
        assert c[key("ipv4")] + c[key("ipv6")] == sum(c[key(n)] for n in L4), c


# --------------------------------------------------------------------------
# the reference parser


@dataclass(frozen=True)
class Parsed:
    """What the program should make of one frame, before any blocklist.

    cls: non_ip, parse_errors, ipv4 or ipv6 (the L3 result); l4: the protocol
    counter for IP frames; l4_error: the L4 header is truncated (the frame
    becomes a parse error unless the blocklist takes it first).
    """

    cls: str
    length: int
    family: int = 0
    l4: str | None = None
    l4_error: bool = False
    key: FlowKey | None = None
    iplen: int = 0
    tcp_flags: int = 0


def _be16(b: bytes, off: int) -> int:
    return (b[off] << 8) | b[off + 1]


def _l4_class(proto: int) -> str:
    return {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}.get(proto, "other")


def classify(frame: bytes, bound: str = "ip", frag_stop: bool = True) -> Parsed:
    """Parse ``frame`` as the program specifies.

    ``bound`` says where extension and L4 headers must end: "ip" at the end of
    the IP packet (IPv4 total length, IPv6 40 + payload length), "frame" at
    the end of the frame (the program before it was fixed, which read Ethernet
    padding as L4 header; test_prog_parse.py::test_l4_header_must_lie_within_ip_packet).

    ``frag_stop``: the header chain ends at the fragment header of a non-first
    IPv6 fragment, whose next header names the first header of the original
    packet's fragmentable part, not something in this fragment. False walks
    on into the payload as the program does today (see
    test_prog_flows.py::test_ipv6_later_fragment_payload_is_not_parsed).
    """
    n = len(frame)
    perr = Parsed("parse_errors", n)
    if n < 14:
        return perr
    proto = _be16(frame, 12)
    off = 14
    for _ in range(VLAN_MAX):
        if proto not in (ETH_P_8021Q, ETH_P_8021AD):
            break
        if off + 4 > n:
            return perr
        proto = _be16(frame, off + 2)
        off += 4
    if proto in (ETH_P_8021Q, ETH_P_8021AD):
        return perr

    if proto == ETH_P_IP:
        if off + 20 > n:
            return perr
        version, ihl = frame[off] >> 4, frame[off] & 0xF
        hdr = ihl * 4
        if version != 4 or hdr < 20:
            return perr
        tot = _be16(frame, off + 2)
        if tot < hdr or off + tot > n:
            return perr
        family, iplen, ipproto = 4, tot, frame[off + 9]
        src, dst = frame[off + 12 : off + 16], frame[off + 16 : off + 20]
        l4_ok = (_be16(frame, off + 6) & 0x1FFF) == 0
        pos, end = off + hdr, (off + tot if bound == "ip" else n)
    elif proto == ETH_P_IPV6:
        if off + 40 > n:
            return perr
        if frame[off] >> 4 != 6:
            return perr
        plen = _be16(frame, off + 4)
        if off + 40 + plen > n:
            return perr
        end = off + 40 + plen if bound == "ip" else n
        family, iplen = 6, 40 + plen
        src, dst = frame[off + 8 : off + 24], frame[off + 24 : off + 40]
        ipproto, pos, l4_ok = frame[off + 6], off + 40, True
        stopped = False
        for _ in range(IPV6_EXT_MAX):
            if ipproto not in IPV6_EXT:
                break
            if ipproto == 44:
                if pos + 8 > end:
                    return perr
                if _be16(frame, pos + 2) & 0xFFF8:
                    l4_ok = False
                ipproto = frame[pos]
                pos += 8
                if not l4_ok and frag_stop:
                    stopped = True
                    break
            else:
                if pos + 2 > end:
                    return perr
                ipproto = frame[pos]
                pos += (frame[pos + 1] + 1) * 8
        if not stopped and (ipproto in IPV6_EXT or (bound == "ip" and pos > end)):
            return perr  # too many, or the last one ends past the packet
    else:
        return Parsed("non_ip", n)

    cls = "ipv4" if family == 4 else "ipv6"
    sport = dport = flags = 0
    l4_error = False
    if l4_ok:
        if ipproto == 6:
            if pos + 20 > end:
                l4_error = True
            else:
                doff = frame[pos + 12] >> 4
                if doff < 5 or pos + doff * 4 > end:
                    l4_error = True
                else:
                    sport, dport, flags = _be16(frame, pos), _be16(frame, pos + 2), frame[pos + 13]
        elif ipproto == 17:
            if pos + 8 > end:
                l4_error = True
            else:
                sport, dport = _be16(frame, pos), _be16(frame, pos + 2)
        elif ipproto in (1, 58):
            if pos + 2 > end:
                l4_error = True
            else:
                sport, dport = frame[pos], frame[pos + 1]
    key = (family, bytes(src), bytes(dst), sport, dport, ipproto)
    return Parsed(cls, n, family, _l4_class(ipproto), l4_error, key, iplen, flags)


# --------------------------------------------------------------------------
# the reference program


@dataclass
class ModelRule:
    net: ipaddress.IPv4Network | ipaddress.IPv6Network
    direction: str
    index: int


@dataclass
class Model:
    """Expected state of one loaded program after the frames fed to it."""

    rules: list[ModelRule] = field(default_factory=list)
    monitor: bool = False
    sink: bool = False
    bound: str = "ip"
    counters: dict[str, int] = field(default_factory=zero_counters)
    flows: dict[FlowKey, list[int]] = field(default_factory=dict)  # packets, bytes, flags
    hits: Counter[int] = field(default_factory=Counter)
    emits: int = 0  # events the program tries to send (new flows, blocklist hits)

    def match(self, p: Parsed) -> int | None:
        assert p.key is not None
        for direction, addr in (("src", p.key[1]), ("dst", p.key[2])):
            ip = ipaddress.ip_address(addr)
            best = None
            for r in self.rules:
                if r.direction == direction and r.net.version == ip.version and ip in r.net:
                    if best is None or r.net.prefixlen > best.net.prefixlen:
                        best = r
            if best is not None:
                return best.index
        return None

    def feed(self, frame: bytes) -> int:
        """Account one frame; returns the expected XDP verdict."""
        p = classify(frame, self.bound)
        cls, l4, act, verdict, side = p.cls, p.l4, "passed", 2, []
        rule = self.match(p) if p.family else None
        if rule is not None:
            self.hits[rule] += 1
            self.emits += 1
            if self.monitor:
                side.append("monitored")
            else:
                act, verdict = "dropped", 1
        elif p.family and p.l4_error:
            cls, l4 = "parse_errors", None
        elif p.family:
            assert p.key is not None
            f = self.flows.get(p.key)
            if f is None:
                self.flows[p.key] = [1, p.iplen, p.tcp_flags]
                self.emits += 1
            else:
                f[0] += 1
                f[1] += p.iplen
                f[2] |= p.tcp_flags
        if not p.family:
            l4 = None
        if self.sink and verdict == 2:
            act, verdict = "sunk", 1
        c = self.counters
        for name in ["packets", cls, act, *side] + ([l4] if l4 else []):
            c[name] += 1
            c[bytes_key(name)] += p.length
        return verdict


EVENT_COUNTERS = ("events_suppressed", "events_lost")


def without_events(c: dict[str, int]) -> dict[str, int]:
    """Counters minus the event side counters, which depend on timing."""
    return {k: v for k, v in c.items() if k.removesuffix("_bytes") not in EVENT_COUNTERS}


def check_model(prog: Any, model: Model, before: dict[str, int] | None = None) -> None:
    """Counters (since ``before``) and flows equal the model's exactly, and
    every event the model says was sent was delivered, suppressed or lost."""
    c = prog.counters()
    if before is not None:
        c = {k: c[k] - before[k] for k in c}
    assert without_events(c) == without_events(model.counters)
    delivered = len(prog.events.drain())
    assert delivered + c["events_suppressed"] + c["events_lost"] == model.emits
    check_invariants(c)
    assert read_flows(prog) == model.flows


def read_flows(prog: Any) -> dict[FlowKey, list[int]]:
    """The harness's flow tables as {key: [packets, bytes, tcp_flags]}."""
    out: dict[FlowKey, list[int]] = {}
    for name, fam in (("flows_v4", 4), ("flows_v6", 6)):
        fa = read_table(prog.map(name), fam)
        for i in range(len(fa)):
            k = fa.keys[i]
            if fam == 4:
                src, dst = int(k["saddr"]).to_bytes(4, "big"), int(k["daddr"]).to_bytes(4, "big")
            else:
                src, dst = bytes(k["saddr"]), bytes(k["daddr"])
            key = (fam, src, dst, int(k["sport"]), int(k["dport"]), int(k["proto"]))
            assert key not in out, f"flow {key} twice"
            out[key] = [int(fa.packets[i]), int(fa.bytes[i]), int(fa.tcp_flags[i])]
    return out


def flow_key(src: str, dst: str, sport: int, dport: int, proto: int) -> FlowKey:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return (s.version, s.packed, d.packed, sport, dport, proto)


# --------------------------------------------------------------------------
# templates and mutation for hostile-frame runs


@dataclass(frozen=True)
class Template:
    name: str
    frame: bytes
    l3: int  # offset of the IP header (or of what follows Ethernet/VLAN)
    l4: int  # offset of the L4 header (== len when there is none)


def raw_udp4(src: int, dst: int, sport: int, dport: int, payload: bytes = b"") -> bytes:
    """Ethernet/IPv4/UDP by struct packing: ~100x faster than scapy, for
    building thousands of frames. Checksums are zero (the program ignores
    them)."""
    n = 28 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, n, 0, 0, 64, 17, 0, src.to_bytes(4, "big"), dst.to_bytes(4, "big"))
    return _ETH_V4 + ip + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


_ETH_V4 = bytes.fromhex(MAC_DST.replace(":", "") + MAC_SRC.replace(":", "")) + b"\x08\x00"


def _template(name: str, pkt: Any) -> Template:
    frame = bytes(pkt)
    l3 = 14
    while _be16(frame, l3 - 2) in (ETH_P_8021Q, ETH_P_8021AD):
        l3 += 4
    layer = pkt.getlayer(TCP) or pkt.getlayer(UDP) or pkt.getlayer(ICMP) or pkt.getlayer(ICMPv6EchoRequest)
    l4 = len(frame) - len(bytes(layer)) if layer is not None else len(frame)
    return Template(name, frame, l3, l4)


def templates() -> list[Template]:
    """A handful of valid frames covering every parser path."""
    v4 = IP(src="198.18.0.1", dst="198.18.0.2")
    v6 = IPv6(src="2001:2::1", dst="2001:2::2")
    q, ad = (ETH_P_8021Q, 10), (ETH_P_8021AD, 20)
    out = [
        _template("v4-udp", ether() / v4 / UDP(sport=1000, dport=53) / Raw(b"q" * 20)),
        _template("v4-tcp", ether() / v4 / TCP(sport=40000, dport=443, flags="S") / Raw(b"t" * 8)),
        _template(
            "v4opt-tcp",
            ether()
            / IP(src="198.19.1.1", dst="203.0.113.9", options=[IPOption_NOP()] * 12)
            / TCP(sport=1, dport=2, flags="PA", options=[("NOP", None)] * 4),
        ),
        _template("v4-icmp", ether() / v4 / ICMP(type=8, code=0) / Raw(b"i" * 16)),
        _template("vlan-v4-udp", ether(q) / v4 / UDP(sport=7, dport=8)),
        _template("qinq-v6-tcp", ether(ad, q) / v6 / TCP(sport=5, dport=6, flags="SA")),
        _template(
            "v6-ext-udp",
            ether()
            / v6
            / IPv6ExtHdrHopByHop()
            / IPv6ExtHdrRouting()
            / IPv6ExtHdrDestOpt()
            / IPv6ExtHdrFragment(offset=0, m=1, id=7)
            / UDP(sport=9, dport=10),
        ),
        _template("v6-frag-later", ether() / v6 / IPv6ExtHdrFragment(offset=100, id=7, nh=17) / Raw(b"f" * 24)),
        _template(
            "v4-frag-later",
            ether() / IP(src="198.18.0.3", dst="198.18.0.4", frag=64, proto=17) / Raw(b"f" * 24),
        ),
        _template("v6-icmp", ether() / v6 / ICMPv6EchoRequest(id=1, seq=2)),
        _template("v4-gre", ether() / IP(src="203.0.113.1", dst="203.0.113.2", proto=47) / Raw(b"\0\0\x08\0")),
        _template("blocked-v4-udp", ether() / IP(src="198.51.100.7", dst="198.18.0.2") / UDP(sport=3, dport=4)),
        _template("blocked-v6-tcp", ether() / IPv6(src="2001:2::9", dst="2001:db8:bad::1") / TCP(sport=3, dport=4)),
        _template("arp", Ether(arp())),
    ]
    padded = pad(bytes(ether() / IP(src="198.18.0.5", dst="198.18.0.6") / UDP(sport=11, dport=12)))
    out.append(Template("v4-udp-padded", padded, 14, 34))
    return out


class Mutator:
    """Hostile variants of templates, by raw byte surgery (fast: no scapy)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.templates = templates()

    def random_frame(self) -> bytes:
        r = self.rng
        return r.randbytes(r.randint(14, 1600))

    def mutated_frame(self) -> bytes:
        r = self.rng
        t = r.choice(self.templates)
        b = bytearray(t.frame)
        l3, l4 = t.l3, t.l4
        is_v4 = t.frame[t.l3] >> 4 == 4
        for _ in range(r.randint(1, 4)):
            op = r.randrange(12)
            hdr_end = min(len(b), l4 + 24)
            if op == 0 and hdr_end > 12:  # random byte in the headers
                b[r.randrange(12, hdr_end)] = r.randrange(256)
            elif op == 1 and hdr_end > 12:  # one bit
                i = r.randrange(12, hdr_end)
                b[i] ^= 1 << r.randrange(8)
            elif op == 2 and len(b) > l3:  # version / IHL nibble
                b[l3] = r.randrange(256)
            elif op == 3 and len(b) > l3 + 6:  # IPv4 tot_len or IPv6 payload_len
                at = l3 + (2 if is_v4 else 4)
                cur = _be16(b, at)
                new = r.choice(
                    [
                        0,
                        1,
                        19,
                        20,
                        39,
                        40,
                        0xFFFF,
                        cur - 1,
                        cur + 1,
                        cur - r.randint(1, 30),
                        r.randrange(65536),
                    ]
                )
                struct.pack_into("!H", b, at, new & 0xFFFF)
            elif op == 4 and len(b) > l4 + 12:  # TCP data offset, incl. zero
                b[l4 + 12] = (r.choice([0, 1, 4, 5, 6, 15, r.randrange(16)]) << 4) | (b[l4 + 12] & 0xF)
            elif op == 5:  # stack VLAN tags, possibly past the limit
                tags = b"".join(
                    struct.pack("!HH", r.choice([ETH_P_8021Q, ETH_P_8021AD]), r.randrange(4096))
                    for _ in range(r.randint(1, 4))
                )
                # tpid1 tci1 tpid2 tci2 ... tcik, then the old ethertype
                b[12:12] = tags
                l3 += len(tags)
                l4 += len(tags)
            elif op == 6:  # cut
                del b[r.randint(14, max(14, len(b))) :]
            elif op == 7:  # append garbage (or padding)
                b += r.randbytes(r.randint(1, 64)) if r.random() < 0.5 else bytes(r.randint(1, 64))
            elif op == 8:  # ethertype
                struct.pack_into(
                    "!H",
                    b,
                    12,
                    r.choice([ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD, 0x0806, 0x88CC, r.randrange(65536)]),
                )
            elif op == 9 and len(b) > l3 + 9:  # IP protocol / IPv6 next header
                at = l3 + (9 if is_v4 else 6)
                b[at] = r.choice([0, 1, 6, 17, 43, 44, 47, 58, 59, 60, r.randrange(256)])
            elif op == 10 and len(b) > l3 + 8:  # IPv4 fragment field
                struct.pack_into("!H", b, l3 + 6, r.choice([0x2000, 0x0001, 0x1FFF, 0x4000, r.randrange(65536)]))
            elif op == 11 and len(b) > l3 + 42:  # IPv6: first extension header's next header / length
                b[l3 + 40 + r.randrange(2)] = r.choice([0, 6, 17, 43, 44, 60, r.randrange(256)])
        if len(b) < 14:
            b += bytes(14 - len(b))
        return bytes(b)


# --------------------------------------------------------------------------
# events and CPUs


@dataclass(frozen=True)
class Event:
    type: int
    family: int
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    len: int
    rule: int | None  # None for a new flow: only blocklist events name a rule
    ifindex: int
    ts: int
    size: int  # bytes of the ring buffer record


_EVENT_CODES = {name: code for code, name in events.EVENT_TYPES.items()}


def decode_event(rec: bytes) -> Event:
    """A record as the product decodes it (raw values: rule indexes, jiffies),
    with the fields its JSON leaves out (family, ifindex) derived from it."""
    d = events.decode_event(rec, None, None)
    ifname = d["ifname"]
    return Event(
        type=_EVENT_CODES.get(d["type"]) or int(d["type"]),
        family=ipaddress.ip_address(d["src"]).version,
        proto=d["proto"],
        src=d["src"],
        dst=d["dst"],
        sport=d["sport"],
        dport=d["dport"],
        len=d["len"],
        rule=d.get("rule"),
        ifindex=int(ifname) if ifname.isdigit() else socket.if_nametoindex(ifname),
        ts=d["time"],
        size=len(rec),
    )


class Events:
    """The program's ``events`` ring buffer, drained on demand."""

    def __init__(self, prog: Any) -> None:
        fd = lib.bpf_map__fd(prog.obj.map_spec("events")._p)
        assert fd >= 0
        self._records: list[bytes] = []
        self._rb = RingBuffer(fd, lambda rec: self._records.append(rec))

    def drain_raw(self) -> list[bytes]:
        """Every record written since the last drain, as bytes."""
        while self._rb.poll(0) > 0:
            pass
        out, self._records = self._records, []
        return out

    def drain(self) -> list[Event]:
        return [decode_event(r) for r in self.drain_raw()]

    def close(self) -> None:
        self._rb.close()


@contextmanager
def on_cpu(cpu: int) -> Iterator[None]:
    """Run the block pinned to one CPU: per-CPU state (event budget, per-CPU
    flow values) is then that CPU's."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


# --------------------------------------------------------------------------
# a pool of loaded programs


def reset(prog: Any, config: bytes) -> None:
    """Bring a loaded program back to the state of a fresh load: zero
    counters, empty flow tables, an empty blocklist (tries, IPv4 and IPv6
    tables, config flags), ``config`` as it was after loading (with the
    controller's HZ), event and new-flow budgets 0, event ring drained."""
    # flush() rewrites every lookup-table word that is not
    # zero, which takes a while; skip it when no rule was ever touched
    if prog.blocklist.entries() or bytes(ffi.buffer(prog.map("config")[0])) != config:
        prog.blocklist.flush()
        prog.map("config")[0] = config
    prog.map("counters")[0] = ffi.new("struct xf_counters *")
    prog.map("event_budget")[0] = ffi.new("struct xf_ratelimit *")
    prog.map("admission")[0] = ffi.new("struct xf_admission *")
    for name in ("flows_v4", "flows_v6"):
        m = prog.map(name)
        if m.lookup_batch_raw(delete=True) is None:
            m.clear()
    prog.events.drain()
    assert prog.counters() == zero_counters()
    assert read_flows(prog) == {}
    assert prog.blocklist.entries() == {}
    assert bytes(ffi.buffer(prog.map("config")[0])) == config


class ProgPool:
    """Loaded programs by load-time options, reset before each reuse.

    Loading xdpflow takes about a second; resetting its maps takes
    milliseconds (a tenth of a second after blocklist changes).
    """

    def __init__(self) -> None:
        self._progs: dict[tuple[tuple[str, Any], ...], tuple[Any, bytes]] = {}

    def get(self, **opts: Any) -> Any:
        from .progtest import ProgHarness

        key = tuple(sorted(opts.items()))
        if key not in self._progs:
            prog = ProgHarness(**opts)
            prog.events = Events(prog)
            self._progs[key] = (prog, bytes(ffi.buffer(prog.map("config")[0])))
        prog, config = self._progs[key]
        reset(prog, config)
        return prog

    def close(self) -> None:
        for prog, _config in self._progs.values():
            prog.events.close()
            prog.close()
        self._progs.clear()


# One pool for the whole session. Test modules import the three fixtures
# below by their function names; pytest knows them by their fixture names
# (prog_pool, prog, make_prog). Each importing module gets its own copy of the
# session fixture, all handing out the same pool; the first teardown closes it.
_POOL = ProgPool()


@pytest.fixture(scope="session", name="prog_pool")
def prog_pool_fixture() -> Iterator[ProgPool]:
    try:
        yield _POOL
    finally:
        _POOL.close()


@pytest.fixture(name="prog")
def prog_fixture(prog_pool: ProgPool) -> Any:
    """Like conftest's ``prog`` (a ProgHarness with all-zero state), served
    from the pool; ``prog.events`` reads its event ring buffer."""
    return prog_pool.get()


@pytest.fixture(name="make_prog")
def make_prog_fixture(prog_pool: ProgPool) -> Any:
    """Like conftest's ``make_prog(**AttachOptions)``, from the pool."""
    return prog_pool.get


def kernel_hz(prog: Any, seconds: float = 0.4) -> int:
    """The kernel's HZ, measured long enough to be unambiguous: over 0.4 s
    a one-tick error is under 1% at HZ=250, where the known values are 17%
    apart."""
    from xdpflow.dataplane.clock import CLOCK_PROG, KNOWN_HZ, sample

    clock = prog.obj.program(CLOCK_PROG)
    try:
        j0, t0 = sample(clock)
        time.sleep(seconds)
        j1, t1 = sample(clock)
    finally:
        clock.close()
    rate = (j1 - j0) * 1e9 / (t1 - t0)
    best = min(KNOWN_HZ, key=lambda hz: abs(hz - rate))
    assert abs(best - rate) < 0.03 * best, f"jiffies advance at {rate:.1f}/s, no known HZ"
    return best
