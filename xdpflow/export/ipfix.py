"""IPFIX (RFC 7011) export of flow records over UDP.

Two layers. The encoding functions (``encode_record``, ``template_set``,
``build_message``, ``encode_message``, ``split_records``, ``encode_messages``)
are pure: records and numbers in, bytes out, no clock and no sockets, so tests
can check every header field. ``IpfixExporter`` holds one UDP socket and one
stream state (sequence number, when templates were last sent) per collector
and is the only part that does I/O.

Wire layout (RFC 7011 section 3): a 16-byte message header (version 10,
length, export time in seconds, sequence number, observation domain), then
sets. Set 2 carries the two template records, IPv4 (ID 256) and IPv6 (ID
257); data sets carry records of one template each. The information elements
(RFC 7012 / IANA) of both templates, in wire order:

    IE      name                               bytes  from FlowRecord
    8/27    sourceIPv4Address/IPv6Address      4/16   src
    12/28   destinationIPv4Address/IPv6Address 4/16   dst
    7       sourceTransportPort                2      sport (0 for ICMP/ICMPv6)
    11      destinationTransportPort           2      dport (0 for ICMP/ICMPv6)
    4       protocolIdentifier                 1      proto
    6       tcpControlBits                     2      tcp_flags (RFC 7125 width)
    2       packetDeltaCount                   8      packets
    1       octetDeltaCount                    8      octets
    152     flowStartMilliseconds              8      start_ms
    153     flowEndMilliseconds                8      end_ms
    10      ingressInterface                   4      ingress_ifindex
    136     flowEndReason                      1      end_reason
    32/139  icmpTypeCodeIPv4/IPv6              2      sport << 8 | dport for ICMP, else 0

A record is 54 bytes (IPv4) or 78 (IPv6).

Set 3 carries one options template (ID 258): the Metering Process
Reliability Statistics of RFC 7011 section 4.2, which reports the frames the
new-flow admission control counted but did not track. One record per
interface with untracked frames, in wire order:

    IE      name                               bytes  from ReliabilityRecord
    149     observationDomainId (scope)        4      the message's domain
    143     meteringProcessId (scope)          4      ifindex: each interface meters alone
    164     ignoredPacketTotalCount            8      packets
    165     ignoredOctetTotalCount             8      octets (IP bytes)
    323     observationTimeMilliseconds        8      first_ms: the first ignored packet
    323     observationTimeMilliseconds        8      last_ms: the last one

(RFC 7011 section 4.2 names any observationTime* element for the first and
last ignored packet, in that order.) These records go with the templates,
so every ``template_refresh`` seconds; they count in the sequence number as
every data record does (RFC 7011 section 3.1). nfdump 1.7 ignores this
template and its records, and since it does not count them either, it logs
a sequence failure after each message that carried them; its flows are not
affected.

The ICMP type and code travel in icmpTypeCodeIPv4/IPv6, not in the port
fields: RFC 7012 defines the transport ports for TCP, UDP and SCTP only, and
nfdump 1.7 overwrites its stored destination port from icmpTypeCode for ICMP
flows whenever the template has that element.

Seen with nfdump 1.7.1 (Debian 12), checked by ``netns_tests/unit/test_ipfix.py``:
every element above is mapped; 8-byte counters arrive whole (> 2^32 is fine);
flowStart/EndMilliseconds are kept to the millisecond (``-o json`` prints them
as local time ``YYYY-MM-DDThh:mm:ss.mmm``); tcpControlBits is stored in one
byte, so the NS bit (0x100) is dropped; ``-o json`` shows ``tcp_flags`` as a
``CEUAPRSF`` string and ICMP flows as ``icmp_type``/``icmp_code`` with no
ports; flowEndReason and ingressInterface appear in ``-o raw`` ("end reason",
"input") and ingressInterface also as ``input_snmp`` in JSON; padded data sets
are accepted; ``nfdump -I`` counts sequence failures, so wrong sequence
numbers show up there.

UDP specifics (RFC 7011 section 10.3): each collector is its own transport
session with its own sequence number, the count of data records sent to it
before the message, modulo 2^32. Templates (and the reliability records) go
in the first message to each collector, then again in the first message once
``template_refresh`` seconds have passed. A message never exceeds ``mtu - 28`` bytes for an IPv4
collector and ``mtu - 48`` for an IPv6 one (IP and UDP headers), so it is
never fragmented; records are split across as many messages as needed, and a
message holds only whole records.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple

from xdpflow.defaults import TEMPLATE_REFRESH
from xdpflow.errors import XdpflowError

__all__ = [
    "FlowRecord",
    "ReliabilityRecord",
    "EncodedRecord",
    "Field",
    "IpfixExporter",
    "IPFIX_VERSION",
    "HEADER_LEN",
    "MIN_MESSAGE",
    "RECORD_LEN",
    "SET_HEADER_LEN",
    "TEMPLATE_SET_ID",
    "TEMPLATE_ID_V4",
    "TEMPLATE_ID_V6",
    "OPTIONS_TEMPLATE_SET_ID",
    "TEMPLATE_ID_RELIABILITY",
    "RELIABILITY_FIELDS",
    "RELIABILITY_SCOPE_FIELDS",
    "TEMPLATES",
    "END_IDLE",
    "END_ACTIVE",
    "END_OF_FLOW",
    "END_FORCED",
    "END_LACK_OF_RESOURCES",
    "encode_record",
    "encode_reliability",
    "template_set",
    "options_template_set",
    "build_message",
    "encode_message",
    "message_size",
    "split_records",
    "encode_messages",
]

IPFIX_VERSION = 10
HEADER_LEN = 16  # version, length, export time, sequence, observation domain
SET_HEADER_LEN = 4  # set id, length
TEMPLATE_SET_ID = 2
TEMPLATE_ID_V4 = 256
TEMPLATE_ID_V6 = 257
OPTIONS_TEMPLATE_SET_ID = 3
TEMPLATE_ID_RELIABILITY = 258
SET_ALIGN = 4  # data sets are zero-padded to this; always less than one record
MAX_MESSAGE = 0xFFFF  # the header's length field is 16 bits
OVERHEAD_V4 = 20 + 8  # IPv4 + UDP header
OVERHEAD_V6 = 40 + 8  # IPv6 + UDP header
SEND_TIMEOUT = 1.0  # seconds a full socket buffer may block export()

# flowEndReason values (RFC 7012, IE 136)
END_IDLE = 1
END_ACTIVE = 2
END_OF_FLOW = 3
END_FORCED = 4
END_LACK_OF_RESOURCES = 5

_ICMP_PROTOS = (1, 58)  # ICMP, ICMPv6


@dataclass(frozen=True)
class FlowRecord:
    """One flow's counters since its last export: what one IPFIX data record says."""

    family: int  # 4 or 6
    src: bytes  # 4 or 16 bytes, network order
    dst: bytes
    sport: int  # host order; ICMP: type in sport, code in dport
    dport: int
    proto: int  # IANA protocol number
    packets: int  # delta since the last export of this flow
    octets: int  # IP bytes (RFC 7012 octetDeltaCount), delta
    start_ms: int  # flowStartMilliseconds (Unix ms)
    end_ms: int  # flowEndMilliseconds
    tcp_flags: int  # OR of TCP flags seen (tcpControlBits)
    ingress_ifindex: int  # ingressInterface
    end_reason: int  # flowEndReason: 1 idle, 2 active, 3 end of flow (FIN/RST), 4 forced, 5 lack of resources


