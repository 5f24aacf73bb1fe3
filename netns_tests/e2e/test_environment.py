"""xdpflow when the world around it changes or is hostile: the interface is
deleted, renamed or moved to another namespace under a running program;
bpffs is missing, not where the pin root is, or read-only; a user without
privileges pokes at the pins; blocklist and config files carry shell or
Python code; the interface or namespace asked for does not exist.

Every xdpflow call goes through the installed console script in a lab's dut
namespace (``--netns``), as an operator would type it. Steps that need a
different filesystem view run in a private mount namespace of their own
(``unshare --mount``), which the kernel tears down with its last process:
the host's /sys/fs/bpf, which other tests use at the same time, is never
unmounted or remounted. The rule everywhere: xdpflow says what is true, exits
0/1/2 as documented with one line on stderr, and leaves nothing behind --
no pins, and above all no program still attached that no pin can reach.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import xdpflow
from xdpflow.app import config
from xdpflow.app.config import DEFAULT_LISTEN, parse_hostport
from xdpflow.dataplane.pins import SHARED_MAPS, SHARED_PROGS, PinRoot
from xdpflow.errors import ROOT_HINT
from xdpflow.export import metrics
from xdpflow.testing.lab import DUT_V4, Lab, Receiver, run_in_netns, traffic_mix
from xdpflow.testing.lab import _wait_link_ready as wait_link_ready

from ..clitest import (
    XDPFLOW,
    Cli,
    all_ok,
    assert_one_error_line,
    expect_counters,
    hostile_config,
    hostile_lines,
    pins_under,
    raw,
    send_and_receive,
    together,
    udp4,
    wait_prog_gone,
    xdp_prog,
)
from .conftest import ip

LAB_PREFIX = "xfenv"
PACKAGE = os.path.dirname(os.path.abspath(xdpflow.__file__))
NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
IFACE_PINS = ["admission", "counters", "flows_v4", "flows_v6", "link", "next_prog", "prog", "take"]
BPFFS_HINT = (
    "is not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` "
    "or choose a --pin-root below a bpffs mount"
)


# --- helpers -------------------------------------------------------------------


def rename(netns: str, old: str, new: str) -> None:
    """Rename a link the way an operator must: down, rename, up."""
    ip("-n", netns, "link", "set", "dev", old, "down")
    ip("-n", netns, "link", "set", "dev", old, "name", new)
    ip("-n", netns, "link", "set", "dev", new, "up")


def iface_pins(ifname: str) -> set[str]:
    return {f"if_{ifname}"} | {f"if_{ifname}/{n}" for n in IFACE_PINS}


def assert_no_orphan(r: subprocess.CompletedProcess[str], pin_root: str, netns: str, ifname: str) -> None:
    """After a detach: success means the program is gone; a program still
    running means the command failed and kept the pins that reach it."""
    running = xdp_prog(netns, ifname)
    if running is not None:
        assert r.returncode != 0, (
            f"`detach` said {r.stdout.strip()!r} (exit 0) but xdpflow program {running[0]} still runs on "
            f"{ifname} in {netns}, and its pins are {'gone' if not pins_under(pin_root) else 'kept'}"
        )
        assert pins_under(pin_root), "the pins of a program that still runs were removed"


# A private mount namespace for steps that change what is mounted. The helper
# checks it really is in a namespace of its own before touching a mount.
_PRIVATE_MOUNTS = r"""
import json, os, subprocess, sys
host_ns, setup, steps, parallel = json.loads(sys.argv[1])
if os.readlink("/proc/self/ns/mnt") == host_ns:
    sys.exit("refusing to change mounts: not in a private mount namespace")
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["sh", "-euc", setup], check=True)
def start(argv):
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
def finish(p):
    out, err = p.communicate(timeout=60)
    return [p.returncode, out, err]
if parallel:
    out = [finish(p) for p in [start(argv) for argv in steps]]
else:
    out = [finish(start(argv)) for argv in steps]
