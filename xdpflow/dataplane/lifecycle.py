"""Load, pin, attach and detach: the life cycle of xdpflow on an interface.

Every call is meant for a short-lived process: all state is in pinned maps,
so the data plane keeps counting and blocking when no xdpflow process runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from xdpflow.bindings import netlink
from xdpflow.bindings.libbpf import (
    BPF_F_MMAPABLE,
    BPF_MAP_TYPE_LRU_HASH,
    BPF_MAP_TYPE_LRU_PERCPU_HASH,
    MapInfo,
    MapSpec,
    Object,
    Program,
    map_info,
    obj_get,
)
from xdpflow.bindings.netlink import XdpState
from xdpflow.dataplane import abi, attachment, blocklist, chain, rules
from xdpflow.dataplane.abi import FLOW_BUDGET_DEFAULT, FLOW_BUDGET_MAX, FLOWS_DEFAULT
from xdpflow.dataplane.clock import CLOCK_PIN, CLOCK_PROG, measure_hz
from xdpflow.dataplane.maps import PROG_PIN, knobs_of, open_clock, pinned_prog, set_monitor
from xdpflow.dataplane.pins import IFACE_MAPS, RETIRED_MAPS, RULE_SET_MAPS, SHARED_MAPS, PinRoot, ensure_bpffs
from xdpflow.dataplane.take import TAKE_PIN, TAKE_PROG
from xdpflow.errors import ForeignProgramError, InputError, XdpflowError

PROG_NAME = "xdpflow"


@dataclass
class AttachOptions:
    mode: str = "auto"
    flows: int | None = None  # flows both tables hold together; None: keep/default
    sink: bool | None = None  # None: keep what an upgraded program had (else off)
    monitor: bool | None = None  # None: leave as it is
    force: bool = False
    shared_flows: bool = True  # LRU_HASH with atomic adds; False: per-CPU LRU
    events_per_sec: int = abi.C.XF_EVENTS_PER_SEC
    object_path: str | None = None
    then: str | None = None  # --then: "none", "id:N" or a pinned program's path; None: keep
    then_only: bool = False  # on an attached interface, only swap the next program (no reload)
    protect_hosts: int | None = None  # protected hosts counted (prot_hosts); None: keep/default
    flow_budget: int | None = None  # new flows per CPU per second (0: unlimited); None: keep/default


@dataclass
class AttachResult:
    ifname: str
    prog_id: int
    mode: str | None
    replaced: bool  # an xdpflow program was upgraded in place
    attach: str = "link"  # "link" or "netlink"
    then: chain.NextProg | None = None  # the next program now
    then_only: bool = False  # only the next program changed
    gap_ns: int | None = None  # a move from netlink to a link: how long no program ran


def _pinned_info(path: str) -> MapInfo | None:
    try:
        fd = obj_get(path)
    except XdpflowError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    try:
        return map_info(fd)
    finally:
        os.close(fd)


def _settle_pins(pins: PinRoot, ifname: str, running_id: int) -> None:
    """Finish what an attach killed mid-upgrade left: a "prog_new" pin is the
    program that runs if the switch happened (it becomes "prog"), else a
    leftover (removed)."""
    path = pins.iface(ifname, PROG_PIN + "_new")
    try:
        new = Program.from_pin(path)
    except XdpflowError as e:
        if e.errno == errno.ENOENT:
            return
        raise
    try:
        if running_id and new.id == running_id:
            os.replace(path, pins.iface(ifname, PROG_PIN))
        else:
            os.unlink(path)
    finally:
        new.close()


def _pinned_max_entries(path: str) -> int | None:
    info = _pinned_info(path)
    return info.max_entries if info else None


def pinned_flow_tables(pins: PinRoot, ifname: str) -> list[int | None]:
    """Sizes of ``ifname``'s pinned flow tables (None: not pinned)."""
    return [_pinned_max_entries(pins.iface(ifname, name)) for name in FLOW_TABLES]


def _pinned_type(path: str) -> int | None:
    info = _pinned_info(path)
    return info.type if info else None


def _keep_pinned_mmapable(spec: MapSpec, path: str) -> None:
    """An array pinned by an object built before it was mmapable keeps its
    definition, so an upgrade reuses it (libbpf refuses a pin whose flags
    differ); the controller then reads and writes it by syscall."""
    if not spec.map_flags & BPF_F_MMAPABLE:
        return
    info = _pinned_info(path)
    if info is not None and not info.flags & BPF_F_MMAPABLE:
        spec.set_map_flags(spec.map_flags & ~BPF_F_MMAPABLE)


ASIDE = "_old"


