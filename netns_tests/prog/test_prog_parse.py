"""How the program classifies frames: Ethernet/VLAN, IPv4/IPv6, L4 headers.

Every test compares the whole counters dict (every counter, packets and
bytes), so a frame counted twice or in the wrong class fails.
"""

from __future__ import annotations

import errno
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from xdpflow.dataplane.abi import bytes_key
from xdpflow.errors import XdpflowError

from .. import frames
from ..frames import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    Model,
    arp,
    check_invariants,
    classify,
    ether,
    expect,
    pad,
    read_flows,
    zero_counters,
)
from ..progtest import XDP_PASS

# loaded programs from a pool shared by the session, reset before each test (frames.py)
prog_pool_fixture = frames.prog_pool_fixture
prog_fixture = frames.prog_fixture

V4 = {"src": "198.18.0.1", "dst": "198.18.0.2"}
V6 = {"src": "2001:2::1", "dst": "2001:2::2"}
Q, AD = (ETH_P_8021Q, 100), (ETH_P_8021AD, 200)


def one(frame: bytes, cls: str, l4: str | None = None, act: str = "passed") -> dict[str, int]:
    return expect((len(frame), cls, act, l4))


def run_expect(prog, frame, cls: str, l4: str | None = None) -> None:
    """Run one frame on a fresh program: passed, counted exactly once."""
    frame = bytes(frame)
    assert prog.run(frame) == XDP_PASS
    assert prog.counters() == one(frame, cls, l4)


def no_flows(prog) -> None:
    assert read_flows(prog) == {}


# --------------------------------------------------------------------------
# valid frames, one per L3/L4 class


@pytest.mark.parametrize(
    ("pkt", "cls", "l4"),
    [
        (IP(**V4) / UDP(sport=1, dport=2), "ipv4", "udp"),
        (IP(**V4) / TCP(sport=1, dport=2), "ipv4", "tcp"),
        (IP(**V4) / ICMP(), "ipv4", "icmp"),
        (IP(**V4, proto=47) / Raw(b"\0\0\x08\0"), "ipv4", "other"),
        (IP(**V4, proto=132) / Raw(b"x" * 12), "ipv4", "other"),
        (IPv6(**V6) / UDP(sport=1, dport=2), "ipv6", "udp"),
        (IPv6(**V6) / TCP(sport=1, dport=2), "ipv6", "tcp"),
        (IPv6(**V6) / ICMPv6EchoRequest(), "ipv6", "icmp"),
        (IPv6(**V6, nh=59), "ipv6", "other"),
        (IPv6(**V6, nh=47) / Raw(b"\0\0\x86\xdd"), "ipv6", "other"),
    ],
    ids=[
        "v4-udp",
        "v4-tcp",
        "v4-icmp",
        "v4-gre",
        "v4-sctp",
        "v6-udp",
        "v6-tcp",
        "v6-icmp",
        "v6-nonxt",
        "v6-gre",
    ],
)
def test_each_class_counted_once_with_frame_bytes(prog, pkt, cls, l4):
    frame = bytes(ether() / pkt)
    run_expect(prog, frame, cls, l4)
    assert len(read_flows(prog)) == 1


def test_bytes_are_whole_frame_including_vlan_and_padding(prog):
    f1 = pad(bytes(ether(Q) / IP(**V4) / UDP(sport=1, dport=2)), 64)
    f2 = bytes(ether(AD, Q) / IPv6(**V6) / TCP(sport=1, dport=2) / Raw(b"z" * 100))
    assert prog.run(f1) == XDP_PASS
    assert prog.run(f2) == XDP_PASS
    assert prog.counters() == expect((64, "ipv4", "passed", "udp"), (len(f2), "ipv6", "passed", "tcp"))
    assert prog.counters()["bytes"] == 64 + 14 + 8 + 40 + 20 + 100


def test_counters_accumulate_over_many_frames(prog):
    frames = [bytes(ether() / IP(**V4) / UDP(sport=i, dport=2)) for i in range(1, 11)]
    frames += [arp()] * 3
    for f in frames:
        assert prog.run(f) == XDP_PASS
    assert prog.prog.test_run(frames[0], repeat=50).retval == XDP_PASS
    want = expect(*[(len(f), "ipv4", "passed", "udp") for f in frames[:10]], *[(42, "non_ip", "passed", None)] * 3)
    for k in ("packets", "ipv4", "udp", "passed"):
        want[k] += 50
        want[bytes_key(k)] += 50 * len(frames[0])
    assert prog.counters() == want