@dataclass(frozen=True)
class ReliabilityRecord:
    """What one interface's admission control counted but did not track
    since the program was attached: an RFC 7011 section 4.2 record."""

    metering_process: int  # meteringProcessId: the interface's ifindex
    packets: int  # ignoredPacketTotalCount
    octets: int  # ignoredOctetTotalCount: IP bytes
    first_ms: int  # observationTimeMilliseconds of the first ignored packet (Unix ms)
    last_ms: int  # ... and of the last


class Field(NamedTuple):
    """One field specifier of a template: information element, name, struct code."""

    ie: int
    name: str
    fmt: str  # struct code, network order; its size is the field length

    @property
    def length(self) -> int:
        return struct.calcsize("!" + self.fmt)


def _fields(family: int) -> tuple[Field, ...]:
    v4 = family == 4
    return (
        Field(8, "sourceIPv4Address", "4s") if v4 else Field(27, "sourceIPv6Address", "16s"),
        Field(12, "destinationIPv4Address", "4s") if v4 else Field(28, "destinationIPv6Address", "16s"),
        Field(7, "sourceTransportPort", "H"),
        Field(11, "destinationTransportPort", "H"),
        Field(4, "protocolIdentifier", "B"),
        Field(6, "tcpControlBits", "H"),
        Field(2, "packetDeltaCount", "Q"),
        Field(1, "octetDeltaCount", "Q"),
        Field(152, "flowStartMilliseconds", "Q"),
        Field(153, "flowEndMilliseconds", "Q"),
        Field(10, "ingressInterface", "I"),
        Field(136, "flowEndReason", "B"),
        Field(32, "icmpTypeCodeIPv4", "H") if v4 else Field(139, "icmpTypeCodeIPv6", "H"),
    )


