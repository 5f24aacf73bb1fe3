"""Multi-field rules: the model, its one grammar, and validation.

Pure: text in, ``RuleSpec`` objects out; nothing here touches the kernel.
``compile.py`` turns a rule set into lookup tables, ``dataplane/rules.py``
writes them.

A rule is written as words that mirror the ``rule add`` flags, action first::

    drop proto=udp sport=123 dst=203.0.113.5 ttl=1h # NTP reflection

The CLI builds the same ``{word: text}`` dict from its flags and calls
``from_fields()``, so both paths share every check. ``RuleSpec.words()``
writes a rule back in this grammar (canonical: the kernel's rule store keeps
it, and ``rule sync`` compares rules by it).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network, ip_network

ACTIONS = ("pass", "drop", "monitor", "rate-limit")
# first match wins, lowest first; the blocklist sits at BLOCKLIST_PRIORITY:
# rules below it are judged before it (a pass rule there exempts a listed
# host), the rest after it
BLOCKLIST_PRIORITY = 1000
# automatic mitigation (the daemon's [[protect]] groups) installs its rules at
# MITIGATION_PRIORITY, and the allowlist's exemptions from them just below:
# every operator rule below 59999 (each default one) is judged first, so a
# pass rule is never overridden
MITIGATION_PRIORITY = 60000
ALLOWLIST_PRIORITY = MITIGATION_PRIORITY - 1
DEFAULT_PRIORITY = 1000
PRIORITY_MAX = 65535
COMMENT_MAX = 200
LENGTH_MAX = 65535  # IPv6 lengths above it (jumbograms) count as 65535
RATE_MAX = 10**12

FIELDS = (
    "src",
    "dst",
    "proto",
    "sport",
    "dport",
    "icmp-type",
    "tcp-flags",
    "length",
    "iface",
    "pps",
    "bps",
    "priority",
    "ttl",
)

PROTO_NAMES = {
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "icmpv6": 58,
    "ipv6-icmp": 58,
    "sctp": 132,
}
_PROTO_TEXT = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 51: "ah", 58: "icmpv6", 132: "sctp"}
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58

TCP_FLAGS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20, "ECE": 0x40, "CWR": 0x80}

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE = re.compile(r"^(\d+)([kKMG]?)$")
_RATE_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}

Net = IPv4Network | IPv6Network


class RuleError(ValueError):
    """A rule that cannot be right; ``str()`` is one sentence."""


class RulesFileError(ValueError):
    """A bad line of a rules file: ``path:line: reason: 'text'``."""

    def __init__(self, path: str, lineno: int, line: str, reason: str) -> None:
        super().__init__(path, lineno, line, reason)
        self.path, self.lineno, self.line, self.reason = path, lineno, line, reason

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.reason}: {self.line!r}"


@dataclass(frozen=True)
class RuleSpec:
    """One rule. Ranges are inclusive (lo, hi); ``icmp_type`` is (type,
    code or None); ``tcp_flags`` is (mask, value). ``id`` is None until the
    rule set gives it one; ``expires_at`` is Unix seconds."""

    action: str
    priority: int = DEFAULT_PRIORITY
    src: Net | None = None
    dst: Net | None = None
    proto: int | None = None
    sport: tuple[int, int] | None = None
    dport: tuple[int, int] | None = None
    icmp_type: tuple[int, int | None] | None = None
    tcp_flags: tuple[int, int] | None = None
    length: tuple[int, int] | None = None
    iface: str | None = None
    pps: int | None = None
    bps: int | None = None
    expires_at: int | None = None
    comment: str | None = None
    id: int | None = None

    # what the rule matches -------------------------------------------------

    def protos(self) -> frozenset[int] | None:
        """The IP protocols the rule can match (None: any)."""
        if self.proto is not None:
            return frozenset((self.proto,))
        if self.tcp_flags is not None:
            return frozenset((TCP,))
        if self.sport is not None or self.dport is not None:
            return frozenset((TCP, UDP))
        if self.icmp_type is not None:
            return frozenset((ICMP, ICMPV6))
        return None

    def needs_l4(self) -> bool:
        """Whether the rule reads the L4 header (so never matches a frame
        without one: a non-first fragment, a truncated header)."""
        return any(x is not None for x in (self.sport, self.dport, self.icmp_type, self.tcp_flags))

    def sport_range(self) -> tuple[int, int] | None:
        """What the rule asks of the flow key's sport (ICMP: the type)."""
        if self.icmp_type is not None:
            return (self.icmp_type[0], self.icmp_type[0])
        return self.sport

    def dport_range(self) -> tuple[int, int] | None:
        """What the rule asks of the flow key's dport (ICMP: the code)."""
        if self.icmp_type is not None:
            code = self.icmp_type[1]
            return None if code is None else (code, code)
        return self.dport

    def family(self) -> int | None:
        net = self.src or self.dst
        return net.version if net is not None else None

    # text ------------------------------------------------------------------

    def match_words(self) -> list[str]:
        """The rule's words without ttl or comment: what it does to frames."""
        out = [self.action]
        if self.src is not None:
            out.append(f"src={self.src}")
        if self.dst is not None:
            out.append(f"dst={self.dst}")
        if self.proto is not None:
            out.append(f"proto={proto_text(self.proto)}")
        for name, r in (("sport", self.sport), ("dport", self.dport), ("length", self.length)):
            if r is not None:
                out.append(f"{name}={range_text(r)}")
        if self.icmp_type is not None:
            t, c = self.icmp_type
            out.append(f"icmp-type={t}" + ("" if c is None else f"/{c}"))
        if self.tcp_flags is not None:
            out.append(f"tcp-flags={flags_text(*self.tcp_flags)}")
        if self.iface is not None:
            out.append(f"iface={self.iface}")
        if self.pps is not None:
            out.append(f"pps={self.pps}")
        if self.bps is not None:
            out.append(f"bps={self.bps}")
        out.append(f"priority={self.priority}")
        return out

    def identity(self) -> str:
        """Two rules with the same identity are the same rule to `rule sync`
        (it keeps its id and counters)."""
        return " ".join(self.match_words())

    def line(self) -> str:
        """The rule as a rules-file line (an expiry as ``expires=UNIX``)."""
        words = self.match_words()
        if self.expires_at is not None:
            words.append(f"expires={self.expires_at}")
        if self.comment:
            words.append(f"# {self.comment}")
        return " ".join(words)

    def json(self, packets: int = 0, nbytes: int = 0, limited: int = 0) -> dict[str, object]:
        """The `rule list --json` object (absent fields null)."""

        def r(x: tuple[int, int] | None) -> str | None:
            return None if x is None else range_text(x)

        return {
            "id": self.id,
            "priority": self.priority,
            "action": self.action,
            "src": None if self.src is None else str(self.src),
            "dst": None if self.dst is None else str(self.dst),
            "proto": None if self.proto is None else proto_text(self.proto),
            "sport": r(self.sport),
            "dport": r(self.dport),
            "icmp_type": None
            if self.icmp_type is None
            else f"{self.icmp_type[0]}" + ("" if self.icmp_type[1] is None else f"/{self.icmp_type[1]}"),
            "tcp_flags": None if self.tcp_flags is None else flags_text(*self.tcp_flags),
            "length": r(self.length),
            "iface": self.iface,
            "pps": self.pps,
            "bps": self.bps,
            "expires_at": self.expires_at,
            "packets": packets,
            "bytes": nbytes,
            "limited": limited,
            "comment": self.comment,
        }

    def with_id(self, rule_id: int) -> RuleSpec:
        return replace(self, id=rule_id)


