"""Interfaces, namespaces and XDP attachment over rtnetlink (pyroute2),
plus the ethtool calls that go with them.

The only module that talks netlink, for the product (attach, detach,
namespaces) and for the test tooling (the lab's namespaces, veths,
addresses and neighbours; GRO; veth's XDP transmit counters). pyroute2's
NetlinkError is not an OSError; it is turned into XdpflowError here, at
the module boundary.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xdpflow.bindings.netns import CLONE_NEWNET as CLONE_NEWNET
from xdpflow.bindings.netns import enter_netns as enter_netns
from xdpflow.bindings.netns import in_netns as in_netns
from xdpflow.errors import XdpflowError, os_error

if TYPE_CHECKING:
    from pyroute2 import IPRoute

# pyroute2 takes ~150 ms to import; commands that never touch netlink
# (stats, flows, block) should not pay for it, so it is imported on use.
# Entering a namespace lives in netns.py, which loads no socket code (every
# command enters --netns); its names are here too, for the callers of this module.

# linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4

MODE_FLAGS = {
    "auto": 0,
    "native": XDP_FLAGS_DRV_MODE,
    "skb": XDP_FLAGS_SKB_MODE,
    "hw": XDP_FLAGS_HW_MODE,
}
# IFLA_XDP_ATTACHED values
ATTACHED_NAMES = {0: None, 1: "native", 2: "skb", 3: "hw", 4: "multi"}

# linux/if_addr.h, linux/neighbour.h
IFA_F_NODAD = 0x02
NUD_PERMANENT = 0x80

# linux/sockios.h, linux/ethtool.h
_SIOCETHTOOL = 0x8946
_ETHTOOL_GSTRINGS = 0x1B
_ETHTOOL_GSTATS = 0x1D
_ETHTOOL_GSSET_INFO = 0x37
_ETH_SS_STATS = 1
_ETH_GSTRING_LEN = 32
_XMIT = re.compile(r"^tx_queue_\d+_xdp_xmit$")
_XMIT_ERRORS = re.compile(r"^tx_queue_\d+_xdp_xmit_errors$")


@dataclass(frozen=True)
class XdpState:
    ifindex: int
    ifname: str
    prog_id: int  # 0: nothing attached
    mode: str | None  # native, skb, hw, multi


def _netlink_error() -> type[Exception]:
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError


def _nl_error(e: Any, what: str, hint: str | None = None) -> XdpflowError:
    # the kernel's extended ack, when it sent one, says the most
    detail = e.args[1] if len(e.args) > 1 and e.args[1] and e.args[1] != os.strerror(e.code) else None
    if detail and not hint:
        hint = str(detail)
    return os_error(e.code, what, hint)


@contextlib.contextmanager
def ipr() -> Iterator[IPRoute]:
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        yield ip


def ifindex(name: str) -> int:
    """Index of interface ``name`` in the current network namespace.

    Raises XdpflowError(ENODEV) when there is no such interface.
    """
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise XdpflowError(
            errno.ENODEV,
            f"no interface named {name!r} in this network namespace; `ip link` lists them",
        ) from None


def xdp_state(name: str) -> XdpState:
    """What XDP program (if any) runs on interface ``name``. Raises XdpflowError."""
    idx = ifindex(name)
    links = _get_links(idx, f"reading interface {name}")
    if not links:
        raise XdpflowError(errno.ENODEV, f"reading interface {name}: no such device")
    _idx, _name, prog_id, mode = links[0]
    return XdpState(ifindex=idx, ifname=name, prog_id=prog_id, mode=mode)


def find_prog(prog_id: int) -> XdpState | None:
    """The interface of this namespace that runs XDP program ``prog_id``
    (it may have been renamed since it was attached), or None."""
    for idx, name, running, mode in _get_links(0, "listing interfaces"):
        if running == prog_id:
            return XdpState(ifindex=idx, ifname=name, prog_id=running, mode=mode)
    return None


# Reading a device's XDP state is a plain RTM_GETLINK, sent and parsed here:
# `status` reads it, and pyroute2 takes ~150 ms to import.
# linux/rtnetlink.h, linux/netlink.h, linux/if_link.h
_RTM_NEWLINK = 16
_RTM_GETLINK = 18
_NLM_F_DUMP = 0x300
_NLMSG_DONE = 3
_NLA_TYPE_MASK = 0x3FFF
_IFLA_IFNAME = 3
_IFLA_EXT_MASK = 29
_RTEXT_FILTER_SKIP_STATS = 1 << 3
_IFLA_XDP_ATTACHED = 2
_IFLA_XDP_PROG_ID = 4


def _attrs(data: bytes, at: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in data[at:end]."""
    while at + 4 <= end:
        n, kind = struct.unpack_from("=HH", data, at)
        if n < 4:
            return
        yield kind & _NLA_TYPE_MASK, data[at + 4 : at + n]
        at += (n + 3) & ~3