# template id -> fields, in wire order; the data record layout follows from it
TEMPLATES: dict[int, tuple[Field, ...]] = {TEMPLATE_ID_V4: _fields(4), TEMPLATE_ID_V6: _fields(6)}
_TEMPLATE_OF_FAMILY = {4: TEMPLATE_ID_V4, 6: TEMPLATE_ID_V6}
_ADDR_LEN = {4: 4, 6: 16}

# the options template: scope fields first
RELIABILITY_SCOPE_FIELDS = 2
RELIABILITY_FIELDS: tuple[Field, ...] = (
    Field(149, "observationDomainId", "I"),
    Field(143, "meteringProcessId", "I"),
    Field(164, "ignoredPacketTotalCount", "Q"),
    Field(165, "ignoredOctetTotalCount", "Q"),
    Field(323, "observationTimeMilliseconds", "Q"),  # the first ignored packet
    Field(323, "observationTimeMilliseconds", "Q"),  # the last
)

# every template's data record layout, flow templates first (data sets go in this order)
_RECORD = {
    tid: struct.Struct("!" + "".join(f.fmt for f in fields))
    for tid, fields in (*TEMPLATES.items(), (TEMPLATE_ID_RELIABILITY, RELIABILITY_FIELDS))
}
RECORD_LEN = {tid: s.size for tid, s in _RECORD.items()}
_HEADER = struct.Struct("!HHIII")
_SET_HEADER = struct.Struct("!HH")


class EncodedRecord(NamedTuple):
    """A data record's bytes and the template they follow."""

    template_id: int
    data: bytes


def encode_record(rec: FlowRecord) -> EncodedRecord:
    """Encode one flow as a data record of the IPv4 or IPv6 template.

    Raises ``ValueError`` naming the record when it cannot be encoded: an
    unknown family, an address of the wrong length, or a number that does not
    fit its field (negative, a counter >= 2^64, ICMP type or code > 255...).
    """
    tid = _TEMPLATE_OF_FAMILY.get(rec.family)
    if tid is None:
        raise ValueError(f"cannot encode {rec!r}: family must be 4 or 6")
    alen = _ADDR_LEN[rec.family]
    if len(rec.src) != alen or len(rec.dst) != alen:
        raise ValueError(f"cannot encode {rec!r}: IPv{rec.family} addresses are {alen} bytes")
    sport, dport, icmp = rec.sport, rec.dport, 0
    if rec.proto in _ICMP_PROTOS:
        if not (0 <= rec.sport <= 0xFF and 0 <= rec.dport <= 0xFF):
            raise ValueError(f"cannot encode {rec!r}: ICMP type and code are 0..255")
        sport, dport, icmp = 0, 0, rec.sport << 8 | rec.dport
    try:
        data = _RECORD[tid].pack(
            rec.src,
            rec.dst,
            sport,
            dport,
            rec.proto,
            rec.tcp_flags,
            rec.packets,
            rec.octets,
            rec.start_ms,
            rec.end_ms,
            rec.ingress_ifindex,
            rec.end_reason,
            icmp,
        )
    except struct.error as e:
        raise ValueError(f"cannot encode {rec!r}: {e}") from None
    return EncodedRecord(tid, data)


def encode_reliability(rec: ReliabilityRecord, observation_domain: int) -> EncodedRecord:
    """Encode one interface's reliability statistics as a record of the
    options template. Raises ``ValueError`` naming the record when a number
    does not fit its field."""
    try:
        data = _RECORD[TEMPLATE_ID_RELIABILITY].pack(
            observation_domain, rec.metering_process, rec.packets, rec.octets, rec.first_ms, rec.last_ms
        )
    except struct.error as e:
        raise ValueError(f"cannot encode {rec!r}: {e}") from None
    return EncodedRecord(TEMPLATE_ID_RELIABILITY, data)


