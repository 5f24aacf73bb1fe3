"""`xdpflow doctor`: whether this host can run xdpflow, and how well.

Every kernel feature is probed for real (a tiny map or program is made and
thrown away), never guessed from the version. Probes that attach or inject
frames run in a forked child inside a new, empty network namespace, so the
host's interfaces never see them. Each problem comes with one sentence
saying what to do. Output is the CLI's business: this module returns data.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from xdpflow.bindings import netlink
from xdpflow.bindings.libbpf import (
    ARRAY_TYPES,
    BPF_MAP_TYPE_LPM_TRIE,
    BPF_MAP_TYPE_LRU_HASH,
    BPF_MAP_TYPE_LRU_PERCPU_HASH,
    BPF_MAP_TYPE_PROG_ARRAY,
    BPF_MAP_TYPE_RINGBUF,
    PERCPU_TYPES,
    Link,
    Object,
    Program,
    possible_cpus,
    probe_map,
    round_up8,
)
from xdpflow.bindings.netlink import MODE_FLAGS, NETDEV_XDP_ACT
from xdpflow.dataplane import abi, attachment
from xdpflow.dataplane.child import in_child
from xdpflow.dataplane.lifecycle import FLOW_TABLES, FLOWS_DEFAULT, flow_table_sizes, pinned_flow_tables
from xdpflow.dataplane.pins import IFACE_MAPS, SHARED_MAPS, PinRoot, ensure_bpffs
from xdpflow.errors import XdpflowError

PROBE_OBJ = "probe"
CLONE_NEWNET = 0x40000000
# capabilities xdpflow needs (linux/capability.h)
CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
HASH_OVERHEAD = 48  # bytes the kernel adds per preallocated hash element (struct htab_elem and LRU node)
MEMORY_SHARE = 0.5  # warn above this share of MemAvailable


@dataclass
class Check:
    name: str
    ok: bool
    required: bool  # xdpflow cannot run without it
    detail: str  # what was found
    fix: str | None = None  # one sentence: what to do (when not ok)


@dataclass
class AttachedProg:
    prog_id: int
    name: str
    mode: str | None
    attach: str  # "link" or "netlink"


@dataclass
class Iface:
    ifname: str
    ok: bool = False  # xdpflow can run natively here
    driver: str | None = None
    xdp_features: list[str] | None = None  # None: the kernel does not say
    native_xdp: bool | None = None
    programs: list[AttachedProg] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)

    def problem(self, what: str, fix: str) -> None:
        self.problems.append({"problem": what, "fix": fix})


@dataclass
class Memory:
    bytes: int  # what xdpflow's maps would take at most, for the interfaces named (at least one)
    available: int  # MemAvailable
    ok: bool
    fix: str | None = None


@dataclass
class Report:
    kernel: str
    ok: bool
    checks: list[Check]
    memory: Memory
    interfaces: list[Iface]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def fixes(self) -> list[str]:
        """Every "what to do" sentence, host problems first."""
        out = [c.fix for c in self.checks if not c.ok and c.fix]
        if not self.memory.ok and self.memory.fix:
            out.append(self.memory.fix)
        for i in self.interfaces:
            out.extend(p["fix"] for p in i.problems)
        return out


# --- host probes ------------------------------------------------------------------


def _map_check(name: str, what: str, map_type: int, key: int, value: int, entries: int, fix: str) -> Check:
    try:
        probe_map(map_type, key, value, entries)
        return Check(name, True, True, f"{what}: a map was created")
    except XdpflowError as e:
        return Check(name, False, True, f"{what}: {os.strerror(e.errno or errno.EIO)}", fix)


def _in_new_netns(probe: Any) -> dict[str, Any]:
    """Run ``probe()`` (returning a JSON-able dict) in a forked child inside
    a new network namespace; its only interface is a private loopback."""

    def unshare() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    out = in_child(probe, unshare)
    return out if out is not None else {"error": "the probe process died"}


def _errno_of(e: OSError) -> str:
    return os.strerror(e.errno or errno.EIO)


def _probe_programs() -> dict[str, Any]:
    """In the child: tail calls, an XDP link on loopback, a live-frames test
    run, and an extension program replacing a global function."""
    out: dict[str, Any] = {}
    with Object(abi.object_path(PROBE_OBJ)) as obj:
        obj.set_autoload("probe_ext", False)
        try:
            obj.load()
        except XdpflowError as e:
            return {"error": f"loading XDP programs: {_errno_of(e)}"}
        passing = obj.program("probe_pass")
        tail = obj.program("probe_tail")
        target = obj.program("probe_target")
        try:
            with obj.map("probe_jmp", "__u32", "__u32") as jmp:
                jmp[0] = passing.fd
            out["tail_calls"] = tail.test_run(bytes(64)).retval == 2  # XDP_PASS
        except XdpflowError as e:
            out["tail_calls"] = _errno_of(e)
        try:
            with Link.xdp(passing.fd, netlink.ifindex("lo"), MODE_FLAGS["skb"]):
                out["bpf_link"] = True
        except XdpflowError as e:
            out["bpf_link"] = _errno_of(e)
        try:
            frame = bytes.fromhex("ffffffffffff020000000001") + b"\x88\xb5" + bytes(50)  # local experimental type
            passing.test_run(frame, live_frames=True, ingress_ifindex=netlink.ifindex("lo"))
            out["live_frames"] = True
        except XdpflowError as e:
            out["live_frames"] = _errno_of(e)
        try:
            with Object(abi.object_path(PROBE_OBJ)) as ext_obj:
                for name in ("probe_pass", "probe_tail", "probe_target"):
                    ext_obj.set_autoload(name, False)
                ext_obj.set_attach_target("probe_ext", target.fd, "probe_slot")
                ext_obj.load()
            out["freplace"] = True
        except XdpflowError as e:
            out["freplace"] = _errno_of(e)
        for p in (passing, tail, target):
            p.close()
    return out


def _privileges() -> Check:
    eff = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
    missing = [n for n, bit in CAPS.items() if not eff >> bit & 1]
    if not missing:
        return Check("privileges", True, True, f"uid {os.geteuid()} with {', '.join(CAPS)}")
    return Check(
        "privileges",
        False,
        True,
        f"uid {os.geteuid()} lacks {', '.join(missing)}",
        "run xdpflow as root (it needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_ADMIN)",
    )


def _bpffs(pins: PinRoot) -> Check:
    try:
        ensure_bpffs(pins.root, mount=False)
    except XdpflowError as e:
        return Check("bpffs", False, True, f"{os.path.dirname(pins.root)} is not on a BPF filesystem", str(e))
    base = pins.root if os.path.isdir(pins.root) else os.path.dirname(pins.root)
    probe = os.path.join(base, f"xf_doctor_{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(probe, 0o700)
        os.rmdir(probe)
    except OSError as e:
        return Check(
            "bpffs",
            False,
            True,
            f"{base} is on bpffs but not writable: {_errno_of(e)}",
            f"remount it read-write (`mount -o remount,rw {base}`) or choose another --pin-root",
        )
    return Check("bpffs", True, True, f"{base} is on a writable BPF filesystem")


def host_checks(pins: PinRoot) -> list[Check]:
    """Kernel features, bpffs and privileges."""
    checks = [
        Check(
            "btf",
            os.path.exists("/sys/kernel/btf/vmlinux"),
            False,
            "kernel BTF at /sys/kernel/btf/vmlinux",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distributions' are): tools that inspect "
            "xdpflow's maps by type need it",
        ),
        _map_check(
            "ring_buffer",
            "BPF ring buffer",
            BPF_MAP_TYPE_RINGBUF,
            0,
            0,
            4096,
            "xdpflow's events need a BPF ring buffer: use kernel 5.8 or later",
        ),
        _map_check(
            "lru_maps",
            "LRU hash maps",
            BPF_MAP_TYPE_LRU_HASH,
            8,
            8,
            16,
            "xdpflow's flow tables need LRU hash maps: use kernel 4.10 or later",
        ),
    ]
    checks[-1].ok = checks[-1].ok and _lru_percpu_ok()
    progs = _in_new_netns(_probe_programs)
    err = progs.get("error")

    def prog_check(key: str, what: str, required: bool, fix: str, ok_detail: str) -> Check:
        got = progs.get(key, err or "not probed")
        if got is True:
            return Check(key, True, required, ok_detail)
        detail = f"{what}: {got}" if got is not False else f"{what}: did not work"
        return Check(key, False, required, detail, fix)

    checks += [
        prog_check(
            "tail_calls",
            "tail calls between XDP programs",
            True,
            "xdpflow ends with a tail call (--then): use a kernel with BPF tail calls and a JIT",
            "an XDP program tail-called another through a program array",
        ),
        prog_check(
            "bpf_link",
            "bpf_link for XDP",
            False,
            "xdpflow falls back to netlink attachments (another tool can then replace it unnoticed); "
            "use kernel 5.9 or later for XDP links",
            "an XDP program was attached through a bpf_link (on a private loopback)",
        ),
        prog_check(
            "live_frames",
            "live-frames test runs (BPF_F_TEST_XDP_LIVE_FRAMES)",
            False,
            "only the benchmarks and the traffic generator need it: use kernel 5.18 or later",
            "a test run sent a frame for real (on a private loopback)",
        ),
        prog_check(
            "freplace",
            "extension (freplace) programs, which libxdp's dispatcher needs",
            False,
            "libxdp's multi-program dispatcher cannot run here (xdp-loader falls back to one program): chain "
            "programs behind xdpflow with `xdpflow attach IFACE --then PROG` instead",
            "an extension program was loaded to replace a global function of an XDP program",
        ),
        _bpffs(pins),
        _privileges(),
    ]
    return checks


def _lru_percpu_ok() -> bool:
    try:
        probe_map(BPF_MAP_TYPE_LRU_PERCPU_HASH, 8, 8, 16)
        return True
    except XdpflowError:
        return False


# --- memory ----------------------------------------------------------------------


def _map_bytes(map_type: int, key: int, value: int, entries: int) -> int:
    ncpu = possible_cpus() if map_type in PERCPU_TYPES else 1
    if map_type == BPF_MAP_TYPE_RINGBUF:
        return entries
    if map_type == BPF_MAP_TYPE_PROG_ARRAY:
        return entries * 8
    if map_type in ARRAY_TYPES:
        return entries * round_up8(value) * ncpu
    if map_type == BPF_MAP_TYPE_LPM_TRIE:  # allocated per rule: the most it can take
        return entries * (key + value + HASH_OVERHEAD)
    return entries * (round_up8(key) + round_up8(value) * ncpu + HASH_OVERHEAD)


def map_memory(pins: PinRoot, ifnames: list[str]) -> int:
    """Bytes xdpflow's maps take at most: the shared ones once, the
    per-interface ones for each interface (at least one), flow tables at
    their pinned size or the default."""
    total = 0
    with Object(abi.object_path()) as obj:
        for name in SHARED_MAPS:
            spec = obj.map_spec(name)
            total += _map_bytes(spec.type, spec.key_size, spec.value_size, spec.max_entries)
        for ifname in ifnames or [""]:
            sizes = dict(zip(FLOW_TABLES, flow_table_sizes(FLOWS_DEFAULT)))
            if ifname and pins.has_iface(ifname):
                with contextlib.suppress(OSError):
                    for t, n in zip(FLOW_TABLES, pinned_flow_tables(pins, ifname)):
                        if n:
                            sizes[t] = n
            for name in IFACE_MAPS:
                spec = obj.map_spec(name)
                entries = sizes.get(name, spec.max_entries)
                total += _map_bytes(spec.type, spec.key_size, spec.value_size, entries)
    return total


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memory(pins: PinRoot, ifnames: list[str]) -> Memory:
    need = map_memory(pins, ifnames)
    avail = _mem_available()
    if need <= avail * MEMORY_SHARE:
        return Memory(need, avail, True)
    return Memory(
        need,
        avail,
        False,
        f"xdpflow's maps would take {need >> 20} MiB of {avail >> 20} MiB available: attach with a smaller "
        "--flows N (flow tables take most of it), or free memory",
    )


# --- interfaces -------------------------------------------------------------------


def iface_report(ifname: str) -> Iface:
    """Driver, native XDP support and attached programs of ``ifname``."""
    r = Iface(ifname)
    try:
        st = netlink.xdp_state(ifname)
    except XdpflowError as e:
        r.problem(str(e), "name an interface that exists in this network namespace (`ip link` lists them)")
        return r
    r.driver = netlink.driver(ifname)
    bits = netlink.xdp_features(ifname)
    if bits is not None:
        r.xdp_features = [n for n, b in NETDEV_XDP_ACT.items() if bits & b]
        r.native_xdp = bool(bits & NETDEV_XDP_ACT["basic"])
    if r.native_xdp is False:
        r.problem(
            f"{ifname} ({r.driver or 'no driver'}) has no native XDP support",
            f"xdpflow runs on {ifname} only in generic mode (`xdpflow attach {ifname} --mode skb`), much slower "
            "and after the kernel has built an skb: use a NIC whose driver supports XDP for line rate",
        )
    elif r.native_xdp is None:
        r.problem(
            f"this kernel does not report {ifname}'s XDP features (no netdev netlink family)",
            f"try `xdpflow attach {ifname} --mode native`: it fails at once if the driver has no native XDP",
        )
    if st.prog_id:
        name = ""
        with contextlib.suppress(XdpflowError):
            prog = Program.from_id(st.prog_id)
            name = prog.info.name
            prog.close()
        link = attachment.xdp_link_of(st.prog_id)
        how = "link" if link is not None and link.ifindex == st.ifindex else "netlink"
        r.programs.append(AttachedProg(st.prog_id, name, st.mode, how))
    r.ok = r.native_xdp is True
    return r


def diagnose(pins: PinRoot, ifnames: list[str]) -> Report:
    """The whole report. ``ok``: every required host feature works and
    xdpflow can run natively on every named interface."""
    checks = host_checks(pins)
    ifaces = [iface_report(n) for n in ifnames]
    mem = memory(pins, [i.ifname for i in ifaces])
    ok = all(c.ok for c in checks if c.required) and all(i.ok for i in ifaces)
    return Report(os.uname().release, ok, checks, mem, ifaces)