# --------------------------------------------------------------------------
# Ethernet and VLAN


@pytest.mark.parametrize(
    "frame",
    [
        arp(),
        bytes(Ether(src="02:00:00:00:00:01", dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\x02\x07\x04" + b"x" * 20)),
        bytes(ether(Q))[:12] + struct.pack("!HHH", ETH_P_8021Q, 5, 0x0806) + arp()[14:],
        bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=46) / Raw(b"\0" * 46)),  # 802.3 length
        bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x88CC)),  # header only
    ],
    ids=["arp", "lldp", "vlan-arp", "8023-length", "lldp-14-bytes"],
)
def test_non_ip_passes_as_non_ip(prog, frame):
    run_expect(prog, frame, "non_ip")
    no_flows(prog)


@pytest.mark.parametrize("length", [0, 1, 6, 13])
def test_shorter_than_ethernet_refused_by_kernel(prog, length):
    """BPF_PROG_TEST_RUN needs a whole Ethernet header for XDP: EINVAL, and
    the program never runs (nothing is counted)."""
    with pytest.raises(XdpflowError) as ei:
        prog.run(arp()[:length])
    assert ei.value.errno == errno.EINVAL
    assert prog.counters() == zero_counters()


@pytest.mark.parametrize("ethertype", [0x0800, 0x86DD])
def test_ethernet_header_only_is_parse_error(prog, ethertype):
    frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=ethertype))
    assert len(frame) == 14
    run_expect(prog, frame, "parse_errors")
    no_flows(prog)


@pytest.mark.parametrize(
    "tags",
    [[Q], [AD], [AD, Q], [Q, Q], [AD, AD]],
    ids=["8100", "88a8", "88a8-8100", "8100-8100", "88a8-88a8"],
)
def test_one_or_two_vlan_tags_parse(prog, tags):
    frame = bytes(ether(*tags) / IP(**V4) / UDP(sport=7, dport=8))
    run_expect(prog, frame, "ipv4", "udp")
    f = prog.flow("198.18.0.1", "198.18.0.2", 7, 8, 17)
    assert (f.packets, f.bytes) == (1, 28)


@pytest.mark.parametrize(
    "tags",
    [[Q, Q, Q], [AD, Q, Q], [AD, AD, AD], [Q, Q, Q, Q]],
    ids=["3x8100", "88a8-8100-8100", "3x88a8", "4x8100"],
)
def test_more_than_two_vlan_tags_is_parse_error(prog, tags):
    frame = bytes(ether(*tags) / IP(**V4) / UDP(sport=7, dport=8))
    run_expect(prog, frame, "parse_errors")
    no_flows(prog)


@pytest.mark.parametrize("cut", [14, 15, 16, 17, 18, 19, 20, 21])
def test_truncated_vlan_tag_is_parse_error(prog, cut):
    frame = bytes(ether(AD, Q) / IP(**V4) / UDP(sport=7, dport=8))[:cut]
    run_expect(prog, frame, "parse_errors")


# --------------------------------------------------------------------------
# malformed IPv4


def _v4(**kw) -> bytes:
    return bytes(ether() / IP(**V4, **kw) / UDP(sport=1, dport=2))


@pytest.mark.parametrize("ihl", [0, 1, 2, 3, 4])
def test_ipv4_ihl_below_5_is_parse_error(prog, ihl):
    run_expect(prog, _v4(ihl=ihl), "parse_errors")
    no_flows(prog)


@pytest.mark.parametrize("version", [0, 1, 5, 6, 15])
def test_ipv4_wrong_version_is_parse_error(prog, version):
    run_expect(prog, _v4(version=version), "parse_errors")


@pytest.mark.parametrize(("ihl", "tot_len"), [(5, 0), (5, 19), (6, 20), (6, 23), (15, 59)])
def test_ipv4_total_length_below_header_is_parse_error(prog, ihl, tot_len):
    frame = bytes(ether() / IP(**V4, options=[IPOption_NOP()] * (4 * (ihl - 5)), len=tot_len) / Raw(b"x" * 40))
    assert frame[14] & 0xF == ihl
    run_expect(prog, frame, "parse_errors")