def template_set(template_ids: Sequence[int] = (TEMPLATE_ID_V4, TEMPLATE_ID_V6)) -> bytes:
    """The template set (set ID 2) announcing ``template_ids``; 4-byte aligned by construction."""
    body = b"".join(
        _SET_HEADER.pack(tid, len(TEMPLATES[tid])) + b"".join(_SET_HEADER.pack(f.ie, f.length) for f in TEMPLATES[tid])
        for tid in template_ids
    )
    return _SET_HEADER.pack(TEMPLATE_SET_ID, SET_HEADER_LEN + len(body)) + body


def options_template_set() -> bytes:
    """The options template set (set ID 3) announcing the reliability
    statistics template: ID, field count, scope field count, then the
    field specifiers (RFC 7011 section 3.4.2.2); 4-byte aligned."""
    body = struct.pack("!HHH", TEMPLATE_ID_RELIABILITY, len(RELIABILITY_FIELDS), RELIABILITY_SCOPE_FIELDS)
    body += b"".join(_SET_HEADER.pack(f.ie, f.length) for f in RELIABILITY_FIELDS)
    body += bytes(-len(body) % SET_ALIGN)
    return _SET_HEADER.pack(OPTIONS_TEMPLATE_SET_ID, SET_HEADER_LEN + len(body)) + body


def _templates() -> bytes:
    return template_set() + options_template_set()


_TEMPLATE_SET_LEN = len(_templates())


def _data_set_len(template_id: int, count: int) -> int:
    if count == 0:
        return 0
    n = SET_HEADER_LEN + count * RECORD_LEN[template_id]
    return n + (-n) % SET_ALIGN


def message_size(counts: dict[int, int], *, templates: bool) -> int:
    """Bytes of a message holding ``counts[template_id]`` records of each template."""
    size = HEADER_LEN + (_TEMPLATE_SET_LEN if templates else 0)
    return size + sum(_data_set_len(tid, n) for tid, n in counts.items())


# the smallest message size limit that works: the templates alone, or the largest record alone
MIN_MESSAGE = max(
    HEADER_LEN + _TEMPLATE_SET_LEN,
    *(HEADER_LEN + _data_set_len(tid, 1) for tid in RECORD_LEN),
)


def build_message(
    records: Sequence[EncodedRecord],
    *,
    sequence: int,
    export_time: int,
    observation_domain: int,
    templates: bool = False,
) -> bytes:
    """One IPFIX message: header, the template and options template sets if
    ``templates``, then data sets.

    Records are grouped into one data set per template (IPv4, IPv6, then
    reliability statistics), each
    zero-padded to a multiple of 4 bytes; the padding (0 or 2 bytes) is always
    shorter than a record, as RFC 7011 section 3.3.1 requires. ``sequence`` is
    taken modulo 2^32. Raises ``ValueError`` when the message would not fit the
    16-bit length field or a header value does not fit its field.
    """
    groups: dict[int, list[bytes]] = {tid: [] for tid in RECORD_LEN}
    for r in records:
        if r.template_id not in groups or len(r.data) != RECORD_LEN[r.template_id]:
            raise ValueError(f"not a record of template {r.template_id}: {len(r.data)} bytes")
        groups[r.template_id].append(r.data)
    length = message_size({tid: len(g) for tid, g in groups.items()}, templates=templates)
    if length > MAX_MESSAGE:
        raise ValueError(f"IPFIX message of {length} bytes exceeds {MAX_MESSAGE}; split the records")
    parts = [_templates()] if templates else []
    for tid, g in groups.items():
        if g:
            set_len = _data_set_len(tid, len(g))
            pad = set_len - SET_HEADER_LEN - len(g) * RECORD_LEN[tid]
            parts.append(_SET_HEADER.pack(tid, set_len) + b"".join(g) + bytes(pad))
    body = b"".join(parts)
    try:
        header = _HEADER.pack(IPFIX_VERSION, HEADER_LEN + len(body), export_time, sequence % 2**32, observation_domain)
    except struct.error as e:
        raise ValueError(f"cannot encode IPFIX message header: {e}") from None
    return header + body


def encode_message(
    records: Iterable[FlowRecord],
    *,
    sequence: int,
    export_time: int,
    observation_domain: int = 1,
    templates: bool = False,
) -> bytes:
    """``build_message`` of ``encode_record`` of each record; raises ``ValueError`` as they do."""
    return build_message(
        [encode_record(r) for r in records],
        sequence=sequence,
        export_time=export_time,
        observation_domain=observation_domain,
        templates=templates,
    )


