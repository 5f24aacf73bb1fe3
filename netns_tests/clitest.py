"""Helpers for the end-to-end CLI tests: run the installed `xdpflow` command
inside a lab's dut namespace, build frames, and say what the program must
have counted for them.

Every test drives xdpflow only through the console script, as an operator
would; Python reads nothing from the maps itself. Frames use the lab's
addresses (198.18.0.0/15, 2001:2::/48) and, as spoofed blocked sources or
destinations, 198.51.100.0/24, 203.0.113.0/24 and 2001:db8::/32 only.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pyroute2 import netns as _netns
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from xdpflow.dataplane.abi import bytes_key
from xdpflow.export.metrics import MetricsServer
from xdpflow.testing.lab import DUT_MAC, DUT_V4, DUT_V6, GEN_MAC, GEN_V4, GEN_V6, Lab

LAB_PREFIX = "xfcli"


def _console_script() -> str:
    # the entry point installed for the interpreter running the tests; going
    # around a version manager's shim (pyenv's is a bash script) saves a third
    # of every command's start-up
    beside = os.path.join(os.path.dirname(sys.executable), "xdpflow")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("xdpflow")
    assert found, "the xdpflow console script is not installed (pip install -e .)"
    return found


XDPFLOW = _console_script()
BASELINE_OBJ = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "xdpflow", "bpf", "baseline.bpf.o"
)

BLOCK_MAX = 131072  # XF_BLOCK_MAX: rules per family and direction
RULES_MAX = 524288  # XF_RULES_MAX: blocklist_max in `status`
FLOWS_MAX = 2 * 262144  # XF_FLOWS_DEFAULT per family

COUNTERS = (
    "packets", "passed", "dropped", "sunk", "monitored", "parse_errors", "non_ip", "ipv4", "ipv6",
    "tcp", "udp", "icmp", "other", "flow_insert_failed", "events_suppressed", "events_lost", "untracked",
)  # fmt: skip
_TCP_LETTERS = "FSRPAUEC"


def fresh_lab() -> Iterator[Lab]:
    """Body of the tests' `lab` fixtures: a new lab, gone afterwards."""
    with Lab(LAB_PREFIX) as lab:
        yield lab
    left = {lab.gen_ns, lab.dut_ns} & set(_netns.listnetns())
    assert not left, f"namespaces left behind: {left}"