json.dump(out, sys.stdout)
"""


def in_private_mounts(
    setup: str, *steps: Sequence[str], parallel: bool = False
) -> list[subprocess.CompletedProcess[str]]:
    """Run the shell ``setup``, then each step, in a new private mount namespace;
    every step runs whatever the earlier ones returned, one after the other or,
    with ``parallel``, all at once. Results in the order given."""
    host_ns = os.readlink("/proc/self/ns/mnt")
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", _PRIVATE_MOUNTS,
         json.dumps([host_ns, setup, [list(s) for s in steps], parallel])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, f"private mount namespace: exit {r.returncode}\n{r.stderr}"
    return [
        subprocess.CompletedProcess(list(argv), rc, out, err)
        for argv, (rc, out, err) in zip(steps, json.loads(r.stdout), strict=True)
    ]


def _reach_for_nobody(tree: str) -> str:
    """Shell setup that lets uid 65534 run this interpreter on the package copy ``tree``.

    The interpreter usually lives below /root (mode 0700): the setup lays a world-readable
    tmpfs over the closed ancestor and puts the installation back on top of it,
    in the private mount namespace only. Nothing else changes: the pins keep
    their owner and modes, the process gets no capability.
    """
    wanted = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, tree)}
    needed = {p for p in wanted if not any(p.startswith(q + "/") for q in wanted)}
    closed: dict[str, set[str]] = {}
    for path in needed:
        cur = "/"
        for part in path.strip("/").split("/")[:-1]:
            cur = os.path.join(cur, part)
            if not os.stat(cur).st_mode & stat.S_IXOTH:
                closed.setdefault(cur, set()).add(path)
                break
    lines = []
    for n, (top, paths) in enumerate(sorted(closed.items())):
        paths_sorted = sorted(paths)
        for i, p in enumerate(paths_sorted):
            lines.append(f"s{n}_{i}=$(mktemp -d); mount --bind {shlex.quote(p)} $s{n}_{i}")
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(top)}")
        for i, p in enumerate(paths_sorted):
            lines.append(f"mkdir -p {shlex.quote(p)}; mount --move $s{n}_{i} {shlex.quote(p)}; rmdir $s{n}_{i}")
    return "\n".join(lines) or "true"


_WHOAMI = (
    "import os, xdpflow; caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')];"
    "print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups(), caps[0],"
    " os.path.dirname(os.path.dirname(xdpflow.__file__)))"
)


# The package as uid 65534 runs it: a copy in a world-readable directory,
# because the checkout under test may sit where that user cannot look (root's
# home, a `mktemp -d`); python3 -m xdpflow, as the console script would import
# an installation of its own choosing.
NOBODY_XDPFLOW = [sys.executable, "-m", "xdpflow"]


@pytest.fixture(scope="module")
def nobody_tree() -> Iterator[str]:
    """A world-readable copy of the package under test, removed afterwards."""
    top = tempfile.mkdtemp(prefix="xfenv-pkg-")
    try:
        shutil.copytree(PACKAGE, os.path.join(top, "xdpflow"), ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["chmod", "-R", "a+rX", top], check=True)  # mkdtemp made it 0700
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def as_nobody(tree: str, *commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run commands, all at once, as uid/gid 65534 without groups or
    capabilities (setpriv), importing xdpflow from ``tree`` (cwd /, so
    nothing else is found first); checks that the process really is that
    unprivileged and runs that copy."""
    env = ["env", "-C", "/", f"PYTHONPATH={tree}"]
    whoami, *results = in_private_mounts(
        _reach_for_nobody(tree),
        [*SETPRIV, *env, sys.executable, "-c", _WHOAMI],
        *[[*SETPRIV, *env, *c] for c in commands],
        parallel=True,
    )
    assert whoami.returncode == 0, whoami.stderr
    assert whoami.stdout.split() == ["65534", "65534", "65534", "[]", "0000000000000000", tree], whoami.stdout
    return results


def test_deleted_interface(lab: Lab, cli: Cli, pin_root: str) -> None:
    (attached,) = cli.json("attach", lab.dut_if)
    prog_id = attached["prog_id"]
    mix = traffic_mix(lab)
    assert send_and_receive(lab, mix) == raw(mix)
    counted = expect_counters(passed=mix)

    ip("-n", lab.dut_ns, "link", "del", lab.dut_if)  # takes the gen end with it

    # status: the truth, not a traceback; the pinned state outlives the interface
    status, stats, stats_if, flows = cli.json_all(("status",), ("stats",), ("stats", lab.dut_if), ("flows",))
    (st,) = status
    assert (st["ifname"], st["attached"], st["mode"], st["prog_id"]) == (lab.dut_if, False, None, prog_id)
    assert st["flows"] == 7
    assert stats == stats_if == {lab.dut_if: counted}
    assert len(flows) == 7
    text = cli("status")
    assert text.splitlines()[1].split()[:3] == [lab.dut_if, "NOT", "ATTACHED"]

    # detach: nothing left, neither pins nor the program; it says the interface is gone
    assert cli("detach", lab.dut_if) == f"{lab.dut_if} runs no xdpflow program any more (gone?); removed its pins\n"
    assert pins_under(pin_root) == [] and not os.path.exists(pin_root)
    assert wait_prog_gone(prog_id), f"program {prog_id} outlived its pins"
    assert cli("status") == f"nothing attached under {pin_root}\n"


