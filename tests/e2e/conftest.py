"""Fixtures shared by the end-to-end modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtest.vllm_sim import SimulatorThread


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    """A vLLM simulator per test module (modules reconfigure it freely)."""
    with SimulatorThread() as s:
        yield s


@pytest.fixture(autouse=True)
def _reset_sim(sim: SimulatorThread) -> Iterator[None]:
    """Each test starts and ends with the simulator's default behaviour and no records."""
    sim.reset()
    yield
    sim.reset()


@pytest.fixture(scope="module")
def spare() -> Iterator[SimulatorThread]:
    """A second simulator for modules that test falling over to another backend."""
    with SimulatorThread() as s:
        yield s


@pytest.fixture(autouse=True)
def _reset_spare(request: pytest.FixtureRequest) -> Iterator[None]:
    """The spare too starts and ends each test in its default state, where a module uses it."""
    if "spare" not in request.fixturenames:
        yield
        return
    spare: SimulatorThread = request.getfixturevalue("spare")
    spare.reset()
    yield
    spare.reset()
