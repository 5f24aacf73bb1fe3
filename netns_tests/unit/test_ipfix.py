"""IPFIX export: the encoding against RFC 7011 read independently, then a real collector.

The unit tests decode every message with a small strict parser written here
from RFC 7011 section 3 (not with the module's own code), so a mistake in the
encoder cannot cancel out. The collector tests run Debian's ``nfcapd`` (nfdump
1.7) on loopback and check what ``nfdump`` reads back, field by field; they
skip when nfdump is not installed (``apt-get install nfdump``).
"""

from __future__ import annotations

import random
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from xdpflow.errors import XdpflowError
from xdpflow.export.ipfix import (
    MIN_MESSAGE,
    RECORD_LEN,
    TEMPLATE_ID_RELIABILITY,
    TEMPLATE_ID_V4,
    TEMPLATE_ID_V6,
    FlowRecord,
    IpfixExporter,
    ReliabilityRecord,
    build_message,
    encode_message,
    encode_messages,
    encode_record,
    message_size,
    split_records,
    template_set,
)

from ..nfcapd import NFCAPD, NFDUMP, Nfcapd, free_udp_port

# the templates the brief asks for, as (IE, length); plus icmpTypeCode (see xdpflow/ipfix.py)
COMMON = [(7, 2), (11, 2), (4, 1), (6, 2), (2, 8), (1, 8), (152, 8), (153, 8), (10, 4), (136, 1)]
WANT_V4 = [(8, 4), (12, 4), *COMMON, (32, 2)]
WANT_V6 = [(27, 16), (28, 16), *COMMON, (139, 2)]
# RFC 7011 4.2, Metering Process Reliability Statistics: scope observationDomainId, meteringProcessId;
# ignoredPacketTotalCount, ignoredOctetTotalCount, observationTimeMilliseconds of the first and last
WANT_RELIABILITY = [(149, 4), (143, 4), (164, 8), (165, 8), (323, 8), (323, 8)]
ADDRESS_IES = {8, 12, 27, 28}

T0 = 1_700_000_000_123  # a fixed flow start, Unix ms
SO_RCVBUFFORCE = 33  # Linux; root may exceed rmem_max, so bursts of datagrams are not dropped


# --- an independent RFC 7011 reader ---------------------------------------------------------------


@dataclass
class Message:
    length: int
    export_time: int
    sequence: int
    domain: int
    sets: list[tuple[int, int]] = field(default_factory=list)  # (set id, set length incl. padding)
    templates: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    records: list[FlowRecord] = field(default_factory=list)
    padding: list[int] = field(default_factory=list)  # per data set
    options: dict[int, tuple[int, list[tuple[int, int]]]] = field(default_factory=dict)  # tid: (scope count, specs)
    stats: list[tuple[int, ...]] = field(default_factory=list)  # options data records, values in wire order


def decode(msg: bytes, known: dict[int, list[tuple[int, int]]]) -> Message:
    """Parse one message strictly; templates it carries are added to ``known``."""
    assert len(msg) >= 16
    version, length, export_time, sequence, domain = struct.unpack_from("!HHIII", msg)
    assert version == 10
    assert length == len(msg)
    out = Message(length, export_time, sequence, domain)
    off = 16
    while off < length:
        assert length - off >= 4, "trailing bytes after the last set"
        set_id, set_len = struct.unpack_from("!HH", msg, off)
        assert set_len >= 4 and off + set_len <= length, "set overruns the message"
        body = msg[off + 4 : off + set_len]
        out.sets.append((set_id, set_len))
        if set_id == 2:
            p = 0
            while len(body) - p >= 4:
                tid, count = struct.unpack_from("!HH", body, p)
                p += 4
                assert tid >= 256
                specs = [struct.unpack_from("!HH", body, p + 4 * i) for i in range(count)]
                p += 4 * count
                assert all(ie & 0x8000 == 0 for ie, _ in specs), "no enterprise elements expected"
                known[tid] = specs
                out.templates[tid] = specs
            assert p == len(body)
        elif set_id == 3:
            # RFC 7011 3.4.2.2: template ID, field count, scope field count, specifiers; zero padding
            p = 0
            while len(body) - p >= 6:
                tid, count, scope = struct.unpack_from("!HHH", body, p)
                p += 6
                assert tid >= 256 and 1 <= scope <= count
                specs = [struct.unpack_from("!HH", body, p + 4 * i) for i in range(count)]
                p += 4 * count
                assert all(ie & 0x8000 == 0 for ie, _ in specs), "no enterprise elements expected"
                known[tid] = specs
                out.options[tid] = (scope, specs)
            assert body[p:] == bytes(len(body) - p) and len(body) - p < 4, "options template set padding"
        elif set_id >= 256:
            specs = known[set_id]
            rlen = sum(n for _, n in specs)
            count, pad = divmod(len(body), rlen)
            assert count >= 1
            assert body[count * rlen :] == bytes(pad), "padding must be zeros"
            out.padding.append(pad)
            for i in range(count):
                data = body[i * rlen : (i + 1) * rlen]
                if any(ie == 164 for ie, _ in specs):  # ignoredPacketTotalCount: the options template
                    out.stats.append(_values(specs, data))
                else:
                    out.records.append(_record(specs, data))
        else:
            pytest.fail(f"unexpected set id {set_id}")
        off += set_len
    assert off == length
    return out


