"""The shared header against the loaded object: every map's key and value
size and the map set (struct padding: unit/test_abi_header.py)."""

from __future__ import annotations

import pytest

from xdpflow.bindings.libbpf import (
    BPF_MAP_TYPE_LRU_HASH,
    BPF_MAP_TYPE_LRU_PERCPU_HASH,
    BPF_MAP_TYPE_RINGBUF,
    lib,
    map_info,
)
from xdpflow.dataplane import abi
from xdpflow.dataplane.abi import ffi

from .. import frames

# loaded programs from a pool shared by the session, reset before each test (frames.py)
prog_pool_fixture = frames.prog_pool_fixture
prog_fixture = frames.prog_fixture
make_prog_fixture = frames.make_prog_fixture

# maps of the object that have no Python key/value types, on purpose
UNTYPED = {"events"}  # a ring buffer: no keys, no values


def _object_maps(prog) -> dict[str, object]:
    return {name: map_info(lib.bpf_map__fd(spec._p)) for name, spec in prog.obj.maps.items()}


@pytest.mark.parametrize("name", sorted(abi.MAP_TYPES))
def test_python_types_match_loaded_map(prog, name):
    key, value = abi.MAP_TYPES[name]
    m = prog.map(name)  # raises if the sizes disagree
    assert (ffi.sizeof(key), ffi.sizeof(value)) == (m.info.key_size, m.info.value_size)
    info = _object_maps(prog)[name]
    assert (info.key_size, info.value_size) == (m.info.key_size, m.info.value_size)


def test_every_map_has_types(prog):
    maps = _object_maps(prog)
    internal = {n for n in maps if n.startswith(".") or "." in n}  # .rodata: the knobs
    assert set(maps) - internal - UNTYPED == set(abi.MAP_TYPES)
    assert set(abi.MAP_TYPES) <= set(maps)


def test_knobs_are_the_whole_rodata(prog):
    (rodata,) = [info for n, info in _object_maps(prog).items() if n.endswith(".rodata")]
    assert rodata.value_size == ffi.sizeof("struct xf_knobs")


def test_events_ring(prog):
    info = _object_maps(prog)["events"]
    assert (info.type, info.max_entries) == (BPF_MAP_TYPE_RINGBUF, abi.C.XF_EVENTS_BYTES)


def test_counters_cover_every_counter(prog):
    assert ffi.sizeof("struct xf_counters") == abi.C.XF_CNT_MAX * ffi.sizeof("struct xf_datarec")
    assert sorted(abi.COUNTER_NAMES) == list(range(abi.C.XF_CNT_MAX))
    assert set(prog.counters()) == {n for name in abi.COUNTER_NAMES.values() for n in (name, abi.bytes_key(name))}


@pytest.mark.parametrize(
    ("opts", "maptype", "size"),
    [
        ({}, BPF_MAP_TYPE_LRU_HASH, abi.C.XF_FLOWS_DEFAULT),
        ({"flows": 64}, BPF_MAP_TYPE_LRU_HASH, 32),  # --flows counts both tables
        ({"shared_flows": False}, BPF_MAP_TYPE_LRU_PERCPU_HASH, abi.C.XF_FLOWS_DEFAULT),
    ],
    ids=["default", "flows-64", "percpu"],
)
def test_flow_tables_follow_options(make_prog, opts, maptype, size):
    prog = make_prog(**opts)
    for name in ("flows_v4", "flows_v6"):
        m = prog.map(name)
        assert (m.info.type, m.info.max_entries) == (maptype, size)
        assert m.percpu == (maptype == BPF_MAP_TYPE_LRU_PERCPU_HASH)
