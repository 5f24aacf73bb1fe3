"""A loaded xdpflow program for BPF_PROG_TEST_RUN tests: frames in, verdict
and exact map contents out. Nothing is pinned, nothing is attached.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from xdpflow.bindings.libbpf import Map
from xdpflow.dataplane import abi, blocklist, lifecycle
from xdpflow.dataplane.clock import CLOCK_PROG, JiffiesClock
from xdpflow.dataplane.flows import Flow, read_table, to_flows
from xdpflow.dataplane.lifecycle import AttachOptions
from xdpflow.dataplane.protect import ProtectTables
from xdpflow.dataplane.rules import RuleTables

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3


class ProgHarness:
    def __init__(self, **opts: Any) -> None:
        self.obj = lifecycle.load_unpinned(AttachOptions(**opts))
        self.prog = self.obj.program(lifecycle.PROG_NAME)
        self._maps: dict[str, Map] = {}
        self.blocklist = blocklist.Blocklist(self.map)
        self._rules: RuleTables | None = None

    def map(self, name: str) -> Map:
        if name not in self._maps:
            key, value = abi.MAP_TYPES[name]
            self._maps[name] = self.obj.map(name, key, value, abi.ffi)
        return self._maps[name]

    @property
    def rules(self) -> RuleTables:
        """The rule set of this object (deadlines in its clock's jiffies)."""
        if self._rules is None:
            clock_prog = self.obj.program(CLOCK_PROG)
            clock = JiffiesClock(clock_prog, lifecycle.kernel_hz(self.obj))
            clock_prog.close()
            self._rules = RuleTables(self.map, clock=clock)
        return self._rules

    @property
    def protect(self) -> ProtectTables:
        """The protected-destination tables of this object."""
        return ProtectTables(self.map)

    def run(self, frame: Any, repeat: int = 1) -> int:
        """Run one frame (bytes or a scapy packet); returns the XDP verdict."""
        return self.prog.test_run(bytes(frame), repeat=repeat).retval

    def counters(self) -> dict[str, int]:
        return abi.counter_dict(self.map("counters").sum(0))

    def flows(self) -> list[Flow]:
        out: list[Flow] = []
        clock_prog = self.obj.program(CLOCK_PROG)
        clock = JiffiesClock(clock_prog, lifecycle.kernel_hz(self.obj))
        clock_prog.close()
        for name, fam in (("flows_v4", 4), ("flows_v6", 6)):
            out.extend(to_flows(read_table(self.map(name), fam), "test", clock))
        return out

    def flow(self, src: str, dst: str, sport: int, dport: int, proto: int) -> Flow | None:
        for f in self.flows():
            if (
                ipaddress.ip_address(f.src) == ipaddress.ip_address(src)
                and ipaddress.ip_address(f.dst) == ipaddress.ip_address(dst)
                and (f.sport, f.dport, f.proto) == (sport, dport, proto)
            ):
                return f
        return None

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        self.prog.close()
        self.obj.close()
