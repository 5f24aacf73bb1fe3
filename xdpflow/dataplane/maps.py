"""xdpflow's pinned maps, opened by name, and what they hold: interface
counters, the shared config, the clock, a program's knobs.

Every map is opened with its header types (``abi.MAP_TYPES``); a pin that is
not there is reported as "not attached", the one sentence ``PinRoot`` writes.
"""

from __future__ import annotations

import errno
import os
from typing import Any, NamedTuple

from xdpflow.bindings.libbpf import Map, Program, ffi, lib, map_info, obj_get
from xdpflow.dataplane import abi
from xdpflow.dataplane.clock import CLOCK_PIN, JiffiesClock, measure_hz
from xdpflow.dataplane.pins import PinRoot
from xdpflow.errors import XdpflowError

PROG_PIN = "prog"


def _missing(e: XdpflowError) -> bool:
    return e.errno == errno.ENOENT


def open_map(pins: PinRoot, name: str, ifname: str | None = None) -> Map:
    """One of the shared maps (``ifname`` None) or of an interface's maps,
    typed by the header. Raises NotAttachedError when it is not pinned."""
    key, value = abi.MAP_TYPES[name]
    path = pins.iface(ifname, name) if ifname is not None else pins.shared(name)
    try:
        return Map.from_pin(path, key, value, types=abi.ffi)
    except XdpflowError as e:
        if _missing(e):
            raise pins.not_attached(ifname) from None
        raise


class PinnedMaps:
    """Opens shared maps on demand and closes them together: the ``open_map``
    the blocklist and the rule set take."""

    def __init__(self, pins: PinRoot) -> None:
        self.pins = pins
        self._maps: dict[str, Map] = {}

    def __call__(self, name: str) -> Map:
        if name not in self._maps:
            self._maps[name] = open_map(self.pins, name)
        return self._maps[name]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __enter__(self) -> PinnedMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_events_fd(pins: PinRoot) -> int:
    """A new fd for the shared events ring buffer; the caller closes it."""
    try:
        return obj_get(pins.shared("events"))
    except XdpflowError as e:
        if _missing(e):
            raise pins.not_attached() from None
        raise


def pinned_prog(pins: PinRoot, ifname: str, name: str = PROG_PIN) -> Program | None:
    """The program pinned for ``ifname`` (None when there is none)."""
    try:
        return Program.from_pin(pins.iface(ifname, name))
    except XdpflowError as e:
        if _missing(e):
            return None
        raise


# what read_counters() gives, in display order: the header's counters, then
# the admission control's
STAT_NAMES = (*abi.COUNTER_NAMES.values(), "untracked")


def read_counters(pins: PinRoot, ifname: str) -> dict[str, int]:
    """Interface counters summed over CPUs: ``{name: packets, name_bytes: bytes}``,
    with ``untracked``/``untracked_bytes`` from the admission control."""
    with open_map(pins, "counters", ifname) as m:
        total = m.sum(0)
    out = abi.counter_dict(total)
    adm = read_admission(pins, ifname)
    out["untracked"], out["untracked_bytes"] = adm.packets, adm.bytes
    return out


class Untracked(NamedTuple):
    """Frames over the new-flow budget, summed over CPUs: counted, not tracked."""

    packets: int = 0
    bytes: int = 0  # IP bytes
    first: int = 0  # jiffies of the first one (0: none yet)
    last: int = 0  # jiffies of the last one


def sum_admission(values: list[Any]) -> Untracked:
    """Per-CPU ``struct xf_admission`` values as one ``Untracked``."""
    firsts = [int(v.first_untracked) for v in values if v.first_untracked]
    return Untracked(
        sum(int(v.untracked_packets) for v in values),
        sum(int(v.untracked_bytes) for v in values),
        min(firsts, default=0),
        max((int(v.last_untracked) for v in values), default=0),
    )


def read_admission(pins: PinRoot, ifname: str) -> Untracked:
    """What ``ifname``'s admission control left untracked; zero for a program
    attached by a version without it (no pin; attach again to add it)."""
    try:
        m = Map.from_pin(pins.iface(ifname, "admission"), *abi.MAP_TYPES["admission"], types=abi.ffi)
    except XdpflowError as e:
        if _missing(e):
            return Untracked()
        raise
    with m:
        return sum_admission(m[0])


def get_config(pins: PinRoot) -> Any:
    """The shared config struct (a copy)."""
    with open_map(pins, "config") as m:
        return m[0]


def update_config(pins: PinRoot, set_bits: int = 0, clear_bits: int = 0) -> None:
    """Read-modify-write the shared config flags. Callers hold the pin-root lock."""
    with open_map(pins, "config") as m:
        cfg = m[0]
        cfg.flags = (cfg.flags | set_bits) & ~clear_bits
        m[0] = cfg


def set_monitor(pins: PinRoot, on: bool) -> None:
    """Switch monitor mode (count would-be drops, pass them) at run time."""
    with pins.lock():
        if on:
            update_config(pins, set_bits=abi.C.XF_CFG_MONITOR)
        else:
            update_config(pins, clear_bits=abi.C.XF_CFG_MONITOR)


def open_clock(pins: PinRoot) -> JiffiesClock:
    """A jiffies-to-Unix-time converter for this instance's stamps."""
    try:
        prog = Program.from_pin(pins.shared(CLOCK_PIN))
    except XdpflowError as e:
        if _missing(e):
            raise pins.not_attached() from None
        raise
    try:
        hz = int(get_config(pins).hz) or measure_hz(prog)
        return JiffiesClock(prog, hz)
    finally:
        prog.close()


# knobs an older program's shorter .rodata lacks read as these
_KNOB_DEFAULTS = {"flow_budget": abi.C.XF_FLOW_BUDGET_DEFAULT}
_KNOBS_V1 = abi.ffi.offsetof("struct xf_knobs", "flow_budget")  # .rodata before flow_budget


def knobs_of(prog: Program) -> Any:
    """The load-time knobs of a running program, read from its .rodata map
    (None when it has none of ours). An older program's knobs come with this
    version's defaults for the fields it had none of."""
    size = abi.ffi.sizeof("struct xf_knobs")
    for mid in prog.info.map_ids:
        fd = lib.bpf_map_get_fd_by_id(mid)
        if fd < 0:
            continue
        try:
            info = map_info(fd)
            if not info.name.endswith(".rodata") or info.value_size not in (size, _KNOBS_V1):
                continue
            buf = ffi.new("char[]", info.value_size)
            if lib.bpf_map_lookup_elem(fd, ffi.new("uint32_t *", 0), buf) != 0:
                continue
            knobs = abi.ffi.new("struct xf_knobs *", _KNOB_DEFAULTS)
            abi.ffi.memmove(knobs, ffi.buffer(buf)[:], info.value_size)
            return knobs[0]
        finally:
            os.close(fd)
    return None