class Cli:
    """The `xdpflow` command bound to one lab namespace (None: this process's
    own, for commands refused before they touch one) and one pin root."""

    def __init__(self, netns: str | None, pin_root: str) -> None:
        self.netns = netns
        self.pin_root = pin_root

    @classmethod
    def of(cls, lab: Lab, pin_root: str) -> Cli:
        return cls(lab.dut_ns, pin_root)

    def argv(self, *args: str) -> list[str]:
        where = ["--netns", self.netns] if self.netns is not None else []
        return [XDPFLOW, *args, *where, "--pin-root", self.pin_root]

    def run(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command; the caller checks the exit code."""
        return subprocess.run(self.argv(*args), capture_output=True, text=True, input=input, timeout=timeout)

    def __call__(self, *args: str, input: str | None = None) -> str:
        """Run a command that must succeed silently on stderr; return stdout."""
        r = self.run(*args, input=input)
        assert r.returncode == 0, f"xdpflow {' '.join(args)}: exit {r.returncode}\n{r.stderr}"
        assert r.stderr == "", r.stderr
        return r.stdout

    def json(self, *args: str, input: str | None = None) -> Any:
        return json.loads(self(*args, "--json", input=input))

    def fails(self, code: int, *args: str, input: str | None = None) -> str:
        """Run a command that must fail with ``code`` and one line on stderr; return it."""
        r = self.run(*args, input=input)
        assert r.returncode == code, f"xdpflow {' '.join(args)}: exit {r.returncode}, want {code}\n{r.stderr}"
        assert r.stdout == ""
        assert_one_error_line(r.stderr)
        return r.stderr

    def popen(self, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def run_all(self, *commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
        """Run several commands at once; results in the order given."""
        return together(*[(self, c) for c in commands])

    def run_all_stdin(self, *commands: tuple[Sequence[str], str]) -> list[subprocess.CompletedProcess[str]]:
        """run_all() for commands that each read the given text on standard input."""
        return together(*[(self, c, text) for c, text in commands])

    def json_all(self, *commands: Sequence[str]) -> list[Any]:
        """Read-only JSON queries, run at once; each must succeed."""
        return [json.loads(out) for out in all_ok(self.run_all(*[[*c, "--json"] for c in commands]))]

    def state(self) -> tuple[dict[str, int], list[dict[str, Any]], list[tuple[str, str, int]]]:
        """(stats of the one interface, flows, blocklist), read at once."""
        stats, flows, listing = self.json_all(("stats",), ("flows",), ("block", "list"))
        assert len(stats) == 1, stats
        return (
            next(iter(stats.values())),
            flows,
            [(r["cidr"], r["direction"], r["hits"]) for r in listing],
        )

    # shorthands for the JSON views
    def stats(self, iface: str | None = None) -> dict[str, int]:
        out = self.json("stats", *([iface] if iface else []))
        assert len(out) == 1, out
        return next(iter(out.values()))

    def flows(self, *args: str) -> list[dict[str, Any]]:
        return self.json("flows", *args)  # type: ignore[no-any-return]

    def status(self) -> list[dict[str, Any]]:
        return self.json("status")  # type: ignore[no-any-return]

    def blocklist(self) -> list[tuple[str, str, int]]:
        return [(r["cidr"], r["direction"], r["hits"]) for r in self.json("block", "list")]


def together(
    *commands: tuple[Cli, Sequence[str]] | tuple[Cli, Sequence[str], str],
) -> list[subprocess.CompletedProcess[str]]:
    """Run commands (of one or several Cli) at once; results in the order given.

    A command is (cli, args) or (cli, args, text for its standard input).
    """
    procs = []
    for cli, args, *stdin in commands:
        p = cli.popen(*args, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        procs.append((cli.argv(*args), p, stdin[0] if stdin else None))
    out = []
    for argv, p, text in procs:
        stdout, stderr = p.communicate(input=text, timeout=60)
        out.append(subprocess.CompletedProcess(argv, p.returncode, stdout, stderr))
    return out


def all_ok(results: Sequence[subprocess.CompletedProcess[str]]) -> list[str]:
    """The stdout of each result, once each succeeded without a word on stderr."""
    for r in results:
        assert r.returncode == 0 and r.stderr == "", f"{r.args}: exit {r.returncode}\n{r.stderr}"
    return [r.stdout for r in results]


def assert_one_error_line(stderr: str) -> None:
    assert stderr.startswith("xdpflow: "), stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT, timeout: float = 10) -> tuple[str, str]:
    """Signal a background command and collect its output."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


# --- frames -------------------------------------------------------------------


def _pad(n: int) -> Raw:
    return Raw(bytes(i & 0xFF for i in range(n)))


def _frame(l3: Packet) -> Packet:
    # built once, so lengths and checksums are final
    return Ether(bytes(Ether(src=GEN_MAC, dst=DUT_MAC) / l3))


def udp(src: str, dst: str, sport: int = 40000, dport: int = 9000, payload: int = 32) -> Packet:
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst, id=1)
    return _frame(ip / UDP(sport=sport, dport=dport) / _pad(payload))


def tcp(src: str, dst: str, sport: int = 40002, dport: int = 80, flags: str = "S", payload: int = 0) -> Packet:
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst, id=1)
    l4 = ip / TCP(sport=sport, dport=dport, flags=flags, seq=1000)
    return _frame(l4 / _pad(payload) if payload else l4)


def icmp(src: str, dst: str, payload: int = 32) -> Packet:
    if ":" in src:
        return _frame(IPv6(src=src, dst=dst) / ICMPv6EchoRequest(id=1, seq=1) / _pad(payload))
    return _frame(IP(src=src, dst=dst, id=1) / ICMP(type="echo-request", id=1, seq=1) / _pad(payload))


