"""The `xdpflow` command: what an operator types.

Every command is a short-lived process; the state is in pinned maps. Errors
print one line on stderr (``xdpflow: ...``) and exit non-zero: 1 for a failed
operation, 2 for bad input. ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import re
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import abi, controller, netlink
from .blocklist_file import BlocklistFileError, Rule, parse_cidr, read_file_keys
from .controller import AttachOptions
from .errors import InputError, NotAttachedError, XdpflowError
from .libbpf import Map, RingBuffer, ffi
from .pins import PinRoot, default_root

if TYPE_CHECKING:
    from .blocklist import Blocklist

# numpy-backed modules (flows, blocklist) are imported by the commands that
# use them: `stats` must start fast.
SORT_KEYS = ("packets", "bytes", "last-seen")

EXIT_FAIL = 1
EXIT_USAGE = 2


class PinnedMaps:
    """Opens shared maps on demand and closes them together."""

    def __init__(self, pin_root: str) -> None:
        self.pin_root = pin_root
        self._maps: dict[str, Map] = {}

    def __call__(self, name: str) -> Map:
        if name not in self._maps:
            self._maps[name] = controller.open_shared_map(name, self.pin_root)
        return self._maps[name]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()


@contextlib.contextmanager
def blocklist_of(pin_root: str) -> Iterator[Blocklist]:
    from .blocklist import Blocklist

    maps = PinnedMaps(pin_root)
    try:
        yield Blocklist(maps)
    finally:
        maps.close()


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=None if not sys.stdout.isatty() else 2)
    sys.stdout.write("\n")


_NUMBER = re.compile(r"^-?\d+(\.\d+)?[kMGTP]?$")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.rjust(w) if _NUMBER.match(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def _ifaces(args: argparse.Namespace) -> list[str]:
    pins = PinRoot(args.pin_root)
    names = pins.interfaces()
    wanted = getattr(args, "iface", None)
    if wanted:
        if wanted not in names:
            raise XdpflowError(errno.ENOENT, f"xdpflow is not attached to {wanted} (pin root {pins.root})")
        return [wanted]
    if not names:
        raise XdpflowError(errno.ENOENT, f"nothing is attached under {pins.root}; run `xdpflow attach IFACE` first")
    return names


# --- commands ----------------------------------------------------------------


def cmd_attach(args: argparse.Namespace) -> int:
    opts = AttachOptions(
        mode=args.mode,
        flows=args.flows,
        sink=args.sink,
        monitor=True if args.monitor else None,
        force=args.force,
        shared_flows=not args.percpu_flows,
    )
    results = []
    for ifname in args.ifaces:
        r = controller.attach(ifname, opts, args.pin_root)
        results.append(r)
        if not args.json:
            verb = "upgraded" if r.replaced else "attached"
            print(f"{verb} xdpflow on {ifname}: program id {r.prog_id}, {r.mode} mode")
    if args.json:
        emit_json([{"ifname": r.ifname, "prog_id": r.prog_id, "mode": r.mode, "replaced": r.replaced} for r in results])
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    for ifname in args.ifaces:
        r = controller.detach(ifname, args.pin_root)
        if args.json:
            continue
        if r.found_as is None:
            print(f"{ifname} runs no xdpflow program any more (gone?); removed its pins")
        elif r.found_as != ifname or r.netns:
            where = f" in namespace {r.netns}" if r.netns else ""
            print(f"detached xdpflow from {ifname} (now {r.found_as}{where})")
        else:
            print(f"detached xdpflow from {ifname}")
    return 0


def status_rows(pin_root: str) -> list[dict[str, Any]]:
    from .flows import count_flows

    pins = PinRoot(pin_root)
    rows = []
    monitor = False
    nrules, total = 0, 0
    if pins.interfaces():
        monitor = bool(controller.get_config(pin_root) & abi.C.XF_CFG_MONITOR)
        with blocklist_of(pin_root) as bl:
            nrules = len(bl)
            _per_trie, total = bl.capacity()
    for ifname in pins.interfaces():
        st = controller.iface_status(ifname, pin_root)
        try:
            flows, flows_max = count_flows(ifname, pin_root)
        except NotAttachedError:  # an attach that died half-way: show it, as not attached
            flows, flows_max = 0, 0
        rows.append(
            {
                "ifname": ifname,
                "mode": st.mode,
                "prog_id": st.prog_id,
                "attached": st.attached,
                "attached_at": st.attached_at,
                "sink": st.sink,
                "flows": flows,
                "flows_max": flows_max,
                "blocklist": nrules,
                "blocklist_max": total,
                "monitor": monitor,
            }
        )
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    rows = status_rows(args.pin_root)
    if args.json:
        emit_json(rows)
        return 0
    if not rows:
        print(f"nothing attached under {PinRoot(args.pin_root).root}")
        return 0
    out = []
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["attached_at"])) if r["attached_at"] else "-"
        state = (r["mode"] or "?") if r["attached"] else "NOT ATTACHED (interface gone or program replaced)"
        if r["sink"]:
            state += " sink"
        out.append([r["ifname"], state, r["prog_id"], when, f"{r['flows']}/{r['flows_max']}"])
    print(table(out, ["interface", "mode", "prog", "attached", "flows"]))
    first = rows[0]
    monitor = "on" if first["monitor"] else "off"
    print(f"blocklist: {first['blocklist']}/{first['blocklist_max']} rules, monitor mode {monitor}")
    return 0


def read_stats(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    out = {}
    for ifname in _ifaces(args):
        try:
            out[ifname] = controller.read_counters(ifname, args.pin_root)
        except NotAttachedError:
            if args.iface:
                raise
            # an attach that died half-way left a directory without counters
    return out


STATS_ORDER = [n for n in abi.COUNTER_NAMES.values()]


def cmd_stats(args: argparse.Namespace) -> int:
    if args.watch is None:
        stats = read_stats(args)
        if args.json:
            emit_json(stats)
            return 0
        for ifname, c in stats.items():
            print(f"{ifname}:")
            print(table([[n, c[n], c[f"{n}_bytes"]] for n in STATS_ORDER], ["counter", "packets", "bytes"]))
        return 0
    return watch_stats(args)


def watch_stats(args: argparse.Namespace) -> int:
    prev = read_stats(args)
    t_prev = time.monotonic()
    try:
        while True:
            time.sleep(args.watch)
            now = read_stats(args)
            t_now = time.monotonic()
            dt = max(t_now - t_prev, 1e-9)
            if args.json:
                out = {
                    ifname: {
                        n: {
                            "packets": c[n],
                            "bytes": c[f"{n}_bytes"],
                            "pps": (c[n] - prev[ifname].get(n, 0)) / dt,
                            "bps": 8 * (c[f"{n}_bytes"] - prev[ifname].get(f"{n}_bytes", 0)) / dt,
                        }
                        for n in STATS_ORDER
                    }
                    for ifname, c in now.items()
                }
                emit_json(out)
                sys.stdout.flush()
            else:
                if sys.stdout.isatty():
                    sys.stdout.write("\033[H\033[2J")
                print(time.strftime("%H:%M:%S"), f"every {args.watch:g}s, Ctrl-C to stop")
                for ifname, c in now.items():
                    p = prev.get(ifname, {})
                    rows = [
                        [
                            n,
                            c[n],
                            c[f"{n}_bytes"],
                            human((c[n] - p.get(n, 0)) / dt),
                            human(8 * (c[f"{n}_bytes"] - p.get(f"{n}_bytes", 0)) / dt),
                        ]
                        for n in STATS_ORDER
                    ]
                    print(f"{ifname}:")
                    print(table(rows, ["counter", "packets", "bytes", "pps", "bit/s"]))
                sys.stdout.flush()
            prev, t_prev = now, t_now
    except KeyboardInterrupt:
        return 0


def cmd_flows(args: argparse.Namespace) -> int:
    from .flows import tcp_flags_str, top_flows

    cidr = None
    if args.filter:
        try:
            cidr = parse_cidr(args.filter)
        except ValueError as e:
            raise BadInput(f"--filter: {e}") from None
    flows = []
    for ifname in _ifaces(args):
        try:
            flows.extend(top_flows(ifname, args.pin_root, top=args.top, sort=args.sort, cidr=cidr))
        except NotAttachedError:
            if args.iface:
                raise
    key = {"packets": lambda f: f.packets, "bytes": lambda f: f.bytes, "last-seen": lambda f: f.last_seen}[args.sort]
    flows.sort(key=key, reverse=True)
    if args.top is not None:
        flows = flows[: args.top]
    if args.json:
        emit_json([f.to_json() for f in flows])
        return 0
    now = time.time()
    rows = []
    for f in flows:
        src = f"{f.src}:{f.sport}" if f.family == 4 else f"[{f.src}]:{f.sport}"
        dst = f"{f.dst}:{f.dport}" if f.family == 4 else f"[{f.dst}]:{f.dport}"
        rows.append(
            [
                f.ifname,
                _proto_name(f.proto),
                src,
                dst,
                f.packets,
                f.bytes,
                tcp_flags_str(f.tcp_flags) or "-",
                f"{max(now - f.last_seen, 0):.1f}s",
            ]
        )
    print(table(rows, ["iface", "proto", "source", "destination", "packets", "bytes", "flags", "idle"]))
    return 0


def _proto_name(p: int) -> str:
    return {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}.get(p, str(p))


class BadInput(ValueError):
    """Input the operator must correct; nothing was changed."""


def _parse_cidrs(texts: list[str], direction: str) -> list[Rule]:
    rules, errors = [], []
    for t in texts:
        try:
            rules.append(Rule(parse_cidr(t), direction))
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise BadInput("; ".join(errors) + "; nothing was changed")
    return rules


def cmd_block(args: argparse.Namespace) -> int:
    pins = PinRoot(args.pin_root)
    direction = "dst" if getattr(args, "dst", False) else "src"
    if args.block_cmd == "list":
        from .blocklist import key_cidr

        with blocklist_of(pins.root) as bl:
            listing = bl.listing_keys()
        rows = [(key_cidr(k), "dst" if k & 1 else "src", h) for k, h in listing]
        if args.json:
            emit_json([{"cidr": c, "direction": d, "hits": h} for c, d, h in rows])
        else:
            print(table(rows, ["cidr", "direction", "hits"]))
        return 0

    if args.block_cmd in ("add", "del"):
        rules = _parse_cidrs(args.cidrs, direction)
    elif args.block_cmd == "sync":
        try:
            keys = read_file_keys(args.file, direction)
        except BlocklistFileError as e:
            errs = getattr(e, "errors", None) or [e]
            for err in errs[:20]:
                print(f"xdpflow: {err}", file=sys.stderr)
            if len(errs) > 20:
                print(f"xdpflow: ... and {len(errs) - 20} more bad lines", file=sys.stderr)
            print("xdpflow: the blocklist was not changed", file=sys.stderr)
            return EXIT_USAGE

    with pins.lock(), blocklist_of(pins.root) as bl:
        if args.block_cmd == "add":
            ch = bl.add(rules)
        elif args.block_cmd == "del":
            missing = bl.missing(rules)
            if missing:
                raise BadInput(
                    "not in the blocklist: "
                    + ", ".join(f"{r.net} ({r.direction})" for r in missing)
                    + "; nothing was changed"
                )
            ch = bl.delete(rules)
        elif args.block_cmd == "flush":
            ch = bl.flush()
        else:
            # a file names one direction's rules; the other direction's stay
            ch = bl.sync_keys(keys, dry_run=args.dry_run, direction=direction)
    if args.json:
        emit_json({"added": ch.added_cidrs(), "deleted": ch.deleted_cidrs()})
    else:
        what = "would add" if getattr(args, "dry_run", False) else "added"
        gone = "would delete" if getattr(args, "dry_run", False) else "deleted"
        print(f"{what} {len(ch.added_keys)}, {gone} {len(ch.deleted_keys)} rules")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    controller.set_monitor(args.state == "on", args.pin_root)
    if not args.json:
        print(f"monitor mode {args.state}")
    return 0


EVENT_TYPES = {
    abi.C.XF_EV_NEW_FLOW: "new_flow",
    abi.C.XF_EV_BLOCKED: "blocked",
    abi.C.XF_EV_MONITORED: "monitored",
}


class RuleNames:
    """Rule index -> CIDR per blocklist generation. An event carries the
    generation it was made in; indices freed by a change may name another
    rule after it. During a change both the old rules and the new ones (with
    indices no old rule had) are live, so generation g's index may also be
    one of g + 1's."""

    def __init__(self, pin_root: str) -> None:
        self.pin_root = pin_root
        self.by_gen: dict[int, dict[int, Rule]] = {}
        self.refresh()

    def refresh(self) -> None:
        with blocklist_of(self.pin_root) as bl:
            # read the generation around the rules: equal twice means no change in between
            for _ in range(5):
                g = bl.generation()
                rules = bl.rule_indices()
                if bl.generation() == g:
                    self.by_gen[g] = rules
                    return

    def name(self, generation: int, index: int) -> Rule | None:
        for g in (generation, generation + 1):
            if g not in self.by_gen:
                self.refresh()
            r = self.by_gen.get(g, {}).get(index)
            if r is not None:
                return r
        return None