def _get_links(idx: int, what: str) -> list[tuple[int, str, int, str | None]]:
    """(ifindex, name, XDP program id, XDP mode) of device ``idx`` in this
    namespace, or of every device (``idx`` 0). Raises XdpflowError."""
    flags = _NLM_F_REQUEST | (_NLM_F_DUMP if idx == 0 else 0)
    body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, idx, 0, 0)
    body += _nla(_IFLA_EXT_MASK, struct.pack("=I", _RTEXT_FILTER_SKIP_STATS))
    req = struct.pack("=IHHII", 16 + len(body), _RTM_GETLINK, flags, 1, 0) + body
    out: list[tuple[int, str, int, str | None]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.send(req)
        while True:
            data = sock.recv(1 << 20)
            at = 0
            while at + 16 <= len(data):
                n, kind = struct.unpack_from("=IH", data, at)
                if kind == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, at + 16)
                    if err < 0:
                        raise os_error(-err, what)
                    return out
                if kind == _NLMSG_DONE:
                    return out
                if kind == _RTM_NEWLINK:
                    out.append(_link(data, at + 16, at + n))
                    if idx:
                        return out
                at += (n + 3) & ~3


def _link(data: bytes, at: int, end: int) -> tuple[int, str, int, str | None]:
    """One RTM_NEWLINK message's (ifindex, name, XDP program id, XDP mode)."""
    (idx,) = struct.unpack_from("=i", data, at + 4)
    name, prog_id, mode = "", 0, None
    for kind, payload in _attrs(data, at + 16, end):
        if kind == _IFLA_IFNAME:
            name = payload.split(b"\0", 1)[0].decode()
        elif kind == _IFLA_XDP:
            for sub, value in _attrs(payload, 0, len(payload)):
                if sub == _IFLA_XDP_ATTACHED:
                    mode = ATTACHED_NAMES.get(value[0])
                elif sub == _IFLA_XDP_PROG_ID:
                    (prog_id,) = struct.unpack_from("=I", value)
    return idx, name, prog_id, mode


def xdp_state_by_index(idx: int) -> XdpState | None:
    """What runs on the interface with index ``idx`` in this namespace (None:
    no such interface). Raises XdpflowError."""
    try:
        name = socket.if_indextoname(idx)
    except OSError:
        return None
    try:
        return xdp_state(name)
    except XdpflowError as e:
        if e.errno == errno.ENODEV:  # renamed or gone meanwhile
            return None
        raise


# linux/netdev.h: the netdev generic netlink family (kernel 6.3+)
_NETDEV_CMD_DEV_GET = 1
NETDEV_XDP_ACT = {
    "basic": 1 << 0,
    "redirect": 1 << 1,
    "ndo-xmit": 1 << 2,
    "xsk-zerocopy": 1 << 3,
    "hw-offload": 1 << 4,
    "rx-sg": 1 << 5,
    "ndo-xmit-sg": 1 << 6,
}


