"""Parse, validate and diff blocklist sources.

Pure and deterministic: this module reads text and does arithmetic, it never touches the
kernel. ``blocklist.py`` turns its output into map updates.

A blocklist rule is a CIDR (IPv4 or IPv6; a single host is a /32 or /128) plus the
direction it applies to ("src" or "dst"). Accepted input is line oriented text: plain
lists, FireHOL ``.netset`` files and Spamhaus DROP/EDROP text files. ``#`` and ``;``
start a comment anywhere on a line, so ``1.10.16.0/20 ; SBL256894`` reads as
``1.10.16.0/20``.

Validation is strict and the same on every path: IPv4 octets are plain decimal without
leading zeros, a prefix length is a plain decimal number (no netmask notation, no
leading zeros), and a prefix must be canonical (no host bits set). IPv6 zone indices
(``fe80::1%eth0``) are rejected. IPv4-mapped IPv6 (``::ffff:192.0.2.1``) is kept as the
IPv6 network it is written as; it will not match IPv4 packets.

Feeds have ~10^5 entries, so speed matters: plain dotted quads skip ``ipaddress``
parsing, dedup/sort/diff work on one int per rule, and IPv4Network objects are built
without re-validating them (see "ipaddress fast paths").
"""

from __future__ import annotations

import errno
import gc
import pickle
import re
import socket
import sys
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from ipaddress import AddressValueError, IPv4Address, IPv4Network, IPv6Address, IPv6Network
from itertools import islice
from typing import NamedTuple, NoReturn

from xdpflow.rules.bulk4 import simple_v4

__all__ = [
    "DIRECTIONS",
    "BlocklistFileError",
    "Rule",
    "check_direction",
    "diff",
    "parse_bytes_keys",
    "parse_cidr",
    "parse_keys",
    "parse_lines",
    "read_file",
    "read_file_keys",
    "rule_from_key",
    "rule_key",
    "sort_rules",
]
KEY6 = 1 << 136  # set in a net key for IPv6

DIRECTIONS = ("src", "dst")
_DIRECTION_BIT = {"src": 0, "dst": 1}

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_U128 = (1 << 128) - 1

# Inside this module a network is one int, ``v6 flag | address << 8 | prefixlen``, and a
# rule is ``network << 1 | direction bit``: cheap to hash, and sorting the ints sorts by
# (version, address, prefixlen, direction).
_KEY6 = 1 << 136
_HOST4 = [(1 << (32 - p)) - 1 for p in range(33)]
_HOST6 = [(1 << (128 - p)) - 1 for p in range(129)]

# strict decimal spellings: exactly the octets ipaddress accepts, and prefix lengths
# without sign, spaces or leading zeros
_OCTET = {str(i): i for i in range(256)}
_PLEN4 = {str(i): i for i in range(33)}
_PLEN6 = {str(i): i for i in range(129)}
_V4_CHARS = frozenset("0123456789.")


def _net_key(net: IPv4Network | IPv6Network) -> int:
    key = (int(net.network_address) << 8) | net.prefixlen
    return (key | _KEY6) if isinstance(net, IPv6Network) else key


def rule_key(rule: Rule) -> int:
    """A rule as one int, ordered like Rules: ``(net_key << 1) | direction bit``
    where ``net_key = address << 8 | prefixlen``, with bit 136 set for IPv6.
    Hashing and comparing ints is ~10x cheaper than Rules; ``rule_from_key``
    inverts it. Raises ValueError for a direction other than "src"/"dst".
    """
    return _rule_key(rule)


def rule_from_key(key: int) -> Rule:
    """The Rule for a ``rule_key`` value (no validation: keys come from rules)."""
    return tuple.__new__(Rule, (_network(key >> 1), DIRECTIONS[key & 1]))


def _rule_key(rule: Rule) -> int:
    net, direction = rule
    bit = _DIRECTION_BIT.get(direction)
    if bit is None:
        raise ValueError(f"rule {net} has direction {direction!r}; must be 'src' or 'dst'")
    return (_net_key(net) << 1) | bit


