"""Tests of the namespace lab itself, on real namespaces and veths.

No XDP program is involved: these establish that what the lab sends arrives
exactly once and unchanged, that the link is otherwise silent, and that the
lab always leaves the host as it found it.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute, netns
from pyroute2.ethtool import Ethtool
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from xdpflow.testing.lab import (
    Lab,
    Receiver,
    run_in_netns,
    send_frames,
    set_gro,
    traffic_mix,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

# unique per run, so leftovers are ours even if another suite runs alongside
PREFIX = f"xft{secrets.token_hex(2)}"


def _ip_netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _host_links(*names: str) -> list[str]:
    with IPRoute() as ipr:
        return [name for name in names if ipr.link_lookup(ifname=name)]


def _host_veths() -> str:
    return subprocess.run(
        ["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True, check=True
    ).stdout


def assert_gone(lab: Lab) -> None:
    names = {lab.gen_ns, lab.dut_ns}
    assert names.isdisjoint(netns.listnetns())
    assert names.isdisjoint(_ip_netns_list())
    assert not os.path.exists(f"/run/netns/{lab.gen_ns}")
    assert not os.path.exists(f"/run/netns/{lab.dut_ns}")
    assert _host_links(lab.gen_if, lab.dut_if) == []
    veths = _host_veths()
    assert lab.gen_if not in veths and lab.dut_if not in veths


def _links() -> list[str]:
    with IPRoute() as ipr:
        return [link.get("IFLA_IFNAME") for link in ipr.get_links()]


def _hold(ns_name: str) -> int:
    # an open fd keeps a namespace alive after its name is removed, as a
    # straggling process would; /proc/self/fd/N then still leads into it
    return os.open(f"/run/netns/{ns_name}", os.O_RDONLY)


@pytest.fixture(scope="module", autouse=True)
def no_leftovers() -> Iterator[None]:
    yield
    left = [n for n in netns.listnetns() if n.startswith(PREFIX)]
    assert left == [], f"namespaces left behind: {left}"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(prefix=PREFIX) as lab:
        yield lab
    assert_gone(lab)


def _link_state(ifname: str) -> dict[str, object]:
    with IPRoute() as ipr:
        (link,) = ipr.get_links(ifname=ifname)
        (lo,) = ipr.get_links(ifname="lo")
        addrs = {
            f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.get_addr(index=link["index"])
            if a["scope"] == 0  # global, i.e. not the fe80:: one
        }
        neigh = {(n.get("NDA_DST"), n.get("NDA_LLADDR"), n["state"]) for n in ipr.get_neighbours(ifindex=link["index"])}
        return {
            "index": link["index"],
            "up": link.get("IFLA_OPERSTATE"),
            "lo_up": bool(lo["flags"] & 1),
            "mac": link.get("IFLA_ADDRESS"),
            "addrs": addrs,
            "neigh": neigh,
        }


def test_lab_comes_up(lab: Lab) -> None:
    assert {lab.gen_ns, lab.dut_ns} <= set(netns.listnetns())
    assert {lab.gen_ns, lab.dut_ns} <= _ip_netns_list()
    assert lab.gen_ns.startswith(f"{PREFIX}-gen-")
    assert lab.dut_ns.startswith(f"{PREFIX}-dut-")
    assert max(len(lab.gen_if), len(lab.dut_if)) <= 15
    # the veth never shows up in the host namespace
    assert _host_links(lab.gen_if, lab.dut_if) == []

    gen = run_in_netns(lab.gen_ns, _link_state, lab.gen_if)
    dut = run_in_netns(lab.dut_ns, _link_state, lab.dut_if)
    permanent = 0x80
    assert gen["up"] == dut["up"] == "UP"
    assert gen["lo_up"] and dut["lo_up"]
    assert dut["index"] == lab.dut_ifindex
    assert (gen["mac"], dut["mac"]) == (lab.gen_mac, lab.dut_mac)
    assert gen["addrs"] == {f"{lab.gen_v4}/24", f"{lab.gen_v6}/64"}
    assert dut["addrs"] == {f"{lab.dut_v4}/24", f"{lab.dut_v6}/64"}
    assert gen["neigh"] == {
        (lab.dut_v4, lab.dut_mac, permanent),
        (lab.dut_v6, lab.dut_mac, permanent),
    }
    assert dut["neigh"] == {
        (lab.gen_v4, lab.gen_mac, permanent),
        (lab.gen_v6, lab.gen_mac, permanent),
    }


def test_udp_frame_arrives_once_unchanged(lab: Lab) -> None:
    frame = (
        Ether(src=lab.gen_mac, dst=lab.dut_mac)
        / IP(src=lab.gen_v4, dst=lab.dut_v4)
        / UDP(sport=40000, dport=9000)
        / Raw(b"xdpflow lab")
    )
    with Receiver(lab.dut_ns, lab.dut_if) as rx:
        assert send_frames(lab.gen_ns, lab.gen_if, [frame]) == 1
        received = rx.stop()
    assert received == [bytes(frame)]
    assert rx.dropped == 0


def test_traffic_mix_arrives_in_order(lab: Lab) -> None:
    mix = traffic_mix(lab)
    assert [bytes(p) for p in mix] == [bytes(p) for p in traffic_mix(lab)]
    assert len(mix) == 12
    with lab.receiver() as rx:
        assert lab.send(mix) == len(mix)
        received = rx.stop()
    assert received == [bytes(p) for p in mix]


def test_link_is_silent(lab: Lab) -> None:
    # without IFF_NOARP, MLD reports for the solicited-node group arrive
    # here within the first second, and go on for about two
    with lab.receiver() as rx:
        time.sleep(1.5)
        assert rx.stop() == []


def _udp_to(addrs: list[str], port: int) -> None:
    import socket

    for addr in addrs:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"from the gen stack", (addr, port))


def test_gen_stack_reaches_dut_without_arp_or_nd(lab: Lab) -> None:
    with lab.receiver() as rx:
        run_in_netns(lab.gen_ns, _udp_to, [lab.dut_v4, lab.dut_v6], 9000)
        received = [Ether(f) for f in rx.stop()]
    assert [(p.src, p.dst) for p in received] == [(lab.gen_mac, lab.dut_mac)] * 2
    assert received[0][IP].dst == lab.dut_v4 and UDP in received[0]
    assert received[1][IPv6].dst == lab.dut_v6 and UDP in received[1]


def test_dut_stack_answers_without_arp_or_nd(lab: Lab) -> None:
    eth = Ether(src=lab.gen_mac, dst=lab.dut_mac)
    requests = [
        eth / IP(src=lab.gen_v4, dst=lab.dut_v4) / ICMP(id=7, seq=1),
        eth / IPv6(src=lab.gen_v6, dst=lab.dut_v6) / ICMPv6EchoRequest(id=7, seq=1),
    ]
    with Receiver(lab.gen_ns, lab.gen_if) as rx:
        lab.send(requests)
        replies = [Ether(f) for f in rx.stop()]
    assert [(p.src, p.dst) for p in replies] == [(lab.dut_mac, lab.gen_mac)] * 2
    assert replies[0][ICMP].type == 0 and replies[0][IP].dst == lab.gen_v4
    assert ICMPv6EchoReply in replies[1] and replies[1][IPv6].dst == lab.gen_v6


def test_close_removes_everything_and_is_idempotent() -> None:
    lab = Lab(prefix=PREFIX)
    lab.close()
    assert_gone(lab)
    lab.close()


def test_close_after_exception_in_with() -> None:
    held = []
    try:
        with pytest.raises(RuntimeError, match="body failed"):
            with Lab(prefix=PREFIX) as lab:
                held = [_hold(lab.gen_ns), _hold(lab.dut_ns)]
                raise RuntimeError("body failed")
        assert_gone(lab)
        # the veth went with the lab, not only with the namespaces' names
        for fd in held:
            assert run_in_netns(f"/proc/self/fd/{fd}", _links) == ["lo"]
    finally:
        for fd in held:
            os.close(fd)


# an interrupt landing inside pyroute2 can leave a half-built asyncio loop,
# whose __del__ then complains; that is pyroute2's, not a leak of ours
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_interrupt_during_setup_leaves_nothing() -> None:
    prefix = f"{PREFIX}int"
    interrupted = completed = 0
    main = threading.main_thread().ident
    assert main is not None
    for delay in (0, 0.001, 0.003, 0.006, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08):
        lab = None
        timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
        try:
            timer.start()
            lab = Lab(prefix=prefix)
            timer.join()
            time.sleep(0.05)  # a pending KeyboardInterrupt surfaces here
            completed += 1
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            timer.cancel()
            timer.join()
            if lab is not None:
                lab.close()
    assert [n for n in netns.listnetns() if n.startswith(prefix)] == []
    assert interrupted + completed == 10
    assert interrupted >= 1


def test_sigterm_closes_labs_and_still_terminates() -> None:
    script = (
        "import sys, time\n"
        "from xdpflow.testing.lab import Lab\n"
        f"lab = Lab(prefix={PREFIX!r})\n"
        "print(lab.gen_ns, lab.dut_ns, flush=True)\n"
        "time.sleep(60)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        names = proc.stdout.readline().split()
        assert len(names) == 2 and set(names) <= set(netns.listnetns())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert set(names).isdisjoint(netns.listnetns())


def _netns_inodes() -> tuple[int, int]:
    return (os.stat("/proc/self/ns/net").st_ino, os.stat("/proc/self/ns/mnt").st_ino)


def test_run_in_netns_returns_value_from_inside(lab: Lab) -> None:
    net, mnt = run_in_netns(lab.dut_ns, _netns_inodes)
    assert net == os.stat(f"/run/netns/{lab.dut_ns}").st_ino
    assert net != os.stat("/proc/self/ns/net").st_ino
    # same mount namespace: /sys/fs/bpf pins stay visible
    assert mnt == os.stat("/proc/self/ns/mnt").st_ino
    assert run_in_netns(lab.gen_ns, sorted, [3, 1, 2]) == [1, 2, 3]
    assert run_in_netns(lab.gen_ns, dict, a=1, timeout=5) == {"a": 1}


def _fail(exc: BaseException) -> None:
    raise exc


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}+{b}")


def test_run_in_netns_reraises(lab: Lab) -> None:
    with pytest.raises(ValueError, match="boom") as info:
        run_in_netns(lab.gen_ns, _fail, ValueError("boom"))
    assert any("_fail" in note for note in info.value.__notes__)
    with pytest.raises(OSError) as oserr:
        run_in_netns(lab.gen_ns, _fail, OSError(errno.ENODEV, "no such device"))
    assert oserr.value.errno == errno.ENODEV
    with pytest.raises(RuntimeError, match="_Unpicklable: 1\\+2"):
        run_in_netns(lab.gen_ns, _fail, _Unpicklable(1, 2))


def test_run_in_netns_timeout_kills_child(lab: Lab) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        run_in_netns(lab.gen_ns, time.sleep, 30, timeout=0.3)
    assert time.monotonic() - start < 5


def test_run_in_netns_never_creates_a_namespace() -> None:
    name = f"{PREFIX}-missing-{os.getpid()}"
    with pytest.raises(FileNotFoundError):
        run_in_netns(name, int)
    assert name not in netns.listnetns()


def test_errors_name_the_problem(lab: Lab) -> None:
    with pytest.raises(OSError) as err:
        send_frames(lab.gen_ns, "nosuchif0", [b"\x00" * 60])
    assert err.value.errno == errno.ENODEV
    with pytest.raises(OSError) as err:
        Receiver(lab.dut_ns, "nosuchif0").start()
    assert err.value.errno == errno.ENODEV


def _gro(ifname: str) -> bool:
    with Ethtool() as ethtool:
        return bool(ethtool.get_features(ifname).features["rx-gro"].enable)


def test_set_gro(lab: Lab) -> None:
    for on in (True, False):
        set_gro(lab.dut_ns, lab.dut_if, on)
        assert run_in_netns(lab.dut_ns, _gro, lab.dut_if) is on