def proto_text(p: int) -> str:
    return _PROTO_TEXT.get(p, str(p))


def range_text(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def flags_text(mask: int, value: int) -> str:
    return ",".join(("" if value & bit else "!") + name for name, bit in TCP_FLAGS.items() if mask & bit)


# parsing one field ----------------------------------------------------------


def _int(text: str, what: str, lo: int, hi: int) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise RuleError(f"{what} must be a number {lo}-{hi}, not {text!r}")
    n = int(text)
    if not lo <= n <= hi:
        raise RuleError(f"{what} {n} is outside {lo}-{hi}")
    return n


def parse_range(text: str, what: str, hi: int = 65535) -> tuple[int, int]:
    """``A`` or ``A-B`` with 0 <= A <= B <= hi."""
    a, sep, b = text.partition("-")
    lo = _int(a, what, 0, hi)
    top = _int(b, what, 0, hi) if sep else lo
    if top < lo:
        raise RuleError(f"{what} range {text!r} is reversed (write {top}-{lo})")
    return lo, top


def parse_proto(text: str) -> int:
    name = text.lower()
    if name in PROTO_NAMES:
        return PROTO_NAMES[name]
    if name.isdigit():
        return _int(name, "protocol", 0, 255)
    raise RuleError(f"unknown protocol {text!r} (a name like tcp, udp, icmp, icmpv6, gre, or a number 0-255)")


def parse_flags(text: str) -> tuple[int, int]:
    """``SYN,!ACK`` -> (mask, value)."""
    mask = value = 0
    for word in text.split(","):
        name = word.strip().upper()
        neg = name.startswith("!")
        name = name.lstrip("!")
        if name not in TCP_FLAGS:
            raise RuleError(f"unknown TCP flag {word!r} (known: {', '.join(TCP_FLAGS)}, each optionally with '!')")
        bit = TCP_FLAGS[name]
        if mask & bit:
            raise RuleError(f"TCP flag {name} named twice in {text!r}")
        mask |= bit
        if not neg:
            value |= bit
    return mask, value


def parse_icmp(text: str) -> tuple[int, int | None]:
    t, sep, c = text.partition("/")
    return _int(t, "ICMP type", 0, 255), (_int(c, "ICMP code", 0, 255) if sep else None)


def parse_cidr(text: str, what: str) -> Net:
    try:
        return ip_network(text, strict=True)
    except ValueError as e:
        raise RuleError(f"{what} {text!r} is not an address or CIDR with no host bits set ({e})") from None


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``10m``, ``1h``, ``2d`` -> seconds (> 0)."""
    m = _DURATION.match(text.strip())
    if not m:
        raise RuleError(f"TTL {text!r} is not a duration like 90s, 10m, 1h or 2d")
    secs = int(m.group(1)) * _UNITS[m.group(2)]
    if secs <= 0:
        raise RuleError(f"TTL {text!r} is not in the future")
    return secs


def parse_rate(text: str, what: str) -> int:
    m = _RATE.match(text.strip())
    if not m:
        raise RuleError(f"{what} {text!r} is not a positive number (k, M and G suffixes allowed)")
    n = int(m.group(1)) * _RATE_UNITS[m.group(2)]
    if not 0 < n <= RATE_MAX:
        raise RuleError(f"{what} {text!r} must be between 1 and {RATE_MAX}")
    return n


def _check_iface(name: str) -> str:
    if not name or len(name.encode()) > 15 or any(c in name for c in "/: \t\n=#"):
        raise RuleError(f"{name!r} cannot be an interface name (1-15 bytes, no '/', ':' or spaces)")
    return name


# a whole rule ---------------------------------------------------------------


def from_fields(action: str, fields: dict[str, str], comment: str | None = None, now: float | None = None) -> RuleSpec:
    """Build and validate a rule from its words (``{"proto": "udp", ...}``;
    ``ttl`` is a duration from ``now``, ``expires`` Unix seconds).
    Raises RuleError with one sentence."""
    if action not in ACTIONS:
        raise RuleError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    kw: dict[str, object] = {"action": action}
    for name, text in fields.items():
        if name not in FIELDS and name != "expires":
            raise RuleError(f"unknown field {name!r} (known: {', '.join(FIELDS)})")
        if name in ("src", "dst"):
            kw[name] = parse_cidr(text, name)
        elif name == "proto":
            kw["proto"] = parse_proto(text)
        elif name in ("sport", "dport", "length"):
            kw[name] = parse_range(text, {"sport": "source port", "dport": "destination port"}.get(name, name))
        elif name == "icmp-type":
            kw["icmp_type"] = parse_icmp(text)
        elif name == "tcp-flags":
            kw["tcp_flags"] = parse_flags(text)
        elif name == "iface":
            kw["iface"] = _check_iface(text)
        elif name in ("pps", "bps"):
            kw[name] = parse_rate(text, name)
        elif name == "priority":
            kw["priority"] = _int(text, "priority", 0, PRIORITY_MAX)
        elif name == "ttl":
            kw["expires_at"] = int((time.time() if now is None else now) + parse_duration(text))
        elif name == "expires":
            if not text.isdigit():
                raise RuleError(f"expires {text!r} is not Unix seconds")
            kw["expires_at"] = int(text)
    if comment:
        if len(comment) > COMMENT_MAX or any(c in comment for c in "\n\r\0"):
            raise RuleError(f"a comment is one line of at most {COMMENT_MAX} characters")
        kw["comment"] = comment
    rule = RuleSpec(**kw)  # type: ignore[arg-type]
    check(rule, now)
    return rule


def check(rule: RuleSpec, now: float | None = None) -> None:
    """Raises RuleError when the fields of ``rule`` contradict each other."""
    if rule.src is not None and rule.dst is not None and rule.src.version != rule.dst.version:
        raise RuleError(f"src {rule.src} and dst {rule.dst} are of different address families")
    ports = rule.sport is not None or rule.dport is not None
    if ports and rule.proto not in (None, TCP, UDP):
        raise RuleError(f"ports need proto tcp or udp (or none), not {proto_text(rule.proto or 0)}")
    if rule.icmp_type is not None:
        if ports:
            raise RuleError("a rule matches ports or an ICMP type, not both")
        if rule.proto not in (None, ICMP, ICMPV6):
            raise RuleError(f"icmp-type needs proto icmp or icmpv6 (or none), not {proto_text(rule.proto or 0)}")
    if rule.tcp_flags is not None and rule.proto not in (None, TCP):
        raise RuleError(f"tcp-flags needs proto tcp (or none), not {proto_text(rule.proto or 0)}")
    rate = rule.pps is not None or rule.bps is not None
    if rate and rule.action != "rate-limit":
        raise RuleError(f"pps and bps only go with action rate-limit, not {rule.action}")
    if rule.action == "rate-limit" and not rate:
        raise RuleError("action rate-limit needs pps, bps or both")
    if rule.expires_at is not None and rule.expires_at <= (time.time() if now is None else now):
        raise RuleError("the rule's expiry is in the past")


_WORD = re.compile(r"^([a-z-]+)=(.*)$")


def parse_words(words: list[str], comment: str | None = None, now: float | None = None) -> RuleSpec:
    """``["drop", "proto=udp", ...]`` -> a rule. Raises RuleError."""
    if not words:
        raise RuleError("a rule starts with its action (pass, drop, monitor or rate-limit)")
    action, fields = words[0], {}
    for w in words[1:]:
        m = _WORD.match(w)
        if not m:
            raise RuleError(f"{w!r} is not field=value")
        if m.group(1) in fields:
            raise RuleError(f"field {m.group(1)!r} given twice")
        fields[m.group(1)] = m.group(2)
    return from_fields(action, fields, comment, now)


def parse_line(line: str, now: float | None = None) -> RuleSpec | None:
    """One rules-file line: None for blank and comment-only lines."""
    body, sep, comment = line.partition("#")
    words = body.split()
    if not words:
        return None
    return parse_words(words, comment.strip() or None if sep else None, now)


def parse_lines(lines: Iterable[str], path: str = "-", now: float | None = None) -> list[RuleSpec]:
    """Every rule of a rules file; the whole file is checked before anything
    is returned. Raises RulesFileError for the first bad line."""
    out = []
    for n, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        try:
            rule = parse_line(line, now)
        except RuleError as e:
            raise RulesFileError(path, n, line, str(e)) from None
        if rule is not None:
            out.append(rule)
    return out


def read_file(path: str, now: float | None = None) -> list[RuleSpec]:
    """Parse a rules file ('-': stdin). Raises RulesFileError, OSError."""
    import sys

    if path == "-":
        return parse_lines(sys.stdin.read().splitlines(), "-", now)
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    return parse_lines(text.splitlines(), path, now)
