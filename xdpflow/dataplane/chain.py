"""The next program (`attach --then`): where frames xdpflow passes go.

xdpflow ends with a tail call through a one-slot program array pinned per
interface (``if_<name>/next_prog``), the way Katran and Cilium chain their
root programs. An empty slot falls through and xdpflow passes the frame
itself; a filled one hands it over, and the next program's verdict is the
frame's fate. One map update swaps the next program atomically: each frame
sees either the old one or the new one.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from xdpflow.bindings.libbpf import BPF_PROG_TYPE_XDP, Map, Program
from xdpflow.dataplane import abi
from xdpflow.dataplane.pins import PinRoot
from xdpflow.errors import InputError, XdpflowError

NEXT_PIN = "next_prog"  # the map, one of pins.IFACE_MAPS
NONE = "none"


@dataclass(frozen=True)
class NextProg:
    prog_id: int
    name: str

    def to_json(self) -> dict[str, Any]:
        return {"prog_id": self.prog_id, "name": self.name}


def parse_then(text: str) -> str:
    """Check the form of a --then argument: ``none``, ``id:N`` or a pinned
    program's path. Raises InputError."""
    if text == NONE or text.startswith("/"):
        return text
    if text.startswith("id:"):
        n = text[3:]
        if n.isdigit() and int(n) > 0:
            return text
        raise InputError(f"--then {text}: a program id is a positive number, e.g. id:42 (`bpftool prog` lists them)")
    raise InputError(f"--then {text}: give a pinned program's absolute path, id:N of a loaded program, or none")


def open_next(spec: str) -> Program | None:
    """The program a --then argument names (None for ``none``), checked to be
    an XDP program. Raises XdpflowError (ENOENT: gone; EINVAL: not XDP)."""
    spec = parse_then(spec)
    if spec == NONE:
        return None
    try:
        prog = Program.from_id(int(spec[3:])) if spec.startswith("id:") else Program.from_pin(spec)
    except XdpflowError as e:
        if e.errno == errno.ENOENT:
            raise XdpflowError(
                errno.ENOENT,
                f"--then {spec}: no such program (gone, or never loaded); `bpftool prog` lists the loaded ones",
            ) from None
        if e.errno == errno.EINVAL and not spec.startswith("id:"):
            raise XdpflowError(errno.EINVAL, f"--then {spec}: what is pinned there is not a program") from None
        raise
    info = prog.info
    if info.type != BPF_PROG_TYPE_XDP:
        prog.close()
        raise XdpflowError(
            errno.EINVAL,
            f"--then {spec}: program {info.id} ({info.name}) is not an XDP program; chain only XDP programs",
        )
    return prog


def _slots(pins: PinRoot, ifname: str) -> Map:
    key, value = abi.MAP_TYPES[NEXT_PIN]
    return Map.from_pin(pins.iface(ifname, NEXT_PIN), key, value)


def set_next(slots: Map, prog: Program | None, what: str) -> None:
    """Put ``prog`` in the slot (None: empty it) with one update, so a frame
    goes either to the old next program or to the new one. ``what`` names
    the program for errors. Raises XdpflowError with what to do when the
    kernel refuses the program as a tail-call target."""
    if prog is None:
        try:
            del slots[0]
        except KeyError:
            pass
        return
    try:
        slots[0] = prog.fd
    except XdpflowError as e:
        if e.errno != errno.EINVAL:
            raise
        info = prog.info
        raise XdpflowError(
            errno.EINVAL,
            f"the kernel refused program {info.id} ({info.name}) as the next program of xdpflow ({what}): "
            "a tail call needs an XDP program loaded like xdpflow (no xdp.frags / multi-buffer support, "
            "not offloaded, not bound to a device); reload it that way, or attach it without --then",
        ) from None


def set_next_pinned(pins: PinRoot, ifname: str, prog: Program | None, what: str) -> None:
    """set_next() on ``ifname``'s pinned slot. Raises XdpflowError."""
    with _slots(pins, ifname) as slots:
        set_next(slots, prog, what)


def next_of(pins: PinRoot, ifname: str) -> NextProg | None:
    """The program chained after xdpflow on ``ifname`` (None: none, or an
    xdpflow without chaining). Raises XdpflowError."""
    try:
        slots = _slots(pins, ifname)
    except XdpflowError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    with slots:
        prog_id = slots.lookup(0)  # the kernel answers a program array's lookup with the id
    if not prog_id:
        return None
    try:
        prog = Program.from_id(prog_id)
    except XdpflowError:
        return NextProg(prog_id, "")
    try:
        return NextProg(prog_id, prog.info.name)
    finally:
        prog.close()