class Rule(NamedTuple):
    """One blocklist entry: a canonical network and the direction it applies to.

    Hashable. Orders by (IP version, network address, prefix length, direction), so a
    list mixing IPv4 and IPv6 rules can be sorted (ipaddress alone refuses to compare
    across versions); comparing a rule whose direction is not "src"/"dst" raises
    ValueError. For many rules ``sort_rules()`` is several times faster than sorted().
    """

    net: IPv4Network | IPv6Network
    direction: str

    def __str__(self) -> str:
        return f"{self.direction} {self.net}"

    # tuple ordering would compare IPv4Network with IPv6Network and raise TypeError
    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Rule):
            return NotImplemented
        return _rule_key(self) < _rule_key(other)

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Rule):
            return NotImplemented
        return _rule_key(self) <= _rule_key(other)

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Rule):
            return NotImplemented
        return _rule_key(self) > _rule_key(other)

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Rule):
            return NotImplemented
        return _rule_key(self) >= _rule_key(other)


def sort_rules(rules: Iterable[Rule]) -> list[Rule]:
    """Return ``rules`` sorted in Rule order (duplicates kept).

    Raises ValueError for a rule whose direction is not "src" or "dst".
    """
    return sorted(rules, key=_rule_key)


class BlocklistFileError(ValueError):
    """A line of a blocklist source that is not a valid address or CIDR.

    Attributes: ``path``, ``lineno`` (1-based), ``line`` (the line as read, without its
    line ending), ``reason``, and ``errors``: every bad line of the input, in order. The
    raised error is the first one and its ``errors`` lists all of them; any other
    instance lists just itself.
    """

    def __init__(self, path: str, lineno: int, line: str, reason: str) -> None:
        super().__init__(path, lineno, line, reason)
        self.path = path
        self.lineno = lineno
        self.line = line
        self.reason = reason
        self.errors: list[BlocklistFileError] = [self]

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.reason}: {self.line!r}"


def check_direction(direction: str) -> None:
    """Raises ValueError unless ``direction`` is "src" or "dst"."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'src' or 'dst', not {direction!r}")


# --- ipaddress fast paths ---------------------------------------------------------------
#
# Parsing a 10^5-line feed on a slow machine spends most of its time in ipaddress. Two
# fast paths each do what a public API does, 2-3x faster, and each is used only if an
# import-time self-check shows it agrees with that API (else the public API is used):
#   _v4_int/_v6_int  inet_pton(3) instead of ipaddress's parser (glibc and musl are as
#                    strict: no leading zeros, no short forms, no zone index)
#   _net4            IPv4Network objects built without re-running the constructor
# The last relies on ipaddress internals, unchanged since Python 3.3.

_new_object = object.__new__
_NETMASK4 = [IPv4Network((0, p)).netmask for p in range(33)]


def _v4_int_pure(addr: str) -> int | None:
    """Return a strict dotted quad as an int, or None if it is not one."""
    parts = addr.split(".")
    if len(parts) != 4:
        return None
    octet = _OCTET.get
    a, b, c, d = octet(parts[0]), octet(parts[1]), octet(parts[2]), octet(parts[3])
    if a is None or b is None or c is None or d is None:
        return None
    return (a << 24) | (b << 16) | (c << 8) | d


def _v4_int_pton(addr: str) -> int | None:
    """_v4_int_pure() done by inet_pton(3), which glibc and musl make just as strict."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, addr), "big")
    except (OSError, ValueError):  # ValueError: NUL or surrogates in the text
        return None


def _v6_int_pure(addr: str) -> int | None:
    """Return an IPv6 address (no zone index) as an int, or None if it is not one."""
    if "%" in addr:
        return None
    try:
        return int(IPv6Address(addr))
    except AddressValueError:
        return None


