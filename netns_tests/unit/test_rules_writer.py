"""The pure parts around the rule-set writer: matching a wanted set against
the one in force, rate-limit parameters, `block add --ttl` entries, the rule
store's text, prefix masks, a watched rules file, the config key."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from xdpflow.app import config
from xdpflow.app.output import time_left
from xdpflow.dataplane import rules as dr
from xdpflow.errors import InputError
from xdpflow.rules.rulespec import parse_line
from xdpflow.rules.sources import SETTLE_NS, RulesFileSource


def rule(text: str, rule_id: int | None = None):  # type: ignore[no-untyped-def]
    r = parse_line(text, now=0.0)
    assert r is not None
    return r if rule_id is None else r.with_id(rule_id)


def test_merge_keeps_ids_by_identity() -> None:
    current = [rule("drop dst=203.0.113.5", 1), rule("pass src=198.18.0.0/15 priority=10", 2)]
    wanted = [rule("pass src=198.18.0.0/15 priority=10 # ours"), rule("monitor proto=icmp")]
    new, gone = dr.merge(current, wanted)
    assert [(r.id, r.comment) for r in new] == [(2, "ours"), (None, None)]  # the wanted comment, the old id
    assert gone == [current[0]]
    # a rule wanted twice is one rule; the last one's expiry wins
    twice = [rule("drop dst=203.0.113.5 expires=100"), rule("drop dst=203.0.113.5 expires=200")]
    new, gone = dr.merge(current, twice)
    assert [(r.id, r.expires_at) for r in new] == [(1, 200)] and gone == [current[1]]
    # another priority is another rule
    new, _ = dr.merge(current, [rule("drop dst=203.0.113.5 priority=5")])
    assert new[0].id is None


def test_rate_params() -> None:
    pkt, byte, burst = dr.rate_params(1000, None)
    assert (pkt, byte) == (1_000_000, 0)
    # the tolerance lets a few packets through beyond the rate: 0.5% of a second at 1,000 pps
    assert burst == dr.BURST_MIN_NS and burst // pkt + 1 <= 10
    pkt, byte, burst = dr.rate_params(None, 8_000_000)  # 1 MB/s: 1 us a byte, << 10
    assert pkt == 0 and byte == 1000 << 10
    assert burst >= (dr.BURST_PACKETS * dr.BURST_FRAME * byte) >> 10
    pkt, _, burst = dr.rate_params(1, None)  # slow rates: a few packets' worth
    assert burst == dr.BURST_PACKETS * pkt


def test_rate_costs_in_clock_units() -> None:
    """The program counts 2^-24 jiffy: at HZ 250 a unit is 1/4,194,304,000 s."""
    unit = 1 << dr.C.XF_RATE_SHIFT
    pkt, byte, burst = dr.rate_costs(1000, None, 250)
    assert (pkt, byte) == (round(250 * unit / 1000), 0)
    assert burst == 2 * unit  # two 4 ms ticks, above the 5 ms minimum
    pkt, byte, burst = dr.rate_costs(None, 8_000_000, 1000)  # 1 MB/s: 1 us a byte
    assert pkt == 0 and byte == round(1000 * 1000 * unit / 1e9 * 1024)
    assert dr.rate_costs(10**12, None, 100)[0] == 1  # never 0: that would mean "no limit"
    assert dr.rate_costs(1000, None, 1000)[2] == 5 * unit  # 5 ms: above two 1 ms ticks


def test_block_entries() -> None:
    net = ipaddress.ip_network("203.0.113.7/32")
    r = dr.block_rule(net, "dst", 2_000_000_000)
    assert dr.block_entry(r) == "dst" and r.priority == 1000 and r.action == "drop" and r.comment == "block"
    assert dr.block_entry(rule(r.line(), 3)) == "dst"  # also as read back from the store
    for text in (
        "drop dst=203.0.113.7 expires=2000000000",  # no "block" comment
        "drop dst=203.0.113.7 # block",  # no expiry
        "drop dst=203.0.113.7 proto=udp expires=2000000000 # block",  # more than an address
        "drop dst=203.0.113.7 priority=999 expires=2000000000 # block",
        "pass dst=203.0.113.7 expires=2000000000 # block",
    ):
        assert dr.block_entry(rule(text)) is None, text


def test_stored_text_round_trips_and_has_a_limit() -> None:
    r = rule("rate-limit src=2001:2::/48 proto=tcp dport=443 tcp-flags=SYN,!ACK pps=2000 expires=99 # syn flood")
    text = dr.stored_text(r)
    assert "expires" not in text
    back = parse_line(text, now=0.0)
    assert back is not None and back.identity() == r.identity() and back.comment == "syn flood"
    long = rule("drop src=2001:2::/48 dst=2001:2:0:ffff:ffff:ffff:ffff:ff00/120 # " + "x" * 200)
    with_text = dr.stored_text(long)
    assert len(with_text.encode()) <= dr.TEXT_MAX
    from dataclasses import replace

    with pytest.raises(InputError):
        dr.stored_text(replace(long, comment="€" * 200))


def test_mask_words() -> None:
    # the two u64 the program ANDs with the address as it lies in memory
    lo, hi = dr._mask_words(24, 32)
    assert (lo.to_bytes(8, "little") + hi.to_bytes(8, "little")) == b"\xff\xff\xff\x00" + bytes(12)
    lo, hi = dr._mask_words(72, 128)
    assert (lo.to_bytes(8, "little") + hi.to_bytes(8, "little")) == b"\xff" * 9 + bytes(7)


def test_time_left() -> None:
    assert [time_left(s) for s in (0, -5, 1, 59, 60, 61, 599, 3600, 3661, 86400 * 2 + 7200)] == [
        "expired", "expired", "1s", "59s", "1m", "1m1s", "9m59s", "1h", "1h1m", "2d2h",
    ]  # fmt: skip


def _settle(path: Path) -> None:
    # a change is read once the file was left alone for SETTLE_NS
    time.sleep(SETTLE_NS / 1e9 + 0.05)


def test_rules_file_source(tmp_path: Path) -> None:
    path = tmp_path / "rules.txt"
    src = RulesFileSource(str(path))
    r = src.poll()
    assert r.error is not None and "cannot read rules file" in r.error and r.rules is None and not r.changed
    assert src.poll().error is None  # reported once

    path.write_text("drop proto=udp sport=123 dst=203.0.113.5 ttl=1h # NTP\npass src=198.18.0.1 priority=5\n")
    _settle(path)
    r = src.poll()
    assert r.changed and r.error is None and [x.action for x in r.rules or []] == ["drop", "pass"]
    time.sleep(1.1)  # past RACY_NS: the next poll need not read again
    assert not src.poll().changed and not src.poll().changed

    # a bad edit: file:line reported, the last good rules kept
    path.write_text("drop proto=udp sport=123 dst=203.0.113.5\ndrop dport=90-80\n")
    _settle(path)
    r = src.poll()
    assert not r.changed and r.error is not None
    assert (
        r.error.startswith(f"{path}:2: ")
        and "reversed" in r.error
        and "keeping the last good version (2 rules)" in r.error
    )
    assert [x.action for x in r.rules or []] == ["drop", "pass"]

    path.write_text("monitor proto=icmp\n")
    _settle(path)
    r = src.poll()
    assert r.changed and r.error is None and [x.action for x in r.rules or []] == ["monitor"]


def test_config_rules_files(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('interfaces = ["eth0"]\n[rules]\nfiles = ["/etc/xdpflow/rules.txt"]\n')
    assert config.load_config(str(good)).rules_files == ["/etc/xdpflow/rules.txt"]
    for bad in ('files = "/etc/xdpflow/rules.txt"', "files = [1]", 'file = ["x"]'):
        p = tmp_path / "bad.toml"
        p.write_text(f'interfaces = ["eth0"]\n[rules]\n{bad}\n')
        with pytest.raises(config.ConfigError):
            config.load_config(str(p))
