"""The flow count `status` shows comes from the kernel's own count of each
table (bpf/count.bpf.c): it must equal the entries, through inserts, LRU
evictions and deletes, for both kinds of flow table."""

from __future__ import annotations

import pytest

from xdpflow.dataplane.flows import kernel_counts

from ..frames import raw_udp4
from ..progtest import ProgHarness

SRC = 0xC6120000  # 198.18.0.0


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-cpu"])
def test_kernel_count_equals_entries(shared: bool) -> None:
    h = ProgHarness(flows=2048, shared_flows=shared)
    try:
        v4, v6 = h.map("flows_v4"), h.map("flows_v6")
        assert kernel_counts(v4, v6) == (0, 0)
        for n in (10, 500, 5000):  # the last far past the 1,024-slot table: the LRU evicts
            for i in range(n):
                h.run(raw_udp4(SRC + 1 + i % 250, SRC + 0x10000 + 2, 1024 + i, 53))
            assert kernel_counts(v4, v6) == (len(v4), len(v6)), n
        for k in list(v4.keys())[:100]:
            del v4[k]
        assert kernel_counts(v4, v6) == (len(v4), 0)
        v4.clear()
        assert kernel_counts(v4, v6) == (0, 0)
    finally:
        h.close()