def split_records(
    records: Sequence[EncodedRecord], *, max_size: int, templates: bool = False
) -> list[list[EncodedRecord]]:
    """Split records, in order, into the fewest messages of at most ``max_size`` bytes.

    With ``templates`` the first message also carries the template set. No
    records and ``templates`` gives one empty chunk (a templates-only
    message); no records and no templates gives no chunks. Raises
    ``ValueError`` when ``max_size`` cannot hold a record (or the templates).
    """
    max_size = min(max_size, MAX_MESSAGE)
    if max_size < MIN_MESSAGE:
        raise ValueError(f"IPFIX message size {max_size} cannot hold one record and the templates")
    chunks: list[list[EncodedRecord]] = []
    chunk: list[EncodedRecord] = []
    counts = dict.fromkeys(RECORD_LEN, 0)
    size = message_size(counts, templates=templates)
    with_templates = templates
    for rec in records:
        tid, n = rec.template_id, counts[rec.template_id]
        grow = _data_set_len(tid, n + 1) - _data_set_len(tid, n)
        if size + grow > max_size:
            chunks.append(chunk)
            chunk, counts, with_templates = [], dict.fromkeys(RECORD_LEN, 0), False
            size, grow = HEADER_LEN, _data_set_len(tid, 1)
        chunk.append(rec)
        counts[tid] += 1
        size += grow
    if chunk or with_templates:
        chunks.append(chunk)
    return chunks


def encode_messages(
    records: Iterable[FlowRecord],
    *,
    max_size: int,
    sequence: int,
    export_time: int,
    observation_domain: int = 1,
    templates: bool = False,
) -> list[bytes]:
    """All the messages one collector is sent for ``records``, as ``IpfixExporter.export`` builds them.

    Each message's sequence number is ``sequence`` plus the records in the
    messages before it (mod 2^32); only the first carries the templates.
    Raises ``ValueError`` as ``encode_record`` and ``split_records`` do.
    """
    out = []
    encoded = [encode_record(r) for r in records]
    for i, chunk in enumerate(split_records(encoded, max_size=max_size, templates=templates)):
        out.append(
            build_message(
                chunk,
                sequence=sequence,
                export_time=export_time,
                observation_domain=observation_domain,
                templates=templates and i == 0,
            )
        )
        sequence += len(chunk)
    return out


class _Stream:
    """One collector: its connected socket and its transport session's state."""

    def __init__(self, host: str, port: int) -> None:
        self.name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as e:
            raise XdpflowError(
                errno.EINVAL, f"IPFIX collector {self.name}: cannot resolve: {e.strerror}; check the name"
            ) from None
        family, type_, proto, _canon, addr = infos[0]
        self.family = family
        self.max_size = 0  # set by the exporter from the MTU
        self.sock = socket.socket(family, type_, proto)
        try:
            self.sock.settimeout(SEND_TIMEOUT)
            # connected: ICMP port unreachable comes back as ECONNREFUSED on a later send
            self.sock.connect(addr)
        except OSError as e:
            self.sock.close()
            raise XdpflowError(
                e.errno or errno.EIO, f"IPFIX collector {self.name}: cannot connect UDP socket: {e.strerror}"
            ) from None
        self.sequence = 0
        self.templates_sent: float | None = None

    def templates_due(self, now: float, refresh: float) -> bool:
        last = self.templates_sent
        # a clock that stepped back also refreshes: better early than never
        return last is None or refresh <= 0 or now - last >= refresh or now < last


