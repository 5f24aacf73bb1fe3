"""Events from the data plane's ring buffer: new flows and blocklist hits,
decoded into the objects `xdpflow events --json` prints.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from xdpflow.dataplane import abi
from xdpflow.dataplane.abi import ffi
from xdpflow.dataplane.blocklist import blocklist_of
from xdpflow.dataplane.clock import JiffiesClock
from xdpflow.dataplane.pins import PinRoot
from xdpflow.rules.blockfile import Rule

EVENT_TYPES = {
    abi.C.XF_EV_NEW_FLOW: "new_flow",
    abi.C.XF_EV_BLOCKED: "blocked",
    abi.C.XF_EV_MONITORED: "monitored",
    abi.C.XF_EV_RULE: "rule",
}

# a rule event's action byte (xf_event.pad), as `rule list` spells actions
RULE_ACTIONS = {
    abi.C.XF_RA_PASS: "pass",
    abi.C.XF_RA_DROP: "drop",
    abi.C.XF_RA_MONITOR: "monitor",
    abi.C.XF_RA_RATE: "rate-limit",
}


class RuleNames:
    """Rule index -> CIDR per blocklist generation. An event carries the
    generation it was made in; indices freed by a change may name another
    rule after it. During a change both the old rules and the new ones (with
    indices no old rule had) are live, so generation g's index may also be
    one of g + 1's."""

    def __init__(self, pins: PinRoot) -> None:
        self.pins = pins
        self.by_gen: dict[int, dict[int, Rule]] = {}
        self.refresh()

    def refresh(self) -> None:
        with blocklist_of(self.pins) as bl:
            # read the generation around the rules: equal twice means no change in between
            for _ in range(5):
                g = bl.generation()
                rules = bl.rule_indices()
                if bl.generation() == g:
                    self.by_gen[g] = rules
                    return

    def name(self, generation: int, index: int) -> Rule | None:
        for g in (generation, generation + 1):
            if g not in self.by_gen:
                self.refresh()
            r = self.by_gen.get(g, {}).get(index)
            if r is not None:
                return r
        return None


def decode_event(data: bytes, rules: RuleNames | None, clock: JiffiesClock | None) -> dict[str, Any]:
    """One ring-buffer record as the `events --json` object. Without a clock,
    "time" is the raw jiffies stamp; without rule names, "rule" is the index."""
    e = ffi.cast("struct xf_event *", ffi.from_buffer(data))
    fam = int(e.family)
    alen = 4 if fam == 4 else 16
    raw_s = bytes(ffi.buffer(e.saddr, alen))
    raw_d = bytes(ffi.buffer(e.daddr, alen))
    try:
        ifname = socket.if_indextoname(e.ifindex)
    except OSError:
        ifname = str(e.ifindex)
    out: dict[str, Any] = {
        "type": EVENT_TYPES.get(int(e.type), str(int(e.type))),
        "time": clock.to_wall(int(e.ts)) if clock is not None else int(e.ts),
        "ifname": ifname,
        "src": str(ipaddress.ip_address(raw_s)),
        "dst": str(ipaddress.ip_address(raw_d)),
        "sport": socket.ntohs(e.sport),
        "dport": socket.ntohs(e.dport),
        "proto": int(e.proto),
        "len": int(e.len),
    }
    if int(e.type) == abi.C.XF_EV_RULE:
        # a rule event names the rule by id: ids are never reused, so no generation is needed
        extra = int(e.pad)
        out["rule"] = int(e.rule)
        out["action"] = RULE_ACTIONS.get(extra & ~abi.C.XF_EV_RULE_DROPPED, str(extra))
        out["dropped"] = bool(extra & abi.C.XF_EV_RULE_DROPPED)
    elif int(e.type) != abi.C.XF_EV_NEW_FLOW:
        if rules is None:
            out["rule"] = int(e.rule)
        else:
            r = rules.name(int(e.generation), int(e.rule))
            out["rule"] = str(r.net) if r else None
    return out