def _v6_int_pton(addr: str) -> int | None:
    """_v6_int_pure() done by inet_pton(3), which glibc and musl make just as strict."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET6, addr), "big")
    except (OSError, ValueError):
        return None


# inet_pton must agree with ipaddress on all of these (None: rejected)
_PTON_SAMPLES4 = (
    "192.0.2.255", "0.0.0.0", "255.255.255.255", "01.2.3.4", "1.2.3.04", "1.2.3.00",
    "1.2.3.256", "1.2.3", "1.2.3.4.5", "1.2..3", " 1.2.3.4", "1.2.3.4 ", "0x1.2.3.4",
    "+1.2.3.4", "1.2.3.-4", "1.2.3.4\n", "", "\u0661.2.3.4", "1.2.3.4/32", "1.2.3.4\x00",
    "1.2.3.4\udcff", "::1",
)  # fmt: skip
_PTON_SAMPLES6 = (
    "::", "::1", "2001:db8::", "::ffff:192.0.2.1", "1:2:3:4:5:6:7::", "1::2:3:4:5:6:7",
    "ABCD::ef", "0000:0000::0001", "1:2:3:4:5:6:1.2.3.4", "1:2:3:4:5:6:7:8", "1:2", ":1::2",
    "1::2:", "1::2::3", "12345::", "::ffff:01.2.3.4", "::ffff:1.2.3.256", "1.2.3.4::",
    "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7:1.2.3.4", "1::2:3:4:5:6:7:8", "fe80::1%eth0",
    "g::", " ::1", "::1 ", "", ":", ":::", "1:::2", "0x1::", "::\u0661", "::1.2.3",
    "::1.2.3.4.5", "1:2:3:4:5:6:7:8::", "::1:2:3:4:5:6:7:8", "::1/128", "::1\x00",
    "::1\udcff", "1.2.3.4",
)  # fmt: skip


def _pton_agrees() -> bool:
    try:
        return all(_v4_int_pton(t) == _v4_int_pure(t) for t in _PTON_SAMPLES4) and all(
            _v6_int_pton(t) == _v6_int_pure(t) for t in _PTON_SAMPLES6
        )
    except Exception:  # no inet_pton on this platform
        return False


def _net4_public(value: int, plen: int) -> IPv4Network:
    return IPv4Network((value, plen))


def _hosts32(value: int) -> list[IPv4Address]:
    return [IPv4Address(value)]


def _net4_fast(value: int, plen: int) -> IPv4Network:
    """IPv4Network((value, plen)) for a canonical network, without re-checking it.

    Sets what IPv4Network.__init__ sets; the constructor's checks and calls take ~1.5 us
    per object on a slow machine.
    """
    addr = _new_object(IPv4Address)
    addr._ip = value  # type: ignore[attr-defined]
    net = _new_object(IPv4Network)
    net.network_address = addr
    net.netmask = _NETMASK4[plen]
    net._prefixlen = plen  # type: ignore[attr-defined]
    if plen == 32:
        vars(net)["hosts"] = partial(_hosts32, value)
    elif plen == 31:
        vars(net)["hosts"] = net.__iter__
    return net


def _internals_ok() -> bool:
    """Check _net4_fast() and _keyed_fast() against the public API."""
    samples4 = (
        (0, 0), (0x0A000000, 8), (0xC6120000, 15), (0xC0000200, 24), (0xC0000202, 31),
        (0xC0000201, 32), (_U32, 32),
    )  # fmt: skip
    samples6 = ((0, 0), (1 << 127, 1), (0x20010DB8 << 96, 32), (_U128, 128))
    try:
        for value, plen in samples6:
            ref6 = IPv6Network((value, plen))
            if ref6.network_address._ip != value or ref6._prefixlen != plen:  # type: ignore[attr-defined]
                return False
        for value, plen in samples4:
            fast = _net4_fast(value, plen)
            ref = IPv4Network((value, plen))
            same = (
                type(fast) is type(ref)
                and type(fast.network_address) is type(ref.network_address)
                and vars(fast).keys() == vars(ref).keys()
                and fast == ref
                and hash(fast) == hash(ref)
                and repr(fast) == repr(ref)
                and fast.network_address == ref.network_address
                and hash(fast.network_address) == hash(ref.network_address)
                and fast.network_address.packed == ref.network_address.packed
                and fast.netmask == ref.netmask
                and fast.prefixlen == ref.prefixlen
                and fast.broadcast_address == ref.broadcast_address
                and fast.num_addresses == ref.num_addresses
                and list(islice(fast.hosts(), 3)) == list(islice(ref.hosts(), 3))
                and list(islice(fast, 3)) == list(islice(ref, 3))
                and pickle.loads(pickle.dumps(fast)) == ref
                and ref.network_address._ip == value  # type: ignore[attr-defined]
                and ref._prefixlen == plen  # type: ignore[attr-defined]
            )
            if not same:
                return False
    except Exception:
        return False
    return True


_PTON_OK = _pton_agrees()
_v4_int: Callable[[str], int | None] = _v4_int_pton if _PTON_OK else _v4_int_pure
_v6_int: Callable[[str], int | None] = _v6_int_pton if _PTON_OK else _v6_int_pure
_INTERNALS_OK = _internals_ok()
_net4: Callable[[int, int], IPv4Network] = _net4_fast if _INTERNALS_OK else _net4_public


# --- parsing ----------------------------------------------------------------------------


def _parse(text: str) -> int:
    """Parse a stripped, comment-free address or CIDR into its int key.

    The reference implementation: parse_lines() inlines the common dotted-quad case and
    calls this for everything else. Raises ValueError whose message quotes ``text`` whole
    (what the operator typed, not the part a library choked on), with the reason where
    it tells more than "not an address": a prefix length out of range, host bits set (and
    the network meant), why a dotted quad is not one, a zone index, JSON.
    """
    if text.startswith("{"):
        raise ValueError(f"{text!r}: JSON is not supported; use the plain text list")
    addr, slash, plen_text = text.partition("/")

    if ":" not in addr:
        value = _v4_int_pure(addr)
        if value is not None:
            if not slash:
                return (value << 8) | 32
            plen = _PLEN4.get(plen_text)
            if plen is None:
                raise ValueError(f"{text!r}: prefix length must be a decimal number from 0 to 32")
            if value & _HOST4[plen]:
                _host_bits_error(text, ((value & ~_HOST4[plen]) << 8) | plen)
            return (value << 8) | plen
    else:
        if "%" in addr:
            raise ValueError(f"{text!r}: IPv6 zone index (%...) is not allowed in a blocklist")
        try:
            value = int(IPv6Address(addr))
        except AddressValueError:
            raise ValueError(_NOT_AN_ADDRESS.format(text)) from None
        if not slash:
            return _KEY6 | (value << 8) | 128
        plen = _PLEN6.get(plen_text)
        if plen is None:
            raise ValueError(f"{text!r}: prefix length must be a decimal number from 0 to 128")
        if value & _HOST6[plen]:
            _host_bits_error(text, _KEY6 | ((value & ~_HOST6[plen]) << 8) | plen)
        return _KEY6 | (value << 8) | plen

    if not text:
        raise ValueError("empty address")
    if "." in addr and _V4_CHARS.issuperset(addr):
        # not a strict dotted quad; ipaddress says why (leading zero, > 255, ...) about
        # the part it parsed, which we drop for the whole token
        try:
            IPv4Address(addr)
        except AddressValueError as e:
            why = _QUOTED_TAIL.sub("", str(e))
            raise ValueError(f"{_NOT_AN_ADDRESS.format(text)}: {why[:1].lower()}{why[1:]}") from None
    raise ValueError(_NOT_AN_ADDRESS.format(text))


_NOT_AN_ADDRESS = "{!r} is not an IPv4 or IPv6 address or CIDR"
_QUOTED_TAIL = re.compile(r"(?: in '[^']*')+$")


def _host_bits_error(text: str, canonical: int) -> NoReturn:
    raise ValueError(f"{text!r} has host bits set; did you mean {_network(canonical)}?")


def _network(key: int) -> IPv4Network | IPv6Network:
    if key < _KEY6:
        return _net4(key >> 8, key & 0xFF)
    return IPv6Network(((key >> 8) & _U128, key & 0xFF))


def parse_cidr(text: str) -> IPv4Network | IPv6Network:
    """Parse one IPv4/IPv6 address or CIDR, e.g. ``192.0.2.0/24`` or ``2001:db8::1``.

    Surrounding whitespace is ignored; a bare address is a /32 or /128.
    Raises ValueError if the text is not an address or CIDR, if an octet has a leading
    zero, if the prefix length is not a plain decimal in range, or if host bits are set
    (the message then names the canonical network).
    """
    return _network(_parse(text.strip()))


def _bad_reason(line: str, reason: str) -> str:
    # read_file() decodes with surrogateescape: lone surrogates mark undecodable bytes
    if any("\udc80" <= ch <= "\udcff" for ch in line):
        return "line is not valid UTF-8"
    return reason


@contextmanager
def _gc_paused() -> Iterator[None]:
    # building ~10^5 objects in a row would trigger many collections that free nothing
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_lines(lines: Iterable[str], path: str = "-", direction: str = "src") -> list[Rule]:
    """Parse blocklist text, one address or CIDR per line, into sorted unique rules.
    See parse_keys() for the format and the errors.
    """
    keys = parse_keys(lines, path, direction)
    n4 = bisect_left(keys, _KEY6 << 1)
    new = tuple.__new__
    net4 = _net4
    with _gc_paused():
        rules = [new(Rule, (net4(key >> 9, (key >> 1) & 0xFF), direction)) for key in keys[:n4]]
        rules += [new(Rule, (IPv6Network(((key >> 9) & _U128, (key >> 1) & 0xFF)), direction)) for key in keys[n4:]]
    return rules


def parse_keys(lines: Iterable[str], path: str = "-", direction: str = "src") -> list[int]:
    """Parse blocklist text, one address or CIDR per line, into sorted unique
    rule keys (see rule_key()): the fast path for whole feeds, which never
    builds an ipaddress object.

    ``#`` and ``;`` start a comment anywhere on a line; blank lines and surrounding
    whitespace (including the CR of CRLF endings) are ignored. Duplicates are merged;
    overlapping networks are kept as written. ``path`` only labels error messages.

    The whole input is validated before anything is returned. Raises BlocklistFileError
    for the first bad line, whose ``errors`` attribute holds every bad line; raises
    ValueError if ``direction`` is not "src" or "dst".
    """
    check_direction(direction)
    seen: set[int] = set()
    _parse_into(enumerate(lines, 1), path, seen)
    bit = _DIRECTION_BIT[direction]
    return sorted((key << 1) | bit for key in seen)


def _parse_into(numbered: Iterable[tuple[int, str]], path: str, seen: set[int]) -> None:
    """Add the net key of each (line number, line) to ``seen``; see parse_keys()."""
    add = seen.add
    errors: list[BlocklistFileError] = []
    v4_int = _v4_int
    v6_int = _v6_int
    plen4 = _PLEN4.get
    plen6 = _PLEN6.get
    host4 = _HOST4
    host6 = _HOST6
    for lineno, raw in numbered:
        text = raw
        if "#" in text:
            text = text[: text.index("#")]
        if ";" in text:
            text = text[: text.index(";")]
        text = text.strip()
        if not text:
            continue
        # fast paths, same result as _parse() for a valid address and canonical prefix
        addr, slash, plen_text = text.partition("/")
        if ":" not in addr:
            value = v4_int(addr)
            if value is not None:
                if not slash:
                    add((value << 8) | 32)
                    continue
                plen = plen4(plen_text)
                if plen is not None and not value & host4[plen]:
                    add((value << 8) | plen)
                    continue
        else:
            value = v6_int(addr)
            if value is not None:
                if not slash:
                    add(_KEY6 | (value << 8) | 128)
                    continue
                plen = plen6(plen_text)
                if plen is not None and not value & host6[plen]:
                    add(_KEY6 | (value << 8) | plen)
                    continue
        try:
            add(_parse(text))
        except ValueError as e:
            line = raw.rstrip("\r\n")
            errors.append(BlocklistFileError(path, lineno, line, _bad_reason(line, str(e))))
    if errors:
        first = errors[0]
        first.errors = errors
        raise first


def parse_bytes_keys(data: bytes, path: str = "-", direction: str = "src") -> list[int]:
    """parse_keys() of ``data.decode("utf-8", "surrogateescape").split("\n")``,
    the same keys and errors: plain IPv4 lines are parsed in bulk (bulk4.py),
    the others one by one as parse_keys() does."""
    import numpy as np

    check_direction(direction)
    keys4, others, starts, ends = simple_v4(data)
    seen: set[int] = set()
    numbered = (
        (i + 1, data[s:e].decode("utf-8", "surrogateescape"))
        for i, s, e in zip(others.tolist(), starts[others].tolist(), ends[others].tolist())
    )
    _parse_into(numbered, path, seen)
    slow4 = [k for k in seen if k < _KEY6]
    if slow4:
        keys4 = np.concatenate((keys4, np.array(slow4, dtype=np.uint64)))
    bit = _DIRECTION_BIT[direction]
    keys4 = np.sort(keys4)
    once = np.ones(len(keys4), dtype=bool)  # each key once (np.unique, hashing, is slower)
    once[1:] = keys4[1:] != keys4[:-1]
    keys4 = keys4[once]
    v4 = (keys4 << np.uint64(1)) | np.uint64(bit)
    return v4.tolist() + sorted((key << 1) | bit for key in seen if key >= _KEY6)


def read_file(path: str, direction: str = "src") -> list[Rule]:
    """Read and parse a blocklist file into rules; see read_file_keys()."""
    keys = read_file_keys(path, direction)
    return [rule_from_key(k) for k in keys]


def read_file_keys(path: str, direction: str = "src") -> list[int]:
    """Read and parse a blocklist file; ``-`` reads standard input.

    The file is decoded as UTF-8 (a leading BOM is skipped). Bytes that are not UTF-8
    are tolerated inside comments; elsewhere the line is reported as not valid UTF-8.
    Errors name the file as given, or ``<stdin>``.

    Raises OSError with the errno of the failure (e.g. FileNotFoundError) if the file
    cannot be opened or read, and BlocklistFileError/ValueError as parse_lines() does.
    """
    check_direction(direction)
    label = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            if sys.stdin is None:
                raise OSError(errno.EBADF, "standard input is closed")
            stdin = getattr(sys.stdin, "buffer", None)  # None if replaced by a text stream
            data = stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise OSError(e.errno, f"cannot read blocklist file {label}: {e.strerror or e}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return parse_bytes_keys(data, label, direction)


# --- diffing ----------------------------------------------------------------------------


def diff(current: Iterable[Rule], wanted: Iterable[Rule]) -> tuple[list[Rule], list[Rule]]:
    """Return ``(to_add, to_delete)`` turning ``current`` into ``wanted``, each sorted.

    The caller must apply every add before any delete: when a network is replaced by one
    that covers it (a /24 by its /16) no packet from it then slips through in between.
    The maps need room for both sets during the switch.
    Raises ValueError for a rule whose direction is not "src" or "dst".
    """
    cur = {_rule_key(r): r for r in current}
    want = {_rule_key(r): r for r in wanted}
    to_add = [want[k] for k in sorted(want.keys() - cur.keys())]
    to_delete = [cur[k] for k in sorted(cur.keys() - want.keys())]
    return to_add, to_delete
