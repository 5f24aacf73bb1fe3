"""Where state lives in bpffs, and the lock that serialises writers.

Layout under one pin root (default /sys/fs/bpf/xdpflow):

    <root>/config, bl4_src, ..., rule_hits, events   shared by every interface
    <root>/if_<name>/prog, counters, flows_v4, ...   one directory per interface

bpffs refuses names containing '.', so interface names are escaped
('.' -> '%2e', '%' -> '%25'): eth0.100 becomes if_eth0%2e100.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator

from xdpflow.errors import InputError, NotAttachedError, XdpflowError, os_error

DEFAULT_ROOT = "/sys/fs/bpf/xdpflow"
BPF_FS_MAGIC = 0xCAFE4A11

# The maps whose layout one rule-set encoding spans: an object that changes
# any of them gets fresh copies of all (the running program keeps reading
# its own), written from the rule store before it runs (dataplane/rules.py).
RULE_SET_MAPS = (
    "rl_head",
    "rl_pool",
    "rl_sport",
    "rl_dport",
    "rl_proto",
    "rl_len",
    "rl_l1",
    "rl_c24",
    "rl_c32",
    "rl_act",
    "rule_defs",
    "rl_addr",
    "rl_iface",
)
SHARED_MAPS = (
    "config",
    "bl_count",
    "bl4_src",
    "bl4_dst",
    "bl6_src",
    "bl6_dst",
    "bl4_l1_src",
    "bl4_l2c_src",
    "bl4_l2_src",
    "bl4_l3_src",
    "bl4_l2h_src",
    "bl4_l3c_src",
    "bl4_l1_dst",
    "bl4_l2c_dst",
    "bl4_l2_dst",
    "bl4_l3_dst",
    "bl4_l2h_dst",
    "bl4_l3c_dst",
    "bl6_l0_src",
    "bl6_tab_src",
    "bl6_deep_src",
    "bl6_pf_src",
    "bl6_l1_src",
    "bl6_l0_dst",
    "bl6_tab_dst",
    "bl6_deep_dst",
    "bl6_pf_dst",
    "bl6_l1_dst",
    "rule_hits",
    "events",
    "event_budget",
    *RULE_SET_MAPS,
    "rule_counters",
    "rl_gcra",
    "prot_l1",
    "prot_head",
    "prot_pf",
    "prot_addr",
    "prot_hosts",
    "prot_overflow",
)
SHARED_PROGS = ("clock",)
# shared maps of earlier objects, unpinned when found: an upgrade leaves them
# behind (rl_rate: the rate-limit state as a hash, before rl_gcra)
RETIRED_MAPS = ("rl_rate",)
IFACE_MAPS = ("counters", "flows_v4", "flows_v6", "next_prog", "admission")
IFACE_PREFIX = "if_"


def default_root() -> str:
    return os.environ.get("XDPFLOW_PIN_ROOT") or DEFAULT_ROOT


def check_ifname(ifname: str) -> str:
    """``ifname`` if it can be a Linux interface name. Raises XdpflowError(EINVAL)."""
    if not ifname or len(ifname.encode()) > 15 or any(c in ifname for c in "/: \t\n") or ifname in (".", ".."):
        raise InputError(f"{ifname!r} cannot be an interface name (1-15 bytes, no '/', ':' or spaces)")
    return ifname


def escape_ifname(ifname: str) -> str:
    return IFACE_PREFIX + check_ifname(ifname).replace("%", "%25").replace(".", "%2e")


def unescape_ifname(dirname: str) -> str:
    return dirname[len(IFACE_PREFIX) :].replace("%2e", ".").replace("%25", "%")


def _is_bpffs(path: str) -> bool:
    # statvfs has no f_type; /proc/self/mounts names the filesystem
    path = os.path.realpath(path)
    best, fstype = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    return fstype == "bpf"


def ensure_bpffs(root: str, mount: bool = True) -> None:
    """Make sure ``root``'s parent is on bpffs, mounting /sys/fs/bpf if needed.

    Raises XdpflowError(ENOTSUP) when the path is not on bpffs and cannot be.
    """
    parent = os.path.dirname(os.path.abspath(root)) or "/"
    probe = parent
    while not os.path.isdir(probe):  # the nearest directory that exists
        probe = os.path.dirname(probe)
    if _is_bpffs(probe):
        return
    below_default = (parent + "/").startswith("/sys/fs/bpf/")
    if mount and below_default and os.path.realpath(probe) in ("/sys/fs/bpf", "/sys/fs", "/sys"):
        import subprocess  # only here: every command reads pins, few mount bpffs

        r = subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], capture_output=True, text=True)
        if r.returncode == 0 and _is_bpffs(probe):
            return
    raise XdpflowError(
        errno.ENOTSUP,
        f"{parent} is not on a BPF filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` "
        "or choose a --pin-root below a bpffs mount",
    )


class PinRoot:
    """Paths of one xdpflow instance's pins. Commands and the daemon make one
    from ``--pin-root`` and hand it down; nothing below re-reads the option."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_root())

    def __repr__(self) -> str:
        return f"PinRoot({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PinRoot) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def not_attached(self, ifname: str | None = None) -> NotAttachedError:
        """The error for state that is not here: the one sentence, with what to do."""
        if ifname is None:
            return NotAttachedError(
                errno.ENOENT, f"nothing is attached under {self.root}; run `xdpflow attach IFACE` first"
            )
        return NotAttachedError(errno.ENOENT, f"xdpflow is not attached to {ifname} (pin root {self.root})")

    def shared(self, name: str) -> str:
        return os.path.join(self.root, name)

    def iface_dir(self, ifname: str) -> str:
        return os.path.join(self.root, escape_ifname(ifname))

    def iface(self, ifname: str, name: str) -> str:
        return os.path.join(self.iface_dir(ifname), name)

    def exists(self) -> bool:
        return os.path.isdir(self.root)

    def interfaces(self) -> list[str]:
        """Names of interfaces that have state under this root, sorted.
        Raises XdpflowError (EACCES: not root)."""
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise os_error(e.errno or errno.EIO, f"reading pin root {self.root}") from None
        return sorted(unescape_ifname(e) for e in entries if e.startswith(IFACE_PREFIX))

    def has_iface(self, ifname: str) -> bool:
        """Whether ``ifname`` has a directory here. Raises InputError for a
        name no interface can have, XdpflowError (EACCES)."""
        path = self.iface_dir(ifname)
        try:
            return stat.S_ISDIR(os.stat(path).st_mode)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise os_error(e.errno or errno.EIO, f"reading pin root {self.root}") from None

    def make_dirs(self, ifname: str) -> None:
        """Create the root and the interface directory, owner-only (0700).
        A root that exists must be a directory of ours that nobody else may
        write (bpffs's own top is world-writable and sticky, so anyone could
        have made it first). Raises XdpflowError."""
        for d in (self.root, self.iface_dir(ifname)):
            try:
                os.mkdir(d, 0o700)
                os.chmod(d, 0o700)  # whatever the umask
            except FileExistsError:
                self._check_owned(d)
            except OSError as e:
                raise os_error(e.errno or errno.EIO, f"creating pin directory {d}") from None

    @staticmethod
    def _check_owned(d: str) -> None:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise XdpflowError(
                errno.EPERM,
                f"{d} exists but is not a directory owned by uid {os.geteuid()} that only it may write "
                f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): someone else may have made it; "
                "remove it and attach again",
            )

    def remove_iface(self, ifname: str) -> None:
        """Unpin everything of one interface and remove its directory."""
        d = self.iface_dir(ifname)
        _remove_tree(d)

    def remove_shared(self) -> None:
        """Unpin the shared maps and remove the root if nothing else is in it."""
        for name in SHARED_MAPS + SHARED_PROGS + RETIRED_MAPS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.shared(name))
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(self.root)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock over this pin root's writers (flock on the directory).

        bpffs holds no regular files, so the directory itself is the lock.
        """
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise self.not_attached() from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _remove_tree(d: str) -> None:
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for n in names:
        p = os.path.join(d, n)
        if os.path.isdir(p) and not os.path.islink(p):
            _remove_tree(p)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(d)