def xdp_features(name: str) -> int | None:
    """The device's XDP feature bits (NETDEV_XDP_ACT_*: "basic" is native
    XDP) as the kernel reports them over the netdev generic netlink family;
    None where the kernel has no such family (before 6.3). Raises XdpflowError."""
    from pyroute2.netlink import NLM_F_REQUEST, genlmsg
    from pyroute2.netlink.generic import GenericNetlinkSocket

    class devmsg(genlmsg):  # type: ignore[misc]
        prefix = "NETDEV_A_DEV_"
        nla_map = (
            ("NETDEV_A_DEV_UNSPEC", "none"),
            ("NETDEV_A_DEV_IFINDEX", "uint32"),
            ("NETDEV_A_DEV_PAD", "none"),
            ("NETDEV_A_DEV_XDP_FEATURES", "uint64"),
        )

    idx = ifindex(name)
    sock = GenericNetlinkSocket()
    try:
        try:
            sock.bind("netdev", devmsg)
        except _netlink_error() as e:
            if getattr(e, "code", 0) == errno.ENOENT:
                return None
            raise _nl_error(e, "finding the netdev netlink family") from None
        msg = devmsg()
        msg["cmd"] = _NETDEV_CMD_DEV_GET
        msg["version"] = 1
        msg["attrs"] = [("NETDEV_A_DEV_IFINDEX", idx)]
        try:
            reply = sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST)
        except _netlink_error() as e:
            raise _nl_error(e, f"reading the XDP features of {name}") from None
        return int(reply[0].get_attr("NETDEV_A_DEV_XDP_FEATURES") or 0)
    finally:
        sock.close()


_SIOCETHTOOL = 0x8946
_ETHTOOL_GDRVINFO = 3
_DRVINFO_SIZE = 196  # struct ethtool_drvinfo


def driver(name: str) -> str | None:
    """The device's driver as ethtool names it (None: the device reports
    none, as loopback). Raises XdpflowError(ENODEV)."""
    ifindex(name)
    buf = ctypes.create_string_buffer(struct.pack("=I", _ETHTOOL_GDRVINFO), _DRVINFO_SIZE)
    ifr = struct.pack("16sP", name.encode(), ctypes.addressof(buf)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifr)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                return None
            raise os_error(e.errno or errno.EIO, f"reading the driver of {name}") from None
    return buf.raw[4:36].split(b"\0", 1)[0].decode() or None


def named_netns() -> list[str]:
    """The network namespaces `ip netns` knows by name."""
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def attach(name: str, prog_fd: int, mode: str = "auto", replace_fd: int | None = None) -> None:
    """Attach the program ``prog_fd`` to interface ``name``.

    With ``replace_fd`` the kernel swaps that program for this one atomically
    (XDP_FLAGS_REPLACE) and fails with EEXIST if something else runs there by
    then; without it, attaching fails with EBUSY/EEXIST when any program runs
    there already. Raises XdpflowError.
    """
    if mode not in MODE_FLAGS:
        raise XdpflowError(errno.EINVAL, f"unknown XDP mode {mode!r}; use one of {', '.join(MODE_FLAGS)}")
    flags = MODE_FLAGS[mode]
    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", prog_fd)]
    if replace_fd is not None:
        flags |= XDP_FLAGS_REPLACE
        attrs.append(("IFLA_XDP_EXPECTED_FD", replace_fd))
    else:
        flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
    attrs.append(("IFLA_XDP_FLAGS", flags))
    idx = ifindex(name)
    try:
        with ipr() as ip:
            ip.link("set", index=idx, xdp={"attrs": attrs})
    except _netlink_error() as e:
        hint = None
        code = getattr(e, "code", 0)
        if code in (errno.EBUSY, errno.EEXIST):
            hint = "another XDP program is attached (or in another mode); detach it first or use --force"
        elif code == errno.EOPNOTSUPP:
            hint = f"the driver of {name} has no {mode} XDP support; try --mode skb"
        raise _nl_error(e, f"attaching XDP program to {name} in {mode} mode", hint) from None


