"""Placement of the IPv4 table's /24 and host chunks (pure: no kernel). The
kernel's lookup through them is checked in test_prog_blocklist*."""

from __future__ import annotations

import numpy as np

from xdpflow.dataplane.blocklist import CHUNK, D24, RULE_MASK, place_chunks, v4_tables


def tables(rules: list[tuple[int, int, int]]):
    a = np.array([r[0] for r in rules], dtype=np.uint64)
    p = np.array([r[1] for r in rules], dtype=np.int64)
    i = np.array([r[2] for r in rules], dtype=np.uint64)
    return v4_tables(a, p, i)


def net(text: str) -> int:
    o = [int(x) for x in text.split(".")]
    return o[0] << 24 | o[1] << 16 | o[2] << 8 | o[3]


def answer(placed, addr: int) -> int:
    """rule index + 1 for addr, walked the way bl4_lookup() walks it."""
    v = int(placed.l1[addr >> 16])
    if not v & (D24 | (1 << 30)):
        return v
    if v & CHUNK:
        k = v & RULE_MASK
        v = int(placed.chunks[k][(addr >> 8) & 0xFF])
        h = int(placed.l2h[k][(addr >> 8) & 0xFF]) if k in placed.l2h else 0
        if v & (1 << 30) and h:
            return int(placed.hchunks[h - 1][addr & 0xFF])
    elif v & D24:
        if (addr >> 8) not in placed.l2:
            return v & RULE_MASK
        v = placed.l2[addr >> 8]
    if not v & (1 << 30):
        return v & RULE_MASK
    return placed.l3.get(addr, v & RULE_MASK)


RULES = [
    (net("198.18.0.0"), 16, 0),
    (net("198.18.7.0"), 24, 1),
    (net("198.18.7.9"), 32, 2),
    (net("198.19.3.0"), 24, 3),
    (net("203.0.113.0"), 25, 4),
    (net("198.51.0.0"), 17, 5),
]
PROBES = ["198.18.0.1", "198.18.7.1", "198.18.7.9", "198.19.3.3", "198.19.4.4", "203.0.113.5", "198.51.1.1"]
WANT = [1, 2, 3, 4, 0, 5, 6]


def test_chunks_answer_like_the_hash() -> None:
    t = tables(RULES)
    empty = np.zeros(65536, dtype=np.uint32)
    for capacity in (0, 1, 3, 4096):
        placed = place_chunks(t, empty, capacity, chunk_min=1)
        assert len(placed.chunks) == min(capacity, 3)
        assert [answer(placed, net(p)) for p in PROBES] == WANT, capacity


def test_a_chunk_stays_with_its_16_and_is_never_handed_to_another_in_one_change() -> None:
    first = place_chunks(tables(RULES), np.zeros(65536, dtype=np.uint32), 4, chunk_min=1)
    old = first.l1
    chunk_of = {c: int(old[c]) & RULE_MASK for c in np.flatnonzero(old & CHUNK).tolist()}
    # drop 198.19.3.0/24, add two /24s in new /16s: the freed chunk is not reused yet
    rules = [r for r in RULES if r[2] != 3] + [(net("198.20.1.0"), 24, 6), (net("198.21.1.0"), 24, 7)]
    second = place_chunks(tables(rules), old, 4, chunk_min=1)
    now = {c: int(second.l1[c]) & RULE_MASK for c in np.flatnonzero(second.l1 & CHUNK).tolist()}
    for c, k in chunk_of.items():
        if c in now:
            assert now[c] == k
    assert not ({k for c, k in now.items() if c not in chunk_of} & set(chunk_of.values()))
    # 198.19's chunk is still read by frames holding the old /16 entry: of the
    # two new /16s one gets the one free chunk, the other the L2 hash
    assert len(now) == 3 and len(second.l2) == 1
    assert answer(second, net("198.21.1.1")) == 8 and answer(second, net("198.20.1.1")) == 7


