"""Which completions leave a feedback mapping (models.<name>.feedback_sample), and the A/B buffers
kept while the shared Redis breaker skips Redis. In process memory, injected clock."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import orjson
import pytest

from proxy import errors
from proxy.auth.authenticator import Principal
from proxy.experiments.aggregates import ExperimentStore, Sample, feedback_sampled
from proxy.experiments.store import Fields, MemoryBackend
from proxy.redis import RedisUnavailable
from proxy.settings import ModelSettings, ObservabilitySettings

T0 = 1_700_000_000.0


def clock() -> float:
    return T0


def sample(model: str) -> Sample:
    return Sample(model, "control", 200, False, False, False, 10, 20, 0.5, 0.1)


ALICE = Principal("alice", "acme", "default", None, MappingProxyType({}))


def test_feedback_is_off_unless_a_model_asks_for_it_and_kept_an_hour() -> None:
    variant = {"name": "a", "weight": 1, "backends": ["b"]}
    assert ModelSettings.model_validate({"variants": [variant]}).feedback_sample == 0
    assert ObservabilitySettings().feedback_ttl_s == 3600


async def test_only_models_that_collect_feedback_leave_a_mapping() -> None:
    store = ExperimentStore("", ObservabilitySettings(), feedback={"rated": 1.0, "quiet": 0.0}, clock=clock)
    store.remember("chatcmpl-1", sample("rated"), ALICE)
    store.remember("chatcmpl-2", sample("quiet"), ALICE)
    store.remember("chatcmpl-3", sample("unconfigured"), ALICE)
    assert list(store._ids) == ["chatcmpl-1"]
    with pytest.raises(errors.NotFound) as info:
        await store.feedback(ALICE, orjson.dumps({"id": "chatcmpl-2", "score": 1}))
    assert "does not collect feedback" in info.value.message
    assert (await store.feedback(ALICE, orjson.dumps({"id": "chatcmpl-1", "score": 1})))["replaced"] is False
    await store.close()


def test_sampling_is_a_pure_function_of_the_id_at_the_configured_share() -> None:
    ids = [f"chatcmpl-{i:06d}" for i in range(20_000)]
    kept = [cid for cid in ids if feedback_sampled(cid, 0.1)]
    assert 0.09 < len(kept) / len(ids) < 0.11
    assert kept == [cid for cid in ids if feedback_sampled(cid, 0.1)]  # every replica agrees
    assert set(kept) <= {cid for cid in ids if feedback_sampled(cid, 0.5)}  # a larger share keeps these too
    assert all(feedback_sampled(cid, 1.0) for cid in ids[:100])
    assert not any(feedback_sampled(cid, 0.0) for cid in ids[:100])


class SkippingBackend(MemoryBackend):
    """Redis skipped by its breaker for the first `skips` calls of each kind: nothing is sent."""

    def __init__(self, skips: int) -> None:
        super().__init__(ObservabilitySettings(), clock)
        self.skips = {"apply": skips, "remember": skips}

    def _skip(self, kind: str) -> None:
        if self.skips[kind] > 0:
            self.skips[kind] -= 1
            raise RedisUnavailable("skipped")

    async def apply(self, batch: dict[int, dict[str, Fields]]) -> None:
        self._skip("apply")
        await super().apply(batch)

    async def remember_many(self, records: dict[str, dict[str, str]]) -> None:
        self._skip("remember")
        await super().remember_many(records)


async def test_buffers_are_kept_while_redis_is_skipped_and_counted_once_after() -> None:
    backend = SkippingBackend(skips=2)
    store = ExperimentStore("", ObservabilitySettings(), feedback={"m": 1.0}, clock=clock, backend=backend)
    store.record(sample("m"))
    store.remember("chatcmpl-1", sample("m"), ALICE)
    await store.flush()  # skipped: kept
    store.record(sample("m"))
    await store.flush()  # skipped again: both requests still kept
    assert store.stats.flush_errors == 0 and store.stats.mapping_errors == 0
    await store.flush()
    counts: Any = (await store.read(3600))["m"]["control"]
    assert counts.get("n") == 2 and store._buffer == {} and store._ids == {}
    assert await backend.lookup("chatcmpl-1") is not None
    await store.close()
