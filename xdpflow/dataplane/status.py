"""What `xdpflow status` reports: per interface, the program, its mode, the
flow tables' occupancy, and the shared blocklist and monitor switch.

Per interface, besides: "attach" ("link" or "netlink"; null when not
attached), "current_ifname" and "netns" (where the interface is now: its
name, and the named namespace it moved to or null; both null when not
attached), "then" (the next program, {"prog_id": N, "name": "..."}, or null).
"""

from __future__ import annotations

from typing import Any

from xdpflow.dataplane import abi
from xdpflow.dataplane.blocklist import blocklist_of
from xdpflow.dataplane.chain import next_of
from xdpflow.dataplane.flows import count_flows
from xdpflow.dataplane.maps import get_config, iface_status
from xdpflow.dataplane.pins import PinRoot
from xdpflow.errors import NotAttachedError


def status_rows(pins: PinRoot) -> list[dict[str, Any]]:
    """One `status --json` object per interface with state under ``pins``."""
    names = pins.interfaces()
    if not names:
        return []
    monitor = bool(get_config(pins).flags & abi.C.XF_CFG_MONITOR)
    with blocklist_of(pins) as bl:
        nrules = len(bl)
        _per_trie, total = bl.capacity()
    rows = []
    for ifname in names:
        st = iface_status(pins, ifname)
        try:
            flows, flows_max = count_flows(pins, ifname)
        except NotAttachedError:  # an attach that died half-way: show it, as not attached
            flows, flows_max = 0, 0
        then = next_of(pins, ifname)
        rows.append(
            {
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
                "blocklist": nrules,
                "blocklist_max": total,
                "monitor": monitor,
            }
        )
    return rows