def decode_event(data: bytes, rules: RuleNames, clock: Any) -> dict[str, Any]:
    e = ffi.cast("struct xf_event *", ffi.from_buffer(data))
    fam = int(e.family)
    alen = 4 if fam == 4 else 16
    raw_s = bytes(ffi.buffer(e.saddr, alen))
    raw_d = bytes(ffi.buffer(e.daddr, alen))
    try:
        ifname = socket.if_indextoname(e.ifindex)
    except OSError:
        ifname = str(e.ifindex)
    out: dict[str, Any] = {
        "type": EVENT_TYPES.get(int(e.type), str(int(e.type))),
        "time": clock.to_wall(int(e.ts)),
        "ifname": ifname,
        "src": str(ipaddress.ip_address(raw_s)),
        "dst": str(ipaddress.ip_address(raw_d)),
        "sport": socket.ntohs(e.sport),
        "dport": socket.ntohs(e.dport),
        "proto": int(e.proto),
        "len": int(e.len),
    }
    if int(e.type) != abi.C.XF_EV_NEW_FLOW:
        r = rules.name(int(e.generation), int(e.rule))
        out["rule"] = str(r.net) if r else None
    return out


def cmd_events(args: argparse.Namespace) -> int:
    pins = PinRoot(args.pin_root)
    rules = RuleNames(pins.root)
    clock = controller.open_clock(pins.root)
    m = controller.open_events_fd(pins.root)
    count = [0]

    # The ring keeps what no reader took yet: stream what happens from now on.
    # (A ring buffer has one consumer position: run one `events` at a time.)
    stale = RingBuffer(m, lambda data: None)
    stale.consume()
    stale.close()

    def on_event(data: bytes) -> None:
        ev = decode_event(data, rules, clock)
        if args.json:
            print(json.dumps(ev), flush=True)
        else:
            t = time.strftime("%H:%M:%S", time.localtime(ev["time"]))
            extra = f" rule {ev['rule']}" if "rule" in ev else ""
            print(
                f"{t} {ev['ifname']} {ev['type']} {_proto_name(ev['proto'])} "
                f"{ev['src']}:{ev['sport']} -> {ev['dst']}:{ev['dport']} len {ev['len']}{extra}",
                flush=True,
            )
        count[0] += 1

    rb = RingBuffer(m, on_event)
    deadline = time.monotonic() + args.duration if args.duration else None
    try:
        while deadline is None or time.monotonic() < deadline:
            rb.poll(200)
            if args.count and count[0] >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        rb.close()
        os.close(m)
    return 0