def _values(specs: list[tuple[int, int]], data: bytes) -> tuple[int, ...]:
    out, p = [], 0
    for _ie, n in specs:
        out.append(int.from_bytes(data[p : p + n], "big"))
        p += n
    return tuple(out)


def _record(specs: list[tuple[int, int]], data: bytes) -> FlowRecord:
    addrs: dict[int, bytes] = {}
    v: dict[int, int] = {}
    p = 0
    for ie, n in specs:
        if ie in ADDRESS_IES:
            addrs[ie] = data[p : p + n]
        else:
            v[ie] = int.from_bytes(data[p : p + n], "big")
        p += n
    is6 = 27 in addrs
    sport, dport, icmp = v[7], v[11], v[139 if is6 else 32]
    if v[4] in (1, 58):
        assert sport == dport == 0, "ICMP goes in icmpTypeCode, ports stay 0"
        sport, dport = icmp >> 8, icmp & 0xFF
    else:
        assert icmp == 0
    return FlowRecord(
        family=6 if is6 else 4,
        src=addrs[27 if is6 else 8],
        dst=addrs[28 if is6 else 12],
        sport=sport,
        dport=dport,
        proto=v[4],
        packets=v[2],
        octets=v[1],
        start_ms=v[152],
        end_ms=v[153],
        tcp_flags=v[6],
        ingress_ifindex=v[10],
        end_reason=v[136],
    )


def decode_all(msgs: list[bytes]) -> list[Message]:
    known: dict[int, list[tuple[int, int]]] = {}
    return [decode(m, known) for m in msgs]


# --- records ---------------------------------------------------------------------------------------


def v4(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, a)


def v6(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, a)


def rec(family: int = 4, i: int = 1, **kw: int) -> FlowRecord:
    base: dict = dict(
        family=family,
        src=v4(f"10.0.{i >> 8 & 255}.{i & 255}") if family == 4 else v6(f"2001:db8::{i >> 16:x}:{i & 0xFFFF:x}"),
        dst=v4("192.0.2.1") if family == 4 else v6("2001:db8:ffff::1"),
        sport=1024 + i % 60000,
        dport=443,
        proto=6,
        packets=1 + i,
        octets=60 * (1 + i),
        start_ms=T0 + i,
        end_ms=T0 + 1000 + i,
        tcp_flags=0x12,
        ingress_ifindex=3,
        end_reason=1,
    )
    base.update(kw)
    return FlowRecord(**base)


