"""How many entries xdpflow's tables hold, counted without decoding them.

What `status` and the metrics show. Nothing here imports numpy (~100 ms to
load): a command that only counts starts fast. The flow tables are counted
by the kernel itself where it can (bpf/count.bpf.c); the rule store's tries
keep no count: their writer leaves one (struct xf_bl_count), and where it is
not valid their entries are read in batches and only counted.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

from xdpflow.bindings.libbpf import Map, Object
from xdpflow.dataplane import abi
from xdpflow.dataplane.maps import open_map
from xdpflow.dataplane.pins import PinRoot
from xdpflow.errors import XdpflowError


def count_flows(pins: PinRoot, ifname: str) -> tuple[int, int]:
    """(entries, capacity) over both flow tables of ``ifname``: the count the
    kernel keeps (bpf/count.bpf.c), or, on a kernel without it, by reading
    the tables. Raises NotAttachedError, XdpflowError."""
    with open_map(pins, "flows_v4", ifname) as m4, open_map(pins, "flows_v6", ifname) as m6:
        cap = m4.info.max_entries + m6.info.max_entries
        counted = kernel_counts(m4, m6)
        if counted is not None:
            return sum(counted), cap
        return count_entries(m4) + count_entries(m6), cap


def kernel_counts(a: Map, b: Map) -> tuple[int, int] | None:
    """The entries of two hash maps as the kernel counts them (kfunc
    bpf_map_sum_elem_count, Linux 6.6+), or None where the kernel cannot."""
    obj = Object(abi.object_path("count"))
    try:
        obj.map_spec("table_a").reuse_fd(a.fd)
        obj.map_spec("table_b").reuse_fd(b.fd)
        obj.load()
        with obj.program("xdpflow_count") as prog:
            out = prog.test_run(bytes(64), repeat=1).data
    except OSError:
        return None  # no such kfunc here (or no BTF): the caller reads the tables
    finally:
        obj.close()
    n4, n6 = struct.unpack_from("<qq", out)
    return n4, n6


def count_entries(m: Map) -> int:
    """The entries of a hash or trie map: read in batches and counted (one
    key at a time where the kernel has no batch reads). Raises XdpflowError."""
    raw = m.lookup_batch_raw(chunk=65536)
    return raw[2] if raw is not None else len(m)


def count_rules(open_map: Callable[[str], Map]) -> int:
    """The blocklist's rules (``open_map`` as ``Blocklist`` takes it): the
    count its writer left, while that is valid for the rules in force (see
    struct xf_bl_count), else the entries of its four tries. Raises
    XdpflowError."""
    try:
        counted = open_map("bl_count")[0]
    except XdpflowError as e:
        if e.errno != errno.ENOENT:
            raise
    else:
        if counted.valid and counted.generation == open_map("config")[0].generation:
            return int(counted.rules)
    return sum(count_entries(open_map(trie)) for trie, _flag in abi.BLOCKLIST_TRIES.values())


def rule_capacity(open_map: Callable[[str], Map]) -> tuple[int, int]:
    """(rules per family and direction, rules in all) the blocklist holds."""
    return open_map("bl4_src").info.max_entries, open_map("rule_hits").info.max_entries
