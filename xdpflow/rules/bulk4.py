"""The plain IPv4 lines of a blocklist file, parsed all at once with numpy.

A feed of 10^5 lines costs ~2.5 us a line through Python's per-line parser
(blockfile.parse_keys); most of its lines are a dotted quad, an optional
prefix length and a comment. ``simple_v4`` finds those lines and parses them
with array operations over the file's bytes, and hands every other line back
by number, for the per-line parser to read (IPv6, errors, odd whitespace).

It accepts only what the per-line parser accepts the same way: a line is
taken here when, before its first ``#`` or ``;``, it holds nothing but ASCII
blanks (space, tab, CR, VT, FF) around one token of digits, dots and at most
one slash, that token is a strict dotted quad (octets 0-255 in plain decimal,
no leading zeros) with an optional plain-decimal prefix length 0-32, and no
host bit is set. Anything else, however close, goes to the per-line parser,
which has the last word (and the error messages).
"""

from __future__ import annotations

from typing import Any

_TOKEN_MAX = len("255.255.255.255/32")
_DIGIT0 = ord("0")


def simple_v4(data: bytes) -> tuple[Any, Any, Any, Any]:
    """Parse the plain IPv4 lines of ``data`` (a file's bytes, split at
    b"\\n" as str.split("\\n") splits its text).

    Returns (keys, others, starts, ends): the net keys (``address << 8 |
    prefixlen``, numpy uint64, in line order, duplicates kept) of the lines
    parsed here, the 0-based numbers of the lines left to the per-line parser
    (blank lines are in neither), and every line's start and end offset.
    """
    import numpy as np  # only whole files are parsed here: parse_cidr() users need no numpy

    buf = np.frombuffer(data, dtype=np.uint8)
    n = len(buf)
    newline = buf == ord("\n")
    nl = np.flatnonzero(newline)
    starts = np.concatenate(([0], nl + 1))
    ends = np.concatenate((nl, [n]))
    nlines = len(starts)

    # a line's content ends at its first '#' or ';'
    marks = np.flatnonzero((buf == ord("#")) | (buf == ord(";")))
    at = np.searchsorted(marks, starts)
    first = marks[np.minimum(at, len(marks) - 1)] if len(marks) else ends
    cut = np.where((at < len(marks)) & (first < ends), first, ends)
    edges = np.zeros(n + 1, dtype=np.int8)  # +1 where a line's content starts, -1 where it ends
    edges[starts] += 1  # line starts are distinct, and so are content ends
    edges[cut] -= 1
    content = np.cumsum(edges[:n], dtype=np.int8) > 0

    digit = (buf >= _DIGIT0) & (buf <= _DIGIT0 + 9)
    tok = content & (digit | (buf == ord(".")) | (buf == ord("/")))
    blank = (buf == ord(" ")) | (buf == ord("\t")) | (buf == ord("\r")) | (buf == 0x0B) | (buf == 0x0C)
    bad = np.zeros(nlines, dtype=bool)
    bad[np.searchsorted(nl, np.flatnonzero(content & ~tok & ~blank))] = True  # newlines before: the line
    prev = np.concatenate(([False], tok[:-1]))
    nxt = np.concatenate((tok[1:], [False]))
    run_starts = np.flatnonzero(tok & ~prev)
    run_ends = np.flatnonzero(tok & ~nxt) + 1
    run_line = np.searchsorted(nl, run_starts)
    runs = np.bincount(run_line, minlength=nlines)
    one = ~bad & (runs == 1)
    # lines with one token run, and its span (runs never cross a newline)
    which = one[run_line]
    lines = run_line[which]
    tstart, tlen = run_starts[which], run_ends[which] - run_starts[which]

    ok, keys = _parse(buf, tstart, tlen)
    parsed = np.zeros(nlines, dtype=bool)
    parsed[lines[ok]] = True
    empty = ~bad & (runs == 0)
    others = np.flatnonzero(~parsed & ~empty)
    return keys[ok], others, starts, ends


def _parse(buf: Any, tstart: Any, tlen: Any) -> tuple[Any, Any]:
    """(ok, net keys) of tokens (digits, dots, slashes): ok where the token
    is a strict dotted quad with an optional prefix length and no host bits."""
    import numpy as np

    ok = tlen <= _TOKEN_MAX
    cols = np.arange(_TOKEN_MAX, dtype=np.int8)
    inside = cols < tlen[:, None]
    padded = np.concatenate((buf, np.zeros(_TOKEN_MAX, dtype=np.uint8)))
    window = np.lib.stride_tricks.sliding_window_view(padded, _TOKEN_MAX)
    chars = np.where(inside, window[tstart], 0)  # each token's bytes, zeros after it
    dot, slash = chars == ord("."), chars == ord("/")
    has_plen = slash.sum(axis=1) == 1
    ok &= (dot.sum(axis=1) == 3) & (slash.sum(axis=1) <= 1)
    # the separators' columns in order, the token's end standing in for a missing slash
    seps = np.sort(np.where(dot | slash, cols, np.int8(_TOKEN_MAX)), axis=1)[:, :4].astype(np.int64)
    seps[:, 3] = np.where(has_plen, seps[:, 3], tlen)
    rows = np.arange(len(tstart))
    ok &= ~has_plen | (chars[rows, np.minimum(seps[:, 3], _TOKEN_MAX - 1)] == ord("/"))  # the slash comes last
    ends = np.concatenate((seps, tlen[:, None]), axis=1)  # where fields 0-3 and the prefix length end
    begins = np.concatenate((np.zeros((len(rows), 1), dtype=ends.dtype), seps + 1), axis=1)
    size = ends - begins
    size[:, 4] = np.where(has_plen, size[:, 4], 1)  # no prefix length: read as one digit, unused
    ok &= ((size >= 1) & (size <= 3)).all(axis=1) & (size[:, 4] <= 2)
    first = chars[rows[:, None], np.minimum(begins, _TOKEN_MAX - 1)]
    ok &= ~((size > 1) & (first == _DIGIT0)).any(axis=1)  # leading zeros

    def digit(back: int) -> Any:  # each field's digit ``back`` places from its end, 0 past its start
        at = np.clip(ends - 1 - back, 0, _TOKEN_MAX - 1)
        return np.where(size > back, chars[rows[:, None], at].astype(np.int64) - _DIGIT0, 0)

    fields = digit(0) + 10 * digit(1) + 100 * digit(2)
    plen = np.where(has_plen, fields[:, 4], 32)
    ok &= (fields[:, :4] <= 255).all(axis=1) & (plen <= 32)
    addr = (fields[:, 0] << 24) | (fields[:, 1] << 16) | (fields[:, 2] << 8) | fields[:, 3]
    host = (np.int64(1) << (32 - np.minimum(plen, 32))) - 1
    ok &= (addr & host) == 0
    return ok, ((addr << 8) | np.minimum(plen, 32)).astype(np.uint64)