def mixed(n: int, seed: int = 7, counter_bits: int = 64) -> list[FlowRecord]:
    """n records of both families and several protocols, in a random but fixed order."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        fam = rng.choice((4, 6))
        proto = rng.choice((6, 17, 1 if fam == 4 else 58))
        icmp = proto in (1, 58)
        out.append(
            rec(
                fam,
                i,
                proto=proto,
                sport=rng.randrange(256) if icmp else rng.randrange(65536),
                dport=rng.randrange(256) if icmp else rng.randrange(65536),
                packets=rng.randrange(2**counter_bits),
                octets=rng.randrange(2**counter_bits),
                tcp_flags=rng.randrange(0x200) if proto == 6 else 0,
                ingress_ifindex=rng.randrange(2**32),
                end_reason=rng.randrange(1, 6),
            )
        )
    return out


# --- encoding --------------------------------------------------------------------------------------


def test_template_set_announces_both_templates() -> None:
    known: dict[int, list[tuple[int, int]]] = {}
    m = decode(build_message([], sequence=0, export_time=0, observation_domain=1, templates=True), known)
    # and the options template, 6 + 4 x 6 bytes padded to 32
    assert m.sets == [(2, 4 + 2 * 4 + 4 * (len(WANT_V4) + len(WANT_V6))), (3, 4 + 32)]
    assert m.templates == {TEMPLATE_ID_V4: WANT_V4, TEMPLATE_ID_V6: WANT_V6}
    assert m.options == {TEMPLATE_ID_RELIABILITY: (2, WANT_RELIABILITY)}
    assert TEMPLATE_ID_V4 >= 256 and TEMPLATE_ID_V6 >= 256
    assert len(template_set()) % 4 == 0
    assert RECORD_LEN == {
        TEMPLATE_ID_V4: sum(n for _, n in WANT_V4),
        TEMPLATE_ID_V6: sum(n for _, n in WANT_V6),
        TEMPLATE_ID_RELIABILITY: sum(n for _, n in WANT_RELIABILITY),
    }


def test_header_fields() -> None:
    msg = encode_message([rec()], sequence=12345, export_time=1_700_000_000, observation_domain=0xDEADBEEF)
    version, length, export_time, sequence, domain = struct.unpack_from("!HHIII", msg)
    assert (version, length, export_time, sequence, domain) == (10, len(msg), 1_700_000_000, 12345, 0xDEADBEEF)
    # sequence numbers are modulo 2^32
    msg = encode_message([rec()], sequence=2**32 + 5, export_time=0)
    assert struct.unpack_from("!I", msg, 8) == (5,)


def test_fields_round_trip() -> None:
    records = [
        rec(4, 1, tcp_flags=0x1B, end_reason=3),
        rec(4, 2, proto=17, sport=5353, dport=53, tcp_flags=0, packets=2**40 + 1, octets=2**63 + 7),
        rec(6, 3, proto=6, tcp_flags=0x1FF, ingress_ifindex=2**32 - 1, end_reason=5),
        rec(4, 4, proto=1, sport=8, dport=0),  # echo request
        rec(6, 5, proto=58, sport=1, dport=4),  # port unreachable
        rec(4, 6, proto=132, sport=9899, dport=9899, packets=0, octets=0, start_ms=0, end_ms=2**64 - 1),
    ]
    m = decode_all([encode_message(records, sequence=0, export_time=0, templates=True)])[0]
    # one data set per family, IPv4 first; order within a family is kept
    assert [s for s, _ in m.sets] == [2, 3, TEMPLATE_ID_V4, TEMPLATE_ID_V6]
    assert m.records == [r for r in records if r.family == 4] + [r for r in records if r.family == 6]


def test_icmp_type_code_goes_in_icmp_type_code() -> None:
    for family, proto, ie in ((4, 1, 32), (6, 58, 139)):
        data = encode_record(rec(family, proto=proto, sport=3, dport=13)).data
        # the last field of both templates is icmpTypeCode; the ports are 0
        assert data[-2:] == bytes([3, 13])
        off = 8 if family == 4 else 32
        assert data[off : off + 4] == bytes(4)
        assert (WANT_V4 if family == 4 else WANT_V6)[-1] == (ie, 2)
    assert encode_record(rec(4, proto=6, sport=3, dport=13)).data[-2:] == bytes(2)


@pytest.mark.parametrize(
    "bad, why",
    [
        (dict(family=5), "family"),
        (dict(src=b"\x01\x02\x03"), "4 bytes"),
        (dict(family=6, src=v4("10.0.0.1"), dst=v4("10.0.0.2")), "16 bytes"),
        (dict(packets=-1), ""),
        (dict(octets=2**64), ""),
        (dict(sport=65536), ""),
        (dict(tcp_flags=0x10000), ""),
        (dict(ingress_ifindex=2**32), ""),
        (dict(end_reason=256), ""),
        (dict(proto=1, sport=256, dport=0), "ICMP"),
        (dict(proto=58, sport=1, dport=-1), "ICMP"),
    ],
)
def test_bad_record_raises(bad: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why or None):
        encode_record(rec(**bad))


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_data_sets_padded_to_four_bytes(family: int, count: int) -> None:
    msg = encode_message([rec(family, i) for i in range(count)], sequence=0, export_time=0, templates=True)
    m = decode_all([msg])[0]
    rlen = RECORD_LEN[TEMPLATE_ID_V4 if family == 4 else TEMPLATE_ID_V6]
    want_pad = (-(4 + count * rlen)) % 4
    assert m.padding == [want_pad]
    assert want_pad < rlen  # RFC 7011 3.3.1: padding shorter than any record
    assert m.sets[2:] == [(TEMPLATE_ID_V4 if family == 4 else TEMPLATE_ID_V6, 4 + count * rlen + want_pad)]
    assert all(n % 4 == 0 for _, n in m.sets)
    assert len(m.records) == count
    assert m.length == 16 + sum(n for _, n in m.sets)


def test_message_too_long_for_length_field() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_message([rec(6, i) for i in range(1000)], sequence=0, export_time=0)


@pytest.mark.parametrize("max_size", [MIN_MESSAGE, 548, 1232, 1472, 8972, 65535, 10**6])
def test_split_thousands_of_records(max_size: int) -> None:
    records = mixed(5000)
    start = 2**32 - 1000  # the sequence number wraps in the middle
    msgs = encode_messages(records, max_size=max_size, sequence=start, export_time=99, templates=True)
    decoded = decode_all(msgs)
    seen = 0
    for i, (raw, m) in enumerate(zip(msgs, decoded)):
        assert len(raw) <= min(max_size, 65535)
        assert m.sequence == (start + seen) % 2**32
        assert m.export_time == 99
        assert bool(m.templates) == (i == 0)
        seen += len(m.records)
    assert seen == len(records)
    # nothing lost, nothing reordered within a family
    got = [r for m in decoded for r in m.records]
    assert len(got) == len(records) and set(got) == set(records)
    for fam in (4, 6):
        assert [r for r in got if r.family == fam] == [r for r in records if r.family == fam]
    # greedy: every message but the last is too full to take the next record
    chunks = split_records([encode_record(r) for r in records], max_size=max_size, templates=True)
    assert [len(c) for c in chunks] == [len(m.records) for m in decoded]
    pos = 0
    for i, chunk in enumerate(chunks[:-1]):
        pos += len(chunk)
        counts = Counter(r.template_id for r in chunk)
        counts[TEMPLATE_ID_V4 if records[pos].family == 4 else TEMPLATE_ID_V6] += 1
        assert message_size(counts, templates=i == 0) > min(max_size, 65535)


def test_split_edge_cases() -> None:
    assert split_records([], max_size=1472, templates=False) == []
    assert split_records([], max_size=1472, templates=True) == [[]]
    one = [encode_record(rec(6))]
    # the templates and the record do not fit together: templates go alone first
    assert split_records(one, max_size=MIN_MESSAGE, templates=True) == [[], one]
    with pytest.raises(ValueError, match="cannot hold"):
        split_records(one, max_size=MIN_MESSAGE - 1)


# --- the exporter over loopback --------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.5) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Receiver:
    """A UDP socket standing in for a collector; ``take()`` returns what arrived since last time."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind((host, port))
        self.addr = (host, self.sock.getsockname()[1])
        self.known: dict[int, list[tuple[int, int]]] = {}

    def take_raw(self) -> list[bytes]:
        out = []
        self.sock.settimeout(0.05)
        while True:
            try:
                out.append(self.sock.recv(70000))
            except TimeoutError:
                return out

    def take(self) -> list[Message]:
        return [decode(m, self.known) for m in self.take_raw()]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def test_templates_first_then_on_refresh(receiver: Receiver) -> None:
    clock = FakeClock()
    with IpfixExporter([receiver.addr], template_refresh=60.0, clock=clock) as exp:
        assert exp.export([rec(4, 1), rec(6, 2)]) == 1
        (m,) = receiver.take()
        assert [s for s, _ in m.sets] == [2, 3, TEMPLATE_ID_V4, TEMPLATE_ID_V6]
        assert m.export_time == 1_700_000_000

        clock.t += 59.9
        exp.export([rec(4, 3)])
        (m,) = receiver.take()
        assert not m.templates and m.sequence == 2

        # nothing to send and nothing due: nothing goes out
        assert exp.export([]) == 0
        assert receiver.take_raw() == []

        clock.t += 0.1  # 60 s after the templates: due, in the first message only
        exp.export(mixed(200))
        ms = receiver.take()
        assert len(ms) > 1
        assert [bool(m.templates) for m in ms] == [True] + [False] * (len(ms) - 1)
        assert ms[0].sequence == 3

        # an idle tick still refreshes: a templates-only message
        clock.t += 60
        assert exp.export([]) == 1
        (m,) = receiver.take()
        assert [s for s, _ in m.sets] == [2, 3] and not m.records and m.sequence == 203
        assert exp.export([]) == 0

        # a clock that steps back refreshes too
        clock.t -= 3600
        exp.export([rec()])
        assert receiver.take()[0].templates


