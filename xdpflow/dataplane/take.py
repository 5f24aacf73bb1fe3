"""Record starts: taking a flow's ``rec_start`` stamp without losing counts.

The XDP program stamps ``rec_start`` with the first packet a flow counts
after the exporter's last active-timeout export. The exporter cannot clear
one field of an LRU hash value from userspace (an update replaces the whole
element: increments landing between its read and its write would be lost),
so the program ``xdpflow_take``, run through BPF_PROG_TEST_RUN, does it in
the kernel: an atomic exchange with 0, then the totals read right after
(see bpf/xdpflow.bpf.c for the race that is left, a few ns wide). It is
pinned per interface, because its maps are that interface's flow tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdpflow.bindings.libbpf import Program
from xdpflow.dataplane.abi import C, ffi

TAKE_PROG = "xdpflow_take"  # its name in the object
TAKE_PIN = "take"  # its pin, under the interface's directory


@dataclass(frozen=True)
class Taken:
    """What ``xdpflow_take`` took of one flow, and its totals right after."""

    rec_start: int  # jiffies; 0: no packet stamped one since the last take
    packets: int
    bytes: int
    last_seen: int
    tcp_flags: int


def take(prog: Program, family: int, keys: list[bytes]) -> dict[bytes, Taken]:
    """Swap ``rec_start`` of each flow (raw keys of one family's table) for 0
    and return what was taken; flows no longer in the table are left out.
    Raises XdpflowError."""
    out: dict[bytes, Taken] = {}
    size = ffi.sizeof("struct xf_take")
    for at in range(0, len(keys), C.XF_TAKE_MAX):
        chunk = keys[at : at + C.XF_TAKE_MAX]
        buf = ffi.new("struct xf_take[]", len(chunk))
        for i, key in enumerate(chunk):
            ffi.memmove(buf[i].key, key, len(key))
            buf[i].family = family
        r = prog.test_run(ffi.buffer(buf)[:])
        got = ffi.from_buffer("struct xf_take[]", r.data[: size * len(chunk)])
        for i, key in enumerate(chunk):
            t = got[i]
            if t.found:
                out[key] = Taken(int(t.rec_start), int(t.packets), int(t.bytes), int(t.last_seen), int(t.tcp_flags))
    return out