# --- 2. the interface is renamed -------------------------------------------------
#
# The pins are keyed by the name given to `attach`. After a rename no
# interface has that name, so "not attached to OLD" is true, as far as it
# goes -- but the program keeps running (and dropping) on NEW. The right
# behaviour: find it by its program id (or an ifindex recorded at attach),
# have `status` say where it runs, and have `detach OLD` take it off NEW.


def test_renamed_interface_status_and_detach(lab: Lab, cli: Cli, pin_root: str) -> None:
    (attached,) = cli.json("attach", lab.dut_if)
    prog_id = attached["prog_id"]
    new = "xr" + lab.dut_if[2:]
    try:
        rename(lab.dut_ns, lab.dut_if, new)
        run_in_netns(lab.gen_ns, wait_link_ready, lab.gen_if, 5.0)
        run_in_netns(lab.dut_ns, wait_link_ready, new, 5.0)
        # the kernel keeps the program through a rename, and it keeps counting
        assert xdp_prog(lab.dut_ns, new) == (prog_id, "xdpflow")
        frame = udp4()
        with Receiver(lab.dut_ns, new) as rx:
            assert lab.send([frame]) == 1
            assert rx.stop() == [bytes(frame)]
        assert cli.stats(lab.dut_if) == expect_counters(passed=[frame])

        # status of the old name: the link follows the device, so attached, under its new name
        (st,) = cli.status()
        assert (st["ifname"], st["attached"], st["mode"], st["prog_id"]) == (lab.dut_if, True, "native", prog_id)
        assert (st["current_ifname"], st["netns"], st["attach"]) == (new, None, "link")
        assert f"{lab.dut_if} (now {new})" in cli("status")
        # the new name has no pins of its own
        want = f"xdpflow: xdpflow is not attached to {new} (pin root {pin_root})\n"
        assert cli.fails(1, "stats", new) == want

        # detach by the name the pins carry removes them all, and the program where it runs now
        assert cli("detach", lab.dut_if) == f"detached xdpflow from {lab.dut_if} (now {new})\n"
        assert pins_under(pin_root) == []
    finally:
        subprocess.run(["ip", "-n", lab.dut_ns, "link", "del", new], capture_output=True)


def test_detach_after_rename_leaves_no_program(lab: Lab, cli: Cli, pin_root: str) -> None:
    cli("attach", lab.dut_if)
    cli("block", "add", f"{lab.gen_v4}/32")
    new = "xr" + lab.dut_if[2:]
    try:
        rename(lab.dut_ns, lab.dut_if, new)
        r = cli.run("detach", lab.dut_if)
        assert_no_orphan(r, pin_root, lab.dut_ns, new)
    finally:
        subprocess.run(["ip", "-n", lab.dut_ns, "link", "del", new], capture_output=True)


# --- 3. the interface moves to another namespace --------------------------------
#
# The kernel does not detach XDP on a namespace move (6.18): the program goes
# along, and the link arrives down. Pins are in the mount namespace, so both
# network namespaces see them; each answers for its own interfaces.


