"""How xdpflow's program hangs on an interface, and where that interface is now.

By default through a bpf_link pinned as ``if_<name>/link``: the attachment
outlives every process, cannot be replaced by another tool behind xdpflow's
back, and the link knows the device's index wherever the device has moved.
Where the kernel refuses a link (hw mode, old kernels) the program is
attached with plain netlink, as earlier xdpflow versions always did.

An interface attached through netlink is moved to a link by the next attach.
The kernel refuses a link while a netlink program is attached, so the switch
is detach-then-link: for those few microseconds no program runs. The switch
happens in a child process in its own session that outlives its parent: a
kill -9 of `xdpflow attach` at any point leaves either the old program
(before the child started) or the new one (the child finishes the switch,
with the link pinned) on the interface, never nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from xdpflow.bindings import netlink
from xdpflow.bindings.libbpf import BPF_LINK_TYPE_XDP, Link, LinkInfo, link_ids
from xdpflow.bindings.netlink import MODE_FLAGS, XDP_FLAGS_UPDATE_IF_NOEXIST, XdpRequest, XdpState
from xdpflow.dataplane.child import in_child
from xdpflow.dataplane.pins import PinRoot
from xdpflow.errors import XdpflowError

LINK_PIN = "link"
LINK_MODES = ("auto", "native", "skb")  # hw: netlink only
# errnos with which the kernel says "no XDP link here", not "something is wrong"
_NO_LINK = {errno.EINVAL, errno.EOPNOTSUPP, 524}  # 524: ENOTSUPP


def pinned_link(pins: PinRoot, ifname: str) -> Link | None:
    """The link pinned for ``ifname`` (None: attached through netlink, or not
    at all). Raises XdpflowError."""
    try:
        return Link.from_pin(pins.iface(ifname, LINK_PIN))
    except XdpflowError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


@dataclass(frozen=True)
class Where:
    ifname: str  # the interface's name now
    netns: str | None  # the named namespace it is in; None: this one
    state: XdpState


def _here_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _find(prog_id: int, ifname: str | None, ifindex: int) -> XdpState | None:
    """In this namespace: the interface running ``prog_id``, tried by name,
    then by index, then among all interfaces."""
    if ifname is not None:
        try:
            st = netlink.xdp_state(ifname)
            if st.prog_id == prog_id:
                return st
        except XdpflowError as e:
            if e.errno != errno.ENODEV:
                raise
    if ifindex:
        st2 = netlink.xdp_state_by_index(ifindex)
        if st2 is not None and st2.prog_id == prog_id:
            return st2
    return netlink.find_prog(prog_id)


def locate(prog_id: int, ifname: str, ifindex: int = 0) -> Where | None:
    """Where program ``prog_id`` runs: on ``ifname`` here, on the device with
    index ``ifindex`` (a link's, which follows the device), renamed here, or
    moved to a named namespace. None when nowhere visible. Raises XdpflowError."""
    if not prog_id:
        return None
    st = _find(prog_id, ifname, ifindex)
    if st is not None:
        return Where(st.ifname, None, st)
    here = _here_ino()
    for ns in netlink.named_netns():
        try:
            if os.stat(f"/run/netns/{ns}").st_ino == here:
                continue
            with netlink.in_netns(ns):
                st3 = _find(prog_id, None, ifindex)
        except OSError:  # a namespace removed meanwhile
            continue
        if st3 is not None:
            return Where(st3.ifname, ns, st3)
    return None


def xdp_link_of(prog_id: int) -> LinkInfo | None:
    """The XDP link that holds program ``prog_id`` on a device (None: it
    runs through netlink, or nowhere). Found among all links rather than
    through the pin, which a read-only bpffs would not open. Raises XdpflowError."""
    for link_id in link_ids():
        try:
            link = Link.from_id(link_id)
        except XdpflowError:
            continue  # gone meanwhile
        with link:
            info = link.info
        if info.type == BPF_LINK_TYPE_XDP and info.prog_id == prog_id and info.ifindex:
            return info
    return None


def _link_flags(mode: str) -> int:
    return MODE_FLAGS[mode]


def create_link(pins: PinRoot, ifname: str, ifindex: int, prog_fd: int, mode: str) -> bool:
    """Attach ``prog_fd`` to a device that runs nothing, through a pinned link.

    Returns False, with nothing attached, where the kernel refuses a link
    (the caller attaches through netlink). A kill between creating and
    pinning the link closes it, which detaches: the device runs nothing, as
    before. Raises XdpflowError.
    """
    if mode not in LINK_MODES:
        return False
    path = pins.iface(ifname, LINK_PIN)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    try:
        link = Link.xdp(prog_fd, ifindex, _link_flags(mode))
    except XdpflowError as e:
        if e.errno in _NO_LINK:
            return False
        raise
    with link:
        link.pin(path)
    return True


@dataclass(frozen=True)
class Switch:
    attach: str  # "link" or "netlink": how the new program is attached now
    gap_ns: int  # how long no program ran: from the detach to the new attachment


def _switch(path: str, ifindex: int, prog_fd: int, old_fd: int, mode: str, old_mode: str) -> Switch:
    """The critical section: netlink detach, link create, pin. Runs in the child."""
    # everything that can fail slowly is done before the program goes away
    flags = _link_flags(mode) if mode in LINK_MODES else None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    old_flags = MODE_FLAGS.get(old_mode, 0)
    new_flags = MODE_FLAGS.get(mode, 0)
    with (
        XdpRequest(ifindex, -1, old_flags) as remove,
        XdpRequest(ifindex, prog_fd, new_flags | XDP_FLAGS_UPDATE_IF_NOEXIST) as fallback,
        XdpRequest(ifindex, old_fd, old_flags | XDP_FLAGS_UPDATE_IF_NOEXIST) as restore,
        XdpRequest(ifindex, prog_fd, new_flags, expected_fd=old_fd) as replace,
    ):
        if flags is None:  # hw mode: no link to move to, an atomic netlink swap
            replace.run()
            return Switch("netlink", 0)

        def through_netlink() -> Switch:
            try:
                fallback.run()
            except XdpflowError:
                restore.run()  # the old program back, and say why the new one failed
                raise
            return Switch("netlink", time.perf_counter_ns() - t0)

        t0 = time.perf_counter_ns()
        remove.run()
        try:
            link = Link.xdp(prog_fd, ifindex, flags)
        except XdpflowError:
            return through_netlink()  # no link here after all
        gap = time.perf_counter_ns() - t0
        with link:
            try:
                link.pin(path)
            except XdpflowError:
                # an unpinned link dies with this process: hand over to netlink
                link.detach()
                return through_netlink()
        return Switch("link", gap)


def switch_to_link(pins: PinRoot, ifname: str, st: XdpState, prog_fd: int, old_fd: int, mode: str) -> Switch:
    """Replace the netlink-attached program ``old_fd`` on ``st``'s device with
    ``prog_fd`` attached through a pinned link (through netlink where links
    are refused), in a child process that outlives a killed parent.
    Raises XdpflowError (with nothing changed, or the old program back).
    """
    path = pins.iface(ifname, LINK_PIN)

    def detached() -> None:  # finish whatever happens to the parent
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)

    def switch() -> dict[str, Any]:
        sw = _switch(path, st.ifindex, prog_fd, old_fd, mode, st.mode or "auto")
        return {"attach": sw.attach, "gap_ns": sw.gap_ns}

    out = in_child(switch, detached)
    if out is None:
        raise XdpflowError(errno.EIO, f"switching {ifname} to a bpf_link: the helper process died; run attach again")
    if "error" in out:
        raise XdpflowError(int(out["errno"]), f"switching {ifname} to a bpf_link: {out['error']}")
    return Switch(str(out["attach"]), int(out["gap_ns"]))


def detach_link(link: Link) -> None:
    """Detach the program a link holds, wherever its device is now; a link
    whose device is gone is detached already."""
    try:
        link.detach()
    except XdpflowError as e:
        if e.errno not in (errno.ENOLINK, errno.EINVAL, errno.ENOENT):
            raise
