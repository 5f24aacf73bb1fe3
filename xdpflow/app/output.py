"""How the CLI prints: aligned tables, human-sized rates, JSON."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

_NUMBER = re.compile(r"^-?\d+(\.\d+)?[kMGTP]?$")

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=None if not sys.stdout.isatty() else 2)
    sys.stdout.write("\n")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.rjust(w) if _NUMBER.match(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def human(n: float) -> str:
    """1234567 -> "1.2M"."""
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def proto_name(p: int) -> str:
    return PROTO_NAMES.get(p, str(p))


def clear_screen() -> None:
    """Redraw in place on a terminal (``--watch``); nothing when piped."""
    if sys.stdout.isatty():
        sys.stdout.write("\033[H\033[2J")


def time_left(seconds: float) -> str:
    """A TTL's remaining time, two units at most: "9m59s", "1h5m", "2d3h"."""
    s = int(seconds)
    if s <= 0:
        return "expired"
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // subsize
            return f"{s // size}{unit}" + (f"{rest}{sub}" if rest else "")
    return f"{s}s"
