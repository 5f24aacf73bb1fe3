"""The `xdpflow` command's subcommands: what an operator types.

Argument parsing and output only (the entry point around it is cli.py): every command calls the data plane (or
the daemon) and prints what it got. Each is a short-lived process; the
state is in pinned maps. Errors print one line on stderr (``xdpflow: ...``)
and exit non-zero: 1 for a failed operation, 2 for input to correct.
``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from xdpflow.app.output import clear_screen, emit_json, human, proto_name, table, time_left
from xdpflow.bindings.netns import in_netns
from xdpflow.dataplane import abi, maps
from xdpflow.dataplane.abi import FLOW_BUDGET_DEFAULT, FLOWS_DEFAULT
from xdpflow.dataplane.pins import PinRoot, default_root
from xdpflow.errors import InputError, NotAttachedError, one_line

if TYPE_CHECKING:
    from xdpflow.dataplane.top import TopRow
    from xdpflow.rules.blockfile import BlocklistFileError, Rule
    from xdpflow.rules.rulespec import RuleSpec

# numpy-backed modules (flows, blocklist, events), the loader (lifecycle), the
# blocklist file parser and the daemon's configuration are imported by the
# commands that use them: `stats` must start fast.
SORT_KEYS = ("packets", "bytes", "last-seen")  # flows.SORT_KEYS, without importing numpy

EXIT_FAIL = 1
EXIT_USAGE = 2

STATS_ORDER = list(maps.STAT_NAMES)


def _ifaces(args: argparse.Namespace) -> list[str]:
    """The interface named on the command line, or every attached one."""
    pins: PinRoot = args.pins
    names = pins.interfaces()
    wanted = getattr(args, "iface", None)
    if wanted:
        if wanted not in names:
            raise pins.not_attached(wanted)
        return [wanted]
    if not names:
        raise pins.not_attached()
    return names


# --- commands ----------------------------------------------------------------


def cmd_attach(args: argparse.Namespace) -> int:
    from xdpflow.dataplane import lifecycle

    opts = lifecycle.AttachOptions(
        mode=args.mode,
        flows=args.flows,
        sink=args.sink,
        monitor=True if args.monitor else None,
        force=args.force,
        shared_flows=not args.percpu_flows,
        flow_budget=args.flow_budget,
        then=args.then,
        # `attach IFACE --then PROG` alone on an attached interface: one map update, no reload
        then_only=args.then is not None
        and (args.mode, args.flows, args.sink, args.monitor, args.force, args.percpu_flows, args.flow_budget)
        == ("auto", None, None, False, False, False, None),
    )
    results = []
    for ifname in args.ifaces:
        r = lifecycle.attach(ifname, opts, args.pins)
        results.append(r)
        if not args.json and r.then_only:
            nxt = f"go to program {r.then.prog_id} ({r.then.name})" if r.then else "pass (no next program)"
            print(f"xdpflow on {ifname}: frames it passes {nxt} now")
        elif not args.json:
            verb = "upgraded" if r.replaced else "attached"
            how = "bpf_link" if r.attach == "link" else "netlink (the kernel refused a bpf_link)"
            line = f"{verb} xdpflow on {ifname}: program id {r.prog_id}, {r.mode} mode, through {how}"
            if r.gap_ns is not None:
                line += f"; moved from netlink, {r.gap_ns / 1000:.0f} us without a program"
            if r.then is not None:
                line += f"; then program {r.then.prog_id} ({r.then.name})"
            print(line)
    if args.json:
        emit_json(
            [
                {"ifname": r.ifname, "prog_id": r.prog_id, "mode": r.mode, "replaced": r.replaced, "attach": r.attach}
                for r in results
            ]
        )
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    from xdpflow.dataplane import lifecycle

    for ifname in args.ifaces:
        r = lifecycle.detach(ifname, args.pins)
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


def cmd_status(args: argparse.Namespace) -> int:
    from xdpflow.dataplane.status import status_rows

    rows = status_rows(args.pins)
    if args.json:
        emit_json(rows)
        return 0
    if not rows:
        print(f"nothing attached under {args.pins.root}")
        return 0
    out = []
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["attached_at"])) if r["attached_at"] else "-"
        state = (r["mode"] or "?") if r["attached"] else "NOT ATTACHED (interface gone or program replaced)"
        if r["sink"]:
            state += " sink"
        name = r["ifname"]
        if r["attached"] and (r["current_ifname"] != name or r["netns"]):
            name += f" (now {r['current_ifname']}" + (f" in namespace {r['netns']})" if r["netns"] else ")")
        then = f"{r['then']['prog_id']} {r['then']['name']}".strip() if r["then"] else "-"
        out.append([name, state, r["prog_id"], r["attach"] or "-", then, when, f"{r['flows']}/{r['flows_max']}"])
    print(table(out, ["interface", "mode", "prog", "via", "then", "attached", "flows"]))
    first = rows[0]
    monitor = "on" if first["monitor"] else "off"
    print(f"blocklist: {first['blocklist']}/{first['blocklist_max']} rules, monitor mode {monitor}")
    return 0


def read_stats(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    out = {}
    for ifname in _ifaces(args):
        try:
            out[ifname] = maps.read_counters(args.pins, ifname)
        except NotAttachedError:
            if args.iface:
                raise
            # an attach that died half-way left a directory without counters
    return out


def cmd_stats(args: argparse.Namespace) -> int:
    if args.watch is not None:
        return watch_stats(args)
    stats = read_stats(args)
    if args.json:
        emit_json(stats)
        return 0
    for ifname, c in stats.items():
        print(f"{ifname}:")
        print(table([[n, c[n], c[abi.bytes_key(n)]] for n in STATS_ORDER], ["counter", "packets", "bytes"]))
    return 0


def watch_stats(args: argparse.Namespace) -> int:
    prev = read_stats(args)
    t_prev = time.monotonic()
    try:
        while True:
            time.sleep(args.watch)
            now = read_stats(args)
            t_now = time.monotonic()
            dt = max(t_now - t_prev, 1e-9)

            def rate(ifname: str, key: str, c: dict[str, int], prev: dict = prev, dt: float = dt) -> float:
                return (c[key] - prev.get(ifname, {}).get(key, 0)) / dt

            if args.json:
                out = {
                    ifname: {
                        n: {
                            "packets": c[n],
                            "bytes": c[abi.bytes_key(n)],
                            "pps": rate(ifname, n, c),
                            "bps": 8 * rate(ifname, abi.bytes_key(n), c),
                        }
                        for n in STATS_ORDER
                    }
                    for ifname, c in now.items()
                }
                emit_json(out)
            else:
                clear_screen()
                print(time.strftime("%H:%M:%S"), f"every {args.watch:g}s, Ctrl-C to stop")
                for ifname, c in now.items():
                    rows = [
                        [
                            n,
                            c[n],
                            c[abi.bytes_key(n)],
                            human(rate(ifname, n, c)),
                            human(8 * rate(ifname, abi.bytes_key(n), c)),
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
    from xdpflow.dataplane.flows import tcp_flags_str, top_flows
    from xdpflow.rules.blockfile import parse_cidr

    cidr = None
    if args.filter:
        try:
            cidr = parse_cidr(args.filter)
        except ValueError as e:
            raise InputError(f"--filter: {e}") from None
    flows = []
    for ifname in _ifaces(args):
        try:
            flows.extend(top_flows(args.pins, ifname, top=args.top, sort=args.sort, cidr=cidr))
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
                proto_name(f.proto),
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


TOP_BY = ("src", "dst", "flow")  # dataplane.top.BY, without importing numpy
_TOP_WHAT = {"src": "sources", "dst": "destinations", "flow": "flows"}


def cmd_top(args: argparse.Namespace) -> int:
    from xdpflow.dataplane.top import read_snapshot, top

    ifnames = _ifaces(args)
    prev = read_snapshot(args.pins, ifnames)
    try:
        while True:
            # the interval runs from read to read, whatever the last one cost
            time.sleep(max(prev.at + args.interval - time.monotonic(), 0.0))
            now = read_snapshot(args.pins, ifnames)
            rows = top(prev, now, args.by, args.count)
            interval = now.at - prev.at
            if args.json:
                emit_json({"by": args.by, "interval": interval, "rows": [r.to_json() for r in rows]})
            else:
                clear_screen()
                print(
                    time.strftime("%H:%M:%S"),
                    f"top {args.count} {_TOP_WHAT[args.by]} over {interval:.1f}s, Ctrl-C to stop",
                )
                print(table([_top_row(r.key) + _top_rates(r) for r in rows], _top_header(args.by)))
            sys.stdout.flush()
            prev = now
    except KeyboardInterrupt:
        return 0


def _top_row(key: dict[str, Any]) -> list[Any]:
    if "sport" not in key:
        return [key.get("src", key.get("dst"))]
    src = f"{key['src']}:{key['sport']}" if ":" not in key["src"] else f"[{key['src']}]:{key['sport']}"
    dst = f"{key['dst']}:{key['dport']}" if ":" not in key["dst"] else f"[{key['dst']}]:{key['dport']}"
    return [key["ifname"], proto_name(key["proto"]), src, dst]


def _top_rates(r: TopRow) -> list[Any]:
    return [human(r.pps), human(r.bps), r.packets, r.bytes]


def _top_header(by: str) -> list[str]:
    first = {"src": ["source"], "dst": ["destination"], "flow": ["iface", "proto", "source", "destination"]}[by]
    return [*first, "pps", "bit/s", "packets", "bytes"]


def _parse_cidrs(texts: list[str], direction: str) -> list[Rule]:
    from xdpflow.rules.blockfile import Rule, parse_cidr

    rules, errors = [], []
    for t in texts:
        try:
            rules.append(Rule(parse_cidr(t), direction))
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise InputError("; ".join(errors) + "; nothing was changed")
    return rules


def _file_errors(e: BlocklistFileError, what: str) -> int:
    """Print every bad line of a refused file (the first 20) and say nothing changed."""
    errs = getattr(e, "errors", None) or [e]
    for err in errs[:20]:
        print(f"xdpflow: {err}", file=sys.stderr)
    if len(errs) > 20:
        print(f"xdpflow: ... and {len(errs) - 20} more bad lines", file=sys.stderr)
    print(f"xdpflow: {what} was not changed", file=sys.stderr)
    return EXIT_USAGE


def _block_entries(pins: PinRoot) -> list[tuple[RuleSpec, str, int]]:
    """The `block add --ttl` entries (none where the rule maps are not pinned)."""
    from xdpflow.dataplane.rules import RuleTables

    try:
        with RuleTables.of_pins(pins) as rt:
            return rt.block_entries()
    except NotAttachedError:
        return []


def cmd_block(args: argparse.Namespace) -> int:
    from xdpflow.dataplane.blocklist import blocklist_of, key_cidr
    from xdpflow.rules.blockfile import BlocklistFileError, read_file_keys

    pins: PinRoot = args.pins
    direction = "dst" if getattr(args, "dst", False) else "src"
    if args.block_cmd == "list":
        with blocklist_of(pins) as bl:
            listing = bl.listing_keys()
        rows: list[tuple[str, str, int, int | None]] = [
            (key_cidr(k), "dst" if k & 1 else "src", h, None) for k, h in listing
        ]
        rows += [(str(r.src or r.dst), d, n, r.expires_at) for r, d, n in _block_entries(pins)]
        if args.json:
            emit_json([{"cidr": c, "direction": d, "hits": h, "expires_at": e} for c, d, h, e in rows])
        elif any(e is not None for *_, e in rows):
            now = time.time()
            print(
                table(
                    [(c, d, h, "-" if e is None else time_left(e - now)) for c, d, h, e in rows],
                    ["cidr", "direction", "hits", "ttl"],
                )
            )
        else:
            print(table([(c, d, h) for c, d, h, _ in rows], ["cidr", "direction", "hits"]))
        return 0

    ttl = getattr(args, "ttl", None)
    if args.block_cmd == "add" and ttl is not None:
        return _block_add_ttl(args, direction, ttl)
    if args.block_cmd in ("add", "del"):
        rules = _parse_cidrs(args.cidrs, direction)
    elif args.block_cmd == "sync":
        try:
            keys = read_file_keys(args.file, direction)
        except BlocklistFileError as e:
            return _file_errors(e, "the blocklist")

    extra: list[str] = []  # `block add --ttl` entries deleted
    with pins.lock(), blocklist_of(pins) as bl:
        if args.block_cmd == "add":
            ch = bl.add(rules)
        elif args.block_cmd == "del":
            # `block add --ttl` entries of these CIDRs go too
            timed = _timed_blocks(pins, rules)
            missing = [r for r in bl.missing(rules) if (str(r.net), r.direction) not in timed]
            if missing:
                raise InputError(
                    "not in the blocklist: "
                    + ", ".join(f"{r.net} ({r.direction})" for r in missing)
                    + "; nothing was changed"
                )
            ch = bl.delete([r for r in rules if r not in bl.missing(rules)])
            extra = _remove_timed(pins, timed)
        elif args.block_cmd == "flush":
            ch = bl.flush()
            extra = _remove_timed(pins, None)
        else:
            # a file names one direction's rules; the other direction's stay
            ch = bl.sync_keys(keys, dry_run=args.dry_run, direction=direction)
    deleted = ch.deleted_cidrs() + [c for c in extra if c not in ch.deleted_cidrs()]
    if args.json:
        emit_json({"added": ch.added_cidrs(), "deleted": deleted})
    else:
        what = "would add" if getattr(args, "dry_run", False) else "added"
        gone = "would delete" if getattr(args, "dry_run", False) else "deleted"
        print(f"{what} {len(ch.added_keys)}, {gone} {len(deleted)} rules")
    return 0


def _timed_blocks(pins: PinRoot, rules: list[Rule]) -> dict[tuple[str, str], list[int]]:
    """(cidr, direction) -> ids of the `block add --ttl` entries among ``rules``."""
    wanted = {(str(r.net), r.direction) for r in rules}
    out: dict[tuple[str, str], list[int]] = {}
    for r, d, _ in _block_entries(pins):
        key = (str(r.src or r.dst), d)
        if key in wanted:
            out.setdefault(key, []).append(r.id or 0)
    return out


def _remove_timed(pins: PinRoot, timed: dict[tuple[str, str], list[int]] | None) -> list[str]:
    """Remove `block add --ttl` entries (None: all); the caller holds the lock.
    Returns their CIDRs."""
    from xdpflow.dataplane.rules import RuleTables

    if timed is not None and not timed:
        return []
    try:
        with RuleTables.of_pins(pins, lock=False) as rt:  # cmd_block holds the pin-root lock
            if timed is None:
                gone = rt.flush(blocks=True)
            else:
                gone = rt.delete([i for ids in timed.values() for i in ids])
    except NotAttachedError:
        return []
    return [str(r.src or r.dst) for r in gone]


def _block_add_ttl(args: argparse.Namespace, direction: str, ttl: str) -> int:
    """`block add CIDR --ttl D`: drop rules at the blocklist's priority in the
    rule set, so the data plane itself stops matching them on time."""
    from xdpflow.dataplane.rules import RuleTables, block_rule
    from xdpflow.rules.rulespec import RuleError, parse_duration

    try:
        expires_at = int(time.time()) + parse_duration(ttl)
    except RuleError as e:
        raise InputError(f"--ttl: {e}") from None
    nets = [r.net for r in _parse_cidrs(args.cidrs, direction)]
    with RuleTables.of_pins(args.pins) as rt, rt.locked():
        rt.expire()
        added = rt.add([block_rule(n, direction, expires_at) for n in nets])
    cidrs = [str(r.src or r.dst) for r in added]
    if args.json:
        emit_json({"added": cidrs, "deleted": []})
    else:
        print(f"added {len(cidrs)}, deleted 0 rules (expiring in {time_left(expires_at - time.time())})")
    return 0


# `rule add` flag (argparse dest) -> the rules-file word it mirrors
RULE_FLAGS = {
    "src": "src",
    "dst": "dst",
    "proto": "proto",
    "sport": "sport",
    "dport": "dport",
    "icmp_type": "icmp-type",
    "tcp_flags": "tcp-flags",
    "length": "length",
    "rule_iface": "iface",
    "pps": "pps",
    "bps": "bps",
    "priority": "priority",
    "ttl": "ttl",
}


def _rule_from_args(args: argparse.Namespace) -> RuleSpec:
    from xdpflow.rules.rulespec import RuleError, from_fields

    if args.action is None:
        raise InputError("rule add needs --action pass|drop|monitor|rate-limit")
    fields = {word: getattr(args, dest) for dest, word in RULE_FLAGS.items() if getattr(args, dest) is not None}
    try:
        return from_fields(args.action, fields, args.comment)
    except RuleError as e:
        raise InputError(f"{e}; nothing was changed") from None


def _rule_row(r: RuleSpec, counts: tuple[int, int, int], now: float) -> list[Any]:
    match = " ".join(w for w in r.match_words()[1:] if not w.startswith("priority="))
    ttl = "-" if r.expires_at is None else time_left(r.expires_at - now)
    return [r.id, r.priority, r.action, match or "any", *counts, ttl, r.comment or ""]


def cmd_rule(args: argparse.Namespace) -> int:
    from xdpflow.dataplane.rules import RuleTables
    from xdpflow.rules.rulespec import RulesFileError
    from xdpflow.rules.rulespec import read_file as read_rules_file

    if args.rule_cmd == "add":
        rule = _rule_from_args(args)
    elif args.rule_cmd == "sync":
        try:
            wanted = read_rules_file(args.file)
        except RulesFileError as e:
            raise InputError(f"{e}; the rule set was not changed") from None
        except OSError as e:
            raise InputError(f"cannot read rules file {args.file}: {e.strerror or e}; nothing was changed") from None

    with RuleTables.of_pins(args.pins) as rt, rt.locked():
        rt.expire()
        if args.rule_cmd == "add":
            (added,) = rt.add([rule])
            if args.json:
                emit_json(added.json())
            else:
                print(added.id)
        elif args.rule_cmd == "del":
            gone = rt.delete(args.ids)
            if args.json:
                emit_json({"deleted": [r.id for r in gone]})
            else:
                print(f"deleted {len(gone)} rules")
        elif args.rule_cmd == "flush":
            gone = rt.flush()
            if args.json:
                emit_json({"deleted": [r.id for r in gone]})
            else:
                print(f"deleted {len(gone)} rules")
        elif args.rule_cmd == "sync":
            added_rules, removed = rt.sync(wanted, dry_run=args.dry_run)
            if args.json:
                emit_json({"added": [r.json() for r in added_rules], "deleted": [r.json() for r in removed]})
            else:
                for r in added_rules:
                    print(f"+ {r.line()}")
                for r in removed:
                    print(f"- {r.id} {r.line()}")
                add, rm = ("would add", "would delete") if args.dry_run else ("added", "deleted")
                print(f"{add} {len(added_rules)}, {rm} {len(removed)} rules")
        else:  # list
            rules = rt.active()
            counts = rt.counters()
            now = time.time()
            if args.json:
                emit_json([r.json(*counts.get(r.id or 0, (0, 0, 0))) for r in rules])
            else:
                rows = [_rule_row(r, counts.get(r.id or 0, (0, 0, 0)), now) for r in rules]
                header = ["id", "priority", "action", "match", "packets", "bytes", "limited", "ttl", "comment"]
                print(table(rows, header))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    maps.set_monitor(args.pins, args.state == "on")
    if not args.json:
        print(f"monitor mode {args.state}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from xdpflow.bindings.libbpf import RingBuffer
    from xdpflow.dataplane.events import RuleNames, decode_event

    pins: PinRoot = args.pins
    rules = RuleNames(pins)
    clock = maps.open_clock(pins)
    fd = maps.open_events_fd(pins)
    count = 0

    # The ring keeps what no reader took yet: stream what happens from now on.
    # (A ring buffer has one consumer position: run one `events` at a time.)
    stale = RingBuffer(fd, lambda data: None)
    stale.consume()
    stale.close()

    def on_event(data: bytes) -> None:
        nonlocal count
        ev = decode_event(data, rules, clock)
        if args.json:
            print(json.dumps(ev), flush=True)
        else:
            t = time.strftime("%H:%M:%S", time.localtime(ev["time"]))
            extra = f" rule {ev['rule']}" if "rule" in ev else ""
            print(
                f"{t} {ev['ifname']} {ev['type']} {proto_name(ev['proto'])} "
                f"{ev['src']}:{ev['sport']} -> {ev['dst']}:{ev['dport']} len {ev['len']}{extra}",
                flush=True,
            )
        count += 1

    rb = RingBuffer(fd, on_event)
    deadline = time.monotonic() + args.duration if args.duration else None
    try:
        while deadline is None or time.monotonic() < deadline:
            rb.poll(200)
            if args.count and count >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        rb.close()
        os.close(fd)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from xdpflow.dataplane.doctor import diagnose

    report = diagnose(args.pins, args.ifaces)
    if args.json:
        emit_json(report.to_json())
        return 0 if report.ok else EXIT_FAIL
    print(f"kernel {report.kernel}")
    rows = [[c.name, "ok" if c.ok else ("MISSING" if c.required else "no"), c.detail] for c in report.checks]
    print(table(rows, ["check", "result", "detail"]))
    m = report.memory
    print(f"map memory: {m.bytes / 2**20:.0f} MiB at most, {m.available / 2**20:.0f} MiB available")
    for i in report.interfaces:
        native = {True: "native XDP", False: "no native XDP", None: "native XDP unknown"}[i.native_xdp]
        feats = ", ".join(i.xdp_features) if i.xdp_features else "-"
        print(f"{i.ifname}: driver {i.driver or '-'}, {native} (features: {feats})")
        for p in i.programs:
            print(f"  runs XDP program {p.prog_id} {p.name or '?'} ({p.mode} mode, through {p.attach})")
    fixes = report.fixes()
    if fixes:
        print("to do:")
        for f in fixes:
            print(f"  - {f}")
    verdict = "xdpflow can run natively" + (" on every interface named" if report.interfaces else " here")
    print(verdict if report.ok else "xdpflow cannot run natively everywhere asked: see above")
    return 0 if report.ok else EXIT_FAIL


def cmd_attacks(args: argparse.Namespace) -> int:
    """The daemon's attacks (its state file): active and recent ones."""
    from xdpflow.export.detect import load_state, state_path

    attacks, _ = load_state(state_path(args.pins))
    if args.json:
        emit_json([a.json() for a in attacks])
        return 0
    if not attacks:
        print("no attacks")
        return 0

    def when(t: float | None) -> str:
        return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    rows = []
    for a in attacks:
        m = a.mitigation
        if m is None or m.kind == "none":
            what = "none"
        elif m.declined:
            what = f"{m.kind}: declined: {m.declined}"
        else:
            what = f"{m.kind}{' (dry run)' if m.dry_run else ''}: " + (
                ", ".join(map(str, m.rules)) if m.rules else "; ".join(m.lines)
            )
        rows.append(
            [
                a.id,
                "active" if a.active else "ended",
                a.victim,
                a.group,
                when(a.start),
                when(a.end),
                human(a.peak.get("pps", 0)),
                human(a.peak.get("bps", 0)),
                ",".join(a.exceeded),
                what,
            ]
        )
    print(
        table(rows, ["ID", "STATE", "VICTIM", "GROUP", "START", "END", "PEAK PPS", "PEAK BIT/S", "OVER", "MITIGATION"])
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from xdpflow.app.daemon import main as run_daemon

    return run_daemon(args)


# --- argument parsing --------------------------------------------------------


def positive_of(kind: type, what: str) -> Any:
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


positive_int = positive_of(int, "a whole number")
positive_float = positive_of(float, "a number")


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser that may add its arguments when it is first
    used: `run`'s come from the daemon's configuration module (with the
    daemon's imports behind it), which no other command should load."""

    def __init__(self, *args: Any, arguments: Callable[[argparse.ArgumentParser], None] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self._arguments = arguments

    def _add_arguments(self) -> None:
        if self._arguments is not None:
            add, self._arguments = self._arguments, None
            add(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._add_arguments()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._add_arguments()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_arguments()
        return super().format_help()


def _run_arguments(p: argparse.ArgumentParser) -> None:
    from xdpflow.app.config import add_run_arguments

    add_run_arguments(p)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with ``only`` the parser of that one
    subcommand under the same top level: building all thirteen costs a
    command ~4 ms of its start (a parser each, and their gettext lookups),
    and the one argparse will pick parses the same either way (see
    ``command_in``; netns_tests/unit/test_cli_parser.py compares them)."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print machine-readable JSON instead of text (default off)",
    )
    common.add_argument(
        "--pin-root",
        default=argparse.SUPPRESS,
        help="bpffs directory of this instance's state (default $XDPFLOW_PIN_ROOT or /sys/fs/bpf/xdpflow)",
    )
    common.add_argument(
        "--netns",
        default=argparse.SUPPRESS,
        help="act inside this named network namespace (default: the namespace xdpflow runs in)",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the traceback of an error too (default off, or on when $XDPFLOW_DEBUG is set)",
    )

    p = _Parser(
        prog="xdpflow",
        description="XDP packet counting, flow tracking and blocking.",
        parents=[common],
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, add in _COMMANDS.items():
        if only is None or name == only:
            add(sub, common)
    return p


def _add_attach_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    a = sub.add_parser("attach", parents=[common], help="load, pin and attach to interfaces")
    a.add_argument("ifaces", nargs="+", metavar="IFACE")
    a.add_argument("--mode", choices=["auto", "native", "skb", "hw"], default="auto", help="XDP mode (default auto)")
    a.add_argument(
        "--flows",
        type=lambda t: _at_least(t, 2),
        default=None,
        metavar="N",
        help=f"flows the IPv4 and IPv6 tables hold together, half each (default {FLOWS_DEFAULT}); "
        "an upgrade keeps the current tables",
    )
    a.add_argument(
        "--flow-budget",
        type=lambda t: _at_least(t, 0),
        default=None,
        metavar="N",
        help=f"new flows each CPU may add per second; frames over it are counted as untracked, not tracked "
        f"(default {FLOW_BUDGET_DEFAULT}; 0: unlimited); an upgrade keeps the current budget",
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
        "--then",
        metavar="PROG",
        default=None,
        help="hand every frame xdpflow passes to PROG (a pinned program's path, or id:N) with a tail call; "
        "its verdict is the frame's fate. On an attached interface: swap it atomically; none: stop",
    )
    a.add_argument(
        "--percpu-flows",
        action="store_true",
        help="per-CPU flow tables (no atomics; memory grows with CPUs) instead of shared ones",
    )
    a.set_defaults(func=cmd_attach)


def _add_detach_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    d = sub.add_parser("detach", parents=[common], help="detach and remove an interface's pins")
    d.add_argument("ifaces", nargs="+", metavar="IFACE")
    d.set_defaults(func=cmd_detach)


def _add_status_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("status", parents=[common], help="interfaces, programs, table occupancy")
    s.set_defaults(func=cmd_status)


def _add_stats_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    st = sub.add_parser("stats", parents=[common], help="interface counters")
    st.add_argument("iface", nargs="?", metavar="IFACE")
    st.add_argument(
        "--watch",
        nargs="?",
        type=positive_float,
        const=1.0,
        default=None,
        metavar="SECONDS",
        help="redraw with rates every SECONDS (default 1)",
    )
    st.set_defaults(func=cmd_stats)


def _add_flows_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    f = sub.add_parser("flows", parents=[common], help="the flow table")
    f.add_argument("iface", nargs="?", metavar="IFACE")
    f.add_argument("--top", type=positive_int, default=None, metavar="N", help="only the N largest")
    f.add_argument("--sort", choices=SORT_KEYS, default="packets", help="largest by (default packets)")
    f.add_argument("--filter", metavar="CIDR", help="only flows with source or destination inside CIDR")
    f.set_defaults(func=cmd_flows)


def _add_top_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    tp = sub.add_parser(
        "top", parents=[common], help="current rates of the heaviest sources, destinations or flows, until Ctrl-C"
    )
    tp.add_argument("--by", choices=TOP_BY, default="src", help="rank sources, destinations or flows (default src)")
    tp.add_argument("--iface", metavar="IFACE", default=None, help="only this interface (default every attached one)")
    tp.add_argument("--count", type=positive_int, default=10, metavar="N", help="show the N heaviest (default 10)")
    tp.add_argument(
        "--interval",
        type=positive_float,
        default=1.0,
        metavar="SECONDS",
        help="rates over SECONDS between two reads of the flow tables, redrawn each time (default 1)",
    )
    tp.set_defaults(func=cmd_top)


def _add_block_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    b = sub.add_parser("block", parents=[common], help="manage the blocklist")
    bsub = b.add_subparsers(dest="block_cmd", required=True, metavar="ACTION")
    for name, helptext in (("add", "add rules"), ("del", "delete rules")):
        x = bsub.add_parser(name, parents=[common], help=helptext)
        x.add_argument("cidrs", nargs="+", metavar="CIDR")
        x.add_argument("--dst", action="store_true", help="match the destination address, not the source")
        if name == "add":
            x.add_argument(
                "--ttl",
                metavar="DURATION",
                help="remove the rules after DURATION (90s, 10m, 1h, 2d); the data plane stops matching them "
                "on time with no process running (default: until deleted)",
            )
    bsub.add_parser("list", parents=[common], help="rules and their hits")
    bsub.add_parser("flush", parents=[common], help="delete every rule")
    y = bsub.add_parser("sync", parents=[common], help="make the blocklist equal to FILE (- for stdin)")
    y.add_argument("file", metavar="FILE")
    y.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    y.add_argument("--dst", action="store_true", help="the file lists destination rules")
    b.set_defaults(func=cmd_block)


def _add_monitor_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    m = sub.add_parser("monitor", parents=[common], help="count would-be drops but pass them")
    m.add_argument("state", choices=["on", "off"])
    m.set_defaults(func=cmd_monitor)


def _add_events_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    e = sub.add_parser("events", parents=[common], help="stream new-flow and blocklist events")
    e.add_argument("--count", type=positive_int, default=None, help="stop after N events")
    e.add_argument("--duration", type=positive_float, default=None, help="stop after SECONDS")
    e.set_defaults(func=cmd_events)


def _add_doctor_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    dr = sub.add_parser(
        "doctor",
        parents=[common],
        help="can this host run xdpflow, and how well (exit 0: natively on every IFACE named)",
    )
    dr.add_argument("ifaces", nargs="*", metavar="IFACE")
    dr.set_defaults(func=cmd_doctor)


def _add_attacks_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    at = sub.add_parser(
        "attacks",
        parents=[common],
        help="attacks the daemon detected ([[protect]] groups): active and recent, with their mitigation",
    )
    at.set_defaults(func=cmd_attacks)


def _add_run_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser(
        "run",
        parents=[common],
        arguments=_run_arguments,
        help="the daemon: attach, export IPFIX, serve metrics, sync feeds",
        description="Run the daemon. Every option overrides the key of the same name in --config; "
        "defaults are those of contrib/xdpflow.toml.",
    )
    r.set_defaults(func=cmd_run)


# a top-level option's unique prefix (argparse's allow_abbrev) that takes a value
_VALUE_OPTIONS = ("--pin-root", "--netns")
_HELP = "--help"


def command_in(argv: Sequence[str]) -> str | None:
    """The subcommand argparse will pick from ``argv``: its first token that
    is neither a top-level option nor such an option's value. None when that
    is no subcommand's name, or a help request comes first: both need the
    whole parser (its list of commands)."""
    it = iter(argv)
    for tok in it:
        if tok == "-h" or (len(tok) > 2 and _HELP.startswith(tok)) or tok == "--":
            return None
        if tok == "-" or tok[1:2].isdigit() or tok[1:2] == ".":
            return None  # a positional to argparse ("-", "-1", "-.5"), and no command
        if tok.startswith("-"):
            if "=" not in tok and len(tok) > 2 and any(o.startswith(tok) for o in _VALUE_OPTIONS):
                next(it, None)
            continue
        return tok if tok in _COMMANDS else None
    return None


def _rule_id(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rule id (a whole number from `xdpflow rule list`)")
    return int(text)


def _add_rule_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser("rule", parents=[common], help="manage multi-field rules (pass, drop, monitor, rate-limit)")
    rsub = r.add_subparsers(dest="rule_cmd", required=True, metavar="ACTION")
    a = rsub.add_parser("add", parents=[common], help="add a rule; prints its id")
    for flag, dest, meta, text in (
        ("--src", "src", "CIDR", "source address or CIDR"),
        ("--dst", "dst", "CIDR", "destination address or CIDR"),
        ("--proto", "proto", "P", "IP protocol: tcp, udp, icmp, icmpv6, ... or a number"),
        ("--sport", "sport", "A[-B]", "TCP/UDP source port or range"),
        ("--dport", "dport", "A[-B]", "TCP/UDP destination port or range"),
        ("--icmp-type", "icmp_type", "T[/CODE]", "ICMP or ICMPv6 type, and code"),
        ("--tcp-flags", "tcp_flags", "SPEC", "TCP flags set and, with '!', clear: SYN,!ACK"),
        ("--length", "length", "A[-B]", "IP length (IPv4 total length, IPv6 40 + payload length)"),
        ("--iface", "rule_iface", "IFACE", "only frames arriving on IFACE"),
        ("--pps", "pps", "N", "rate-limit: packets per second per source (k, M, G allowed)"),
        ("--bps", "bps", "N", "rate-limit: bits per second per source (k, M, G allowed)"),
        ("--priority", "priority", "N", "lower is judged first, 0-65535; the blocklist sits at 1000 (default 1000)"),
        ("--ttl", "ttl", "DURATION", "remove the rule after DURATION: 90s, 10m, 1h, 2d (default: never)"),
    ):
        a.add_argument(flag, dest=dest, metavar=meta, default=None, help=text)
    a.add_argument("--action", metavar="ACTION", default=None, help="pass, drop, monitor or rate-limit (required)")
    a.add_argument("--comment", metavar="TEXT", default=None, help="a note shown by `rule list`")
    d = rsub.add_parser("del", parents=[common], help="delete rules by id")
    d.add_argument("ids", nargs="+", type=_rule_id, metavar="ID")
    rsub.add_parser("list", parents=[common], help="the rules in force, with counters and time left")
    rsub.add_parser("flush", parents=[common], help="delete every rule (`block add --ttl` entries stay)")
    y = rsub.add_parser("sync", parents=[common], help="make the rule set equal to FILE (- for stdin)")
    y.add_argument("file", metavar="FILE")
    y.add_argument("--dry-run", action="store_true", help="print what would be added and deleted, change nothing")
    r.set_defaults(func=cmd_rule)


_COMMANDS: dict[str, Callable[[Any, argparse.ArgumentParser], None]] = {
    "attach": _add_attach_parser,
    "detach": _add_detach_parser,
    "status": _add_status_parser,
    "stats": _add_stats_parser,
    "flows": _add_flows_parser,
    "top": _add_top_parser,
    "block": _add_block_parser,
    "rule": _add_rule_parser,
    "monitor": _add_monitor_parser,
    "events": _add_events_parser,
    "doctor": _add_doctor_parser,
    "attacks": _add_attacks_parser,
    "run": _add_run_parser,
}


def _at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least {low}")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command_in(argv)).parse_args(argv)
    args.json = getattr(args, "json", False)
    args.debug = getattr(args, "debug", False) or bool(os.environ.get("XDPFLOW_DEBUG"))
    args.pin_root_given = getattr(args, "pin_root", None)
    args.pins = PinRoot(args.pin_root_given or default_root())
    args.netns = getattr(args, "netns", None)
    # a closed pipe (xdpflow ... | head) is not an error worth a traceback
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.func is not cmd_run:
        # a one-shot command multiplies no matrices: numpy's OpenBLAS would
        # only start its thread pool, ~50 ms of `flows` and `block sync`
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        if args.func is cmd_run:  # the daemon enters its (configured) namespace itself
            return int(args.func(args))
        with in_netns(args.netns):
            return int(args.func(args))
    except OSError as e:
        if args.debug:
            import traceback  # only here: ~2 ms of every command's start

            traceback.print_exc()
        print(f"xdpflow: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, InputError) else EXIT_FAIL
    except KeyboardInterrupt:
        return 130
