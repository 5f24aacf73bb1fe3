"""The IPv6 blocklist table computed in Python, walked the way the XDP
program walks it, against a plain longest-prefix match (no kernel: the
kernel's walk is checked against the same reference in test_prog_blocklist)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from xdpflow.dataplane import abi
from xdpflow.dataplane.blocklist import (
    BUCKET_DTYPE,
    L1_WALK,
    V6Placed,
    V6Tables,
    bucket_of,
    fill_v6,
    l1_hash,
    l1_meanwhile,
    pf6_bits,
    place_v6,
    prune_v6,
    region_halves,
    v6_filter,
    v6_l1,
    v6_tables,
)

NEXT = abi.C.XF_BL6_NEXT_SHIFT
MASK = abi.C.XF_BL6_RULE_MASK


def walk(t: V6Tables, addr: int, pf: np.ndarray | None = None, l1: np.ndarray | None = None) -> tuple[int, int]:
    """(rule index + 1 or 0, deeper lookups made), as bl6_lookup() does it
    (with the L1 slots ``l1``) or as the program before it did (with the
    filter's words ``pf``: a clear bit for the address's /32 stops a walk
    that would start at /32 or deeper)."""
    v = int(t.l0[addr >> 112])
    lookups = 0
    if pf is not None and v >> NEXT >= 32:
        bit = int(pf6_bits(np.array([addr >> 96]))[0])
        if not int(pf[bit >> 6]) >> (bit & 63) & 1:
            return v & MASK, 0
    first = v >> NEXT
    if l1 is not None and 0 < first <= 48:
        at, high = l1_hash(np.array([(addr >> 80) >> (48 - first) << (48 - first)], dtype=np.uint64))
        slot = int(l1[int(at[0])])
        w = slot & 0xFFFFFFFF
        if w != abi.C.XF_BL6_L1_WALK:
            if slot >> 32 != int(high[0]):
                return v & MASK, 0
            v = w
    while v >> NEXT:
        plen = v >> NEXT
        lookups += 1
        e = t.deep.get((plen, addr >> (128 - plen)))
        if e is None:
            break
        v = e
    return v & MASK, lookups


def reference(rules: list[tuple[int, int, int]], addr: int) -> int:
    best, best_len = 0, -1
    for a, plen, idx in rules:
        if plen > best_len and (addr ^ a) >> (128 - plen) == 0:
            best, best_len = idx + 1, plen
    return best


def random_rules(rnd: random.Random, n: int, base: int, spread: int) -> list[tuple[int, int, int]]:
    rules, seen = [], set()
    while len(rules) < n:
        plen = rnd.choice([0, 8, 12, 16, 19, 20, 24, 29, 32, 33, 40, 44, 47, 48, 56, 60, 64, 65, 96, 120, 127, 128])
        if plen < 16 and rnd.random() < 0.9:
            continue  # keep short rules rare, as in feeds
        addr = (base | rnd.getrandbits(spread)) if plen else 0
        addr &= ((1 << 128) - 1) ^ ((1 << (128 - plen)) - 1) if plen else 0
        if (addr, plen) in seen:
            continue
        seen.add((addr, plen))
        rules.append((addr, plen, len(rules)))
    return rules


@pytest.mark.parametrize("seed", range(6))
def test_walk_equals_longest_prefix_match(seed: int) -> None:
    rnd = random.Random(seed)
    base = 0x2001_0002 << 96  # 2001:2::/32: rules nest in the traffic's own prefixes
    rules = random_rules(rnd, 300, base, 96)
    t, pf = v6_tables(rules), v6_filter(rules)
    probes = [a | rnd.getrandbits(128 - p) if p < 128 else a for a, p, _ in rules]
    probes += [base | rnd.getrandbits(96) for _ in range(2000)] + [rnd.getrandbits(128) for _ in range(200)]
    probes += [(base & ~(0xFFFF << 96)) | rnd.getrandbits(112) for _ in range(2000)]  # the same /16, other /32s
    l1 = v6_l1(t)
    for addr in probes:
        assert walk(t, addr)[0] == walk(t, addr, pf)[0] == walk(t, addr, l1=l1)[0] == reference(rules, addr), hex(addr)


@pytest.mark.parametrize("seed", range(3))
def test_l1_over_thousands_of_regions_equals_longest_prefix_match(seed: int) -> None:
    # 2001::/16: rules in 3,000 /32s (its first level is /32); 2003::/16:
    # 3,000 /48s and rules inside some (first level /48); 2002::/16: first
    # level /24 (no slots). Some regions share a slot, which must then send
    # every region of it to the walk.
    rnd = random.Random(seed)
    rules: list[tuple[int, int, int]] = []
    for top16, plens in ((0x2001, [32, 40, 48, 48, 64, 128]), (0x2003, [48, 48, 56, 64, 128])):
        for _ in range(3000):
            plen = rnd.choice(plens)
            addr = (top16 << 112) | rnd.getrandbits(112)
            rules.append((addr >> (128 - plen) << (128 - plen), plen, len(rules)))
    rules.append((0x2002_0100 << 96, 24, len(rules)))
    rules.append((0x2002_0101_0002 << 80, 48, len(rules)))
    rules = list({(a, p): (a, p, i) for a, p, i in rules}.values())
    t = v6_tables(rules)
    l1 = v6_l1(t)
    assert (l1 == L1_WALK).sum() > 0  # the birthday bound: a few shared slots
    probes = [a | rnd.getrandbits(128 - p) if p < 128 else a for a, p, _ in rules]
    probes += [(top16 << 112) | rnd.getrandbits(112) for top16 in (0x2001, 0x2002, 0x2003) for _ in range(1000)]
    probes += [(0x2002_0101 << 96) | rnd.getrandbits(96) for _ in range(200)]
    for addr in probes:
        assert walk(t, addr, l1=l1)[0] == reference(rules, addr), hex(addr)


@pytest.mark.parametrize("seed", range(3))
def test_l1_meanwhile_answers_old_or_new_for_either_l0(seed: int) -> None:
    # 2003::/16 holds 4,000 /48s (first level /48); the change adds /32s
    # (first level /32), so the new table gives slots to other regions,
    # and drops a quarter of the /48s. While the change is written, a frame
    # may read the old L0 or the new one, with both tables' regions in
    # place: it must get the old answer or the new one, never a third.
    rnd = random.Random(seed)
    old: list[tuple[int, int, int]] = []
    for _ in range(4000):
        addr = ((0x2003 << 112) | rnd.getrandbits(112)) >> 80 << 80
        old.append((addr, 48, len(old)))
    old = list({(a, p): (a, p, i) for a, p, i in old}.values())
    new = [r for r in old if rnd.random() < 0.75]
    for _ in range(2000):
        new.append((((0x2003 << 16) | rnd.getrandbits(16)) << 96, 32, len(old) + len(new)))
    new = list({(a, p): (a, p, i) for a, p, i in new}.values())
    t_old, t_new = v6_tables(old), v6_tables(new)
    meanwhile = l1_meanwhile(v6_l1(t_old), v6_l1(t_new))
    deep = {**t_old.deep, **t_new.deep}
    readers = [V6Tables(t_old.l0, deep), V6Tables(t_new.l0, deep)]
    probes = [a | rnd.getrandbits(80) for a, _, _ in old]
    probes += [(0x2003 << 112) | rnd.getrandbits(112) for _ in range(2000)]
    for addr in probes:
        answers = {reference(old, addr), reference(new, addr)}
        for t in readers:
            assert walk(t, addr, l1=meanwhile)[0] in answers, hex(addr)


def test_l1_starts_the_walk_below_the_first_level() -> None:
    rules = [((0x2001_0DB8_0001 << 80), 48, 0), ((0x2001_0DB8_0001_0002 << 64), 64, 1), ((0x2001_0C00 << 96), 32, 2)]
    t = v6_tables(rules)
    l1 = v6_l1(t)
    assert walk(t, (0x2001_0DB8_0001_0002 << 64) | 5, l1=l1) == (2, 2)  # /48, /64: the /32 marker is in L1
    assert walk(t, (0x2001_0DB8_0009 << 80) | 5, l1=l1) == (0, 1)  # a miss at /48
    assert walk(t, (0x2001_0C00 << 96) | 5, l1=l1) == (3, 0)  # a /32 rule, nothing inside: L1 answers
    assert walk(t, (0x2001_0C01 << 96) | 5, l1=l1) == (0, 0)  # a /32 without regions: L1 answers
    only48 = v6_tables([((0x2001_0002_0001 << 80), 48, 0), ((0x2001_0002_0000_0005 << 64), 64, 1)])
    # the /16's first level is /48: its slot answers for 2001:2:0::/48, the walk goes on at /64
    assert walk(only48, (0x2001_0002_0000_0001 << 64) | 1, l1=v6_l1(only48)) == (0, 1)
    assert walk(only48, (0x2001_0002_0000_0005 << 64) | 1, l1=v6_l1(only48)) == (2, 1)
    assert walk(only48, (0x2001_0002_0001 << 80) | 1, l1=v6_l1(only48)) == (1, 0)
    assert walk(only48, (0x2001_0002_0009 << 80) | 1, l1=v6_l1(only48)) == (0, 0)
    only64 = v6_tables([((0x2001_0DB8_0001_0002 << 64), 64, 0)])  # the /16's first level is /64: no slots
    assert walk(only64, (0x2001_0DB8_0001_0002 << 64) | 5, l1=v6_l1(only64)) == (1, 1)


def test_the_filter_stops_walks_into_a_32_without_rules() -> None:
    # the /16 holds rules, all of them in another /32: its /32s cost no hash lookup
    rules = [((0x2001_0DB8_0001 << 80), 48, 0), ((0x2001_0DB8_0002_0003 << 64), 64, 1), ((0x2001_0C00 << 96), 26, 2)]
    t, pf = v6_tables(rules), v6_filter(rules)
    misses = [(0x2001_0000 + i) << 96 | 5 for i in range(0, 0xFFFF, 97) if not 0x0C00 <= i <= 0x0C3F and i != 0x0DB8]
    assert sum(walk(t, a, pf)[1] for a in misses) <= len(misses) // 64  # hash collisions only
    assert all(walk(t, a, pf)[0] == 0 for a in misses)
    assert walk(t, (0x2001_0DB8_0001 << 80) | 5, pf) == (1, 2)  # /32 marker, /48
    assert walk(t, (0x2001_0DB8_0002_0003 << 64) | 5, pf) == (2, 3)  # /32 and /48 markers, /64
    assert walk(t, (0x2001_0C3F << 96) | 5, pf) == (3, 1)  # the /26 spans 64 /32s, each with its bit


def test_traffic_outside_every_rules_16_costs_one_array_load() -> None:
    rules = [((0x2001_0DB8 << 96), 32, 0), ((0x2001_0DB8_0001 << 80), 48, 1), ((0x2001_0DB8_0001_0002 << 64), 64, 2)]
    t = v6_tables(rules)
    assert walk(t, 0x2002 << 112) == (0, 0)  # another /16: the L0 load answers
    assert walk(t, 0x2001_0002 << 96) == (0, 1)  # the same /16, another /32: one miss
    assert walk(t, (0x2001_0DB8_0001_0002 << 64) | 5) == (3, 3)  # /32, /48, /64: one lookup per branching level
    assert walk(t, (0x2001_0DB8_0001_0003 << 64) | 5) == (2, 3)  # inside the /48, not the /64: a miss at /64
    assert walk(t, (0x2001_0DB8_0009 << 80) | 5) == (1, 2)  # inside the /32 only


def test_levels_jump_over_empty_steps() -> None:
    # only a /64 inside this /16: the walk goes from L0 straight to /64
    t = v6_tables([((0x2001_0DB8_0001_0002 << 64), 64, 0)])
    assert walk(t, (0x2001_0DB8_0001_0002 << 64) | 1) == (1, 1)
    assert len(t.deep) == 1


# The deeper regions as the program finds them: in a bucket of the array, or
# in the overflow hash when the bucket's flag says so.


def find(arr: np.ndarray, deep: dict[tuple[int, int], int], plen: int, region: int) -> int | None:
    hi, lo, pl = region_halves([(plen, region)])
    b = int(bucket_of(hi, lo, pl, len(arr).bit_length() - 1)[0])
    for s in arr[b]["s"].tolist():
        if (s[2], s[0], s[1]) == (plen, int(hi[0]), int(lo[0])):
            return int(s[3])
    return deep.get((plen, region)) if arr[b]["ovf"] else None


def walk_placed(l0: np.ndarray, arr: np.ndarray, deep: dict[tuple[int, int], int], addr: int) -> int:
    v = int(l0[addr >> 112])
    while v >> NEXT:
        plen = v >> NEXT
        e = find(arr, deep, plen, addr >> (128 - plen))
        if e is None:
            break
        v = e
    return v & MASK


def nothing(_buckets: np.ndarray) -> None:
    pass


def placed_into(arr: np.ndarray, deep: dict[tuple[int, int], int], rules: list[tuple[int, int, int]]) -> V6Placed:
    """rules' table placed over arr and written as _write_v6 does (arr and
    deep change in place, pruned)."""
    p = place_v6(v6_tables(rules), arr.copy())
    deep.update(p.deep)
    fill_v6(arr, nothing, p)
    prune_v6(arr, nothing, p)
    for k in [k for k in deep if k not in p.deep]:
        del deep[k]
    return p


def probes_for(rnd: random.Random, rules: list[tuple[int, int, int]], base: int) -> list[int]:
    probes = [a | rnd.getrandbits(128 - p) if p < 128 else a for a, p, _ in rules]
    return probes + [base | rnd.getrandbits(96) for _ in range(1500)]


@pytest.mark.parametrize("seed", range(4))
def test_full_buckets_overflow_to_the_hash(seed: int) -> None:
    """A small array fills: the regions of full buckets go to the hash, their
    buckets are flagged, and the lookup still answers as the reference."""
    rnd = random.Random(seed)
    base = 0x2001_0002 << 96
    rules = random_rules(rnd, 300, base, 96)
    arr = np.zeros(64, dtype=BUCKET_DTYPE)  # 256 slots for more regions than that
    deep: dict[tuple[int, int], int] = {}
    p = placed_into(arr, deep, rules)
    assert len(p.deep) > 0 and len(p.deep) + int((arr["s"]["plen"] != 0).sum()) == len(v6_tables(rules).deep)
    full = (arr["s"]["plen"] != 0).all(axis=1)
    assert (arr["ovf"] != 0).any() and not (arr["ovf"].astype(bool) & ~full).any()  # only full buckets overflow
    for addr in probes_for(rnd, rules, base):
        assert walk_placed(p.l0, arr, deep, addr) == reference(rules, addr), hex(addr)


@pytest.mark.parametrize("seed", range(4))
def test_changes_never_move_live_slots_and_keep_unchanged_rules(seed: int) -> None:
    """From one random set to another over a small array: slots that stay
    live keep their region, new regions only take slots free before the
    change, and at every step of the write an address gets the old or the
    new answer (the same rule, when it is that rule under both)."""
    rnd = random.Random(100 + seed)
    base = 0x2001_0002 << 96
    a = random_rules(rnd, 250, base, 96)
    in_a = {(x, p) for x, p, _ in a}
    b = a[:150] + [(x, p, i + 1000) for x, p, i in random_rules(rnd, 120, base, 96) if (x, p) not in in_a]
    arr = np.zeros(1024, dtype=BUCKET_DTYPE)  # some buckets fill, most do not
    deep: dict[tuple[int, int], int] = {}
    pa = placed_into(arr, deep, a)
    before = arr.copy()
    pb = place_v6(v6_tables(b), arr.copy())
    deep.update(pb.deep)
    fill_v6(arr, nothing, pb)
    was_live = before["s"]["plen"] != 0
    moved = was_live & ((arr["s"]["hi"] != before["s"]["hi"]) | (arr["s"]["lo"] != before["s"]["lo"]))
    assert not moved.any() and not (was_live & (arr["s"]["plen"] != before["s"]["plen"])).any()
    probes = probes_for(rnd, a + b, base)
    for l0 in (pa.l0, pb.l0):  # the L0 array is written after the deeper entries
        for addr in probes:
            old, new = reference(a, addr), reference(b, addr)
            got = walk_placed(l0, arr, deep, addr)
            assert got in (old, new), hex(addr)
            if old == new:
                assert got == old, hex(addr)
    prune_v6(arr, nothing, pb)
    for k in [k for k in deep if k not in pb.deep]:
        del deep[k]
    for addr in probes:
        assert walk_placed(pb.l0, arr, deep, addr) == reference(b, addr), hex(addr)
    # once freed, slots serve regions that overflowed before
    pc = placed_into(arr, deep, b)
    assert len(pc.deep) <= len(pb.deep)