def test_moved_interface_status_and_detach(lab: Lab, cli: Cli, pin_root: str, other_ns: str) -> None:
    (attached,) = cli.json("attach", lab.dut_if)
    prog_id = attached["prog_id"]
    ip("-n", lab.dut_ns, "link", "set", "dev", lab.dut_if, "netns", other_ns)
    assert xdp_prog(other_ns, lab.dut_if) == (prog_id, "xdpflow")

    there = Cli(other_ns, pin_root)
    here_status, there_status, here_stats, there_stats = (
        json.loads(out)
        for out in all_ok(
            together(
                (cli, ("status", "--json")),
                (there, ("status", "--json")),
                (cli, ("stats", "--json")),
                (there, ("stats", "--json")),
            )
        )
    )
    (here_st,), (there_st,) = here_status, there_status
    # attached, seen from both: from here, in the namespace it moved to
    assert (here_st["attached"], here_st["mode"], here_st["prog_id"]) == (True, "native", prog_id)
    assert (here_st["current_ifname"], here_st["netns"]) == (lab.dut_if, other_ns)
    assert (there_st["attached"], there_st["mode"], there_st["prog_id"]) == (True, "native", prog_id)
    assert (there_st["current_ifname"], there_st["netns"]) == (lab.dut_if, None)
    assert here_stats == there_stats  # one set of pins, seen from both

    assert there("detach", lab.dut_if) == f"detached xdpflow from {lab.dut_if}\n"
    assert xdp_prog(other_ns, lab.dut_if) is None
    assert pins_under(pin_root) == []
    assert wait_prog_gone(prog_id)


def test_detach_in_the_old_namespace_after_a_move(lab: Lab, cli: Cli, pin_root: str, other_ns: str) -> None:
    cli("attach", lab.dut_if)
    ip("-n", lab.dut_ns, "link", "set", "dev", lab.dut_if, "netns", other_ns)
    r = cli.run("detach", lab.dut_if)
    assert_no_orphan(r, pin_root, other_ns, lab.dut_if)


# --- 4. bpffs missing, or the pin root not on it ---------------------------------


def test_pin_root_on_a_plain_directory(lab: Lab, cli: Cli) -> None:
    root = f"/tmp/{LAB_PREFIX}-{uuid.uuid4().hex[:10]}"
    here = Cli(lab.dut_ns, root)
    assert here.fails(1, "attach", lab.dut_if) == f"xdpflow: /tmp {BPFFS_HINT}\n"
    assert not os.path.exists(root)
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None


def test_pin_root_on_tmpfs(lab: Lab, tmp_path: Path) -> None:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    attach, listing = in_private_mounts(
        f"mount -t tmpfs tmpfs {shlex.quote(str(mnt))}",
        Cli(lab.dut_ns, f"{mnt}/x").argv("attach", lab.dut_if),
        ["ls", "-A", str(mnt)],
    )
    assert (attach.returncode, attach.stdout, attach.stderr) == (1, "", f"xdpflow: {mnt} {BPFFS_HINT}\n")
    assert listing.stdout == ""  # nothing created
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None


def test_pin_root_below_a_missing_directory_off_bpffs(lab: Lab, tmp_path: Path) -> None:
    root = tmp_path / "missing" / "x"
    r = Cli(lab.dut_ns, str(root)).run("attach", lab.dut_if)
    assert not root.parent.exists()
    assert r.returncode == 1
    assert_one_error_line(r.stderr)
    assert "not on a BPF filesystem" in r.stderr, r.stderr


def test_attach_mounts_bpffs_when_missing(lab: Lab, cli: Cli, pin_root: str) -> None:
    # the pin root is below /sys/fs/bpf, which is not mounted in the private
    # namespace: attach mounts it there; the mount (and every pin on it) goes
    # with the namespace, so detach runs before it ends
    before, attach, after, modes, status, detach, gone = in_private_mounts(
        "umount /sys/fs/bpf",
        ["findmnt", "-n", "/sys/fs/bpf"],
        cli.argv("attach", lab.dut_if, "--json"),
        ["findmnt", "-n", "-o", "FSTYPE", "/sys/fs/bpf"],
        ["find", pin_root, "-printf", "%m %U %P\n"],
        cli.argv("status", "--json"),
        cli.argv("detach", lab.dut_if),
        ["ls", "-A", pin_root],
    )
    assert before.returncode == 1 and before.stdout == "", "bpffs was still mounted"
    assert (attach.returncode, attach.stderr) == (0, ""), attach.stderr
    (a,) = json.loads(attach.stdout)
    assert after.stdout == "bpf\n"
    found = {rel: (mode, uid) for mode, uid, rel in (line.split(" ", 2) for line in modes.stdout.splitlines())}
    dirs = {"", f"if_{lab.dut_if}"}
    assert len(found) == 1 + len(SHARED_MAPS + SHARED_PROGS) + len(iface_pins(lab.dut_if)), found
    assert all(v == ("700" if rel in dirs else "600", "0") for rel, v in found.items()), found
    (st,) = json.loads(status.stdout)
    assert (st["attached"], st["prog_id"]) == (True, a["prog_id"])
    assert (detach.returncode, detach.stdout) == (0, f"detached xdpflow from {lab.dut_if}\n")
    assert gone.returncode != 0  # the pin root went with the last interface
    # nothing reached the host: no pins there, no program on the interface
    assert not os.path.exists(pin_root)
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None
    assert wait_prog_gone(a["prog_id"])


