"""The kernel/user ABI, read from the one shared header.

``bpf/xdpflow.h`` is the single definition of every struct and constant the
XDP program and the controller exchange. It ships inside the package (next to
the compiled objects) and is declared to cffi here at import time, so Python
never writes a byte offset of its own. ``MAP_TYPES`` says which header type is
the key and value of each map; a test checks those sizes against the maps of
the loaded object.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from xdpflow.bindings import libbpf

BPF_DIR = resources.files("xdpflow") / "bpf"
HEADER = BPF_DIR / "xdpflow.h"

# cffi takes declarations and "#define NAME <int>"; every other preprocessor
# line (include guards, includes) means nothing to it and is dropped.
_DEFINE = re.compile(r"^#define\s+(XF_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b")


def declarations(text: str) -> str:
    """The header as cffi takes it."""
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            m = _DEFINE.match(line.strip())
            if m:
                out.append(f"#define {m.group(1)} {m.group(2)}")
            continue
        out.append(line)
    return "\n".join(out)


def _load_ffi() -> Any:
    try:
        # compiled from this header by `make build` (scripts/ffigen.py)
        from xdpflow.dataplane._abi_ffi import ffi as built  # type: ignore[import-not-found]

        return built
    except ImportError:
        return libbpf.declare_types(declarations(HEADER.read_text()))


# The header's types live in this FFI of their own (the binding's stays as
# it is); maps and structs of the product are made through it.
ffi = _load_ffi()
C = ffi.dlopen(None)  # gives access to the header's enums and #defines

# map name -> (key type, value type), for every map the program defines
MAP_TYPES: dict[str, tuple[str, str]] = {
    "counters": ("__u32", "struct xf_counters"),
    "flows_v4": ("struct xf_flow4", "struct xf_flow_val"),
    "flows_v6": ("struct xf_flow6", "struct xf_flow_val"),
    "admission": ("__u32", "struct xf_admission"),
    "config": ("__u32", "struct xf_config"),
    "bl_count": ("__u32", "struct xf_bl_count"),
    "bl4_src": ("struct xf_lpm4", "__u32"),
    "bl4_dst": ("struct xf_lpm4", "__u32"),
    "bl6_src": ("struct xf_lpm6", "__u32"),
    "bl6_dst": ("struct xf_lpm6", "__u32"),
    "bl4_l1_src": ("__u32", "__u32"),
    "bl4_l2c_src": ("__u32", "__u32"),
    "bl4_l2_src": ("__u32", "__u32"),
    "bl4_l3_src": ("__u32", "__u32"),
    "bl4_l2h_src": ("__u32", "__u32"),
    "bl4_l3c_src": ("__u32", "__u32"),
    "bl4_l1_dst": ("__u32", "__u32"),
    "bl4_l2c_dst": ("__u32", "__u32"),
    "bl4_l2_dst": ("__u32", "__u32"),
    "bl4_l3_dst": ("__u32", "__u32"),
    "bl4_l2h_dst": ("__u32", "__u32"),
    "bl4_l3c_dst": ("__u32", "__u32"),
    "bl6_l0_src": ("__u32", "__u32"),
    "bl6_tab_src": ("__u32", "struct xf_bl6_bucket"),
    "bl6_deep_src": ("struct xf_bl6_key", "__u32"),
    "bl6_pf_src": ("__u32", "__u64"),
    "bl6_l1_src": ("__u32", "__u64"),
    "bl6_l0_dst": ("__u32", "__u32"),
    "bl6_tab_dst": ("__u32", "struct xf_bl6_bucket"),
    "bl6_deep_dst": ("struct xf_bl6_key", "__u32"),
    "bl6_pf_dst": ("__u32", "__u64"),
    "bl6_l1_dst": ("__u32", "__u64"),
    "rule_hits": ("__u32", "__u64"),
    "event_budget": ("__u32", "struct xf_ratelimit"),
    "next_prog": ("__u32", "__u32"),  # a program array: fds in, ids out
    "rl_head": ("__u32", "struct xf_rule_head"),
    "rl_pool": ("__u32", "struct xf_rule_pool"),
    "rl_sport": ("__u32", "struct xf_rule_tport"),
    "rl_dport": ("__u32", "struct xf_rule_tport"),
    "rl_proto": ("__u32", "struct xf_rule_t16"),
    "rl_len": ("__u32", "struct xf_rule_t16"),
    "rl_l1": ("__u32", "struct xf_rule_tl1"),
    "rl_c24": ("__u32", "struct xf_rule_tchunk"),
    "rl_c32": ("__u32", "struct xf_rule_tchunk"),
    "rl_act": ("__u32", "struct xf_rule_act"),
    "rule_defs": ("__u32", "struct xf_rule_def"),
    "rl_addr": ("struct xf_raddr_key", "__u64"),
    "rl_iface": ("struct xf_riface_key", "__u64"),
    "rule_counters": ("__u32", "struct xf_rule_cnt"),
    "rl_gcra": ("__u32", "struct xf_rate_set"),
    "prot_l1": ("__u32", "__u32"),
    "prot_head": ("__u32", "struct xf_prot_head"),
    "prot_pf": ("__u32", "__u64"),
    "prot_addr": ("struct xf_paddr_key", "__u32"),
    "prot_hosts": ("__u32", "struct xf_host_slot"),
    "prot_overflow": ("__u32", "struct xf_host_cnt"),
}

# counter index -> the name used in stats output and metrics
COUNTER_NAMES: dict[int, str] = {
    C.XF_CNT_PACKETS: "packets",
    C.XF_CNT_PASSED: "passed",
    C.XF_CNT_DROPPED: "dropped",
    C.XF_CNT_SUNK: "sunk",
    C.XF_CNT_MONITORED: "monitored",
    C.XF_CNT_PARSE_ERRORS: "parse_errors",
    C.XF_CNT_NON_IP: "non_ip",
    C.XF_CNT_IPV4: "ipv4",
    C.XF_CNT_IPV6: "ipv6",
    C.XF_CNT_TCP: "tcp",
    C.XF_CNT_UDP: "udp",
    C.XF_CNT_ICMP: "icmp",
    C.XF_CNT_OTHER: "other",
    C.XF_CNT_FLOW_INSERT_FAILED: "flow_insert_failed",
    C.XF_CNT_EVENTS_SUPPRESSED: "events_suppressed",
    C.XF_CNT_EVENTS_LOST: "events_lost",
}
assert len(COUNTER_NAMES) == C.XF_CNT_MAX, "name every counter in bpf/xdpflow.h"


def bytes_key(name: str) -> str:
    """The key of a counter's bytes in `stats --json`: "bytes" for the total
    ("packets"), "<name>_bytes" for the others."""
    return "bytes" if name == "packets" else f"{name}_bytes"


# every frame is counted in exactly one of these: their sum is the total,
# which the program does not keep (a counter less per frame)
CLASSES = (C.XF_CNT_PARSE_ERRORS, C.XF_CNT_NON_IP, C.XF_CNT_IPV4, C.XF_CNT_IPV6)


def counter_dict(total: Any) -> dict[str, int]:
    """A summed ``struct xf_counters`` as ``{name: packets, bytes_key(name): bytes}``."""
    out = {name: int(total.c[idx].packets) for idx, name in COUNTER_NAMES.items()}
    out.update({bytes_key(name): int(total.c[idx].bytes) for idx, name in COUNTER_NAMES.items()})
    out["packets"] = sum(int(total.c[idx].packets) for idx in CLASSES)
    out["bytes"] = sum(int(total.c[idx].bytes) for idx in CLASSES)
    return out


# fields the program stores in network byte order
_NET_ORDER = {"saddr", "daddr", "sport", "dport"}


def np_dtype(ctype: str, itemsize: int | None = None) -> Any:
    """A numpy dtype laid out exactly like the header struct ``ctype``
    (offsets from cffi; address and port fields big-endian)."""
    import numpy as np  # only readers of whole tables need numpy

    t = ffi.typeof(ctype)
    names, formats, offsets = [], [], []
    for name, field in t.fields:
        ft = field.type
        order = ">" if name in _NET_ORDER else "<"
        if ft.kind == "array":
            fmt: Any = (f"{order}u{ffi.sizeof(ft.item)}", ft.length)
        else:
            fmt = f"{order}u{ffi.sizeof(ft)}"
        names.append(name)
        formats.append(fmt)
        offsets.append(field.offset)
    size = itemsize or ffi.sizeof(t)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": size})


def object_path(name: str = "xdpflow") -> str:
    """Filesystem path of a compiled object shipped in the package."""
    return str(BPF_DIR / f"{name}.bpf.o")


# `attach --flows` default: the IPv4 and IPv6 tables together (the header's
# XF_FLOWS_DEFAULT is one table's); here, not in lifecycle, so the CLI's
# help shows it without importing the loader
FLOWS_DEFAULT = 2 * C.XF_FLOWS_DEFAULT
# new flows per CPU per second before frames go untracked (0: unlimited)
FLOW_BUDGET_DEFAULT = C.XF_FLOW_BUDGET_DEFAULT
FLOW_BUDGET_MAX = 2**32 - 1

# the blocklist's rule store: (family, direction) -> (the LPM trie holding
# those rules, the config flag that says it is not empty)
BLOCKLIST_TRIES: dict[tuple[int, str], tuple[str, int]] = {
    (4, "src"): ("bl4_src", C.XF_CFG_BL4_SRC),
    (4, "dst"): ("bl4_dst", C.XF_CFG_BL4_DST),
    (6, "src"): ("bl6_src", C.XF_CFG_BL6_SRC),
    (6, "dst"): ("bl6_dst", C.XF_CFG_BL6_DST),
}