def test_sparse_16s_stay_in_the_hash() -> None:
    # one /24 in a /16: a chunk would be 256 slots written for one entry; the
    # /17 fills 128 /24s of its /16, which gets one
    placed = place_chunks(tables(RULES), np.zeros(65536, dtype=np.uint32), 4096)
    assert len(placed.chunks) == 1 and {k >> 8 for k in placed.l2} == {net("198.18.0.0") >> 16, net("198.19.0.0") >> 16}
    assert [answer(placed, net(p)) for p in PROBES] == WANT
    dense = [(net(f"198.18.{i}.0"), 24, i) for i in range(8)]
    placed = place_chunks(tables(dense), np.zeros(65536, dtype=np.uint32), 4096)
    assert len(placed.chunks) == 1 and placed.l2 == {}


def hosts_answer_like_the_hash(placed, rules) -> None:
    probes = [r[0] + d for r in rules for d in (-1, 0, 1, 5)]
    plain = place_chunks(tables(rules), np.zeros(65536, dtype=np.uint32), 4096)  # no host chunks
    assert [answer(placed, a) for a in probes] == [answer(plain, a) for a in probes]


HOSTS_RULES = [
    (net("198.18.0.0"), 16, 0),
    (net("198.18.7.0"), 24, 1),
    (net("198.18.7.9"), 32, 2),
    (net("198.18.7.128"), 25, 3),
    (net("203.0.113.5"), 32, 4),  # a /16 holding nothing but a host
    (net("203.0.114.6"), 31, 5),
    (net("198.51.100.0"), 30, 6),
]


def test_hosts_get_chunks_that_answer_like_the_hash() -> None:
    old_l2h = np.zeros(1 << 20, dtype=np.uint32)
    placed = place_chunks(tables(HOSTS_RULES), np.zeros(65536, dtype=np.uint32), 4096, old_l2h=old_l2h, host_capacity=8)
    # every /16 with hosts has a /24 chunk, every /24 with hosts a host chunk
    assert {c for c in range(65536) if placed.l1[c] & CHUNK} == {0xC612, 0xCB00, 0xC633}
    assert len(placed.hchunks) == 4
    hosts_answer_like_the_hash(placed, HOSTS_RULES)
    assert answer(placed, net("203.0.113.5")) == 5 and answer(placed, net("203.0.113.6")) == 0
    assert answer(placed, net("198.18.7.200")) == 4 and answer(placed, net("198.18.7.10")) == 2
    # past the capacity the rest keep the hash
    few = place_chunks(tables(HOSTS_RULES), np.zeros(65536, dtype=np.uint32), 4096, old_l2h=old_l2h, host_capacity=1)
    assert len(few.hchunks) == 1
    hosts_answer_like_the_hash(few, HOSTS_RULES)


def as_arrays(placed):
    """The L1 and L2H arrays as the program would read them after the write."""
    l2h = np.zeros(1 << 20, dtype=np.uint32)
    for k, row in placed.l2h.items():
        l2h[k * 256 : k * 256 + 256] = row
    return placed.l1, l2h


def test_a_host_chunk_stays_with_its_24_and_is_never_handed_to_another_in_one_change() -> None:
    first = place_chunks(
        tables(HOSTS_RULES),
        np.zeros(65536, dtype=np.uint32),
        4096,
        old_l2h=np.zeros(1 << 20, dtype=np.uint32),
        host_capacity=5,
    )
    l1, l2h = as_arrays(first)

    def host_chunks(placed):
        out = {}
        for k, row in placed.l2h.items():
            c16 = next(c for c in range(65536) if placed.l1[c] & CHUNK and placed.l1[c] & RULE_MASK == k)
            out.update({c16 << 8 | b: int(row[b]) - 1 for b in np.flatnonzero(row).tolist()})
        return out

    before = host_chunks(first)
    # 203.0.114.6/31 goes, 198.51.101.7 and 198.51.102.8 come: the freed host chunk is not reused yet
    rules = [r for r in HOSTS_RULES if r[2] != 5] + [(net("198.51.101.7"), 32, 7), (net("198.51.102.8"), 32, 8)]
    second = place_chunks(tables(rules), l1, 4096, old_l2h=l2h, host_capacity=5)
    after = host_chunks(second)
    for c, k in before.items():
        if c in after:
            assert after[c] == k
    new = {k for c, k in after.items() if c not in before}
    assert not new & set(before.values())
    # 4 before, one gone (its chunk still readable), two new: one gets the fifth chunk, the other the hash
    assert len(after) == 4 and len({net("198.51.101.0") >> 8, net("198.51.102.0") >> 8} & after.keys()) == 1
    hosts_answer_like_the_hash(second, rules)