# --- 5. a read-only bpffs ----------------------------------------------------------


def test_read_only_bpffs(lab: Lab, tmp_path: Path) -> None:
    mnt = tmp_path / "robpf"
    mnt.mkdir()
    attach, debug, listing = in_private_mounts(
        f"mount -t bpf -o ro bpf {shlex.quote(str(mnt))}",
        Cli(lab.dut_ns, f"{mnt}/x").argv("attach", lab.dut_if),
        Cli(lab.dut_ns, f"{mnt}/x").argv("attach", lab.dut_if, "--debug"),
        ["ls", "-A", str(mnt)],
    )
    want = f"xdpflow: creating pin directory {mnt}/x: Read-only file system\n"
    assert (attach.returncode, attach.stdout, attach.stderr) == (1, "", want)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and debug.stderr.endswith(want)
    assert "x" not in listing.stdout.split()
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None


def test_read_only_bpffs_still_answers_read_only_commands(lab: Lab, tmp_path: Path) -> None:
    mnt = tmp_path / "bpf"
    mnt.mkdir()
    c = Cli(lab.dut_ns, f"{mnt}/x")
    q = shlex.quote(str(mnt))
    attach, _, *reads, _, detach = in_private_mounts(
        f"mount -t bpf bpf {q}",
        c.argv("attach", lab.dut_if),
        ["mount", "-o", "remount,ro", str(mnt)],
        c.argv("status", "--json"),
        c.argv("stats", "--json"),
        c.argv("flows", "--json"),
        c.argv("block", "list", "--json"),
        ["mount", "-o", "remount,rw", str(mnt)],
        c.argv("detach", lab.dut_if),
    )
    assert attach.returncode == 0 and detach.returncode == 0, (attach.stderr, detach.stderr)
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None
    for r in reads:
        assert (r.returncode, r.stderr) == (0, ""), f"{r.args[1:3]}: {r.stderr}"


# --- 6. privilege and exposure -------------------------------------------------------


def _modes(root: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for rel in [".", *pins_under(root)]:
        st = os.lstat(os.path.join(root, rel))
        out[rel] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode), rel
    return out


def test_pins_are_root_only_whatever_the_umask(lab: Lab, cli: Cli, pin_root: str) -> None:
    argv = ["sh", "-c", 'umask 000; exec "$@"', "sh", *cli.argv("attach", lab.dut_if)]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    modes = _modes(pin_root)
    assert len(modes) == 1 + len(SHARED_MAPS + SHARED_PROGS) + len(iface_pins(lab.dut_if))  # root, shared, iface
    for rel, (mode, uid, gid) in modes.items():
        is_dir = os.path.isdir(os.path.join(pin_root, rel))
        assert (mode, uid, gid) == (0o700 if is_dir else 0o600, 0, 0), f"{rel}: {oct(mode)} uid {uid} gid {gid}"