def udp4(src: str = GEN_V4, dst: str = DUT_V4, sport: int = 40000, dport: int = 9000, payload: int = 32) -> Packet:
    return udp(src, dst, sport, dport, payload)


def udp6(src: str = GEN_V6, dst: str = DUT_V6, sport: int = 40000, dport: int = 9000, payload: int = 32) -> Packet:
    return udp(src, dst, sport, dport, payload)


# --- what the program must count ----------------------------------------------


def ip_len(frame: Packet) -> int:
    """IP bytes as flows count them: v4 total length, v6 40 + payload length."""
    if IP in frame:
        return int(frame[IP].len)
    return 40 + int(frame[IPv6].plen)


def flow_key(frame: Packet) -> tuple[str, str, int, int, int]:
    """(src, dst, sport, dport, proto); ICMP keys carry type and code as ports."""
    ip = frame[IP] if IP in frame else frame[IPv6]
    proto = int(ip.proto if IP in frame else ip.nh)
    l4 = ip.payload
    if TCP in frame or UDP in frame:
        sport, dport = int(l4.sport), int(l4.dport)
    else:
        sport, dport = int(l4.type), int(l4.code)
    return str(ip.src), str(ip.dst), sport, dport, proto


def _l4_counter(frame: Packet) -> str:
    if TCP in frame:
        return "tcp"
    if UDP in frame:
        return "udp"
    if ICMP in frame or ICMPv6EchoRequest in frame:
        return "icmp"
    return "other"


def expect_counters(
    passed: Iterable[Packet] = (), dropped: Iterable[Packet] = (), monitored: Iterable[Packet] = ()
) -> dict[str, int]:
    """The exact `stats --json` of one interface after these frames.

    ``monitored`` frames matched the blocklist in monitor mode: they pass, so
    they also count as passed.
    """
    out = dict.fromkeys(COUNTERS, 0)
    out.update({bytes_key(n): 0 for n in COUNTERS})

    def add(name: str, frame: Packet) -> None:
        out[name] += 1
        out[bytes_key(name)] += len(bytes(frame))

    for action, frames in (("passed", passed), ("dropped", dropped), ("monitored", monitored)):
        for f in frames:
            add("packets", f)
            add("ipv4" if IP in f else "ipv6", f)
            add(_l4_counter(f), f)
            add("passed" if action == "monitored" else action, f)
            if action == "monitored":
                add("monitored", f)
    return out


def tcp_letters(flags: int) -> str:
    return "".join(ch for i, ch in enumerate(_TCP_LETTERS) if flags & (1 << i))


def expect_flows(frames: Iterable[Packet], ifname: str) -> list[dict[str, Any]]:
    """Flow entries (without timestamps) for frames the program tracked, sorted."""
    acc: dict[tuple[str, str, int, int, int], list[int]] = {}
    for f in frames:
        e = acc.setdefault(flow_key(f), [0, 0, 0])
        e[0] += 1
        e[1] += ip_len(f)
        e[2] |= int(f[TCP].flags) if TCP in f else 0
    return sorted(
        (
            {"ifname": ifname, "src": k[0], "dst": k[1], "sport": k[2], "dport": k[3], "proto": k[4],
             "packets": v[0], "bytes": v[1], "tcp_flags": tcp_letters(v[2])}
            for k, v in acc.items()
        ),
        key=_flow_sort_key,
    )  # fmt: skip


def _flow_sort_key(f: dict[str, Any]) -> tuple[Any, ...]:
    return (f["ifname"], f["src"], f["dst"], f["sport"], f["dport"], f["proto"])