def test_template_refresh_zero_sends_them_with_every_export(receiver: Receiver) -> None:
    with IpfixExporter([receiver.addr], template_refresh=0, clock=FakeClock()) as exp:
        for _ in range(3):
            exp.export([rec()])
            (m,) = receiver.take()
            assert m.templates


def test_sequence_and_counters_per_collector() -> None:
    a, b = Receiver("127.0.0.1"), Receiver("::1")
    try:
        with IpfixExporter([a.addr, b.addr], observation_domain=42, mtu=576) as exp:
            seq = {id(a): 0, id(b): 0}
            total = 0
            for n in (1, 0, 17, 300, 2):
                batch = mixed(n, seed=n)
                sent = exp.export(batch)
                for r in (a, b):
                    ms = r.take()
                    sent -= len(ms)
                    for m in ms:
                        assert m.domain == 42
                        assert m.sequence == seq[id(r)]
                        seq[id(r)] += len(m.records)
                    got = [x for m in ms for x in m.records]
                    assert sorted(got, key=lambda x: x.start_ms) == sorted(batch, key=lambda x: x.start_ms)
                assert sent == 0
                total += n
            assert seq[id(a)] == seq[id(b)] == total
            assert exp.sent_records == 2 * total
            assert exp.errors == 0 and exp.last_error is None
            assert exp.collectors == [f"127.0.0.1:{a.addr[1]}", f"[::1]:{b.addr[1]}"]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("host, overhead", [("127.0.0.1", 28), ("::1", 48)])