def test_non_root_is_refused(lab: Lab, cli: Cli, pin_root: str, nobody_tree: str) -> None:
    cli("attach", lab.dut_if)
    cli("block", "add", "203.0.113.0/24")
    before = cli.blocklist()
    commands = [
        ("stats",),
        ("flows",),
        ("block", "add", "198.51.100.0/24"),
        ("block", "list"),
        ("status",),
    ]
    probe = (
        "import sys\nfrom xdpflow.bindings.libbpf import obj_get\n"
        "for p in sys.argv[1:]:\n"
        "    for how, f in (('open', lambda: open(p, 'rb')), ('bpf', lambda: obj_get(p))):\n"
        "        try:\n            f()\n            print(how, p, 'OPENED')\n"
        "        except OSError as e:\n            print(how, p, e.errno)\n"
    )
    pins = [f"{pin_root}/bl4_src", f"{pin_root}/if_{lab.dut_if}/counters", f"{pin_root}/if_{lab.dut_if}/prog"]
    *results, in_netns, direct = as_nobody(
        nobody_tree,
        *[[*NOBODY_XDPFLOW, *c, "--pin-root", pin_root] for c in commands],
        [*NOBODY_XDPFLOW, *cli.argv("stats")[1:]],
        [sys.executable, "-c", probe, *pins],
    )
    for c, r in zip(commands, results, strict=True):
        assert (r.returncode, r.stdout) == (1, ""), f"{c}: exit {r.returncode}\n{r.stdout}{r.stderr}"
        assert_one_error_line(r.stderr)
        assert "denied" in r.stderr or "not permitted" in r.stderr, r.stderr
    # entering the lab namespace already needs CAP_SYS_ADMIN
    assert (in_netns.returncode, in_netns.stdout) == (1, "")
    assert in_netns.stderr == (
        f"xdpflow: entering network namespace /run/netns/{lab.dut_ns}: Operation not permitted; "
        "run as root (needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)\n"
    )
    # neither open(2) nor bpf(BPF_OBJ_GET) reaches a pin
    assert direct.returncode == 0, direct.stderr
    for line in direct.stdout.splitlines():
        how, _path, outcome = line.split()
        # open(2): EACCES; bpf(2): EACCES from the lookup, or EPERM before it
        assert outcome == "13" or (how == "bpf" and outcome == "1"), line
    assert len(direct.stdout.splitlines()) == 2 * len(pins)
    assert cli.blocklist() == before
    assert cli.status()[0]["attached"] is True


def test_non_root_errors_say_run_as_root(lab: Lab, cli: Cli, pin_root: str, nobody_tree: str) -> None:
    cli("attach", lab.dut_if)
    commands = [("stats",), ("flows",), ("block", "add", "198.51.100.0/24"), ("status",), ("detach", lab.dut_if)]
    results = as_nobody(nobody_tree, *[[*NOBODY_XDPFLOW, *c, "--pin-root", pin_root] for c in commands])
    said = {" ".join(c): r.stderr for c, r in zip(commands, results, strict=True)}
    assert all(r.returncode == 1 for r in results), said
    assert all("run as root" in err for err in said.values()), said


def test_an_installation_non_root_cannot_read_is_one_line(pin_root: str, tmp_path: Path) -> None:
    """The package imports, but its bpf/ (header, objects) is root's only:
    the command says so in one line, not a traceback."""
    tree = str(tmp_path / "tree")
    shutil.copytree(PACKAGE, os.path.join(tree, "xdpflow"), ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(tmp_path)], check=True)
    bpf_dir = os.path.join(tree, "xdpflow", "bpf")
    os.chmod(bpf_dir, 0o700)
    # a built tree carries the header compiled: it is read only without that
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(tree, "xdpflow", "dataplane", "_abi_ffi.py"))
    (r,) = as_nobody(tree, [*NOBODY_XDPFLOW, "status", "--pin-root", pin_root])
    assert (r.returncode, r.stdout) == (1, ""), r.stderr
    assert_one_error_line(r.stderr)
    assert r.stderr == f"xdpflow: Permission denied: {bpf_dir}/xdpflow.h; {ROOT_HINT}\n"


def test_pin_root_created_by_another_user_is_not_trusted(lab: Lab, cli: Cli, pin_root: str) -> None:
    subprocess.run([*SETPRIV, "mkdir", "-m", "0777", pin_root], check=True)
    assert os.stat(pin_root).st_uid == NOBODY
    r = cli.run("attach", lab.dut_if)
    if r.returncode == 0:
        mode, uid, _ = _modes(pin_root)["."]
        assert (mode, uid) == (0o700, 0), f"attached into a pin root of uid {uid}, mode {oct(mode)}"
    else:
        assert r.returncode == 1
        assert_one_error_line(r.stderr)
        assert xdp_prog(lab.dut_ns, lab.dut_if) is None


def test_status_survives_an_incomplete_interface_directory(lab: Lab, cli: Cli, pin_root: str) -> None:
    cli("attach", lab.dut_if)
    os.mkdir(os.path.join(pin_root, "if_ghost0"), 0o700)
    r = cli.run("status", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["ifname"]: row for row in json.loads(r.stdout)}
    assert rows[lab.dut_if]["attached"] is True