def test_ipv4_total_length_beyond_frame_is_parse_error(prog):
    good = _v4()
    run_expect(prog, _v4(len=len(good) - 14 + 1), "parse_errors")
    no_flows(prog)


def test_ipv4_total_length_exactly_the_frame_parses(prog):
    frame = _v4(len=28)
    run_expect(prog, frame, "ipv4", "udp")
    assert prog.flow("198.18.0.1", "198.18.0.2", 1, 2, 17).bytes == 28


def test_ipv4_header_shorter_than_20_bytes_is_parse_error(prog):
    frame = _v4()[: 14 + 19]
    run_expect(prog, frame, "parse_errors")


# --------------------------------------------------------------------------
# malformed IPv6


@pytest.mark.parametrize("version", [0, 4, 7, 15])
def test_ipv6_wrong_version_is_parse_error(prog, version):
    frame = bytearray(bytes(ether() / IPv6(**V6) / UDP(sport=1, dport=2)))
    frame[14] = (version << 4) | (frame[14] & 0xF)
    run_expect(prog, bytes(frame), "parse_errors")


def test_ipv6_payload_length_beyond_frame_is_parse_error(prog):
    frame = bytes(ether() / IPv6(**V6, plen=9) / UDP(sport=1, dport=2))
    run_expect(prog, frame, "parse_errors")
    no_flows(prog)


def test_ipv6_header_shorter_than_40_bytes_is_parse_error(prog):
    frame = bytes(ether() / IPv6(**V6) / UDP(sport=1, dport=2))[: 14 + 39]
    run_expect(prog, frame, "parse_errors")


def _ext_chain(n: int):
    pkt = IPv6(**V6)
    for _ in range(n):
        pkt = pkt / IPv6ExtHdrDestOpt()
    return ether() / pkt / UDP(sport=31, dport=32)


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_ipv6_up_to_six_extension_headers_parse(prog, n):
    run_expect(prog, _ext_chain(n), "ipv6", "udp")
    f = prog.flow("2001:2::1", "2001:2::2", 31, 32, 17)
    assert (f.packets, f.bytes) == (1, 40 + 8 * n + 8)


@pytest.mark.parametrize("n", [7, 8, 12])
def test_ipv6_more_than_six_extension_headers_is_parse_error(prog, n):
    run_expect(prog, _ext_chain(n), "parse_errors")
    no_flows(prog)


@pytest.mark.parametrize(
    "ext",
    [
        IPv6ExtHdrHopByHop(),
        IPv6ExtHdrRouting(),
        IPv6ExtHdrDestOpt(),
        IPv6ExtHdrFragment(offset=0, m=1),
    ],
    ids=["hbh", "routing", "dstopt", "fragment"],
)
def test_ipv6_truncated_extension_header_is_parse_error(prog, ext):
    """The payload ends inside the extension header (payload_len is honest)."""
    whole = bytes(ether() / IPv6(**V6) / ext / UDP(sport=1, dport=2))
    need = 8 if isinstance(ext, IPv6ExtHdrFragment) else 2
    for keep in range(need):
        frame = bytearray(whole[: 14 + 40 + keep])
        struct.pack_into("!H", frame, 18, keep)
        c0 = prog.counters()
        assert prog.run(bytes(frame)) == XDP_PASS
        c1 = prog.counters()
        assert {k: c1[k] - c0[k] for k in c1} == one(frame, "parse_errors"), keep
    no_flows(prog)


@pytest.mark.parametrize("nh", [17, 59], ids=["then-udp", "then-no-next-header"])
def test_ipv6_extension_header_length_past_the_end_is_parse_error(prog, nh):
    """A hop-by-hop header claiming 8 * (1 + 20) bytes in a short packet;
    with no L4 header to check after it, only the extension header's own
    length gives it away."""
    frame = bytes(ether() / IPv6(**V6) / IPv6ExtHdrHopByHop(len=20, nh=nh) / UDP(sport=1, dport=2))
    run_expect(prog, frame, "parse_errors")
    no_flows(prog)


# --------------------------------------------------------------------------
# truncated L4 headers: parse errors, passed, no flow


def _v4_raw(proto: int, l4: bytes) -> bytes:
    return bytes(ether() / IP(**V4, proto=proto) / Raw(l4))


