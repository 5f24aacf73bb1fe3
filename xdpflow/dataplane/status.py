"""What `xdpflow status` reports: per interface, the program, its mode, the
flow tables' occupancy, and the shared blocklist and monitor switch.

Per interface, besides: "attach" ("link" or "netlink"; null when not
attached), "current_ifname" and "netns" (where the interface is now: its
name, and the named namespace it moved to or null; both null when not
attached), "then" (the next program, {"prog_id": N, "name": "..."}, or null).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from xdpflow.dataplane import abi, attachment
from xdpflow.dataplane.background import Background
from xdpflow.dataplane.chain import next_of
from xdpflow.dataplane.counts import count_flows, count_rules, rule_capacity
from xdpflow.dataplane.maps import PinnedMaps, get_config, knobs_of, pinned_prog
from xdpflow.dataplane.pins import PinRoot
from xdpflow.errors import NotAttachedError


def status_rows(pins: PinRoot) -> list[dict[str, Any]]:
    """One `status --json` object per interface with state under ``pins``."""
    names = pins.interfaces()
    if not names:
        return []
    monitor = bool(get_config(pins).flags & abi.C.XF_CFG_MONITOR)
    with PinnedMaps(pins) as shared:
        _per_trie, total = rule_capacity(shared)
        for trie, _flag in abi.BLOCKLIST_TRIES.values():
            shared(trie)  # opened here: the map cache is not shared across threads
        # the tries keep no count and reading 10^5 rules is most of status's
        # time, in syscalls: they are counted while the interfaces are read
        counting = Background(lambda: count_rules(shared))
        try:
            rows = [_row(pins, ifname) for ifname in names]
        except BaseException:
            counting.wait()
            raise
        nrules = counting.result()
    for row in rows:
        row.update({"blocklist": nrules, "blocklist_max": total, "monitor": monitor})
    return rows


def _row(pins: PinRoot, ifname: str) -> dict[str, Any]:
    """One interface's object; the shared keys at its end are filled in after."""
    st = iface_status(pins, ifname)
    try:
        flows, flows_max = count_flows(pins, ifname)
    except NotAttachedError:  # an attach that died half-way: show it, as not attached
        flows, flows_max = 0, 0
    then = next_of(pins, ifname)
    return {
        "ifname": ifname,
        "mode": st.mode,
        "prog_id": st.prog_id,
        "attached": st.attached,
        "attached_at": st.attached_at,
        "attach": st.attach,
        "current_ifname": st.found_as,
        "netns": st.netns,
        "then": then.to_json() if then is not None else None,
        "sink": st.sink,
        "flows": flows,
        "flows_max": flows_max,
        "blocklist": None,
        "blocklist_max": None,
        "monitor": None,
    }


def boot_to_wall(ns_since_boot: int) -> float:
    """Convert a CLOCK_BOOTTIME nanosecond stamp to Unix seconds."""
    return time.time() - (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - ns_since_boot) / 1e9


@dataclass
class IfaceStatus:
    ifname: str
    mode: str | None
    prog_id: int
    attached: bool  # the pinned program is the one running on the interface
    attached_at: float | None
    sink: bool
    attach: str | None = None  # "link" or "netlink" while attached
    found_as: str | None = None  # the interface's name now (renamed or moved)
    netns: str | None = None  # the named namespace it moved to; None: this one


def iface_status(pins: PinRoot, ifname: str) -> IfaceStatus:
    """Program, mode, attach time and attachment of ``ifname``, followed
    through renames and moves to named namespaces (counts.count_flows counts
    its flow tables). Raises XdpflowError."""
    prog = pinned_prog(pins, ifname)
    prog_id, attached_at, sink = 0, None, False
    if prog is not None:
        info = prog.info
        prog_id = info.id
        attached_at = boot_to_wall(info.load_time_ns)
        knobs = knobs_of(prog)
        sink = bool(knobs is not None and knobs.sink)
        prog.close()
    st = IfaceStatus(ifname, None, prog_id, False, attached_at, sink)
    if not prog_id:
        return st
    link = attachment.xdp_link_of(prog_id)
    where = attachment.locate(prog_id, ifname, link.ifindex if link is not None else 0)
    if where is None:
        return st
    st.attached = True
    st.mode = where.state.mode
    st.attach = "link" if link is not None else "netlink"
    st.found_as = where.ifname
    st.netns = where.netns
    return st