def _serve_with_defaults(pin_root: str) -> tuple[tuple[str, int], int, str]:
    with metrics.serve(parse_hostport(DEFAULT_LISTEN), PinRoot(pin_root)) as server:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(server.url, timeout=10) as resp:
            status = resp.status
        with socket.socket() as s:
            s.settimeout(5)
            try:
                s.connect((DUT_V4, server.port))
                other = "connected"
            except ConnectionRefusedError:
                other = "refused"
        return server.address, status, other


def test_metrics_listen_on_loopback_by_default(lab: Lab, pin_root: str) -> None:
    # in the lab's own namespace port 9437 is always free: no clash with
    # another exporter on this host, no skip
    address, status, other = run_in_netns(lab.dut_ns, _serve_with_defaults, pin_root)
    assert address == ("127.0.0.1", 9437)
    assert status == 200
    assert other == "refused"  # the namespace's own address does not reach it
    assert DEFAULT_LISTEN == config.Config().listen == "127.0.0.1:9437"


def test_blocklist_input_is_never_executed(cli: Cli, lab: Lab, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cli("attach", lab.dut_if)
    cli("block", "add", "203.0.113.0/24")
    before = cli.blocklist()
    lines = hostile_lines(marker)
    path = tmp_path / "blocklist.txt"
    path.write_text("198.18.0.0/24\n" + "\n".join(lines) + "\n")

    syncs = together((cli, ("block", "sync", str(path))), (cli, ("block", "sync", "-"), path.read_text()))
    for source, r in zip((str(path), "-"), syncs, strict=True):
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        errs = r.stderr.splitlines()
        label = "<stdin>" if source == "-" else source
        assert len(errs) == len(lines) + 1 and errs[-1] == "xdpflow: the blocklist was not changed", r.stderr
        for n, (err, line) in enumerate(zip(errs, lines, strict=False), 2):
            assert err.startswith(f"xdpflow: {label}:{n}: ") and err.endswith(repr(line)), err
    for line, r in zip(lines, cli.run_all(*[("block", "add", line) for line in lines]), strict=True):
        assert (r.returncode, r.stdout) == (2, ""), (line, r.stderr)
        assert_one_error_line(r.stderr)
    assert cli.blocklist() == before
    assert not marker.exists()


def test_the_daemon_takes_config_values_as_names(lab: Lab, pin_root: str, tmp_path: Path) -> None:
    """The config parser keeps hostile values verbatim (unit/test_config.py);
    the daemon then takes them as names: no such interface, nothing run."""
    marker = tmp_path / "pwned"
    hostile = hostile_lines(marker)[0]
    verbatim = tmp_path / "verbatim.toml"
    verbatim.write_text(hostile_config(hostile))
    r = subprocess.run(
        [XDPFLOW, "run", "--config", str(verbatim), "--netns", lab.dut_ns, "--pin-root", pin_root],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith(f"xdpflow: no interface named {hostile!r}"), r.stderr
    assert not os.path.exists(pin_root)
    assert not marker.exists()


# --- 7. no such interface, no such namespace ----------------------------------------


def test_unknown_interface_and_namespace(lab: Lab, cli: Cli, pin_root: str, tmp_path: Path) -> None:
    assert cli.fails(1, "attach", "nosuch0") == (
        "xdpflow: no interface named 'nosuch0' in this network namespace; `ip link` lists them\n"
    )
    missing = f"{LAB_PREFIX}-nosuch-{uuid.uuid4().hex[:6]}"
    assert Cli(missing, pin_root).fails(1, "attach", lab.dut_if) == (
        f"xdpflow: no network namespace named {missing!r}; `ip netns list` lists them\n"
    )
    not_a_netns = tmp_path / "not-a-netns"
    not_a_netns.touch()
    err = Cli(str(not_a_netns), pin_root).fails(1, "attach", lab.dut_if)
    assert str(not_a_netns) in err
    assert not os.path.exists(pin_root)
    assert xdp_prog(lab.dut_ns, lab.dut_if) is None


def test_detach_with_a_malformed_interface_name(lab: Lab, cli: Cli, pin_root: str) -> None:
    cli("attach", lab.dut_if)
    r = cli.run("detach", lab.dut_if + "/")
    assert_no_orphan(r, pin_root, lab.dut_ns, lab.dut_if)
    assert r.returncode == 2, "not an interface name: bad input"
