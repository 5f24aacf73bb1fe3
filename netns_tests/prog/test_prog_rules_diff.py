"""Multi-field rules, differentially: the program against the reference.

1,024 random rules (every field, overlapping priorities, IPv4 and IPv6, port
ranges, TCP flags, lengths, ICMP type/code, interfaces, rate limits too high
to bite, TTLs that ran out before the traffic and TTLs that did not) and a
small blocklist are installed through the writer (dataplane/rules.py), then
100,000 random frames built byte by byte go through BPF_PROG_TEST_RUN one by
one. Each frame's verdict is compared with what the reference says, and
after the run every rule's packet and byte counters with the frames the
reference gave that rule (so the matched rule is compared, not only the
verdict).

The reference is rules_ref.reference(): walk the rules by (priority, id),
first match wins. Walking 1,024 rules for each of 100,000 frames in Python
takes minutes, so the whole run is judged by ``_first_matches()``, the same
walk with each rule tested against all frames at once in numpy, and that is
itself checked against reference() frame by frame on a sample.

The blocklist sits at priority 1000 (rulespec.BLOCKLIST_PRIORITY): a rule
below it is judged first (a pass rule exempts a listed host); a listed frame
whose best rule is at 1000 or above is dropped by the blocklist and counts
for no rule.

The suite runs a fixed seed; ``make fuzz`` (``-m fuzz``) runs the
``fuzz``-marked variant with XDPFLOW_FUZZ_FRAMES frames (default 1,000,000)
and XDPFLOW_FUZZ_SEED.
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from xdpflow.rules.blockfile import Rule, parse_cidr
from xdpflow.rules.rulespec import BLOCKLIST_PRIORITY, LENGTH_MAX, RuleSpec, check

from .. import frames
from ..progtest import XDP_DROP, XDP_PASS, ProgHarness
from ..rules_ref import Pkt, random_pkt, random_rule, reference

SEED = 20250111
N_RULES = 1024  # XF_RULE_CAP: the whole capacity
N_FRAMES = 100_000
SAMPLE = 1_500  # frames also judged by reference() itself
# BPF_PROG_TEST_RUN without a context runs on the loopback device of this
# process's namespace: rules naming "lo" match every frame, "eth0" none
IFACES = ("lo", "eth0")
SHORT_TTL = 2  # seconds: these rules have expired before the first frame
LONG_TTL = 3600
# rules matching more than this share of random packets go late (priority
# 1000, at the blocklist, or after it), so many rules get to judge
BROAD = 0.02
BROAD_PRIORITIES = (1000, 1001, 5000, 65535)
XDP_IP_MAX = 3000  # IP length of the longest frame: one XDP buffer, see build_frame
AIMED = 0.35  # share of frames built to match a chosen rule

BLOCKLIST = [
    Rule(parse_cidr("198.18.1.0/24"), "src"),
    Rule(parse_cidr("198.19.200.0/24"), "dst"),
    Rule(parse_cidr("2001:2:0:1::/64"), "src"),
    Rule(parse_cidr("2001:db8:bad::/48"), "dst"),
]

_MAC = bytes.fromhex("020000000002020000000001")
_ETH4, _ETH6 = _MAC + b"\x08\x00", _MAC + b"\x86\xdd"
_L4_HDR = {6: 20, 17: 8, 1: 8, 58: 8, 47: 4}


# --------------------------------------------------------------------------
# rules


def random_rules(rng: random.Random, n: int, now: float) -> list[RuleSpec]:
    """``n`` rules of distinct identity (rule sync would merge twins): the
    generator's, plus rate-limit rules and TTLs."""
    out: dict[str, RuleSpec] = {}
    calibration = Frames([random_pkt(rng, ("lo",)) for _ in range(2000)])
    i = 0
    while len(out) < n:
        i += 1
        r = random_rule(rng, i, IFACES)
        if calibration.matching(r).mean() > BROAD:
            # a broad rule early would judge nearly every frame alone
            r = replace(r, priority=rng.choice(BROAD_PRIORITIES))
        if rng.random() < 0.06:
            # far above what one CPU's test runs reach: never limited
            rate = rng.choice([{"pps": 10**9}, {"bps": 10**12}, {"pps": 10**9, "bps": 10**12}])
            r = replace(r, action="rate-limit", **rate)
        ttl = rng.random()
        if ttl < 0.08:
            r = replace(r, expires_at=int(now) + SHORT_TTL)
        elif ttl < 0.16:
            r = replace(r, expires_at=int(now) + LONG_TTL)
        check(r, now)
        out.setdefault(r.identity(), replace(r, id=None))
    return list(out.values())