def without_times(flows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`flows --json` entries minus their timestamps, sorted like expect_flows()."""
    out = []
    for f in flows:
        assert set(f) == {"ifname", "src", "dst", "sport", "dport", "proto", "packets", "bytes",
                          "first_seen", "last_seen", "tcp_flags"}, f  # fmt: skip
        out.append({k: v for k, v in f.items() if k not in ("first_seen", "last_seen")})
    return sorted(out, key=_flow_sort_key)


def key_of(f: dict[str, Any]) -> tuple[str, str, int, int, int]:
    return f["src"], f["dst"], f["sport"], f["dport"], f["proto"]


# --- what the kernel says ------------------------------------------------------


def ip_link(netns: str, ifname: str) -> dict[str, Any]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "link", "show", "dev", ifname], capture_output=True, text=True, check=True
    ).stdout
    (link,) = json.loads(out)
    return link  # type: ignore[no-any-return]


def xdp_prog(netns: str, ifname: str) -> tuple[int, str] | None:
    """(id, name) of the XDP program on the interface, None if there is none."""
    xdp = ip_link(netns, ifname).get("xdp")
    if not xdp or "prog" not in xdp:
        return None
    return int(xdp["prog"]["id"]), str(xdp["prog"]["name"])


def attach_foreign(netns: str, ifname: str) -> int:
    """Attach baseline's xdp_pass with iproute2, as another tool would; return its id."""
    subprocess.run(
        ["ip", "-n", netns, "link", "set", "dev", ifname, "xdp", "obj", BASELINE_OBJ, "program", "xdp_pass"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    prog = xdp_prog(netns, ifname)
    assert prog is not None and prog[1] == "xdp_pass", prog
    return prog[0]


def detach_link_of(prog_id: int) -> None:
    """Remove program ``prog_id`` behind xdpflow's back: xdpflow holds it with
    a bpf_link, which netlink (`ip link set ... xdp off`) may not remove."""
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, check=True).stdout)
    (link_id,) = [lk["id"] for lk in links if lk.get("prog_id") == prog_id]
    subprocess.run(["bpftool", "link", "detach", "id", str(link_id)], check=True)


def prog_exists(prog_id: int) -> bool:
    return subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True).returncode == 0


def wait_prog_gone(prog_id: int, timeout: float = 3.0) -> bool:
    """True once the kernel has freed the program (its last reference went)."""
    deadline = time.monotonic() + timeout
    while prog_exists(prog_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def pins_under(root: str) -> list[str]:
    """Every path under a pin root, relative to it; [] if the root is gone."""
    out = []
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(d, n), root))
    return sorted(out)


def send_and_receive(lab: Lab, frames: Sequence[Packet], inter: float = 0) -> list[bytes]:
    """Send frames from gen; return the frames XDP passed on dut, in order."""
    with lab.receiver() as rx:
        assert lab.send(frames, inter) == len(frames)
        return rx.stop()


def raw(frames: Iterable[Packet]) -> list[bytes]:
    return [bytes(f) for f in frames]


def scrape(server: MetricsServer) -> str:
    """One /metrics scrape of a server this process runs on loopback."""
    assert server.host == "127.0.0.1"
    with urllib.request.urlopen(server.url, timeout=30) as r:
        assert r.status == 200
        return str(r.read().decode())


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], int]:
    """{(sample name, labels): value} for the xdpflow_ samples of a /metrics
    scrape, values as exact ints."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("xdpflow_"):
                assert float(s.value).is_integer(), s
                out[(s.name, frozenset(s.labels.items()))] = int(s.value)
    return out


def hostile_lines(marker: Path) -> list[str]:
    """Shell, Python and template code that would create ``marker`` if any
    of it were ever executed or evaluated."""
    m = shlex.quote(str(marker))
    return [
        f"$(touch {m})",
        f"`touch {m}`",
        f"__import__('os').system('touch {m}')",
        f"198.18.0.0/24 && touch {m}",
        f"{{{{ ''.__class__.__mro__[1].__subclasses__() }}}} {m}",
    ]


def hostile_config(value: str) -> str:
    """A daemon config whose every name and path is ``value``, verbatim."""
    return (
        f"interfaces = [{json.dumps(value)}]\nnetns = {json.dumps(value)}\n"
        f"pin_root = {json.dumps('/sys/fs/bpf/' + value)}\n"
        f"[blocklist]\nfiles = [{json.dumps(value)}]\n"
        f"feeds = [{{url = {json.dumps('http://127.0.0.1:1/' + value)}}}]\n"
    )


def interrupt(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C to a console script that runs until interrupted: it must exit
    0 with nothing on stderr. A reader thread may own stdout: signal, then
    wait."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.returncode == 0, err
    assert err == ""