def test_datagrams_fit_the_mtu(host: str, overhead: int) -> None:
    r = Receiver(host)
    try:
        for mtu in (MIN_MESSAGE + overhead, 576, 1280, 1500, 9000):
            with IpfixExporter([r.addr], mtu=mtu) as exp:
                n = exp.export(mixed(1000))
                raws = r.take_raw()
                assert len(raws) == n == exp.sent_messages
                assert all(len(x) <= mtu - overhead for x in raws)
                assert max(len(x) for x in raws) > mtu - overhead - 78  # and they are not tiny
                assert sum(len(m.records) for m in decode_all(raws)) == 1000
    finally:
        r.close()


def test_hostname_collector() -> None:
    addr = socket.getaddrinfo("localhost", 0, type=socket.SOCK_DGRAM)[0][4]
    r = Receiver(str(addr[0]))
    try:
        with IpfixExporter([("localhost", r.addr[1])]) as exp:
            assert exp.export([rec()]) == 1
        assert len(r.take()) == 1
    finally:
        r.close()


def test_unresolvable_collector_raises_oserror(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_a: object, **_k: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(XdpflowError, match="collector nowhere.invalid:4739: cannot resolve"):
        IpfixExporter([("nowhere.invalid", 4739)])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mtu=MIN_MESSAGE + 27), "too small"),
        (dict(observation_domain=-1), "observation domain"),
        (dict(observation_domain=2**32), "observation domain"),
        (dict(template_refresh=-1), "negative"),
    ],
)
def test_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IpfixExporter([("127.0.0.1", 4739)], **kw)


