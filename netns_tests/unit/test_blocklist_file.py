"""Tests of blocklist parsing, validation and diffing.

Pure Python, no kernel: every expected value here is computed independently of
xdpflow.rules.blockfile, from ipaddress or written out by hand.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import pickle
import random
import re
import sys
import time
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from xdpflow.rules import blockfile as bf
from xdpflow.rules.blockfile import (
    BlocklistFileError,
    Rule,
    diff,
    parse_cidr,
    parse_lines,
    read_file,
    sort_rules,
)

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "xdpflow.h"


def v4(text: str, direction: str = "src") -> Rule:
    return Rule(IPv4Network(text), direction)


def v6(text: str, direction: str = "src") -> Rule:
    return Rule(IPv6Network(text), direction)


# --- parse_cidr -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1.2.3.4", IPv4Network("1.2.3.4/32")),
        ("1.2.3.0/24", IPv4Network("1.2.3.0/24")),
        ("192.0.2.1/32", IPv4Network("192.0.2.1/32")),
        ("10.0.0.0/8", IPv4Network("10.0.0.0/8")),
        ("0.0.0.0/0", IPv4Network("0.0.0.0/0")),
        ("255.255.255.255", IPv4Network("255.255.255.255/32")),
        ("2001:db8::/32", IPv6Network("2001:db8::/32")),
        ("2001:db8::1", IPv6Network("2001:db8::1/128")),
        ("2001:DB8:0:0::/64", IPv6Network("2001:db8::/64")),
        ("::/0", IPv6Network("::/0")),
        ("::", IPv6Network("::/128")),
        ("::ffff:192.0.2.1", IPv6Network("::ffff:c000:201/128")),
        ("::ffff:192.0.2.0/120", IPv6Network("::ffff:c000:200/120")),
        ("  \t198.51.100.0/24 \r\n", IPv4Network("198.51.100.0/24")),
        (" 2001:db8::/48\n", IPv6Network("2001:db8::/48")),
    ],
)
def test_parse_cidr_accepts(text: str, expected: IPv4Network | IPv6Network) -> None:
    got = parse_cidr(text)
    assert got == expected
    assert type(got) is type(expected)
    assert str(got) == str(expected)


def test_parse_cidr_ipv4_mapped_stays_ipv6() -> None:
    net = parse_cidr("::ffff:1.2.3.4")
    assert isinstance(net, IPv6Network)
    assert net.prefixlen == 128


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("192.0.2.1/24", "192.0.2.0/24"),
        ("198.51.100.128/0", "0.0.0.0/0"),
        ("203.0.113.7/31", "203.0.113.6/31"),
        ("2001:db8::1/32", "2001:db8::/32"),
        ("2001:DB8:1:2::/32", "2001:db8::/32"),
        ("::1/0", "::/0"),
    ],
)
def test_parse_cidr_host_bits(text: str, canonical: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_cidr(text)
    assert str(exc.value) == f"{text!r} has host bits set; did you mean {canonical}?"


def test_parse_cidr_host_bits_message_from_the_brief() -> None:
    with pytest.raises(ValueError, match=r"^'10\.1\.2\.3/8' has host bits set; did you mean 10\.0\.0\.0/8\?$"):
        parse_cidr("10.1.2.3/8")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty address"),
        ("   ", "empty address"),
        ("foo", "is not an IPv4 or IPv6 address or CIDR"),
        ("example.com", "is not an IPv4 or IPv6 address or CIDR"),
        ("0x01020304", "is not an IPv4 or IPv6 address or CIDR"),
        ("16909060", "is not an IPv4 or IPv6 address or CIDR"),
        ("/24", "is not an IPv4 or IPv6 address or CIDR"),
        ("1.2.3", "is not an IPv4 or IPv6 address or CIDR: expected 4 octets"),
        ("1.2.3.4.5", "is not an IPv4 or IPv6 address or CIDR: expected 4 octets"),
        ("1.2..4", "is not an IPv4 or IPv6 address or CIDR: empty octet not permitted"),
        ("256.1.1.1", "is not an IPv4 or IPv6 address or CIDR: octet 256 (> 255) not permitted"),
        ("1.2.3.999", "is not an IPv4 or IPv6 address or CIDR: octet 999 (> 255) not permitted"),
        ("01.2.3.4", "is not an IPv4 or IPv6 address or CIDR: leading zeros are not permitted"),
        ("1.2.3.04", "is not an IPv4 or IPv6 address or CIDR: leading zeros are not permitted"),
        ("1.2.3.00/32", "is not an IPv4 or IPv6 address or CIDR: leading zeros are not permitted"),
        ("1.2.3.4a", "is not an IPv4 or IPv6 address or CIDR"),
        ("\u0661.2.3.4", "is not an IPv4 or IPv6 address or CIDR"),  # Arabic-Indic digit
        ("1.2.3.4\x00", "is not an IPv4 or IPv6 address or CIDR"),
        ("1.2.3.4/33", "prefix length must be a decimal number from 0 to 32"),
        ("1.2.3.4/-1", "prefix length must be a decimal number from 0 to 32"),
        ("1.2.3.4/", "prefix length must be a decimal number from 0 to 32"),
        ("1.2.3.0/024", "prefix length must be a decimal number from 0 to 32"),
        ("1.2.3.0/+24", "prefix length must be a decimal number from 0 to 32"),
        ("1.2.3.0/ 24", "prefix length must be a decimal number from 0 to 32"),
        ("1.2.3.0/255.255.255.0", "prefix length must be a decimal number from 0 to 32"),
        ("1.2.3.4/32/32", "prefix length must be a decimal number from 0 to 32"),
        ("1.2.3.4 /32", "is not an IPv4 or IPv6 address or CIDR"),
        ("1.2.3.4 5.6.7.8", "is not an IPv4 or IPv6 address or CIDR"),
        ("::/129", "prefix length must be a decimal number from 0 to 128"),
        ("2001:db8::/032", "prefix length must be a decimal number from 0 to 128"),
        ("1::2::3", "is not an IPv4 or IPv6 address or CIDR"),
        ("12345::", "is not an IPv4 or IPv6 address or CIDR"),
        ("2001:db8:::1", "is not an IPv4 or IPv6 address or CIDR"),
        ("::ffff:01.2.3.4", "is not an IPv4 or IPv6 address or CIDR"),
        ("g::1", "is not an IPv4 or IPv6 address or CIDR"),
        ("fe80::1%eth0", "IPv6 zone index (%...) is not allowed"),
        ("fe80::1%eth0/128", "IPv6 zone index (%...) is not allowed"),
        ('{"cidr":"198.51.100.0/24","sblid":"SBL1"}', "JSON is not supported"),
    ],
)
def test_parse_cidr_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_cidr(text)
    assert reason in str(exc.value)
    # the token as given (surrounding whitespace aside) is quoted whole, first
    if text.strip():
        assert str(exc.value).startswith(repr(text.strip())), str(exc.value)


def _random_cidr_text(rnd: random.Random) -> str:
    """Random, mostly almost-valid text: real addresses with random damage."""
    if rnd.random() < 0.5:
        addr = str(ipaddress.IPv4Address(rnd.getrandbits(32)))
        maxlen = 32
    else:
        addr = str(ipaddress.IPv6Address(rnd.getrandbits(128) & ~((1 << rnd.randrange(0, 129)) - 1)))
        maxlen = 128
    text = addr if rnd.random() < 0.3 else f"{addr}/{rnd.randrange(0, maxlen + 3)}"
    for _ in range(rnd.choice((0, 0, 1, 2))):
        i = rnd.randrange(len(text) + 1)
        op = rnd.randrange(3)
        if op == 0:
            text = text[:i] + rnd.choice("0123456789.:/abcfx% ") + text[i:]
        elif op == 1:
            text = text[:i] + text[i + 1 :]
        else:
            text = text[:i] + rnd.choice("0.:/") + text[i + 1 :]
    return text


def test_parse_cidr_agrees_with_ipaddress() -> None:
    """Anything accepted is exactly ipaddress's strict reading; anything ipaddress
    accepts in plain prefix notation is accepted too."""
    rnd = random.Random(20240501)
    accepted = rejected = 0
    for _ in range(20000):
        text = _random_cidr_text(rnd).strip()
        try:
            ref = ipaddress.ip_network(text, strict=True)
        except ValueError:
            ref = None
        try:
            got = parse_cidr(text)
        except ValueError:
            got = None
        _, slash, plen = text.partition("/")
        plain = not slash or (plen.isascii() and plen.isdigit() and (plen == "0" or plen[0] != "0"))
        if got is not None:
            accepted += 1
            assert ref is not None, text
            assert got == ref and type(got) is type(ref), text
        else:
            rejected += 1
            assert ref is None or not plain or "%" in text, text
    assert accepted > 5000 and rejected > 5000


# --- Rule -------------------------------------------------------------------------------


def test_rule_is_hashable_and_compares_by_value() -> None:
    a = Rule(IPv4Network("198.51.100.0/24"), "src")
    b = Rule(ipaddress.ip_network("198.51.100.0/24"), "src")
    assert a == b and hash(a) == hash(b)
    assert a != Rule(IPv4Network("198.51.100.0/24"), "dst")
    assert len({a, b, v4("198.51.100.0/24", "dst")}) == 2
    assert a.net is a[0] and a.direction == "src"
    assert str(a) == "src 198.51.100.0/24"


def test_rule_sorts_by_version_address_prefixlen_direction() -> None:
    expected = [
        v4("0.0.0.0/0"),
        v4("10.0.0.0/8", "src"),
        v4("10.0.0.0/8", "dst"),
        v4("10.0.0.0/16"),
        v4("10.0.0.1/32"),
        v4("198.51.100.0/24", "src"),
        v4("198.51.100.0/24", "dst"),
        v4("255.255.255.255/32"),
        v6("::/0"),
        v6("::1/128"),
        v6("2001:db8::/32", "src"),
        v6("2001:db8::/32", "dst"),
        v6("2001:db8::/48"),
        v6("2001:db8:1::/48"),
    ]
    rnd = random.Random(7)
    for _ in range(20):
        shuffled = expected[:]
        rnd.shuffle(shuffled)
        assert sorted(shuffled) == expected
        assert sort_rules(shuffled) == expected
    assert v4("10.0.0.0/8") < v6("::/0")
    assert v6("::/0") > v4("255.255.255.255/32")
    assert v4("10.0.0.0/8") <= v4("10.0.0.0/8") and v4("10.0.0.0/8") >= v4("10.0.0.0/8")


def test_sort_rules_keeps_duplicates() -> None:
    r = v4("192.0.2.0/24")
    assert sort_rules([r, v4("10.0.0.0/8"), r]) == [v4("10.0.0.0/8"), r, r]


def test_rule_ordering_rejects_bad_direction_and_foreign_types() -> None:
    with pytest.raises(ValueError, match="direction"):
        sorted([v4("10.0.0.0/8", "up"), v4("10.0.0.0/8")])
    with pytest.raises(TypeError):
        _ = v4("10.0.0.0/8") < 5  # noqa: B015


# --- BlocklistFileError -----------------------------------------------------------------


def test_blocklist_file_error_fields_and_str() -> None:
    e = BlocklistFileError("feeds/drop.txt", 7, "10.1.2.3/8 ; SBL1", "10.1.2.3/8 has host bits set")
    assert isinstance(e, ValueError)
    assert (e.path, e.lineno, e.line) == ("feeds/drop.txt", 7, "10.1.2.3/8 ; SBL1")
    assert e.reason == "10.1.2.3/8 has host bits set"
    assert str(e) == "feeds/drop.txt:7: 10.1.2.3/8 has host bits set: '10.1.2.3/8 ; SBL1'"
    assert e.errors == [e]
    copy = pickle.loads(pickle.dumps(e))
    assert str(copy) == str(e)


# --- parse_lines ------------------------------------------------------------------------


def test_parse_lines_comments_blank_lines_and_whitespace() -> None:
    lines = [
        "# a comment line\n",
        "; another style\n",
        "\n",
        "   \t \n",
        "192.0.2.0/24   # trailing hash comment\n",
        "198.51.100.7;trailing semicolon\n",
        "\t203.0.113.0/25\t\n",
        "2001:db8::/32 # v6 with comment\n",
        "2001:db8:ffff::1;x\n",
        "#198.18.0.0/15 commented out\n",
        "  ; 198.18.0.0/15 commented out too\n",
        "198.18.0.0/15#no space\n",
        "",
    ]
    assert parse_lines(lines) == [
        v4("192.0.2.0/24"),
        v4("198.18.0.0/15"),
        v4("198.51.100.7/32"),
        v4("203.0.113.0/25"),
        v6("2001:db8::/32"),
        v6("2001:db8:ffff::1/128"),
    ]


SPAMHAUS_DROP = """\
; Spamhaus DROP List 2024/05/01 - (c) 2024 The Spamhaus Project SLU
; https://www.spamhaus.org/drop/drop.txt
; Last-Modified: Wed, 01 May 2024 09:56:20 GMT
; Expires: Wed, 01 May 2024 11:02:51 GMT
1.10.16.0/20 ; SBL256894
198.18.0.0/15 ; SBL000001
198.51.100.0/24 ; SBL000002
203.0.113.0/24 ; SBL000003
"""

SPAMHAUS_DROPV6 = """\
; Spamhaus DROPv6 List 2024/05/01 - (c) 2024 The Spamhaus Project SLU
; https://www.spamhaus.org/drop/dropv6.txt
2001:db8::/32 ; SBL000004
2001:2::/48 ; SBL000005
"""

FIREHOL_NETSET = """\
#
# firehol_level1
#
# ipv4 hash:net ipset
#
# A firewall blacklist composed from IP lists, providing
# maximum protection with minimum false positives.
#
# Source URL: https://iplists.firehol.org/
#
# Source File Date: Wed May  1 10:00:00 UTC 2024
# This File Date  : Wed May  1 10:05:00 UTC 2024
# Update Frequency: 1 min
# Aggregation     : none
# Entries         : 4 subnets, 131331 unique IPs
#
# Generated by FireHOL's update-ipsets.sh
#
0.0.0.0/8
192.0.2.1
198.18.0.0/15
203.0.113.128/25
"""


def test_parse_lines_spamhaus_drop() -> None:
    assert parse_lines(SPAMHAUS_DROP.splitlines(keepends=True), "drop.txt") == [
        v4("1.10.16.0/20"),
        v4("198.18.0.0/15"),
        v4("198.51.100.0/24"),
        v4("203.0.113.0/24"),
    ]
    assert parse_lines(SPAMHAUS_DROPV6.splitlines(), "dropv6.txt", "dst") == [
        v6("2001:2::/48", "dst"),
        v6("2001:db8::/32", "dst"),
    ]


def test_parse_lines_firehol_netset() -> None:
    assert parse_lines(FIREHOL_NETSET.splitlines(keepends=True)) == [
        v4("0.0.0.0/8"),
        v4("192.0.2.1/32"),
        v4("198.18.0.0/15"),
        v4("203.0.113.128/25"),
    ]


def test_parse_lines_crlf() -> None:
    text = "# windows\r\n192.0.2.0/24\r\n\r\n2001:db8::/32 ; x\r\n198.51.100.1\r\n"
    assert parse_lines(text.splitlines(keepends=True)) == [
        v4("192.0.2.0/24"),
        v4("198.51.100.1/32"),
        v6("2001:db8::/32"),
    ]


def test_parse_lines_bad_crlf_line_is_reported_without_line_ending() -> None:
    with pytest.raises(BlocklistFileError) as exc:
        parse_lines(["192.0.2.0/24\r\n", "192.0.2.1/24\r\n"], "win.txt")
    assert exc.value.line == "192.0.2.1/24"
    assert str(exc.value) == ("win.txt:2: '192.0.2.1/24' has host bits set; did you mean 192.0.2.0/24?: '192.0.2.1/24'")


def test_parse_lines_empty_inputs() -> None:
    assert parse_lines([]) == []
    assert parse_lines(["\n", "# only comments\n", "; and these\n", "   \n"]) == []
    assert parse_lines(iter(())) == []


def test_parse_lines_duplicates_are_merged() -> None:
    lines = [
        "10.0.0.0/8",
        "10.0.0.0/8 # again",
        "192.0.2.1",
        "192.0.2.1/32",
        " 192.0.2.1 ",
        "2001:db8::1",
        "2001:DB8:0::1/128",
        "2001:0db8:0000:0000:0000:0000:0000:0001",
        "::ffff:192.0.2.1",
    ]
    assert parse_lines(lines) == [
        v4("10.0.0.0/8"),
        v4("192.0.2.1/32"),
        v6("::ffff:c000:201/128"),
        v6("2001:db8::1/128"),
    ]


def test_parse_lines_keeps_overlapping_networks() -> None:
    assert parse_lines(["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3"]) == [
        v4("10.0.0.0/8"),
        v4("10.1.0.0/16"),
        v4("10.1.2.3/32"),
    ]


def test_parse_lines_direction() -> None:
    assert parse_lines(["192.0.2.0/24", "2001:db8::/32"], direction="dst") == [
        v4("192.0.2.0/24", "dst"),
        v6("2001:db8::/32", "dst"),
    ]
    with pytest.raises(ValueError, match="direction must be 'src' or 'dst'") as exc:
        parse_lines(["192.0.2.0/24"], direction="both")
    assert not isinstance(exc.value, BlocklistFileError)


def test_parse_lines_reports_first_bad_line_and_lists_all() -> None:
    lines = [
        "# feed\n",
        "192.0.2.0/24\n",
        "10.1.2.3/8 ; SBL9\n",
        "198.51.100.0/24\n",
        "not-an-address\n",
        "\n",
        "256.0.0.0/8\n",
        "2001:db8::1/32\n",
        "203.0.113.0/24\n",
    ]
    with pytest.raises(BlocklistFileError) as exc:
        parse_lines(lines, "feeds/bad.txt")
    first = exc.value
    assert (first.path, first.lineno, first.line) == ("feeds/bad.txt", 3, "10.1.2.3/8 ; SBL9")
    assert first.reason == "'10.1.2.3/8' has host bits set; did you mean 10.0.0.0/8?"
    assert str(first) == (
        "feeds/bad.txt:3: '10.1.2.3/8' has host bits set; did you mean 10.0.0.0/8?: '10.1.2.3/8 ; SBL9'"
    )
    assert [e.lineno for e in first.errors] == [3, 5, 7, 8]
    assert [e.line for e in first.errors] == [
        "10.1.2.3/8 ; SBL9",
        "not-an-address",
        "256.0.0.0/8",
        "2001:db8::1/32",
    ]
    assert first.errors[0] is first
    assert all(e.path == "feeds/bad.txt" for e in first.errors)
    assert first.errors[1].reason == "'not-an-address' is not an IPv4 or IPv6 address or CIDR"
    assert first.errors[2].reason == (
        "'256.0.0.0/8' is not an IPv4 or IPv6 address or CIDR: octet 256 (> 255) not permitted"
    )
    assert first.errors[3].reason == "'2001:db8::1/32' has host bits set; did you mean 2001:db8::/32?"


def test_parse_lines_every_line_bad() -> None:
    lines = [f"junk{i}" for i in range(1000)]
    with pytest.raises(BlocklistFileError) as exc:
        parse_lines(lines)
    assert exc.value.lineno == 1
    assert [e.lineno for e in exc.value.errors] == list(range(1, 1001))


def test_parse_lines_json_gets_a_hint() -> None:
    with pytest.raises(BlocklistFileError, match="JSON is not supported"):
        parse_lines(['{"cidr":"198.51.100.0/24","sblid":"SBL000002","rir":"ripencc"}'])


def _random_feed(rnd: random.Random, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        r = rnd.random()
        if r < 0.45:
            lines.append(str(IPv4Network((rnd.getrandbits(24) << 8, 24))))
        elif r < 0.75:
            lines.append(str(ipaddress.IPv4Address(rnd.getrandbits(32))))
        elif r < 0.85:
            plen = rnd.randrange(0, 33)
            lines.append(str(IPv4Network((rnd.getrandbits(32) & ~((1 << (32 - plen)) - 1), plen))))
        elif r < 0.95:
            lines.append(str(IPv6Network(((0x20010DB8 << 96) | (rnd.getrandbits(16) << 80), 48))))
        else:
            plen = rnd.randrange(0, 129)
            lines.append(str(IPv6Network((rnd.getrandbits(128) & ~((1 << (128 - plen)) - 1), plen))))
        if rnd.random() < 0.1:
            lines[-1] += rnd.choice((" ; SBL1", "  # note", "\r"))
    return lines


def _reference_parse(lines: list[str], direction: str = "src") -> list[Rule]:
    rules = set()
    for line in lines:
        text = re.split("[#;]", line, maxsplit=1)[0].strip()
        if text:
            rules.add(Rule(ipaddress.ip_network(text), direction))
    return sorted(rules, key=lambda r: (r.net.version, int(r.net.network_address), r.net.prefixlen))


def test_parse_lines_matches_reference() -> None:
    lines = _random_feed(random.Random(99), 5000)
    got = parse_lines(lines)
    want = _reference_parse(lines)
    assert got == want
    assert [type(r.net) for r in got] == [type(r.net) for r in want]
    assert [str(r.net) for r in got] == [str(r.net) for r in want]


def test_parse_lines_same_result_without_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _random_feed(random.Random(5), 3000) + ["01.2.3.4", "192.0.2.1/24", "::1/129", "fe80::1%lo"]
    with pytest.raises(BlocklistFileError) as fast:
        parse_lines(lines)
    good = lines[:-4]
    fast_rules = parse_lines(good)
    monkeypatch.setattr(bf, "_v4_int", bf._v4_int_pure)
    monkeypatch.setattr(bf, "_v6_int", bf._v6_int_pure)
    monkeypatch.setattr(bf, "_net4", bf._net4_public)
    with pytest.raises(BlocklistFileError) as slow:
        parse_lines(lines)
    assert [str(e) for e in slow.value.errors] == [str(e) for e in fast.value.errors]
    slow_rules = parse_lines(good)
    assert slow_rules == fast_rules
    assert [vars(r.net).keys() for r in slow_rules] == [vars(r.net).keys() for r in fast_rules]


# --- fast paths -------------------------------------------------------------------------


def test_fast_paths_are_enabled_here() -> None:
    # if a Python or libc update disables them, parsing still works, only slower
    assert bf._PTON_OK, "inet_pton disagrees with ipaddress; parsing falls back to the slow path"
    assert bf._INTERNALS_OK, "ipaddress internals changed; IPv4Network objects are built the slow way"
    assert bf._net4 is bf._net4_fast


def test_inet_pton_agrees_with_ipaddress_on_damaged_addresses() -> None:
    rnd = random.Random(3)
    for _ in range(20000):
        text = _random_cidr_text(rnd).partition("/")[0]
        assert bf._v4_int_pton(text) == bf._v4_int_pure(text), text
        assert bf._v6_int_pton(text) == bf._v6_int_pure(text), text


def test_net4_fast_builds_the_same_objects() -> None:
    rnd = random.Random(11)
    cases = [(0, 0), (0xFFFFFFFF, 32), (0xC0000202, 31), (0xC0000201, 32)]
    for _ in range(2000):
        plen = rnd.randrange(0, 33)
        cases.append((rnd.getrandbits(32) & ~((1 << (32 - plen)) - 1), plen))
    for value, plen in cases:
        fast = bf._net4_fast(value, plen)
        ref = IPv4Network((value, plen))
        assert fast == ref and hash(fast) == hash(ref) and repr(fast) == repr(ref)
        assert vars(fast).keys() == vars(ref).keys()
        assert fast.network_address == ref.network_address and fast.netmask is ref.netmask
        assert fast.prefixlen == plen and fast.with_netmask == ref.with_netmask
        if plen >= 30:
            assert list(fast.hosts()) == list(ref.hosts())
        assert fast.overlaps(ref) and ref.subnet_of(fast) and fast.supernet_of(ref)
        assert bf.rule_key(Rule(fast, "dst")) == bf.rule_key(Rule(ref, "dst"))


# --- read_file --------------------------------------------------------------------------


def test_read_file(tmp_path: Path) -> None:
    path = tmp_path / "drop.txt"
    path.write_text(SPAMHAUS_DROP)
    assert read_file(str(path), "dst") == [
        v4("1.10.16.0/20", "dst"),
        v4("198.18.0.0/15", "dst"),
        v4("198.51.100.0/24", "dst"),
        v4("203.0.113.0/24", "dst"),
    ]


def test_read_file_crlf_bom_and_no_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "win.txt"
    path.write_bytes(b"\xef\xbb\xbf# exported\r\n192.0.2.0/24\r\n2001:db8::/32")
    assert read_file(str(path)) == [v4("192.0.2.0/24"), v6("2001:db8::/32")]


def test_read_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    assert read_file(str(path)) == []


def test_read_file_error_names_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.netset"
    path.write_text("192.0.2.0/24\n\n198.51.100.1/24\n")
    with pytest.raises(BlocklistFileError) as exc:
        read_file(str(path))
    assert exc.value.path == str(path)
    assert exc.value.lineno == 3
    assert str(exc.value).startswith(f"{path}:3: '198.51.100.1/24' has host bits set")


def test_read_file_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"192.0.2.0/24 # caf\xe9 owner\n198.51.100.\xff/24\n203.0.113.0/24\n")
    with pytest.raises(BlocklistFileError) as exc:
        read_file(str(path))
    assert [e.lineno for e in exc.value.errors] == [2]
    assert exc.value.reason == "line is not valid UTF-8"
    # a bad byte inside a comment is harmless
    path.write_bytes(b"192.0.2.0/24 # caf\xe9 owner\n")
    assert read_file(str(path)) == [v4("192.0.2.0/24")]


def test_read_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as exc:
        read_file(str(path))
    assert exc.value.errno == errno.ENOENT
    assert str(path) in str(exc.value)
    assert "cannot read blocklist file" in str(exc.value)


def test_read_file_directory(tmp_path: Path) -> None:
    with pytest.raises(OSError) as exc:
        read_file(str(tmp_path))
    assert exc.value.errno == errno.EISDIR
    assert str(tmp_path) in str(exc.value)


def test_read_file_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"192.0.2.0/24\r\nbogus\n")))
    with pytest.raises(BlocklistFileError) as exc:
        read_file("-")
    assert str(exc.value) == "<stdin>:2: 'bogus' is not an IPv4 or IPv6 address or CIDR: 'bogus'"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"192.0.2.0/24\n")))
    assert read_file("-", "dst") == [v4("192.0.2.0/24", "dst")]


def test_read_file_stdin_text_stream_or_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("2001:db8::/32\n"))
    assert read_file("-") == [v6("2001:db8::/32")]
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(OSError) as exc:
        read_file("-")
    assert exc.value.errno == errno.EBADF
    assert "<stdin>" in str(exc.value)


def test_read_file_bad_direction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="direction"):
        read_file(str(tmp_path / "not-even-opened"), "sideways")


# --- diff -------------------------------------------------------------------------------


def test_diff_add_and_delete() -> None:
    current = [v4("10.0.0.0/8"), v4("192.0.2.0/24"), v6("2001:db8::/32"), v4("198.51.100.0/24", "dst")]
    wanted = [v6("2001:2::/48"), v4("192.0.2.0/24"), v4("198.51.100.0/24"), v4("10.0.0.0/16")]
    to_add, to_delete = diff(current, wanted)
    assert to_add == [v4("10.0.0.0/16"), v4("198.51.100.0/24", "src"), v6("2001:2::/48")]
    assert to_delete == [v4("10.0.0.0/8"), v4("198.51.100.0/24", "dst"), v6("2001:db8::/32")]


def test_diff_treats_equal_rules_from_different_sources_as_equal() -> None:
    current = [
        Rule(ipaddress.ip_network("192.0.2.0/24"), "src"),
        Rule(IPv6Network(("2001:db8::", 32)), "dst"),
    ]
    wanted = parse_lines(["2001:db8::/32"], direction="dst") + parse_lines(["192.0.2.0/24"])
    assert diff(current, wanted) == ([], [])
    assert diff(iter(current), iter(wanted)) == ([], [])


def test_diff_edge_cases() -> None:
    rules = [v4("192.0.2.0/24"), v6("::/0")]
    assert diff([], []) == ([], [])
    assert diff([], rules) == (rules, [])
    assert diff(rules, []) == ([], rules)
    assert diff(rules + rules, rules) == ([], [])
    with pytest.raises(ValueError, match="direction"):
        diff([v4("192.0.2.0/24", "in")], [])


def test_diff_large_matches_set_arithmetic() -> None:
    rnd = random.Random(1)
    lines = _random_feed(rnd, 4000)
    universe = parse_lines(lines) + parse_lines(lines, direction="dst")
    current = rnd.sample(universe, 3000)
    wanted = rnd.sample(universe, 3000)
    to_add, to_delete = diff(current, wanted)
    assert set(to_add) == set(wanted) - set(current)
    assert set(to_delete) == set(current) - set(wanted)
    assert to_add == sorted(to_add) and to_delete == sorted(to_delete)


# --- speed ------------------------------------------------------------------------------


def _big_feed(path: Path, n: int) -> None:
    rnd = random.Random(100_000)
    out = ["; big generated feed", "# random prefixes; never sent anywhere", ""]
    for i in range(n):
        r = rnd.random()
        if r < 0.55:
            a = rnd.getrandbits(24) << 8
            out.append(f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.0/24")
        elif r < 0.85:
            a = rnd.getrandbits(32)
            out.append(f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}")
        elif r < 0.9:
            a = 0xC6120000 | rnd.getrandbits(17)  # 198.18.0.0/15
            out.append(f"198.{18 + (a >> 16 & 1)}.{a >> 8 & 255}.{a & 255}")
        else:
            out.append(f"2001:db8:{rnd.getrandbits(16):x}::/48")
        if i % 10 == 0:
            out[-1] += f" ; SBL{i}"
    path.write_text("\n".join(out) + "\n")


def test_100k_rules(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    _big_feed(path, 100_000)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    wanted = read_file(str(path))
    cpu1, wall1 = time.process_time(), time.perf_counter()
    current = parse_lines([str(r.net) for r in wanted[::3]]) + parse_lines(["192.0.2.0/24"])
    cpu2, wall2 = time.process_time(), time.perf_counter()
    to_add, to_delete = diff(current, wanted)
    cpu3, wall3 = time.process_time(), time.perf_counter()
    cpu = (cpu1 - cpu0) + (cpu3 - cpu2)
    wall = (wall1 - wall0) + (wall3 - wall2)
    print(
        f"\n100k-line feed, {len(wanted)} rules, CPU ms: read+parse {1e3 * (cpu1 - cpu0):.0f}, "
        f"diff vs {len(current)} {1e3 * (cpu3 - cpu2):.0f}; total {1e3 * cpu:.0f} (wall {1e3 * wall:.0f})"
    )
    assert len(wanted) > 95_000
    assert len(to_add) == len(wanted) - len(current) + 1 and to_delete == [v4("192.0.2.0/24")]
    # speed is measured by `make bench` (block sync of 100k prefixes), not asserted here:
    # a shared machine makes wall-clock assertions flaky
