"""Rule hits in the events ring: a drop, monitor or rate-limit rule's hit is
an event naming the rule's id and action (budgeted like every event); pass
rules stay quiet."""

from __future__ import annotations

from xdpflow.dataplane.events import decode_event as product_decode
from xdpflow.rules.rulespec import parse_words

from ..frames import Events, decode_event, raw_udp4
from ..progtest import XDP_DROP, XDP_PASS, ProgHarness

SRC, DST = 0xC6120001, 0xC6120002  # 198.18.0.1 -> 198.18.0.2


def test_rule_hits_are_events_with_id_and_action() -> None:
    h = ProgHarness()
    events = Events(h)
    try:
        d, m, p = h.rules.install(
            [
                parse_words(["drop", "proto=udp", "dport=9"]),
                parse_words(["monitor", "proto=udp", "dport=10"]),
                parse_words(["pass", "proto=udp", "dport=11"]),
            ]
        )
        events.drain_raw()
        assert h.run(raw_udp4(SRC, DST, 1000, 9)) == XDP_DROP
        assert h.run(raw_udp4(SRC, DST, 1000, 10)) == XDP_PASS
        recs = events.drain_raw()
        assert h.run(raw_udp4(SRC, DST, 1000, 11)) == XDP_PASS
        quiet = [decode_event(r).type for r in events.drain_raw()]

        got = [product_decode(r, None, None) for r in recs]
        rule_events = [(e["rule"], e["action"], e["dropped"], e["dport"]) for e in got if e["type"] == "rule"]
        assert rule_events == [(d.id, "drop", True, 9), (m.id, "monitor", False, 10)], got
        # the pass rule's frame makes its new-flow event only
        assert 4 not in quiet
    finally:
        events.close()
        h.close()