# --------------------------------------------------------------------------
# frames, byte by byte (scapy would take minutes for 100,000)


def build_frame(rng: random.Random, p: Pkt) -> tuple[Pkt, bytes]:
    """A frame for ``p``, and ``p`` with the IP length the frame really has
    (at least its headers). A packet without L4 (``has_l4`` False) of
    TCP/UDP/ICMP becomes a non-first fragment."""
    frag = not p.has_l4 and p.proto in (1, 6, 17, 58)
    hdr = 8 if frag else _L4_HDR.get(p.proto, 0)
    ip_hdr = 20 if p.family == 4 else 40 + (8 if frag else 0)
    # One XDP buffer: BPF_PROG_TEST_RUN moves bytes past ~3.5 KB into
    # fragments a program without xdp.frags never sees (nor does a NIC
    # without multi-buffer deliver such frames), so the program cannot read
    # their end and rightly counts them as parse errors.
    iplen = min(max(p.iplen, ip_hdr + hdr), XDP_IP_MAX)
    if frag:
        l4 = b""
    elif p.proto == 6:
        l4 = struct.pack("!HHIIBBHHH", p.sport, p.dport, 1, 0, 5 << 4, p.tcp_flags, 1024, 0, 0)
    elif p.proto == 17:
        l4 = struct.pack("!HHHH", p.sport, p.dport, iplen - ip_hdr, 0)
    elif p.proto in (1, 58):
        l4 = struct.pack("!BBHI", p.sport, p.dport, 0, 0)
    else:
        l4 = b"\0\0\x08\0"  # GRE carrying IPv4
    payload = l4 + rng.randbytes(iplen - ip_hdr - len(l4))
    if p.family == 4:
        off = 0x0008 if frag else 0  # fragment offset 64 bytes
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, iplen, 1, off, 64, p.proto, 0, p.src, p.dst)
        frame = _ETH4 + ip + payload
    else:
        nh = 44 if frag else p.proto
        ip = struct.pack("!IHBB16s16s", 6 << 28, iplen - 40, nh, 64, p.src, p.dst)
        if frag:
            ip += struct.pack("!BBHI", p.proto, 0, 8 << 3, 7)  # offset 64 bytes
        frame = _ETH6 + ip + payload
    return replace(p, iplen=iplen, sport=0 if frag else p.sport, dport=0 if frag else p.dport), frame


