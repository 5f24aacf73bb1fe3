"""Markers and the root rule for the three test folders.

``unit/`` is pure Python (parsers, encoders, loopback sockets, temp files) and
runs as any user. ``prog/`` (BPF_PROG_TEST_RUN) and ``e2e/`` (namespaces,
veths, the console script) need root; without it they are skipped with a
reason that says so, never mocked. Their fixtures live in their own
conftest.py so a unit run imports nothing that touches the kernel.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NEEDS_ROOT = {"prog": "BPF_PROG_TEST_RUN needs root (CAP_BPF, CAP_SYS_ADMIN)",
              "e2e": "namespace, veth and XDP tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"}  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuzz: the long hostile-frame run (make fuzz)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    # A cancelled CI job, or timeout(1), ends the run with SIGTERM, which by
    # default kills pytest before any fixture's teardown: namespaces, veths
    # and pin roots would stay behind. As an interrupt, pytest stops and
    # tears every fixture down; later SIGTERMs wait for that to finish.
    global _pytest_pid
    _pytest_pid = os.getpid()
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)


_pytest_pid = 0


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    if os.getpid() != _pytest_pid:
        # a forked child (a traffic generator, say) dies as it would have
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


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
