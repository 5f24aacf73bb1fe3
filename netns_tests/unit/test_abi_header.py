"""The shared header as Python reads it: every struct laid out with explicit
padding, no byte left to the compiler. (Sizes against the loaded object:
prog/test_prog_abi.py.)"""

from __future__ import annotations

import re

import pytest

from xdpflow.dataplane import abi
from xdpflow.dataplane.abi import ffi


def _header_structs() -> list[str]:
    return sorted(set(re.findall(r"^struct (xf_\w+) \{", abi.HEADER.read_text(), re.M)))


@pytest.mark.parametrize("struct", _header_structs())
def test_structs_have_no_hidden_padding(struct):
    """Every byte of a shared struct is a named field (explicit padding)."""
    t = ffi.typeof(f"struct {struct}")
    assert sum(ffi.sizeof(f.type) for _n, f in t.fields) == ffi.sizeof(t)
    end = 0
    for _n, f in t.fields:
        assert f.offset == end, f"hole before {_n}"
        end = f.offset + ffi.sizeof(f.type)
