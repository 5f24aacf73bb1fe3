"""Markers and the root rule for the three test folders.

``unit/`` is pure Python (parsers, encoders, loopback sockets, temp files) and
runs as any user. ``prog/`` (BPF_PROG_TEST_RUN) and ``e2e/`` (namespaces,
veths, the console script) need root; without it they are skipped with a
reason that says so, never mocked. Their fixtures live in their own
conftest.py so a unit run imports nothing that touches the kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NEEDS_ROOT = {"prog": "BPF_PROG_TEST_RUN needs root (CAP_BPF, CAP_SYS_ADMIN)",
              "e2e": "namespace, veth and XDP tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"}  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: the long hostile-frame run (make fuzz)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def _folder(item: pytest.Item) -> str | None:
    try:
        return Path(item.path).resolve().relative_to(HERE).parts[0]
    except ValueError:
        return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        for item in items:
            reason = NEEDS_ROOT.get(_folder(item) or "")
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"{reason}; run as root"))
    if not config.getoption("-m"):
        skip_fuzz = pytest.mark.skip(reason="long run: `make fuzz`")
        for item in items:
            if "fuzz" in item.keywords:
                item.add_marker(skip_fuzz)