@pytest.mark.parametrize("port", [0, 65536])
def test_bad_collector_port(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        IpfixExporter([("127.0.0.1", port)])


def test_bad_record_sends_nothing(receiver: Receiver) -> None:
    with IpfixExporter([receiver.addr]) as exp:
        with pytest.raises(ValueError):
            exp.export([rec(4, 1), rec(4, 2, packets=-5), rec(4, 3)])
        assert receiver.take_raw() == []
        assert exp.sent_messages == exp.sent_records == 0
        # the templates were not sent either: the next message carries them
        exp.export([rec()])
        assert receiver.take()[0].templates


def test_send_errors_are_counted_not_raised() -> None:
    port = free_udp_port("127.0.0.1")
    exp = IpfixExporter([("127.0.0.1", port)], clock=FakeClock())
    try:
        sent = 0
        for _ in range(6):
            sent += exp.export([rec()])  # ICMP port unreachable -> ECONNREFUSED on a later send
            time.sleep(0.01)
        assert exp.errors >= 2
        assert isinstance(exp.last_error, ConnectionRefusedError)
        assert exp.sent_messages == sent == 6 - exp.errors
        assert exp.sent_records == sent

        # the collector comes up: the next message re-announces the templates at once
        r = Receiver("127.0.0.1", port)
        try:
            before = exp.errors
            # at most one more refusal may still be pending from before the bind
            msgs: list[Message] = []
            for _ in range(2):
                exp.export([rec()])
                msgs += r.take()
            assert exp.errors - before <= 1
            assert msgs and msgs[0].templates
            assert msgs[-1].sequence == 7  # every message counted, delivered or not
        finally:
            r.close()
    finally:
        exp.close()


def test_closed_exporter() -> None:
    exp = IpfixExporter([("127.0.0.1", 4739)])
    with exp:
        pass
    exp.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        exp.export([rec()])


# --- a real collector: nfcapd / nfdump 1.7 ---------------------------------------------------------

needs_nfdump = pytest.mark.skipif(
    NFCAPD is None or NFDUMP is None, reason="nfcapd/nfdump not installed (apt-get install nfdump)"
)


@pytest.fixture
def nfcapd() -> Iterator[Callable[..., Nfcapd]]:
    started: list[Nfcapd] = []

    def start(host: str, port: int | None = None) -> Nfcapd:
        n = Nfcapd(host, port)
        started.append(n)
        return n

    try:
        yield start
    finally:
        for n in started:
            n.close()


def flags_str(flags: int) -> str:
    return "".join(c if flags & (0x80 >> i) else "." for i, c in enumerate("CEUAPRSF"))


def ms_str(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}"


def addr_str(family: int, a: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, a)


KNOWN = [
    # IPv4: three records, so the data set needs padding
    rec(4, 1, proto=6, sport=40000, dport=80, packets=10, octets=5000, tcp_flags=0x1B, end_reason=3),
    rec(4, 2, proto=17, sport=5353, dport=53, packets=2**32 + 9, octets=2**40 + 123, tcp_flags=0, end_reason=2),
    rec(4, 3, proto=1, sport=8, dport=0, packets=4, octets=336, tcp_flags=0, ingress_ifindex=7, end_reason=1),
    # IPv6: three more; the TCP one has the NS bit (0x100), which nfdump keeps only 8 bits of
    rec(6, 4, proto=6, sport=443, dport=51000, packets=2**33, octets=2**63 + 1, tcp_flags=0x1D2, end_reason=4),
    rec(6, 5, proto=58, sport=128, dport=0, packets=3, octets=312, tcp_flags=0, end_reason=5),
    rec(6, 6, proto=58, sport=1, dport=4, packets=1, octets=1280, tcp_flags=0, ingress_ifindex=2**31, end_reason=1),
]


@needs_nfdump
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_nfcapd_reads_every_field(nfcapd: Callable[..., Nfcapd], host: str) -> None:
    cap = nfcapd(host)
    with IpfixExporter([(host, cap.port)], observation_domain=7) as exp:
        # two exports: the second message has no templates and continues the sequence
        assert exp.export(KNOWN[:2] + KNOWN[3:5]) == 1
        assert exp.export([KNOWN[2], KNOWN[5]]) == 1
        assert exp.errors == 0
    cap.stop()
    assert cap.drops == 0

    flows = {(f.get("src4_addr") or f["src6_addr"]): f for f in cap.json()}
    raws = {f["src addr"]: f for f in cap.raw()}
    assert len(flows) == len(raws) == len(KNOWN)
    for r in KNOWN:
        src, dst = addr_str(r.family, r.src), addr_str(r.family, r.dst)
        j, raw = flows[src], raws[src]
        a = "4" if r.family == 4 else "6"
        assert (j[f"src{a}_addr"], j[f"dst{a}_addr"]) == (src, dst)
        assert j["proto"] == r.proto
        if r.proto in (1, 58):
            assert (j["icmp_type"], j["icmp_code"]) == (r.sport, r.dport)
            assert "src_port" not in j
        else:
            assert (j["src_port"], j["dst_port"]) == (r.sport, r.dport)
            assert j["tcp_flags"] == flags_str(r.tcp_flags & 0xFF)  # one byte kept
        assert (j["in_packets"], j["in_bytes"]) == (r.packets, r.octets)
        assert (j["first"], j["last"]) == (ms_str(r.start_ms), ms_str(r.end_ms))
        assert j["input_snmp"] == r.ingress_ifindex
        # -o raw: exact milliseconds, flowEndReason and the flags in hex (TCP only there)
        assert int(raw["first"].split()[0]) == r.start_ms
        assert int(raw["last"].split()[0]) == r.end_ms
        assert int(raw["end reason"].split()[0], 16) == r.end_reason
        assert int(raw["input"]) == r.ingress_ifindex
        if r.proto == 6:
            assert int(raw["tcp flags"].split()[0], 16) == r.tcp_flags & 0xFF

    info = cap.info()
    assert info["Flows"] == str(len(KNOWN))
    assert info["Packets"] == str(sum(r.packets for r in KNOWN))
    assert info["Bytes"] == str(sum(r.octets for r in KNOWN))
    assert info["Sequence failures"] == "0"
    assert re.search(r"Sequence Errors: 0, Bad Packets: 0", cap.output()), cap.output()


@needs_nfdump
def test_nfcapd_thousands_of_records_split_by_mtu(nfcapd: Callable[..., Nfcapd]) -> None:
    cap = nfcapd("127.0.0.1")
    records = mixed(3000, seed=11, counter_bits=48)  # nfdump's totals are 64-bit sums
    with IpfixExporter([("127.0.0.1", cap.port)], mtu=1500) as exp:
        for i in range(0, len(records), 1000):
            exp.export(records[i : i + 1000])
        assert exp.errors == 0
        assert exp.sent_messages > 3000 * 54 // 1472
    cap.stop()
    assert cap.drops == 0
    info = cap.info()
    assert info["Flows"] == "3000"
    assert info["Packets"] == str(sum(r.packets for r in records))
    assert info["Bytes"] == str(sum(r.octets for r in records))
    assert info["Sequence failures"] == "0"
    assert re.search(r"Sequence Errors: 0, Bad Packets: 0", cap.output()), cap.output()
    flows = {(f.get("src4_addr") or f["src6_addr"]): f for f in cap.json()}
    for r in records:
        j = flows[addr_str(r.family, r.src)]
        ports = (j["icmp_type"], j["icmp_code"]) if r.proto in (1, 58) else (j["src_port"], j["dst_port"])
        assert (j["proto"], *ports, j["in_packets"], j["in_bytes"]) == (
            r.proto,
            r.sport,
            r.dport,
            r.packets,
            r.octets,
        )


@needs_nfdump
def test_nfcapd_started_late_gets_templates_at_once(nfcapd: Callable[..., Nfcapd]) -> None:
    port = free_udp_port("127.0.0.1")
    with IpfixExporter([("127.0.0.1", port)], template_refresh=3600) as exp:
        exp.export([rec(4, 100)])  # templates, refused by the kernel: nobody listens
        time.sleep(0.05)
        exp.export([rec(4, 101)])  # reports ECONNREFUSED
        assert exp.errors == 1
        cap = nfcapd("127.0.0.1", port)
        exp.export([rec(4, 102), rec(6, 103)])
    cap.stop()
    got = sorted(f.get("src4_addr") or f["src6_addr"] for f in cap.json())
    assert got == ["10.0.0.102", "2001:db8::67"]


# --- reliability statistics (RFC 7011 section 4.2) -------------------------------------------------

UNTRACKED = [
    ReliabilityRecord(metering_process=7, packets=1000, octets=2**40 + 1, first_ms=T0, last_ms=T0 + 999),
    ReliabilityRecord(metering_process=2**32 - 1, packets=2**63, octets=2**64 - 1, first_ms=T0 + 5, last_ms=T0 + 5),
]


def test_reliability_records_go_with_the_templates(receiver: Receiver) -> None:
    clock = FakeClock()
    with IpfixExporter([receiver.addr], observation_domain=42, template_refresh=60.0, clock=clock) as exp:
        assert exp.export([rec(4, 1)], UNTRACKED) == 1
        (m,) = receiver.take()
        assert [s for s, _ in m.sets] == [2, 3, TEMPLATE_ID_V4, TEMPLATE_ID_RELIABILITY]
        # scope first: the message's observation domain, the interface
        assert m.stats == [(42, r.metering_process, r.packets, r.octets, r.first_ms, r.last_ms) for r in UNTRACKED]
        assert m.records == [rec(4, 1)] and m.sequence == 0

        # between refreshes only flows go; the statistics counted in the sequence
        clock.t += 30
        assert exp.export([rec(4, 2)], UNTRACKED) == 1
        (m,) = receiver.take()
        assert (m.stats, m.sequence, [s for s, _ in m.sets]) == ([], 3, [TEMPLATE_ID_V4])
        assert exp.export([], UNTRACKED) == 0

        # an idle tick at the refresh: templates and statistics only
        clock.t += 30
        assert exp.export([], UNTRACKED[:1]) == 1
        (m,) = receiver.take()
        assert [s for s, _ in m.sets] == [2, 3, TEMPLATE_ID_RELIABILITY]
        assert (len(m.stats), m.sequence, m.records) == (1, 4, [])
        assert exp.sent_records == 3 + 1 + 1


def test_reliability_record_that_does_not_fit_sends_nothing(receiver: Receiver) -> None:
    bad = ReliabilityRecord(metering_process=1, packets=2**64, octets=0, first_ms=0, last_ms=0)
    with IpfixExporter([receiver.addr], clock=FakeClock()) as exp:
        with pytest.raises(ValueError, match="cannot encode"):
            exp.export([rec()], [bad])
    assert receiver.take_raw() == []


@needs_nfdump
def test_nfcapd_reads_flows_beside_reliability_records(nfcapd: Callable[..., Nfcapd]) -> None:
    """nfdump 1.7 keeps no ignored counts, but reads every flow of messages
    that carry the options template and its records. Our sequence numbers
    count those records, as RFC 7011 section 3.1 says ("all IPFIX Data
    Records"); nfdump drops an options template it has no use for, so it
    skips its records uncounted and reports one sequence failure at the next
    message after each message that carried them (here: the second)."""
    cap = nfcapd("127.0.0.1")
    clock = FakeClock()
    with IpfixExporter([("127.0.0.1", cap.port)], template_refresh=10, clock=clock) as exp:
        exp.export(KNOWN[:3], UNTRACKED)
        clock.t += 5
        exp.export(KNOWN[3:], UNTRACKED)
        clock.t += 5
        exp.export([rec(4, 50)], UNTRACKED)
        assert exp.errors == 0
    cap.stop()
    info = cap.info()
    assert info["Flows"] == str(len(KNOWN) + 1)
    assert info["Packets"] == str(sum(r.packets for r in KNOWN) + rec(4, 50).packets)
    assert info["Sequence failures"] == "1"
    assert re.search(r"Bad Packets: 0", cap.output()), cap.output()