def detach(name: str, mode: str | None = None) -> None:
    """Remove the XDP program from interface ``name`` (a no-op when none runs).

    ``mode`` is the attached mode as ``xdp_state`` reports it; by default it
    is read first. Raises XdpflowError.
    """
    st = xdp_state(name)
    if not st.prog_id:
        return
    mode = mode or st.mode or "auto"
    flags = MODE_FLAGS.get(mode, 0)
    try:
        with ipr() as ip:
            ip.link("set", index=st.ifindex, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]})
    except _netlink_error() as e:
        raise _nl_error(e, f"detaching XDP program from {name}") from None


# --- what the test lab builds: namespaces, veths, addresses, neighbours -------


def create_netns(name: str) -> None:
    """Create a network namespace named ``name`` (`ip netns add`).

    Raises FileExistsError when the name is taken, OSError otherwise.
    """
    from pyroute2 import netns

    try:
        netns.create(name)
    except _netlink_error() as e:
        raise _nl_error(e, f"creating network namespace {name}") from None


def remove_netns(name: str) -> None:
    """Remove network namespace ``name`` (`ip netns del`); the namespace
    itself lives on while a process is still in it.

    Raises FileNotFoundError when there is no such name, OSError otherwise.
    """
    from pyroute2 import netns

    try:
        netns.remove(name)
    except _netlink_error() as e:
        raise _nl_error(e, f"removing network namespace {name}") from None


def add_veth(
    name: str,
    peer: str,
    *,
    netns: str,
    peer_netns: str,
    address: str,
    peer_address: str,
    index: int | None = None,
    peer_rx_queues: int = 1,
) -> None:
    """Create a veth pair whose ends are born in namespaces ``netns`` and
    ``peer_netns`` (so neither ever appears in this one), with MAC addresses
    ``address``/``peer_address`` and, if given, ``index`` as ``name``'s ifindex.

    Each end transmits through one queue; ``peer`` receives on
    ``peer_rx_queues``. A veth hands a frame from the stack to its peer's
    receive queue numbered as the sender's transmit queue (always 0 here),
    and a frame sent with XDP to the queue numbered as the sending CPU
    (modulo the count): so with one receive queue per CPU, XDP traffic made
    on one CPU fills a ring of its own, and never the ring the stack's
    traffic (TCP included) goes through.

    Raises XdpflowError.
    """
    attrs: dict[str, Any] = {
        "ifname": name,
        "kind": "veth",
        "address": address,
        "net_ns_fd": netns,
        "num_tx_queues": 1,
        "num_rx_queues": 1,
        "peer": {
            "ifname": peer,
            "address": peer_address,
            "net_ns_fd": peer_netns,
            "num_tx_queues": 1,
            "num_rx_queues": peer_rx_queues,
        },
    }
    if index is not None:
        attrs["index"] = index
    try:
        with ipr() as ip:
            ip.link("add", **attrs)
    except _netlink_error() as e:
        raise _nl_error(e, f"creating veth {name}/{peer}") from None


def set_link_up(name: str) -> None:
    """Bring interface ``name`` of this namespace up. Raises XdpflowError."""
    idx = ifindex(name)
    try:
        with ipr() as ip:
            ip.link("set", index=idx, state="up")
    except _netlink_error() as e:
        raise _nl_error(e, f"bringing {name} up") from None


