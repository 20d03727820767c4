"""Fixtures shared by the component modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtest.vllm_sim import SimulatorThread


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[SimulatorThread]:
    with SimulatorThread() as sim:
        yield sim


@pytest.fixture
def sim(shared_sim: SimulatorThread) -> Iterator[SimulatorThread]:
    """The module's simulator, reset before and after each test."""
    shared_sim.reset()
    yield shared_sim
    shared_sim.reset()