def _set_rules_aside(obj: Object, pins: PinRoot) -> tuple[rules.Carried, list[str]] | None:
    """When obj encodes rule sets in maps laid out otherwise than the pinned
    ones, read the set in force and move those pins aside, so obj gets
    fresh maps (the running program keeps its own until the switch).
    Returns (the set, the names moved aside), or None."""
    for name in RULE_SET_MAPS:
        info = _pinned_info(pins.shared(name))
        spec = obj.map_spec(name)
        if info is not None and (info.type, info.key_size, info.value_size, info.max_entries) != (
            spec.type,
            spec.key_size,
            spec.value_size,
            spec.max_entries,
        ):
            break
    else:
        return None
    with rules.RuleTables.of_pins(pins, lock=False) as old:
        carried = old.carry()
    moved = []
    for name in RULE_SET_MAPS:
        if os.path.exists(pins.shared(name)):
            os.replace(pins.shared(name), pins.shared(name + ASIDE))
            moved.append(name)
    return carried, moved


def _rules_back(pins: PinRoot, moved: list[str]) -> None:
    """Undo _set_rules_aside() after a failed attach."""
    for name in moved:
        with contextlib.suppress(FileNotFoundError):
            os.replace(pins.shared(name + ASIDE), pins.shared(name))


@contextlib.contextmanager
def _object_maps(obj: Object) -> Iterator[Callable[[str], Any]]:
    """An ``open_map`` over a loaded object's maps (typed by the header), as
    the blocklist and the rule set take it; the maps close on exit."""
    opened: dict[str, Any] = {}

    def open_map(name: str) -> Any:
        if name not in opened:
            opened[name] = obj.map(name, *abi.MAP_TYPES[name], abi.ffi)
        return opened[name]

    try:
        yield open_map
    finally:
        for m in opened.values():
            m.close()


def _restore_rules(obj: Object, pins: PinRoot, carried: rules.Carried) -> None:
    with _object_maps(obj) as open_map:
        rules.RuleTables(open_map, clock=lambda: open_clock(pins)).restore(carried)


def _rebuild_v6(obj: Object) -> None:
    """Fill the new object's IPv6 blocklist arrays and L1 slots from the
    rule store: an older object's program (still running) read every region
    from the hash, or read the filter, which stay as they are until the next
    blocklist change."""
    with _object_maps(obj) as open_map:
        blocklist.Blocklist(open_map).rebuild_v6()


def _rodata(obj: Object) -> tuple[Any, Callable[[], None]]:
    """The program's knobs to write before load, and what to call once they
    are written. An object built before some knobs existed (a benchmark's
    baseline from git) has a shorter .rodata: the knobs are then written to
    a copy, and as much of it as the object holds goes back."""
    spec = next((s for name, s in obj.maps.items() if name.endswith(".rodata")), None)
    if spec is None:
        raise XdpflowError(errno.EINVAL, f"{obj.path} has no .rodata; rebuild it with `make`")
    data = spec.initial_bytes()
    if len(data) >= abi.ffi.sizeof("struct xf_knobs"):
        return spec.initial_value("struct xf_knobs", abi.ffi), lambda: None
    knobs = abi.ffi.new("struct xf_knobs *")
    abi.ffi.memmove(knobs, data, len(data))

    def done() -> None:
        data[:] = abi.ffi.buffer(knobs)[: len(data)]

    return knobs, done


