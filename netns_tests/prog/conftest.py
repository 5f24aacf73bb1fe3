"""Fixtures for BPF_PROG_TEST_RUN tests: programs loaded with private maps."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..progtest import ProgHarness


@pytest.fixture
def prog() -> Iterator[ProgHarness]:
    """xdpflow loaded with private maps, for BPF_PROG_TEST_RUN."""
    h = ProgHarness()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def make_prog() -> Iterator:
    """Factory for harnesses with non-default knobs: make_prog(sink=True)."""
    made: list[ProgHarness] = []

    def make(**opts: object) -> ProgHarness:
        h = ProgHarness(**opts)
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.close()