# --- argument parsing --------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument(
        "--pin-root",
        default=argparse.SUPPRESS,
        help="bpffs directory of this instance's state (default $XDPFLOW_PIN_ROOT or /sys/fs/bpf/xdpflow)",
    )
    common.add_argument("--netns", default=argparse.SUPPRESS, help="act inside this named network namespace")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="tracebacks on errors")

    p = argparse.ArgumentParser(
        prog="xdpflow",
        description="XDP packet counting, flow tracking and blocking.",
        parents=[common],
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    a = sub.add_parser("attach", parents=[common], help="load, pin and attach to interfaces")
    a.add_argument("ifaces", nargs="+", metavar="IFACE")
    a.add_argument("--mode", choices=["auto", "native", "skb", "hw"], default="auto")
    a.add_argument(
        "--flows",
        type=_positive,
        default=None,
        help=f"flow-table entries per family (default {abi.C.XF_FLOWS_DEFAULT})",
    )
    a.add_argument("--monitor", action="store_true", help="switch monitor mode on")
    a.add_argument(
        "--sink",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop every frame after accounting it (SPAN ports); an upgrade keeps the current setting",
    )
    a.add_argument("--force", action="store_true", help="replace a foreign XDP program")
    a.add_argument(
        "--percpu-flows",
        action="store_true",
        help="per-CPU flow tables (no atomics; memory grows with CPUs) instead of shared ones",
    )
    a.set_defaults(func=cmd_attach)

    d = sub.add_parser("detach", parents=[common], help="detach and remove an interface's pins")
    d.add_argument("ifaces", nargs="+", metavar="IFACE")
    d.set_defaults(func=cmd_detach)

    s = sub.add_parser("status", parents=[common], help="interfaces, programs, table occupancy")
    s.set_defaults(func=cmd_status)

    st = sub.add_parser("stats", parents=[common], help="interface counters")
    st.add_argument("iface", nargs="?", metavar="IFACE")
    st.add_argument("--watch", nargs="?", type=_positive_float, const=1.0, default=None, metavar="SECONDS")
    st.set_defaults(func=cmd_stats)

    f = sub.add_parser("flows", parents=[common], help="the flow table")
    f.add_argument("iface", nargs="?", metavar="IFACE")
    f.add_argument("--top", type=_positive, default=None, metavar="N")
    f.add_argument("--sort", choices=SORT_KEYS, default="packets")
    f.add_argument("--filter", metavar="CIDR", help="only flows with source or destination inside CIDR")
    f.set_defaults(func=cmd_flows)

    b = sub.add_parser("block", parents=[common], help="manage the blocklist")
    bsub = b.add_subparsers(dest="block_cmd", required=True, metavar="ACTION")
    for name, helptext in (("add", "add rules"), ("del", "delete rules")):
        x = bsub.add_parser(name, parents=[common], help=helptext)
        x.add_argument("cidrs", nargs="+", metavar="CIDR")
        x.add_argument("--dst", action="store_true", help="match the destination address, not the source")
    bsub.add_parser("list", parents=[common], help="rules and their hits")
    bsub.add_parser("flush", parents=[common], help="delete every rule")
    y = bsub.add_parser("sync", parents=[common], help="make the blocklist equal to FILE (- for stdin)")
    y.add_argument("file", metavar="FILE")
    y.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    y.add_argument("--dst", action="store_true", help="the file lists destination rules")
    b.set_defaults(func=cmd_block)

    m = sub.add_parser("monitor", parents=[common], help="count would-be drops but pass them")
    m.add_argument("state", choices=["on", "off"])
    m.set_defaults(func=cmd_monitor)

    e = sub.add_parser("events", parents=[common], help="stream new-flow and blocklist events")
    e.add_argument("--count", type=_positive, default=None, help="stop after N events")
    e.add_argument("--duration", type=_positive_float, default=None, help="stop after SECONDS")
    e.set_defaults(func=cmd_events)

    r = sub.add_parser("run", parents=[common], help="the daemon: attach, export IPFIX, serve metrics, sync feeds")
    from .daemon import add_arguments

    add_arguments(r)
    r.set_defaults(func=cmd_run)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import main as run_daemon

    return run_daemon(args)


def _positive_of(kind: type, what: str) -> Any:
    """An argparse type: a positive ``kind`` (int or float)."""

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return v

    return parse


_positive = _positive_of(int, "a whole number")
_positive_float = _positive_of(float, "a number")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    args.debug = getattr(args, "debug", False) or bool(os.environ.get("XDPFLOW_DEBUG"))
    args.pin_root_given = getattr(args, "pin_root", None)
    args.pin_root = PinRoot(args.pin_root_given or default_root()).root
    args.netns = getattr(args, "netns", None)
    # a closed pipe (xdpflow ... | head) is not an error worth a traceback
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        if args.func is cmd_run:  # the daemon enters its (configured) namespace itself
            return int(args.func(args))
        with netlink.in_netns(args.netns):
            return int(args.func(args))
    except BadInput as e:
        print(f"xdpflow: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if args.debug:
            traceback.print_exc()
        if isinstance(e, XdpflowError):
            msg = str(e)
        else:
            msg = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
            if e.errno in (errno.EACCES, errno.EPERM):
                msg += "; run as root (needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        print(f"xdpflow: {msg}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, InputError) else EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