def _prepare(obj: Object, opts: AttachOptions, pins: PinRoot | None, ifname: str | None) -> None:
    if pins is not None and ifname is not None:
        # an upgrade keeps the flow tables, so it keeps their kind
        pinned_type = _pinned_type(pins.iface(ifname, "flows_v4"))
        if pinned_type is not None:
            opts.shared_flows = pinned_type == BPF_MAP_TYPE_LRU_HASH
    if opts.sink is None or opts.flow_budget is None:
        # an upgrade keeps what the running program was told
        old = pinned_prog(pins, ifname) if pins is not None and ifname is not None else None
        old_knobs = None
        if old is not None:
            old_knobs = knobs_of(old)
            old.close()
        if opts.sink is None:
            opts.sink = bool(old_knobs is not None and old_knobs.sink)
        if opts.flow_budget is None:
            opts.flow_budget = FLOW_BUDGET_DEFAULT if old_knobs is None else int(old_knobs.flow_budget)
    check_flow_budget(opts.flow_budget)
    knobs, knobs_written = _rodata(obj)
    knobs.sink = int(opts.sink)
    knobs.shared_flows = int(opts.shared_flows)
    knobs.events_per_sec = opts.events_per_sec
    knobs.flow_budget = opts.flow_budget

    if pins is not None and ifname is not None:
        for name in SHARED_MAPS:
            spec = obj.map_spec(name)
            spec.set_pin_path(pins.shared(name))
            _keep_pinned_mmapable(spec, pins.shared(name))
        for name in RETIRED_MAPS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pins.shared(name))
        for name in IFACE_MAPS:
            obj.map_spec(name).set_pin_path(pins.iface(ifname, name))

    pinned: list[int | None] = [None, None]
    if pins is not None and ifname is not None:
        pinned = pinned_flow_tables(pins, ifname)
    sizes: tuple[int, int]
    if pinned[0] is not None and pinned[1] is not None:
        sizes = (pinned[0], pinned[1])
        if opts.flows is not None and sum(sizes) != opts.flows:
            raise XdpflowError(
                errno.EINVAL,
                f"{ifname} already has flow tables for {sum(sizes)} flows; "
                f"detach it first to resize them to {opts.flows}",
            )
    else:
        sizes = flow_table_sizes(opts.flows or FLOWS_DEFAULT)
    for name, size in zip(FLOW_TABLES, sizes):
        spec = obj.map_spec(name)
        if not opts.shared_flows:
            spec.set_type(BPF_MAP_TYPE_LRU_PERCPU_HASH)
        spec.set_max_entries(size)
    _size_protect_hosts(obj, opts, pins, knobs)
    knobs_written()


def check_flow_budget(budget: int) -> None:
    """Raises InputError unless ``budget`` (new flows per CPU per second,
    0: unlimited) fits the program's 32-bit knob."""
    if not 0 <= budget <= FLOW_BUDGET_MAX:
        raise InputError(
            f"flow budget {budget} is not 0 (unlimited) .. {FLOW_BUDGET_MAX} new flows per CPU per second",
        )


def protect_slots(hosts: int) -> int:
    """Host slots per CPU for ``hosts``: the next power of two (the program
    masks its hash with slots - 1)."""
    return 1 << max(2, (max(hosts, 1) - 1).bit_length())


def _size_protect_hosts(obj: Object, opts: AttachOptions, pins: PinRoot | None, knobs: Any) -> None:
    """prot_hosts is shared: the first attach sizes it, later ones reuse the
    pin (libbpf refuses a pin of another size)."""
    if "prot_hosts" not in obj.maps:
        return  # an object from before protected groups (benchmarks compare with one)
    pinned = _pinned_max_entries(pins.shared("prot_hosts")) if pins is not None else None
    if pinned is not None:
        if opts.protect_hosts is not None and protect_slots(opts.protect_hosts) != pinned:
            raise XdpflowError(
                errno.EINVAL,
                f"the protected-host table already holds {pinned} hosts; "
                f"detach every interface first to resize it to {opts.protect_hosts}",
            )
        size = pinned
    else:
        size = protect_slots(opts.protect_hosts or abi.C.XF_PHOSTS_DEFAULT)
    obj.map_spec("prot_hosts").set_max_entries(size)
    knobs.prot_mask = size - 1


FLOW_TABLES = ("flows_v4", "flows_v6")


def flow_table_sizes(flows: int) -> tuple[int, int]:
    """(IPv4, IPv6) table sizes for ``flows`` flows in all: half each, so
    `--flows N` shows N as `flows_max`."""
    return (flows + 1) // 2, max(flows // 2, 1)


_hz: int | None = None


def kernel_hz(obj: Object) -> int:
    """The kernel's HZ, measured once per process with obj's clock program."""
    global _hz
    if _hz is None:
        prog = obj.program(CLOCK_PROG)
        try:
            _hz = measure_hz(prog)
        finally:
            prog.close()
    return _hz


def _init_config(obj: Object) -> None:
    """Write the measured HZ into the (possibly shared, pinned) config map."""
    hz = kernel_hz(obj)
    key, value = abi.MAP_TYPES["config"]
    with obj.map("config", key, value, abi.ffi) as m:
        cfg = m[0]
        if cfg.hz != hz:
            cfg.hz = hz
            m[0] = cfg


def load_unpinned(opts: AttachOptions | None = None, reuse: dict[str, int] | None = None) -> Object:
    """Load xdpflow with private maps and no pins: for BPF_PROG_TEST_RUN
    tests and benchmarks. ``reuse`` names maps to take from another loaded
    object instead (name -> fd). The caller closes the returned Object.
    """
    opts = opts or AttachOptions()
    obj = Object(opts.object_path or abi.object_path())
    try:
        _prepare(obj, opts, None, None)
        for name, fd in (reuse or {}).items():
            obj.map_spec(name).reuse_fd(fd)
        obj.load()
        _init_config(obj)
    except BaseException:
        obj.close()
        raise
    return obj