def configure_link(
    name: str,
    *,
    arp: bool,
    addresses: list[tuple[str, int]],
    neighbours: list[tuple[str, str]],
) -> int:
    """Configure interface ``name`` of this namespace in one netlink session,
    in this order: ARP on or off, then ``addresses`` ((address, prefixlen);
    IPv6 ones without DAD), then the link up, then ``neighbours`` ((address,
    MAC), permanent). Returns its ifindex.

    With ARP off before any address exists the kernel never joins
    solicited-node groups (whose MLD reports would go out for seconds) and
    never does DAD. Raises XdpflowError.
    """
    idx = ifindex(name)
    try:
        with ipr() as ip:
            ip.link("set", index=idx, arp=arp)
            for address, prefixlen in addresses:
                flags = IFA_F_NODAD if ":" in address else 0  # usable at once, no neighbour solicitation
                ip.addr("add", index=idx, address=address, prefixlen=prefixlen, flags=flags)
            ip.link("set", index=idx, state="up")
            for address, lladdr in neighbours:
                ip.neigh("add", dst=address, lladdr=lladdr, ifindex=idx, state=NUD_PERMANENT)
    except _netlink_error() as e:
        raise _nl_error(e, f"configuring {name}") from None
    return idx


def link_state(name: str) -> tuple[str | None, str | None]:
    """(operstate, qdisc) of interface ``name`` of this namespace, as the
    kernel names them ("UP", "noqueue"...). Raises XdpflowError."""
    idx = ifindex(name)
    try:
        with ipr() as ip:
            (link,) = ip.get_links(idx)
    except _netlink_error() as e:
        raise _nl_error(e, f"reading interface {name}") from None
    return link.get("IFLA_OPERSTATE"), link.get("IFLA_QDISC")


def delete_link(name: str) -> None:
    """Delete interface ``name`` of this namespace (a veth takes its peer
    along). Raises XdpflowError (ENODEV when there is no such interface)."""
    try:
        with ipr() as ip:
            ip.link("del", ifname=name)
    except _netlink_error() as e:
        raise _nl_error(e, f"deleting {name}") from None


def set_gro(name: str, on: bool) -> None:
    """Turn generic receive offload of interface ``name`` of this namespace
    on or off (ethtool's rx-gro feature). Raises OSError."""
    from pyroute2.ethtool import Ethtool

    try:
        with Ethtool() as ethtool:
            features = ethtool.get_features(name)
            features.features["rx-gro"].enable = on
            ethtool.set_features(name, features)
    except _netlink_error() as e:
        raise _nl_error(e, f"setting rx-gro of {name}") from None


def gro(name: str) -> bool:
    """Whether generic receive offload is on for interface ``name`` of this
    namespace. Raises OSError."""
    from pyroute2.ethtool import Ethtool

    try:
        with Ethtool() as ethtool:
            return bool(ethtool.get_features(name).features["rx-gro"].enable)
    except _netlink_error() as e:
        raise _nl_error(e, f"reading rx-gro of {name}") from None


# --- ethtool statistics --------------------------------------------------------