def _v6_raw(nh: int, l4: bytes) -> bytes:
    return bytes(ether() / IPv6(**V6, nh=nh) / Raw(l4))


TCP_HDR = bytes(TCP(sport=1, dport=2, flags="S"))
UDP_HDR = bytes(UDP(sport=1, dport=2))


def _doff(doff: int, extra: bytes = b"") -> bytes:
    b = bytearray(TCP_HDR + extra)
    b[12] = (doff << 4) | (b[12] & 0xF)
    return bytes(b)


@pytest.mark.parametrize(
    "frame",
    [
        _v4_raw(6, b""),
        _v4_raw(6, TCP_HDR[:19]),
        _v4_raw(6, _doff(0)),
        _v4_raw(6, _doff(4)),
        _v4_raw(6, _doff(6)),
        _v4_raw(6, _doff(15, b"o" * 39)),
        _v4_raw(17, b""),
        _v4_raw(17, UDP_HDR[:7]),
        _v4_raw(1, b""),
        _v4_raw(1, b"\x08"),
        _v4_raw(58, b"\x80"),
        _v6_raw(6, TCP_HDR[:19]),
        _v6_raw(6, _doff(3)),
        _v6_raw(6, _doff(7, b"o" * 7)),
        _v6_raw(17, UDP_HDR[:7]),
        _v6_raw(58, b""),
        _v6_raw(58, b"\x80"),
        _v6_raw(1, b"\x08"),
        bytes(ether() / IPv6(**V6) / IPv6ExtHdrFragment(offset=0, m=1, nh=17) / Raw(UDP_HDR[:4])),
        bytes(ether() / IP(**V4, proto=17, flags="MF") / Raw(UDP_HDR[:4])),
    ],
    ids=[
        "v4-tcp-0",
        "v4-tcp-19",
        "v4-tcp-doff0",
        "v4-tcp-doff4",
        "v4-tcp-doff6-20bytes",
        "v4-tcp-doff15-59bytes",
        "v4-udp-0",
        "v4-udp-7",
        "v4-icmp-0",
        "v4-icmp-1",
        "v4-icmpv6-1",
        "v6-tcp-19",
        "v6-tcp-doff3",
        "v6-tcp-doff7-27bytes",
        "v6-udp-7",
        "v6-icmpv6-0",
        "v6-icmpv6-1",
        "v6-icmp-1",
        "v6-first-fragment-udp-4",
        "v4-first-fragment-udp-4",
    ],
)
def test_truncated_l4_header_is_parse_error(prog, frame):
    run_expect(prog, frame, "parse_errors")
    no_flows(prog)


@pytest.mark.parametrize(
    ("frame", "l4"),
    [
        (_v4_raw(6, _doff(6, b"\x01" * 4)), "tcp"),
        (_v4_raw(6, _doff(15, b"\x01" * 40)), "tcp"),
        (_v4_raw(17, UDP_HDR), "udp"),
        (_v4_raw(1, b"\x08\x00"), "icmp"),
        (_v6_raw(58, b"\x80\x00"), "icmp"),
        (_v6_raw(6, _doff(5)), "tcp"),
    ],
    ids=["tcp-doff6", "tcp-doff15", "udp-8", "icmp-2", "icmpv6-2", "v6-tcp-20"],
)
def test_l4_header_exactly_complete_parses(prog, frame, l4):
    p = classify(frame)
    run_expect(prog, frame, p.cls, l4)
    assert read_flows(prog) == {p.key: [1, p.iplen, p.tcp_flags]}


# Ethernet pads frames to 60 bytes; the padding is not part of the IP packet,
# so an L4 header that ends past the IP packet is truncated even when the
# frame goes on.
PADDED_TRUNCATED = [
    pad(bytes(ether() / IP(**V4, proto=17) / Raw(UDP_HDR[:4]))),
    pad(bytes(ether() / IP(**V4, proto=1))),
    pad(bytes(ether() / IP(**V4, proto=6) / Raw(TCP_HDR[:12] + b"\x50"))),
    pad(bytes(ether() / IPv6(**V6, nh=58))),
    pad(bytes(ether() / IPv6(**V6, nh=17) / Raw(UDP_HDR[:4])), 70),
    # payload_len 0, and a trailer that reads as hop-by-hop + UDP
    bytes(ether() / IPv6(**V6, nh=0, plen=0)) + bytes(IPv6ExtHdrHopByHop(nh=17)) + UDP_HDR,
    # a 16-byte destination options header in an 8-byte payload, 8 bytes of trailer
    bytes(ether() / IPv6(**V6, nh=60, plen=8)) + bytes([59, 1]) + bytes(14),
]