def _foreign_error(ifname: str, prog_id: int, held_by_link: bool) -> ForeignProgramError:
    if held_by_link:
        return ForeignProgramError(
            errno.EBUSY,
            f"{ifname} runs another XDP program (id {prog_id}) held by another tool's bpf_link, which only "
            "that link's owner can remove (`bpftool link` lists it); to keep the program behind xdpflow, "
            f"keep it loaded (pinned), detach its link, then: xdpflow attach {ifname} --then id:{prog_id}",
        )
    return ForeignProgramError(
        errno.EBUSY,
        f"{ifname} runs another XDP program (id {prog_id}); use --force to replace it, detach it with "
        f"`ip link set dev {ifname} xdp off`, or keep it: xdpflow attach {ifname} --then id:{prog_id}",
    )


def _held_by_link(st: XdpState) -> bool:
    """Whether the program on ``st``'s device is held by some bpf_link."""
    link = attachment.xdp_link_of(st.prog_id)
    return link is not None and link.ifindex == st.ifindex


def attach(ifname: str, opts: AttachOptions, pins: PinRoot) -> AttachResult:
    """Load xdpflow for ``ifname``, pin its maps and attach it through a pinned
    bpf_link (netlink where the kernel refuses a link).

    If xdpflow already runs there, the new program replaces it atomically and
    keeps its counters, flows, the blocklist and the next program. An
    xdpflow attached through netlink moves to a link (see attachment). A
    foreign XDP program is replaced only with ``opts.force``, or kept as the
    next program when ``opts.then`` names it. On failure nothing new is left
    pinned. Raises ForeignProgramError, VerifierError or XdpflowError.
    """
    ensure_bpffs(pins.root)
    state = netlink.xdp_state(ifname)
    _settle_pins(pins, ifname, state.prog_id)
    nxt = chain.open_next(opts.then) if opts.then is not None else None
    old = pinned_prog(pins, ifname)
    try:
        ours = old is not None and state.prog_id != 0 and old.id == state.prog_id
        kept = nxt is not None and state.prog_id != 0 and nxt.id == state.prog_id
        if state.prog_id and not ours and not (opts.force or kept):
            raise _foreign_error(ifname, state.prog_id, _held_by_link(state))
        if state.prog_id and not ours and _held_by_link(state):
            raise _foreign_error(ifname, state.prog_id, True)
        if ours and opts.then_only and opts.then is not None and os.path.exists(pins.iface(ifname, chain.NEXT_PIN)):
            assert old is not None
            chain.set_next_pinned(pins, ifname, nxt, f"--then {opts.then}")
            return AttachResult(
                ifname=ifname,
                prog_id=old.id,
                mode=state.mode,
                replaced=False,
                attach="link" if attachment.xdp_link_of(old.id) is not None else "netlink",
                then=chain.next_of(pins, ifname),
                then_only=True,
            )
        if ours and opts.mode != "auto" and state.mode != opts.mode:
            raise XdpflowError(
                errno.EINVAL,
                f"xdpflow runs on {ifname} in {state.mode} mode; detach it first to change to {opts.mode}",
            )
        return _attach(ifname, opts, pins, state, old if ours else None, nxt)
    finally:
        if old is not None:
            old.close()
        if nxt is not None:
            nxt.close()


