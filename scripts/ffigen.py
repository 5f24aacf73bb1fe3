"""`make build`: compile the cffi declarations into importable modules.

The libbpf binding's declarations (xdpflow/bindings/libbpf.py CDEF) and the
product's ABI header (bpf/xdpflow.h) become cffi out-of-line ABI-mode
modules: pure Python files holding the parsed types, so no command parses C
(pycparser) at start-up. Nothing is compiled with a C compiler.

    python3 scripts/ffigen.py HEADER
"""

from __future__ import annotations

import os
import sys

import cffi

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from xdpflow.bindings.libbpf import CDEF  # noqa: E402
from xdpflow.dataplane.abi import declarations  # noqa: E402


def main() -> int:
    header = sys.argv[1]
    binding = cffi.FFI()
    binding.cdef(CDEF)
    binding.set_source("xdpflow.bindings._libbpf_ffi", None)
    product = cffi.FFI()
    product.cdef(CDEF)
    with open(header) as f:
        product.cdef(declarations(f.read()))
    product.set_source("xdpflow.dataplane._abi_ffi", None)
    for builder, path in ((binding, "xdpflow/bindings/_libbpf_ffi.py"), (product, "xdpflow/dataplane/_abi_ffi.py")):
        out = os.path.join(ROOT, path)
        tmp = out + ".tmp"
        builder.emit_python_code(tmp)
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