class IpfixExporter:
    """Sends flow records as IPFIX over UDP to one or more collectors.

    ``collectors`` are ``(host, port)`` pairs; a host is a name or an IPv4 or
    IPv6 address, resolved once here (the first address ``getaddrinfo``
    gives). Every collector gets every record. ``mtu`` bounds each UDP
    datagram, IP header included (see the module doc). ``template_refresh``
    is in seconds; 0 puts the templates in the first message of every
    ``export``. ``clock`` returns Unix seconds; tests inject one.

    Counters for metrics, summed over collectors: ``sent_messages`` and
    ``sent_records`` count what the kernel accepted, ``errors`` the messages
    it did not (``last_error`` keeps the latest ``OSError``). A failed message
    still advances its collector's sequence number, so the collector sees the
    loss as a gap. After ECONNREFUSED (an ICMP port unreachable for an earlier
    message: the collector was not listening) the next message carries the
    templates again, so a restarted collector can decode at once rather than
    after the next refresh.

    Not thread-safe. Raises ``ValueError`` for bad arguments and
    ``XdpflowError`` (an ``OSError``) when a collector cannot be resolved or
    its socket cannot be set up; then nothing is left open.
    """

    def __init__(
        self,
        collectors: list[tuple[str, int]],
        observation_domain: int = 1,
        mtu: int = 1500,
        template_refresh: float = TEMPLATE_REFRESH,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= observation_domain <= 0xFFFFFFFF:
            raise ValueError(f"observation domain {observation_domain} is not a 32-bit unsigned number")
        if template_refresh < 0:
            raise ValueError(f"template refresh {template_refresh} s is negative")
        for host, port in collectors:
            if not 0 < port <= 0xFFFF:
                raise ValueError(f"IPFIX collector {host}: port {port} is not 1..65535")
        self.observation_domain = observation_domain
        self.mtu = mtu
        self.template_refresh = template_refresh
        self.clock = clock
        self.errors = 0
        self.last_error: OSError | None = None
        self.sent_messages = 0
        self.sent_records = 0
        self._streams: list[_Stream] = []
        self._closed = False
        try:
            for host, port in collectors:
                stream = _Stream(host, port)
                self._streams.append(stream)
                overhead = OVERHEAD_V6 if stream.family == socket.AF_INET6 else OVERHEAD_V4
                stream.max_size = min(mtu - overhead, MAX_MESSAGE)
                if stream.max_size < MIN_MESSAGE:
                    raise ValueError(
                        f"mtu {mtu} is too small for IPFIX to {stream.name}: need at least {MIN_MESSAGE + overhead}"
                    )
        except BaseException:
            self.close()
            raise

    @property
    def collectors(self) -> list[str]:
        """The collectors as ``host:port`` / ``[v6]:port`` strings, in the order given."""
        return [s.name for s in self._streams]

    def export(self, records: Iterable[FlowRecord], reliability: Iterable[ReliabilityRecord] = ()) -> int:
        """Send ``records`` to every collector; return how many messages the kernel accepted.

        ``reliability`` (the admission control's totals) goes only to a
        collector whose templates are due, right after them: so every
        ``template_refresh`` seconds, if this is called that often.
        All records are encoded before anything is sent, so a ``ValueError``
        (a record that does not fit its fields, see ``encode_record``) sends
        nothing. Send failures never raise: they are counted in ``errors``.
        With no records, a collector whose templates are due gets a
        templates-only message, so calling this on every tick keeps a
        collector's templates fresh through idle periods.
        Raises ``ValueError`` after ``close()``.
        """
        if self._closed:
            raise ValueError("IPFIX exporter is closed")
        encoded = [encode_record(r) for r in records]
        stats = [encode_reliability(r, self.observation_domain) for r in reliability]
        now = self.clock()
        export_time = int(now) % 2**32
        sent = 0
        for stream in self._streams:
            templates = stream.templates_due(now, self.template_refresh)
            todo = stats + encoded if templates else encoded
            chunks = split_records(todo, max_size=stream.max_size, templates=templates)
            for i, chunk in enumerate(chunks):
                with_templates = templates and i == 0
                msg = build_message(
                    chunk,
                    sequence=stream.sequence,
                    export_time=export_time,
                    observation_domain=self.observation_domain,
                    templates=with_templates,
                )
                stream.sequence = (stream.sequence + len(chunk)) % 2**32
                if self._send(stream, msg):
                    sent += 1
                    self.sent_records += len(chunk)
                    if with_templates:
                        stream.templates_sent = now
        self.sent_messages += sent
        return sent

    def _send(self, stream: _Stream, msg: bytes) -> bool:
        try:
            stream.sock.send(msg)
        except OSError as e:
            self.errors += 1
            self.last_error = e
            if isinstance(e, ConnectionRefusedError):
                # an earlier message found no collector: it may have held the templates
                stream.templates_sent = None
            return False
        return True

    def close(self) -> None:
        """Close every socket; safe to call twice."""
        self._closed = True
        for stream in self._streams:
            stream.sock.close()

    def __enter__(self) -> IpfixExporter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
