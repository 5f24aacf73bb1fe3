"""`xdpflow block` and `xdpflow monitor` end to end: rules change what reaches
the dut namespace, hit counters are exact, files sync by difference, and bad
input changes nothing.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest

from xdpflow.bindings.libbpf import BPF_F_MMAPABLE, BPF_MAP_TYPE_ARRAY, Map, Object, map_info, obj_get
from xdpflow.dataplane import abi
from xdpflow.dataplane.pins import SHARED_MAPS, PinRoot
from xdpflow.testing.lab import DUT_V4, DUT_V6, GEN_V4, GEN_V6, Lab

from ..clitest import (
    BLOCK_MAX,
    Cli,
    all_ok,
    assert_one_error_line,
    expect_counters,
    expect_flows,
    icmp,
    raw,
    send_and_receive,
    tcp,
    udp,
    udp4,
    udp6,
    without_times,
)


@pytest.fixture
def cli(lab: Lab, pin_root: str) -> Cli:
    c = Cli.of(lab, pin_root)
    c("attach", lab.dut_if, "--flows", "1024")
    return c


def test_block_add_list_del_flush(lab: Lab, cli: Cli) -> None:
    add = cli.json(
        "block", "add", "198.51.100.0/24", "198.51.100.7", "203.0.0.0/8", "2001:db8:0:1::/64", "2001:d00::/24"
    )
    assert add == {
        "added": ["198.51.100.0/24", "198.51.100.7/32", "203.0.0.0/8", "2001:d00::/24", "2001:db8:0:1::/64"],
        "deleted": [],
    }
    assert cli("block", "add", "--dst", "203.0.113.9/32", "2001:db8:1::5") == "added 2, deleted 0 rules\n"
    # adding what is there changes nothing
    assert cli.json("block", "add", "198.51.100.7/32") == {"added": [], "deleted": []}

    blocked = {
        "v4 /24": udp("198.51.100.1", DUT_V4, 5001, 53),
        "v4 /32": udp("198.51.100.7", DUT_V4, 5002, 53),  # inside the /24: the /32 is the longer match
        "v4 /8": tcp("203.0.113.50", DUT_V4, 5003, 80),  # shorter than /16: spans many /16 slots
        "v4 dst": udp(GEN_V4, "203.0.113.9", 5004, 53),
        "v6 /64": udp("2001:db8:0:1::1", DUT_V6, 5005, 53),
        "v6 /24": icmp("2001:db8:ffff::1", DUT_V6),  # /17../23: expanded to /24 regions
        "v6 dst": icmp(GEN_V6, "2001:db8:1::5"),
        "v6 /24, outside the /64": udp("2001:db8::1", DUT_V6, 5008, 53),
    }
    passing = [
        udp4(),
        udp6(),
        udp(GEN_V4, "203.0.113.10", 5006, 53),  # next to the blocked destination
        udp(GEN_V6, "2001:db8:1::6", 5007, 53),  # next to the blocked v6 destination
        udp(GEN_V4, "198.51.100.7", 5009, 53),  # a source rule does not match the destination
    ]
    frames = [*blocked.values(), *passing, blocked["v4 /32"]]
    assert send_and_receive(lab, frames) == raw(passing)
    dropped = [*blocked.values(), blocked["v4 /32"]]
    stats, flows, listing = cli.state()
    status, text = all_ok(cli.run_all(("status", "--json"), ("block", "list")))
    assert stats == expect_counters(passed=passing, dropped=dropped)
    assert without_times(flows) == expect_flows(passing, lab.dut_if)  # blocked frames make no flows
    assert listing == [
        ("198.51.100.0/24", "src", 1),
        ("198.51.100.7/32", "src", 2),
        ("203.0.0.0/8", "src", 1),
        ("203.0.113.9/32", "dst", 1),
        ("2001:d00::/24", "src", 2),
        ("2001:db8:0:1::/64", "src", 1),
        ("2001:db8:1::5/128", "dst", 1),
    ]
    assert json.loads(status)[0]["blocklist"] == 7
    assert [line.split() for line in text.splitlines()[:3]] == [
        ["cidr", "direction", "hits"],
        ["198.51.100.0/24", "src", "1"],
        ["198.51.100.7/32", "src", "2"],
    ]

    # deleting the /32 falls back to the /24; deleting the v6 dst rule lets it through
    assert cli.json("block", "del", "198.51.100.7") == {"added": [], "deleted": ["198.51.100.7/32"]}
    assert cli("block", "del", "--dst", "2001:db8:1::5/128") == "added 0, deleted 1 rules\n"
    # what is not there cannot be deleted, and nothing else is then deleted either
    err = cli.fails(2, "block", "del", "198.51.100.0/24", "203.0.113.9")
    assert err == "xdpflow: not in the blocklist: 203.0.113.9/32 (src); nothing was changed\n"
    again = [blocked["v4 /32"], blocked["v6 dst"]]
    assert send_and_receive(lab, again) == raw([blocked["v6 dst"]])
    assert cli.blocklist() == [
        ("198.51.100.0/24", "src", 2),
        ("203.0.0.0/8", "src", 1),
        ("203.0.113.9/32", "dst", 1),
        ("2001:d00::/24", "src", 2),
        ("2001:db8:0:1::/64", "src", 1),
    ]

    # a rule deleted and added again starts from zero hits
    cli("block", "del", "198.51.100.0/24")
    assert send_and_receive(lab, [blocked["v4 /24"]]) == raw([blocked["v4 /24"]])
    cli("block", "add", "198.51.100.0/24")
    assert send_and_receive(lab, [blocked["v4 /24"]]) == []
    assert cli.blocklist()[0] == ("198.51.100.0/24", "src", 1)

    assert cli.json("block", "flush") == {
        "added": [],
        "deleted": ["198.51.100.0/24", "203.0.0.0/8", "203.0.113.9/32", "2001:d00::/24", "2001:db8:0:1::/64"],
    }
    everything = list(blocked.values())
    assert send_and_receive(lab, everything) == raw(everything)
    listing, (status,), flush = cli.json_all(("block", "list"), ("status",), ("block", "flush"))
    assert (listing, status["blocklist"], flush) == ([], 0, {"added": [], "deleted": []})


def test_status_takes_the_writers_rule_count_only_while_it_is_valid(lab: Lab, cli: Cli) -> None:
    """`status` reads the count the blocklist's writer left (bl_count) instead
    of counting the tries, but only while it is tagged valid with the
    generation in force: a change under way, a writer that knows nothing of
    it (it bumps the generation), and pins from before it all fall back to
    counting the tries."""
    pins = PinRoot(cli.pin_root)
    cli("block", "add", "198.51.100.0/24", "203.0.113.9", "2001:db8::/32")

    def tag(valid: bool, rules: int, generation_offset: int = 0) -> None:
        gen = _generation(pins) + generation_offset
        with Map.from_pin(pins.shared("bl_count"), *abi.MAP_TYPES["bl_count"], abi.ffi) as m:
            m[0] = abi.ffi.new("struct xf_bl_count *", {"generation": gen, "valid": valid, "rules": rules})

    assert _count_of(pins) == (_generation(pins), 1, 3)
    assert cli.status()[0]["blocklist"] == 3
    tag(True, 999)  # what status shows is the writer's count...
    assert cli.status()[0]["blocklist"] == 999
    tag(False, 999)  # ...but not while a change is under way
    assert cli.status()[0]["blocklist"] == 3
    tag(True, 999, generation_offset=-1)  # nor once a writer that knows nothing of it has bumped the generation
    assert cli.status()[0]["blocklist"] == 3
    cli("block", "del", "203.0.113.9")  # the next change tags it again
    assert cli.status()[0]["blocklist"] == 2
    assert _count_of(pins) == (_generation(pins), 1, 2)

    # pins from before bl_count: counted, and the writer works without it; re-attaching pins it
    os.unlink(pins.shared("bl_count"))
    cli("block", "add", "198.51.100.77")
    assert cli.status()[0]["blocklist"] == 3
    cli("attach", lab.dut_if, "--flows", "1024")
    cli("block", "add", "198.51.100.78")
    assert cli.status()[0]["blocklist"] == 4
    assert _count_of(pins) == (_generation(pins), 1, 4)


def _generation(pins: PinRoot) -> int:
    with Map.from_pin(pins.shared("config"), *abi.MAP_TYPES["config"], abi.ffi) as m:
        return int(m[0].generation)


def _count_of(pins: PinRoot) -> tuple[int, int, int]:
    with Map.from_pin(pins.shared("bl_count"), *abi.MAP_TYPES["bl_count"], abi.ffi) as m:
        v = m[0]
        return int(v.generation), int(v.valid), int(v.rules)


def test_block_sync_applies_the_difference(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    cli("block", "add", "198.51.100.0/24", "203.0.113.0/25")
    cli("block", "add", "--dst", "203.0.113.200")
    hit = udp("198.51.100.1", DUT_V4, 5001, 53)
    assert send_and_receive(lab, [hit]) == []

    plain = tmp_path / "plain.txt"
    plain.write_text("198.51.100.0/24\n203.0.113.128/25\n2001:db8::/48\n")
    assert cli.json("block", "sync", str(plain)) == {
        "added": ["203.0.113.128/25", "2001:db8::/48"],
        "deleted": ["203.0.113.0/25"],
    }
    # nothing to do the second time
    assert cli.json("block", "sync", str(plain)) == {"added": [], "deleted": []}

    # unchanged rules kept their hits; the file's direction only: the dst rule stays
    # Spamhaus DROP: "; comment" lines and "CIDR ; SBL id"
    drop = tmp_path / "drop.txt"
    drop.write_text(
        "; Spamhaus DROP List 2024/01/01 - (c) 2024 The Spamhaus Project\n"
        "; Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT\n"
        "198.51.100.0/24 ; SBL123\n"
        "203.0.113.0/26 ; SBL456\r\n"
    )
    before = [
        ("198.51.100.0/24", "src", 1),
        ("203.0.113.128/25", "src", 0),
        ("203.0.113.200/32", "dst", 0),
        ("2001:db8::/48", "src", 0),
    ]
    dry, dry_text = all_ok(
        cli.run_all(("block", "sync", str(drop), "--dry-run", "--json"), ("block", "sync", str(drop), "--dry-run"))
    )
    assert json.loads(dry) == {"added": ["203.0.113.0/26"], "deleted": ["203.0.113.128/25", "2001:db8::/48"]}
    assert dry_text == "would add 1, would delete 2 rules\n"
    assert cli.blocklist() == before
    assert cli("block", "sync", str(drop)) == "added 1, deleted 2 rules\n"
    assert cli.blocklist() == [
        ("198.51.100.0/24", "src", 1),
        ("203.0.113.0/26", "src", 0),
        ("203.0.113.200/32", "dst", 0),
    ]

    # FireHOL netset: "#" comments, also after an entry; duplicates merge
    netset = tmp_path / "firehol_level1.netset"
    netset.write_text(
        "#\n# firehol_level1\n#\n# ipv4 hash:net ipset\n#\n203.0.113.0/26\n203.0.113.64/26 # more\n\n203.0.113.64/26\n"
    )
    assert cli.json("block", "sync", str(netset)) == {
        "added": ["203.0.113.64/26"],
        "deleted": ["198.51.100.0/24"],
    }

    # standard input; --dst replaces only destination rules
    assert cli.json("block", "sync", "--dst", "-", input="2001:db8:1::/64\n203.0.113.200\n") == {
        "added": ["2001:db8:1::/64"],
        "deleted": [],
    }
    assert cli.json("block", "sync", "-", input="# nothing left\n") == {
        "added": [],
        "deleted": ["203.0.113.0/26", "203.0.113.64/26"],
    }

    # the data plane follows: the synced-away source passes, the synced-in destination drops
    to_v6 = udp(GEN_V6, "2001:db8:1::9", 5002, 53)
    from_v4 = udp("203.0.113.65", DUT_V4, 5003, 53)
    assert send_and_receive(lab, [hit, to_v6, from_v4]) == raw([hit, from_v4])
    assert cli.blocklist() == [("203.0.113.200/32", "dst", 0), ("2001:db8:1::/64", "dst", 1)]


def test_bad_input_changes_nothing(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    cli("block", "add", "198.51.100.0/24")
    assert send_and_receive(lab, [udp("198.51.100.1", DUT_V4, 5001, 53)]) == []
    before = [("198.51.100.0/24", "src", 1)]

    bad = tmp_path / "bad.txt"
    bad.write_text("203.0.113.0/24\n# fine\n198.51.100.300\n2001:db8::/32\n203.0.113.5/33\n")
    missing = tmp_path / "missing.txt"
    # every one is refused before anything is touched, so they may as well run at once
    results = cli.run_all_stdin(
        (("block", "sync", str(bad)), ""),
        (("block", "sync", str(bad), "--dry-run"), ""),
        (("block", "sync", "-"), "203.0.113.0/24\nnot-an-address\n"),
        (("block", "sync", "--dst", "-"), "10.1.2.3/8\n"),
        (("block", "add", "203.0.113.0/24", "10.1.2.3/8"), ""),
        (("block", "add", "--dst", "2001:db8::1/32"), ""),
        (("block", "add", "198.51.100.01"), ""),
        (("block", "add", "2001:db8::1%eth0"), ""),
        (("block", "add", "198.51.100.0/255.255.255.0"), ""),
        (("block", "sync", str(missing)), ""),
    )
    file, dry, stdin, host_bits_file, host_bits, host_bits6, *bad_cidrs, missing_file = results
    for r in results:
        assert r.stdout == "" and "Traceback" not in r.stderr, (r.args, r.stderr)
    assert [r.returncode for r in results] == [2] * 9 + [1]

    # a file: every bad line by file:line and text, then one summary line
    assert file.stderr.splitlines() == [
        f"xdpflow: {bad}:3: '198.51.100.300' is not an IPv4 or IPv6 address or CIDR: octet 300 (> 255) not "
        "permitted: '198.51.100.300'",
        f"xdpflow: {bad}:5: '203.0.113.5/33': prefix length must be a decimal number from 0 to 32: '203.0.113.5/33'",
        "xdpflow: the blocklist was not changed",
    ]
    assert dry.stderr == file.stderr
    assert stdin.stderr.splitlines() == [
        "xdpflow: <stdin>:2: 'not-an-address' is not an IPv4 or IPv6 address or CIDR: 'not-an-address'",
        "xdpflow: the blocklist was not changed",
    ]
    # host bits set: rejected with the canonical network, in a file and on the command line
    assert host_bits_file.stderr.splitlines()[0] == (
        "xdpflow: <stdin>:1: '10.1.2.3/8' has host bits set; did you mean 10.0.0.0/8?: '10.1.2.3/8'"
    )
    assert host_bits.stderr == (
        "xdpflow: '10.1.2.3/8' has host bits set; did you mean 10.0.0.0/8?; nothing was changed\n"
    )
    assert host_bits6.stderr == (
        "xdpflow: '2001:db8::1/32' has host bits set; did you mean 2001:db8::/32?; nothing was changed\n"
    )
    for r in [*bad_cidrs, missing_file]:
        assert_one_error_line(r.stderr)
    assert missing_file.stderr.startswith(f"xdpflow: cannot read blocklist file {missing}: ")

    assert cli.blocklist() == before
    passes = udp("203.0.113.1", DUT_V4, 5001, 53)
    assert send_and_receive(lab, [passes]) == raw([passes])


def _hosts_file(path: Path, n: int) -> None:
    # 198.18.0.0/15 holds 131072 addresses; one more comes from 203.0.113.0/24
    base = (198 << 24) | (18 << 16)
    lines = [
        f"{(a >> 24) & 255}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}" for a in range(base, base + min(n, BLOCK_MAX))
    ]
    lines += [f"203.0.113.{i}" for i in range(n - len(lines))]
    path.write_text("\n".join(lines) + "\n")


def test_more_rules_than_capacity_change_nothing(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    cli("block", "add", "198.51.100.0/24")
    big = tmp_path / "big.txt"
    _hosts_file(big, BLOCK_MAX + 1)
    want = (
        f"xdpflow: the blocklist holds at most {BLOCK_MAX} IPv4 src rules; "
        f"this change needs {BLOCK_MAX + 1}; nothing was changed\n"
    )
    real, dry = cli.run_all(("block", "sync", str(big)), ("block", "sync", str(big), "--dry-run"))
    assert (real.returncode, real.stdout, real.stderr) == (1, "", want)
    assert (dry.returncode, dry.stdout, dry.stderr) == (1, "", want)
    (listing, (status,)) = cli.json_all(("block", "list"), ("status",))
    assert listing == [{"cidr": "198.51.100.0/24", "direction": "src", "hits": 0, "expires_at": None}]
    assert status["blocklist"] == 1
    assert send_and_receive(lab, [udp("198.51.100.1", DUT_V4, 5001, 53)]) == []


def test_sync_to_exactly_capacity_is_all_or_nothing(lab: Lab, cli: Cli, tmp_path: Path) -> None:
    # the file covers the rule it replaces, so that rule cannot simply go first
    cli("block", "add", "198.19.0.0/16")
    full = tmp_path / "full.txt"
    _hosts_file(full, BLOCK_MAX)
    dry = cli.run("block", "sync", str(full), "--dry-run")
    real = cli.run("block", "sync", str(full))
    (st,) = cli.status()
    assert real.returncode == dry.returncode, (dry.stdout, real.stderr)
    if real.returncode == 0:
        assert real.stdout == f"added {BLOCK_MAX}, deleted 1 rules\n"
        assert st["blocklist"] == BLOCK_MAX
    else:
        assert real.stderr.endswith("nothing was changed\n")
        assert st["blocklist"] == 1


def test_monitor_passes_and_counts_would_be_drops(lab: Lab, cli: Cli) -> None:
    cli("block", "add", "198.51.100.0/24")
    cli("block", "add", "--dst", "2001:db8::5")
    b4 = udp("198.51.100.1", DUT_V4, 5001, 53)
    b6 = udp(GEN_V6, "2001:db8::5", 5002, 53)
    ok = udp4()

    assert cli("monitor", "on") == "monitor mode on\n"
    assert cli.status()[0]["monitor"] is True
    assert "monitor mode on" in cli("status")
    assert send_and_receive(lab, [b4, ok, b6]) == raw([b4, ok, b6])
    assert cli.stats() == expect_counters(passed=[ok], monitored=[b4, b6])
    assert cli.blocklist() == [("198.51.100.0/24", "src", 1), ("2001:db8::5/128", "dst", 1)]

    assert cli("monitor", "off") == "monitor mode off\n"
    assert cli.status()[0]["monitor"] is False
    assert send_and_receive(lab, [b4, ok, b6]) == raw([ok])
    assert cli.stats() == expect_counters(passed=[ok, ok], monitored=[b4, b6], dropped=[b4, b6])
    assert cli.blocklist() == [("198.51.100.0/24", "src", 2), ("2001:db8::5/128", "dst", 2)]


def test_concurrent_block_commands_lose_nothing(lab: Lab, cli: Cli) -> None:
    v4 = [f"198.51.100.{64 * i}/26" for i in range(4)]
    v6 = [str(ipaddress.ip_network(f"2001:db8:0:{i}::/64")) for i in range(4)]
    adds = [("block", "add", c) for c in v4] + [("block", "add", "--dst", c) for c in v6]
    results = cli.run_all(*adds)
    assert [(r.returncode, r.stdout, r.stderr) for r in results] == [(0, "added 1, deleted 0 rules\n", "")] * 8
    listing = cli.blocklist()
    assert listing == [(c, "src", 0) for c in v4] + [(c, "dst", 0) for c in v6]

    # and every frame is judged by the merged blocklist, lookup tables included
    frames = [udp(f"198.51.100.{64 * i + 1}", DUT_V4, 5000 + i, 53) for i in range(4)]
    frames += [udp(GEN_V6, f"2001:db8:0:{i}::9", 5100 + i, 53) for i in range(4)]
    assert send_and_receive(lab, frames) == []
    assert [h for _c, _d, h in cli.blocklist()] == [1] * 8


def test_arrays_pinned_without_mmap_are_reused_and_written(lab: Lab, pin_root: str) -> None:
    """An instance whose blocklist arrays were pinned by an object built
    before they were mmapable upgrades in place: attach reuses those pins as
    they are (libbpf would refuse them under the new flags), and the
    blocklist reads and writes them by syscall, with the same verdicts."""
    pins = PinRoot(pin_root)
    os.mkdir(pin_root, 0o700)
    with Object(abi.object_path()) as obj:
        arrays = {n: s.max_entries for n, s in obj.maps.items() if s.map_flags & BPF_F_MMAPABLE and n in SHARED_MAPS}
    assert {"bl4_l1_src", "bl4_l2c_src", "bl6_l0_src", "bl6_pf_src"} <= arrays.keys()
    for name, size in arrays.items():
        with Map.create(BPF_MAP_TYPE_ARRAY, name, *abi.MAP_TYPES[name], size, abi.ffi) as m:
            m.pin(pins.shared(name))
    cli = Cli.of(lab, pin_root)
    cli("attach", lab.dut_if, "--flows", "1024")
    # ten /24s in one /16 get an L2 chunk; the /48 sets the IPv6 filter's bit
    chunked = [f"198.19.{i}.0/24" for i in range(10, 20)]
    cli("block", "add", "198.51.100.0/24", "2001:db8:1::/48", "2001:db8:2::/48", *chunked)
    blocked = [udp("198.51.100.1", DUT_V4, 5001, 53), udp("198.19.12.7", DUT_V4, 5002, 53)]
    blocked += [udp("2001:db8:1::1", DUT_V6, 5003, 53), udp("2001:db8:2::1", DUT_V6, 5004, 53)]
    passing = [udp4(), udp6(), udp("198.19.20.1", DUT_V4, 5005, 53), udp("2001:db8:3::1", DUT_V6, 5006, 53)]
    assert send_and_receive(lab, blocked + passing) == raw(passing)
    cli("block", "del", "198.19.12.0/24", "2001:db8:2::/48")
    assert send_and_receive(lab, blocked) == raw(blocked[1::2])
    for name in arrays:
        fd = obj_get(pins.shared(name))
        try:
            assert not map_info(fd).flags & BPF_F_MMAPABLE, name
        finally:
            os.close(fd)


def _older_instance(cli: Cli, missing: tuple[str, ...]) -> PinRoot:
    """The pins of an instance made by a version without the maps
    ``missing``, with an IPv6 blocklist its own controller wrote (the last
    two changes made without those maps)."""
    pins = PinRoot(cli.pin_root)
    cli("block", "add", "2001:db8:1::/48", "2001:db8:2:3::/64")
    for name in missing:
        os.unlink(pins.shared(name))
    cli("block", "add", "2001:db8:4::/48")
    cli("block", "add", "--dst", "2001:db8:5::9")
    return pins


def test_upgrade_from_before_the_ipv6_arrays_keeps_the_blocklist(lab: Lab, cli: Cli) -> None:
    """An instance pinned by an object from before the IPv6 arrays (its
    deeper regions all in the hash, no bl6_tab pins) upgrades in place: the
    new object's arrays are filled from the rule store before it runs, and
    the next change prunes the hash."""
    pins = _older_instance(cli, ("bl6_tab_src", "bl6_tab_dst"))
    with Map(obj_get(pins.shared("bl6_deep_src")), *abi.MAP_TYPES["bl6_deep_src"], types=abi.ffi) as deep:
        assert len(deep) == 4  # /32 marker, two /48s, /64

    cli("attach", lab.dut_if)
    assert all(os.path.exists(pins.shared(n)) for n in ("bl6_tab_src", "bl6_tab_dst"))
    blocked = [udp("2001:db8:1::1", DUT_V6, 5001, 53), udp("2001:db8:2:3::1", DUT_V6, 5002, 53)]
    blocked.append(udp("2001:db8:4::1", DUT_V6, 5003, 53))
    passing = [udp6(), udp("2001:db8:2:4::1", DUT_V6, 5005, 53)]
    assert send_and_receive(lab, blocked + passing) == raw(passing)
    cli("block", "del", "2001:db8:1::/48")
    assert send_and_receive(lab, blocked[1:] + passing) == raw(passing)
    with Map(obj_get(pins.shared("bl6_deep_src")), *abi.MAP_TYPES["bl6_deep_src"], types=abi.ffi) as deep:
        assert len(deep) == 0
    # the dst rule's regions came through too: its table still answers
    assert ("2001:db8:5::9/128", "dst") in {(r["cidr"], r["direction"]) for r in cli.json("block", "list")}
    listing = {(r["cidr"], r["direction"]): r["hits"] for r in cli.json("block", "list")}
    assert listing[("2001:db8:2:3::/64", "src")] == 2 and listing[("2001:db8:4::/48", "src")] == 2


def test_upgrade_from_before_the_ipv6_l1_slots_keeps_the_blocklist(lab: Lab, cli: Cli) -> None:
    """An instance pinned by an object from before the IPv6 L1 slots (no
    bl6_l1 pins; its program read the filter) upgrades in place: the new
    object's slots are filled from the rule store before it runs, and later
    changes keep them."""
    pins = _older_instance(cli, ("bl6_l1_src", "bl6_l1_dst"))

    cli("attach", lab.dut_if)
    with Map(obj_get(pins.shared("bl6_l1_src")), *abi.MAP_TYPES["bl6_l1_src"], types=abi.ffi) as l1:
        assert sum(1 for v in l1.values() if int(v)) == 3  # 2001::/16's first level: the three /48s
    blocked = [udp("2001:db8:1::1", DUT_V6, 5001, 53), udp("2001:db8:2:3::1", DUT_V6, 5002, 53)]
    blocked.append(udp("2001:db8:4::1", DUT_V6, 5003, 53))
    passing = [udp6(), udp("2001:db8:2:4::1", DUT_V6, 5005, 53), udp("2001:db8:3::1", DUT_V6, 5006, 53)]
    assert send_and_receive(lab, blocked + passing) == raw(passing)
    cli("block", "del", "2001:db8:1::/48")
    assert send_and_receive(lab, blocked[1:] + passing) == raw(passing)
    listing = {(r["cidr"], r["direction"]): r["hits"] for r in cli.json("block", "list")}
    assert listing[("2001:db8:2:3::/64", "src")] == 2 and listing[("2001:db8:4::/48", "src")] == 2