@pytest.mark.parametrize(
    "frame",
    PADDED_TRUNCATED,
    ids=["v4-udp-4", "v4-icmp-0", "v4-tcp-13", "v6-icmpv6-0", "v6-udp-4", "v6-hbh-trailer", "v6-dstopt-long"],
)
def test_l4_header_must_lie_within_ip_packet(prog, frame):
    # the header is complete in the frame, truncated in the IP packet
    in_ip, in_frame = classify(frame, "ip"), classify(frame, "frame")
    assert in_ip.l4_error or in_ip.cls == "parse_errors"
    assert not in_frame.l4_error and in_frame.cls != "parse_errors"
    run_expect(prog, frame, "parse_errors")
    no_flows(prog)


def test_ipv4_padding_after_complete_l4_header_is_ignored(prog):
    frame = pad(bytes(ether() / IP(**V4) / UDP(sport=1, dport=2)))
    assert len(frame) == 60
    run_expect(prog, frame, "ipv4", "udp")
    assert prog.flow("198.18.0.1", "198.18.0.2", 1, 2, 17).bytes == 28


# --------------------------------------------------------------------------
# truncation sweep: every cut of a few valid frames


def _sweep_frames() -> dict[str, bytes]:
    """Valid frames, all ending with their IP packet except the padded one."""
    return {
        "v4-udp": bytes(ether() / IP(**V4) / UDP(sport=1000, dport=53) / Raw(b"q" * 12)),
        "v4opt-tcp": bytes(
            ether()
            / IP(src="198.19.0.1", dst="203.0.113.5", options=[IPOption_NOP()] * 16)
            / TCP(sport=40000, dport=80, flags="S", options=[("MSS", 1460), ("NOP", None), ("NOP", None)])
        ),
        "vlan-v6-tcp": bytes(ether(Q) / IPv6(**V6) / TCP(sport=5, dport=6, flags="A") / Raw(b"d" * 5)),
        "qinq-v6ext-udp": bytes(
            ether(AD, Q)
            / IPv6(**V6)
            / IPv6ExtHdrHopByHop()
            / IPv6ExtHdrRouting()
            / IPv6ExtHdrDestOpt()
            / UDP(sport=9, dport=10)
        ),
        "v6-frag-first": bytes(
            ether() / IPv6(**V6) / IPv6ExtHdrFragment(offset=0, m=1, id=3) / UDP(sport=11, dport=12) / Raw(b"f" * 8)
        ),
        "v6-frag-later": bytes(ether() / IPv6(**V6) / IPv6ExtHdrFragment(offset=2, id=3, nh=17) / Raw(b"f" * 16)),
        "v6-icmp": bytes(ether() / IPv6(**V6) / ICMPv6DestUnreach(code=4) / Raw(b"u" * 8)),
        "v4-udp-padded": pad(bytes(ether() / IP(**V4) / UDP(sport=13, dport=14))),
    }


@pytest.mark.parametrize("name", list(_sweep_frames()))
def test_truncation_sweep(prog, name):
    frame = _sweep_frames()[name]
    whole = classify(frame)
    assert whole.cls in ("ipv4", "ipv6") and not whole.l4_error
    ip_end = 14 + 28 if name == "v4-udp-padded" else len(frame)
    model = Model()
    for cut in range(14, len(frame)):
        f = frame[:cut]
        assert prog.run(f) == model.feed(f) == XDP_PASS, cut
    c = prog.counters()
    check_invariants(c)
    assert c == model.counters
    # every cut inside the IP packet is a parse error; only cuts into the
    # Ethernet padding leave the packet whole
    n_cuts = len(frame) - 14
    whole_cuts = len(frame) - ip_end
    assert c["parse_errors"] == n_cuts - whole_cuts
    assert c[whole.cls] == whole_cuts
    assert c["passed"] == c["packets"] == n_cuts
    expected_flows = {whole.key: [whole_cuts, whole_cuts * whole.iplen, whole.tcp_flags]} if whole_cuts else {}
    assert read_flows(prog) == expected_flows == model.flows