class XdpXmitCounters:
    """veth's XDP transmit counters of one interface, summed over its queues:
    ``tx_queue_N_xdp_xmit`` (frames its peer's ring took) and
    ``tx_queue_N_xdp_xmit_errors`` (frames refused, the ring being full or
    the frame too long), read with the ethtool ioctl (what ``ethtool -S``
    shows). The interface is looked up in the netns of the thread that
    constructs it. ``open()`` returns None for a driver without them.
    """

    def __init__(self, sock: socket.socket, ifname: str, names: list[str]) -> None:
        self._sock = sock
        self.ifname = ifname
        n = len(names)
        self._stats = ctypes.create_string_buffer(struct.pack("II", _ETHTOOL_GSTATS, n) + bytes(8 * n))
        self._ifr = _ifreq(ifname, self._stats)
        self._fmt = f"8x{n}Q"
        self._xmit = [i for i, k in enumerate(names) if _XMIT.match(k)]
        self._errors = [i for i, k in enumerate(names) if _XMIT_ERRORS.match(k)]

    @classmethod
    def open(cls, ifname: str) -> XdpXmitCounters | None:
        """Raises XdpflowError if the counters exist but cannot be read."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            info = ctypes.create_string_buffer(struct.pack("IIQI", _ETHTOOL_GSSET_INFO, 0, 1 << _ETH_SS_STATS, 0))
            cls._ioctl(sock, ifname, info)
            (n,) = struct.unpack_from("I", info.raw, 16)
            strings = ctypes.create_string_buffer(
                struct.pack("III", _ETHTOOL_GSTRINGS, _ETH_SS_STATS, n) + bytes(_ETH_GSTRING_LEN * n)
            )
            cls._ioctl(sock, ifname, strings)
        except OSError as e:
            sock.close()
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise XdpflowError(e.errno or errno.EIO, f"reading the counters of {ifname}: {e.strerror}") from None
        names = [
            strings.raw[12 + _ETH_GSTRING_LEN * i : 12 + _ETH_GSTRING_LEN * (i + 1)].split(b"\0")[0].decode()
            for i in range(n)
        ]
        if not any(_XMIT.match(k) for k in names):
            sock.close()
            return None
        return cls(sock, ifname, names)

    @staticmethod
    def _ioctl(sock: socket.socket, ifname: str, buf: ctypes.Array[ctypes.c_char]) -> None:
        fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, _ifreq(ifname, buf))

    def read(self) -> tuple[int, int]:
        """(frames taken, frames refused) since the interface was created."""
        try:
            fcntl.ioctl(self._sock.fileno(), _SIOCETHTOOL, self._ifr)
        except OSError as e:
            raise XdpflowError(e.errno or errno.EIO, f"reading the counters of {self.ifname}: {e.strerror}") from None
        values = struct.unpack_from(self._fmt, self._stats.raw)
        return sum(values[i] for i in self._xmit), sum(values[i] for i in self._errors)

    def close(self) -> None:
        self._sock.close()


def _ifreq(ifname: str, data: ctypes.Array[ctypes.c_char]) -> bytes:
    """struct ifreq: the name, then a pointer to the ioctl's data (``data``
    must outlive every use of the result)."""
    return struct.pack("16sP", ifname.encode(), ctypes.addressof(data)).ljust(40, b"\0")


# --- a pre-built XDP request: the time-critical part of a switch ----------------

# linux/rtnetlink.h, linux/netlink.h, linux/if_link.h
_RTM_SETLINK = 19
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_NLMSG_ERROR = 2
_NLA_F_NESTED = 1 << 15
_IFLA_XDP = 43
_IFLA_XDP_FD = 1
_IFLA_XDP_FLAGS = 3
_IFLA_XDP_EXPECTED_FD = 8


def _nla(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


class XdpRequest:
    """One RTM_SETLINK request that sets (or, with fd -1, removes) the XDP
    program of device ``ifindex``: encoded and its socket opened ahead, so
    that ``run()`` is one send and one receive. For switches that must be
    short, where pyroute2's per-call work (~1 ms) would widen the gap.
    """

    def __init__(self, ifindex: int, prog_fd: int, flags: int, expected_fd: int | None = None) -> None:
        self.ifindex = ifindex
        attrs = _nla(_IFLA_XDP_FD, struct.pack("=i", prog_fd))
        if expected_fd is not None:
            flags |= XDP_FLAGS_REPLACE
            attrs += _nla(_IFLA_XDP_EXPECTED_FD, struct.pack("=i", expected_fd))
        attrs += _nla(_IFLA_XDP_FLAGS, struct.pack("=I", flags))
        body = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, ifindex, 0, 0) + _nla(_IFLA_XDP | _NLA_F_NESTED, attrs)
        self.data = struct.pack("=IHHII", 16 + len(body), _RTM_SETLINK, _NLM_F_REQUEST | _NLM_F_ACK, 1, 0) + body
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)

    def run(self) -> None:
        """Send the request and wait for the kernel's answer. Raises XdpflowError."""
        self.sock.send(self.data)
        reply = self.sock.recv(65536)
        _len, kind = struct.unpack_from("=IH", reply)
        if kind == _NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", reply, 16)
            if err < 0:
                raise os_error(-err, f"setting the XDP program of interface index {self.ifindex}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> XdpRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