def _inside(rng: random.Random, net: Any) -> bytes:
    host = rng.getrandbits(net.max_prefixlen - net.prefixlen) if net.prefixlen < net.max_prefixlen else 0
    return (int(net.network_address) | host).to_bytes(net.max_prefixlen // 8, "big")


def _within(rng: random.Random, r: tuple[int, int] | None, default: int) -> int:
    return default if r is None else rng.randint(r[0], r[1])


def packet_for(rng: random.Random, r: RuleSpec) -> Pkt:
    """A random packet that ``r`` matches (unless its length range is below
    the headers' length): most random packets match no rule, or only broad
    ones, and these reach the narrow ones."""
    family = r.family() or rng.choice([4, 6])
    p = random_pkt(rng, ("lo",))
    while p.family != family:
        p = random_pkt(rng, ("lo",))
    protos = r.protos()
    proto = rng.choice(sorted(protos)) if protos else p.proto
    if proto in (1, 58) and protos and len(protos) == 2:
        proto = 1 if family == 4 else 58
    has_l4 = r.needs_l4() or (p.has_l4 and proto in (1, 6, 17, 58))
    flags = 0
    if proto == 6 and has_l4:
        flags = rng.getrandbits(8)
        if r.tcp_flags is not None:
            mask, value = r.tcp_flags
            flags = (flags & ~mask) | value
    return replace(
        p,
        src=p.src if r.src is None else _inside(rng, r.src),
        dst=p.dst if r.dst is None else _inside(rng, r.dst),
        proto=proto,
        has_l4=has_l4,
        sport=_within(rng, r.sport_range(), rng.randrange(256 if proto in (1, 58) else 65536)) if has_l4 else 0,
        dport=_within(rng, r.dport_range(), rng.randrange(256 if proto in (1, 58) else 65536)) if has_l4 else 0,
        tcp_flags=flags,
        iplen=_within(rng, r.length, p.iplen),
    )


def random_frames(rng: random.Random, n: int, rules: list[RuleSpec] | None = None) -> tuple[list[Pkt], list[bytes]]:
    """``n`` frames: random ones, and (given ``rules``) a third aimed at a
    random rule each."""
    pkts, out = [], []
    for _ in range(n):
        if rules and rng.random() < AIMED:
            pkt = packet_for(rng, rng.choice(rules))
        else:
            pkt = random_pkt(rng, ("lo",))
        p, f = build_frame(rng, pkt)
        pkts.append(p)
        out.append(f)
    return pkts, out


# --------------------------------------------------------------------------
# the reference walk over all frames at once


def _halves(addr: bytes, family: int) -> tuple[int, int]:
    a = int.from_bytes(addr, "big")
    return (a << 32, 0) if family == 4 else (a >> 64, a & (2**64 - 1))


def _net_halves(net: Any) -> tuple[int, int, int, int]:
    """(network hi, lo, mask hi, lo) laid out like _halves()."""
    width = net.max_prefixlen
    mask = ((1 << net.prefixlen) - 1) << (width - net.prefixlen)
    a = int(net.network_address)
    if width == 32:
        return a << 32, 0, mask << 32, 0
    return a >> 64, a & (2**64 - 1), mask >> 64, mask & (2**64 - 1)


class Frames:
    """The fields of many packets as numpy columns."""

    def __init__(self, pkts: list[Pkt]) -> None:
        self.n = len(pkts)
        self.family = np.array([p.family for p in pkts], np.uint8)
        for side in ("src", "dst"):
            hl = [_halves(getattr(p, side), p.family) for p in pkts]
            setattr(self, side, (np.array([h for h, _ in hl], np.uint64), np.array([lo for _, lo in hl], np.uint64)))
        self.proto = np.array([p.proto for p in pkts], np.int32)
        self.sport = np.array([p.sport for p in pkts], np.int32)
        self.dport = np.array([p.dport for p in pkts], np.int32)
        self.has_l4 = np.array([p.has_l4 for p in pkts], bool)
        self.flags = np.array([p.tcp_flags for p in pkts], np.int32)
        self.iplen = np.minimum(np.array([p.iplen for p in pkts], np.int32), LENGTH_MAX)
        self.iface = np.array([p.iface for p in pkts])

    def in_net(self, side: str, net: Any) -> np.ndarray:
        hi, lo = getattr(self, side)
        nh, nl, mh, ml = (np.uint64(x) for x in _net_halves(net))
        return (self.family == net.version) & ((hi & mh) == nh) & ((lo & ml) == nl)

    def matching(self, r: RuleSpec) -> np.ndarray:
        """What rules_ref.matches() says of every packet (expiry aside)."""
        m = np.ones(self.n, bool)
        for side in ("src", "dst"):
            net = getattr(r, side)
            if net is not None:
                m &= self.in_net(side, net)
        protos = r.protos()
        if protos is not None:
            m &= np.isin(self.proto, sorted(protos))
        if r.needs_l4():
            m &= self.has_l4
        for col, rng in ((self.sport, r.sport_range()), (self.dport, r.dport_range()), (self.iplen, r.length)):
            if rng is not None:
                m &= (col >= rng[0]) & (col <= rng[1])
        if r.tcp_flags is not None:
            m &= (self.flags & r.tcp_flags[0]) == r.tcp_flags[1]
        if r.iface is not None:
            m &= self.iface == r.iface
        return m


def _first_matches(rules: list[RuleSpec], fr: Frames, now: float) -> np.ndarray:
    """Index into ``rules`` of each packet's first match by (priority, id),
    -1 for none: reference() for every packet."""
    best = np.full(fr.n, -1, np.int64)
    order = sorted(range(len(rules)), key=lambda i: (rules[i].priority, rules[i].id or 0))
    for i in order:
        r = rules[i]
        if r.expires_at is not None and r.expires_at <= now:
            continue
        hit = fr.matching(r) & (best < 0)
        best[hit] = i
    return best


def _listed(fr: Frames) -> np.ndarray:
    m = np.zeros(fr.n, bool)
    for b in BLOCKLIST:
        m |= fr.in_net(b.direction, b.net)
    return m


def expected(rules: list[RuleSpec], fr: Frames, now: float) -> tuple[np.ndarray, np.ndarray]:
    """(verdict of every frame, index of the rule it counts for or -1)."""
    best = _first_matches(rules, fr, now)
    listed = _listed(fr)
    prio = np.array([r.priority for r in rules] + [0], np.int64)[best]  # -1 picks the dummy
    drops = np.array([r.action == "drop" for r in rules] + [False])[best]
    # a rule at or after the blocklist gives way to it for listed frames
    ruled = (best >= 0) & ~(listed & (prio >= BLOCKLIST_PRIORITY))
    verdict = np.where(ruled, np.where(drops, XDP_DROP, XDP_PASS), np.where(listed, XDP_DROP, XDP_PASS))
    return verdict, np.where(ruled, best, -1)


# --------------------------------------------------------------------------
# the run


def _rule_of(rules: list[RuleSpec], i: int) -> str | None:
    return None if i < 0 else rules[i].line()


def run_differential(prog: Any, seed: int, n_frames: int, chunk: int = 100_000) -> dict[str, float]:
    """Install, send, compare, ``chunk`` frames at a time (a long run would
    not fit in memory at once); returns timings in seconds."""
    t: Counter[str] = Counter()
    rng = random.Random(seed)
    t0 = time.monotonic()
    now = time.time()
    tables = prog.rules
    rules = tables.install(random_rules(rng, N_RULES, now))
    assert len(rules) == N_RULES and all(r.id is not None for r in rules)
    assert len({r.id for r in rules}) == N_RULES
    prog.blocklist.add(BLOCKLIST)
    t["install"] = time.monotonic() - t0

    # every short TTL has run out (a second of margin for the clock's
    # rounding), no long one will before the end
    short = max((r.expires_at for r in rules if r.expires_at and r.expires_at < now + LONG_TTL // 2), default=0)
    time.sleep(max(0.0, short + 1.2 - time.time()))
    judged_at = time.time()

    want_pk = np.zeros(len(rules), np.int64)
    want_by = np.zeros(len(rules), np.int64)
    seen: Counter[str] = Counter()
    done = 0
    while done < n_frames:
        n = min(chunk, n_frames - done)
        t0 = time.monotonic()
        pkts, fs = random_frames(rng, n, rules)
        t["build"] += time.monotonic() - t0

        t0 = time.monotonic()
        fr = Frames(pkts)
        verdict, counted = expected(rules, fr, judged_at)
        t["reference"] += time.monotonic() - t0

        if done == 0:
            # the numpy walk is reference(), checked on a sample
            t0 = time.monotonic()
            by_id = {r.id: i for i, r in enumerate(rules)}
            best = _first_matches(rules, fr, judged_at)
            for k in random.Random(seed + 1).sample(range(n), min(SAMPLE, n)):
                want = reference(rules, pkts[k], judged_at)
                assert (-1 if want is None else by_id[want.id]) == best[k], (pkts[k], want, best[k])
            t["sample"] = time.monotonic() - t0
            expired = [i for i, r in enumerate(rules) if r.expires_at and r.expires_at <= judged_at]
            assert any(fr.matching(rules[i]).any() for i in expired)  # expired rules that would have matched

        t0 = time.monotonic()
        run = prog.prog.test_run
        got = np.array([run(f, data_out=False).retval for f in fs], np.int64)
        t["test_run"] += time.monotonic() - t0
        print(f"\nrules diff: frames {done}-{done + n}: test runs {t['test_run']:.1f} s so far")
        assert time.time() < now + LONG_TTL - 60, "the run outlived the long TTLs"

        bad = np.nonzero(got != verdict)[0]
        if len(bad):
            show = [(len(fs[k]), pkts[k], int(got[k]), int(verdict[k]), _rule_of(rules, counted[k])) for k in bad[:3]]
            pytest.fail(f"{len(bad)} of {n} verdicts differ from the reference; first: {show}")

        lens = np.array([len(f) for f in fs], np.int64)
        hit = counted >= 0
        want_pk += np.bincount(counted[hit], minlength=len(rules))
        want_by += np.bincount(counted[hit], weights=lens[hit], minlength=len(rules)).astype(np.int64)
        seen.update(rules[i].action for i in counted[hit])
        seen["listed drop"] += int((~hit & (verdict == XDP_DROP)).sum())
        seen["exempt"] += int((hit & _listed(fr) & (verdict == XDP_PASS)).sum())
        seen["ruled"] += int(hit.sum())
        done += n

    # every rule counted exactly the frames the reference gave it
    cnt = tables.counters()
    diff = []
    for i, r in enumerate(rules):
        pk, by, limited = cnt.get(r.id or 0, (0, 0, 0))
        if (pk, by, limited) != (int(want_pk[i]), int(want_by[i]), 0):
            diff.append((r.id, r.line(), (pk, by, limited), (int(want_pk[i]), int(want_by[i]), 0)))
    assert not diff, f"{len(diff)} rules counted other frames than the reference gave them; first: {diff[:5]}"

    # the run reached what it is meant to test
    assert all(seen[a] for a in ("pass", "drop", "monitor", "rate-limit")), seen
    assert seen["ruled"] > n_frames // 10, seen
    assert seen["listed drop"] > 100, seen  # the blocklist took frames no earlier rule exempted
    assert seen["exempt"] > 100, seen  # pass rules below 1000 exempted listed frames
    assert int((want_pk > 0).sum()) > 200, "too few distinct rules matched"
    expired = [i for i, r in enumerate(rules) if r.expires_at and r.expires_at <= judged_at]
    assert expired and not want_pk[expired].any()
    return dict(t)


def test_rules_against_reference(prog) -> None:
    # a program of its own (conftest's), not the pool's: the pool's reset
    # knows nothing of rule sets
    timings = run_differential(prog, SEED, N_FRAMES)
    print("\nrules diff timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    assert timings["test_run"] < 120


@pytest.mark.fuzz
def test_rules_fuzz_long() -> None:
    """``make fuzz``: XDPFLOW_FUZZ_FRAMES frames against a fresh rule set
    of seed XDPFLOW_FUZZ_SEED, on a program of its own."""
    n = int(os.environ.get("XDPFLOW_FUZZ_FRAMES", "1000000"))
    seed = int(os.environ.get("XDPFLOW_FUZZ_SEED", "1"))
    prog = ProgHarness()
    try:
        timings = run_differential(prog, seed, n)
    finally:
        prog.close()
    print(f"\nrules fuzz: {n} frames (seed {seed}): " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def test_frames_parse_as_the_packets_say() -> None:
    """The byte-built frames mean what their Pkt says (frames.classify is
    the program's parser written in Python)."""
    rng = random.Random(SEED)
    rules = [r.with_id(i + 1) for i, r in enumerate(random_rules(rng, 300, time.time()))]
    pkts, fs = random_frames(rng, 3000, rules)
    for p, f in zip(pkts, fs, strict=True):
        c = frames.classify(f)
        assert c.cls == ("ipv4" if p.family == 4 else "ipv6") and not c.l4_error, (p, c)
        assert c.iplen == p.iplen and c.key is not None
        fam, src, dst, sport, dport, proto = c.key
        assert (fam, src, dst, proto) == (p.family, p.src, p.dst, p.proto), (p, c)
        if p.has_l4:
            assert (sport, dport) == (p.sport, p.dport), (p, c)
        assert c.tcp_flags == (p.tcp_flags if p.has_l4 and p.proto == 6 else 0)
        assert ipaddress.ip_address(p.src).version == p.family