def _attach(
    ifname: str, opts: AttachOptions, pins: PinRoot, state: XdpState, old: Program | None, nxt: Program | None
) -> AttachResult:
    fresh_iface = not os.path.isdir(pins.iface_dir(ifname))
    fresh_root = not pins.exists()
    moved: list[str] = []
    pins.make_dirs(ifname)
    try:
        with Object(opts.object_path or abi.object_path()) as obj:
            _prepare(obj, opts, pins, ifname)
            aside = _set_rules_aside(obj, pins)
            if aside is not None:
                moved = aside[1]
            # pinned by an object from before the IPv6 arrays or L1: they start empty
            v6_tables_new = not fresh_root and not all(
                os.path.exists(pins.shared(n)) for n in (*blocklist.V6_ARRAYS.values(), *blocklist.V6_L1.values())
            )
            obj.load()
            _init_config(obj)
            if aside is not None:
                _restore_rules(obj, pins, aside[0])
            if v6_tables_new:
                _rebuild_v6(obj)
            prog = obj.program(PROG_NAME)
            clock = obj.program(CLOCK_PROG)
            taker = obj.program(TAKE_PROG)
            if opts.then is not None:
                # before the switch: the new program chains from its first frame
                with obj.map(chain.NEXT_PIN, *abi.MAP_TYPES[chain.NEXT_PIN]) as slots:
                    chain.set_next(slots, nxt, f"--then {opts.then}")
        mode = state.mode if old is not None and opts.mode == "auto" else opts.mode
        mode = mode or "auto"
        # Pinned before the switch, renamed after it: killed anywhere in
        # between, the program that runs is pinned under "prog" or
        # "prog_new", and _settle_pins() finds it next time.
        tmp = pins.iface(ifname, PROG_PIN + "_new")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        prog.pin(tmp)
        link = attachment.pinned_link(pins, ifname) if old is not None else None
        gap_ns = None
        if link is not None and link.info.prog_id == state.prog_id and link.info.ifindex == state.ifindex:
            with link:
                assert old is not None
                link.update(prog.fd, old_prog_fd=old.fd)
            how = "link"
        elif state.prog_id:
            if link is not None:
                link.close()
            current = old if old is not None else Program.from_id(state.prog_id)
            try:
                sw = attachment.switch_to_link(pins, ifname, state, prog.fd, current.fd, mode)
            finally:
                if current is not old:
                    current.close()
            how, gap_ns = sw.attach, sw.gap_ns
        elif attachment.create_link(pins, ifname, state.ifindex, prog.fd, mode):
            how = "link"
        else:
            netlink.attach(ifname, prog.fd, mode)
            how = "netlink"
        os.replace(tmp, pins.iface(ifname, PROG_PIN))
        for name in moved:  # nothing runs on them now
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pins.shared(name + ASIDE))
        tmp = pins.shared(CLOCK_PIN + "_new")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        clock.pin(tmp)
        os.replace(tmp, pins.shared(CLOCK_PIN))
        clock.close()
        tmp = pins.iface(ifname, TAKE_PIN + "_new")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        taker.pin(tmp)
        os.replace(tmp, pins.iface(ifname, TAKE_PIN))
        taker.close()
        if opts.monitor is not None:
            set_monitor(pins, opts.monitor)
        result = AttachResult(
            ifname=ifname,
            prog_id=prog.id,
            mode=netlink.xdp_state(ifname).mode,
            replaced=old is not None,
            attach=how,
            gap_ns=gap_ns,
            then=chain.next_of(pins, ifname),
        )
        prog.close()
        return result
    except BaseException:
        _rules_back(pins, moved)
        if fresh_iface:
            pins.remove_iface(ifname)
        if fresh_root and not pins.interfaces():
            pins.remove_shared()
        raise


def set_then(ifname: str, then: str, pins: PinRoot) -> chain.NextProg | None:
    """Swap the next program of an attached ``ifname`` (``then``: a --then
    argument) with one map update. Raises NotAttachedError, XdpflowError."""
    if not pins.has_iface(ifname):
        raise pins.not_attached(ifname)
    nxt = chain.open_next(then)
    try:
        chain.set_next_pinned(pins, ifname, nxt, f"--then {then}")
    finally:
        if nxt is not None:
            nxt.close()
    return chain.next_of(pins, ifname)


@dataclass
class DetachResult:
    ifname: str  # the name it was attached under
    found_as: str | None  # where the program ran: its current name, None if nowhere
    netns: str | None  # the named namespace it had moved to, None: this one


def detach(ifname: str, pins: PinRoot) -> DetachResult:
    """Detach xdpflow from ``ifname`` and remove its pins; the shared maps go
    with the last interface. The program is found by its link or pinned id,
    so a renamed interface, or one moved to a named namespace, is detached
    where it is now. A foreign program attached there is left alone.
    Raises NotAttachedError when the interface has no state under the root.
    """
    if not pins.has_iface(ifname):
        raise pins.not_attached(ifname)
    try:
        _settle_pins(pins, ifname, netlink.xdp_state(ifname).prog_id)
    except XdpflowError as e:
        if e.errno != errno.ENODEV:
            raise
    old = pinned_prog(pins, ifname)
    link = attachment.pinned_link(pins, ifname)
    result = DetachResult(ifname, None, None)
    try:
        if old is not None:
            ifindex = link.info.ifindex if link is not None else 0
            where = attachment.locate(old.id, ifname, ifindex)
            if where is not None:
                result = DetachResult(ifname, where.ifname, where.netns)
                if link is not None and link.info.prog_id == old.id and ifindex:
                    attachment.detach_link(link)
                else:
                    with netlink.in_netns(where.netns):
                        netlink.detach(where.ifname, where.state.mode)
    finally:
        if old is not None:
            old.close()
        if link is not None:
            link.close()
    pins.remove_iface(ifname)
    if not pins.interfaces():
        pins.remove_shared()
    return result
