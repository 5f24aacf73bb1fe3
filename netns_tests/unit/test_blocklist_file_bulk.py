"""The bulk path of blocklist files (rules/bulk4.py through
blockfile.parse_bytes_keys, what read_file_keys uses) against the per-line
parser: the same keys and the same errors, line for line, on hand-written
near misses and on seeded random text.

Pure Python and numpy, no kernel.
"""

from __future__ import annotations

import random

import pytest

from xdpflow.rules.blockfile import BlocklistFileError, parse_bytes_keys, parse_keys


def outcome(parse: object) -> tuple[str, object]:
    try:
        return "keys", parse()  # type: ignore[operator]
    except BlocklistFileError as e:
        return "errors", [(x.lineno, x.line, x.reason) for x in e.errors]


def both(data: bytes, direction: str = "src") -> tuple[tuple[str, object], tuple[str, object]]:
    text = data.decode("utf-8", "surrogateescape")
    return (
        outcome(lambda: parse_keys(text.split("\n"), "f", direction)),
        outcome(lambda: parse_bytes_keys(data, "f", direction)),
    )


NEAR_MISSES = [
    "192.0.2.0/24",
    "192.0.2.1",
    "0.0.0.0/0",
    "255.255.255.255/32",
    "  10.0.0.0/8\t; comment",
    "10.0.0.0/8#c;d",
    "10.0.0.0/8\r",
    "10.0.0.1/8",  # host bits
    "01.2.3.4",
    "1.2.3.04/32",
    "1.2.3.4/032",
    "1.2.3.4/00",
    "1.2.3.0/0",
    "0.0.0.0/00",
    "256.1.1.1",
    "1.2.3",
    "1.2.3.4.5",
    "1.2.3.4/",
    "1.2.3.4//24",
    "1.2.3.4/24/1",
    "1.2.3/4.5",
    "1..2.3",
    ".1.2.3.4",
    "1.2.3.4/33",
    "1.2.3.4/100",
    "1.2.3.4 5.6.7.8",
    "\x0c1.2.3.4\x0b",
    "\x1c1.2.3.4",
    "\xa01.2.3.4",
    "1.2.3.4\x85",
    "1.2.3.4\x00",
    "2001:db8::/32",
    "2001:db8::g/64",
    "::ffff:1.2.3.4",
    "fe80::1%eth0",
    "",
    "   ",
    "# only a comment",
    ";",
    "1234567890123456789",
    "255.255.255.255/320",
]


@pytest.mark.parametrize("line", NEAR_MISSES)
@pytest.mark.parametrize("direction", ["src", "dst"])
def test_each_near_miss_reads_as_the_per_line_parser_reads_it(line: str, direction: str) -> None:
    data = f"# head\n{line}\n198.51.100.0/24\n".encode("utf-8", "surrogateescape")
    line_by_line, bulk = both(data, direction)
    assert bulk == line_by_line


def test_bytes_that_are_not_utf8_read_the_same() -> None:
    data = b"\xef\xbb\xbf1.2.3.4\n# caf\xe9\n5.6.7.0/24 ; \xff\n\xff1.2.3.4\n1.2.3.4\xfe\n"
    line_by_line, bulk = both(data)
    assert bulk == line_by_line
    assert bulk[0] == "errors"


def test_random_text_reads_the_same() -> None:
    rnd = random.Random(20261205)
    atoms = ["0", "1", "9", "10", "01", "00", "255", "256", "099", "199", "250", "300", "", "32", "33", "0x1"]

    def token() -> str:
        r = rnd.random()
        if r < 0.45:
            t = ".".join(rnd.choice(atoms) for _ in range(rnd.choice([3, 4, 4, 4, 5])))
            return t + ("/" + rnd.choice(atoms) if rnd.random() < 0.6 else "")
        if r < 0.75:
            octets = ".".join(str(rnd.getrandbits(8)) for _ in range(4))
            return f"{octets}/{rnd.randint(0, 33)}"
        if r < 0.85:
            return rnd.choice(["2001:db8::/32", "::1", "2001:db8::g/64", "1.2.3.4::"])
        return "".join(rnd.choice("0123456789./: \t#;\r\x00\xe9") for _ in range(rnd.randint(0, 20)))

    for _ in range(600):
        lines = [
            rnd.choice(["", " ", "\t", "\x0c", "\x1c"]) + token() + rnd.choice(["", " ", "\r", " ; c", "#x", "\x85"])
            for _ in range(rnd.randint(0, 10))
        ]
        data = ("\n".join(lines) + rnd.choice(["", "\n", "\r\n"])).encode("utf-8", "surrogateescape")
        line_by_line, bulk = both(data, rnd.choice(["src", "dst"]))
        assert bulk == line_by_line, data


def test_a_feed_sized_file_reads_the_same() -> None:
    rnd = random.Random(5)
    lines = ["# a feed"]
    for _ in range(20000):
        r = rnd.random()
        if r < 0.6:
            net = ".".join(str(rnd.getrandbits(8)) for _ in range(3))
            lines.append(f"{net}.0/24 ; SBL{rnd.getrandbits(16)}")
        elif r < 0.9:
            lines.append(".".join(str(rnd.getrandbits(8)) for _ in range(4)))
        else:
            lines.append(f"2001:db8:{rnd.getrandbits(16):x}::/48")
    data = ("\n".join(lines) + "\n").encode()
    line_by_line, bulk = both(data)
    assert line_by_line[0] == "keys"
    assert bulk == line_by_line
