"""A/B aggregates and feedback in process memory (the Redis layout is exercised end to end)."""

from __future__ import annotations

from types import MappingProxyType, SimpleNamespace
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy import errors
from proxy.auth.authenticator import Principal
from proxy.call import Call
from proxy.experiments.aggregates import ExperimentStore, Sample, parse_feedback, sample_fields
from proxy.experiments.report import bucket_of
from proxy.observability.observer import Observer
from proxy.settings import ObservabilitySettings

T0 = 1_700_000_000.0  # a minute boundary is at T0 - 20 (1_699_999_980)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _principal(sub: str, tenant: str | None = None) -> Principal:
    return Principal(sub, tenant or sub, "default", None, MappingProxyType({}))


def _sample(**kw: Any) -> Sample:
    base: dict[str, Any] = dict(
        model="assistant",
        variant="control",
        status=200,
        blocked=False,
        cache_hit=False,
        disconnected=False,
        prompt_tokens=10,
        completion_tokens=20,
        latency_s=0.5,
        ttft_s=0.1,
    )
    return Sample(**{**base, **kw})


def _store(clock: Clock, feedback: float = 1.0, **settings: Any) -> ExperimentStore:
    """A store in process memory where `feedback` of model "assistant"'s completions can be rated."""
    return ExperimentStore("", ObservabilitySettings(**settings), feedback={"assistant": feedback}, clock=clock)


def _body(**kw: Any) -> bytes:
    return orjson.dumps(kw)


# -- what a request contributes --------------------------------------------------------------------------
def test_fields_of_a_complete_answer() -> None:
    f = sample_fields(_sample())
    assert f == {
        "n": 1,
        "tin": 10,
        "tout": 20,
        f"lat:{bucket_of(0.5)}": 1,
        f"ttft:{bucket_of(0.1)}": 1,
        "tps_n": 1,
        "tps_s": 40.0,
        "tps_q": 1600.0,
    }


@pytest.mark.parametrize(
    ("kw", "flags"),
    [
        ({"status": 502, "completion_tokens": 0}, {"err"}),
        ({"status": 400, "blocked": True, "completion_tokens": 0, "ttft_s": None}, {"blk"}),
        ({"status": 429, "completion_tokens": 0}, set()),  # a client-side refusal is not a variant error
        ({"disconnected": True}, {"disc"}),
    ],
)
def test_failed_requests_count_but_add_no_latency(kw: dict[str, Any], flags: set[str]) -> None:
    f = sample_fields(_sample(**kw))
    assert f["n"] == 1
    assert {k for k in ("err", "blk", "hit", "disc") if k in f} == flags
    assert not any(k.startswith(("lat:", "ttft:", "tps_")) for k in f)


def test_cache_hits_count_latency_but_not_tokens_per_second() -> None:
    f = sample_fields(_sample(cache_hit=True))
    assert f["hit"] == 1 and f"lat:{bucket_of(0.5)}" in f
    assert "tps_n" not in f


# -- feedback bodies ----------------------------------------------------------------------------------------
def test_parse_feedback_accepts_the_documented_shape() -> None:
    fb = parse_feedback(_body(id="chatcmpl-1", score=-1, comment="too long"), "thumbs")
    assert (fb.id, fb.score, fb.comment) == ("chatcmpl-1", -1.0, "too long")
    assert parse_feedback(_body(id="x", score=4.5), "stars").score == 4.5


@pytest.mark.parametrize(
    ("raw", "scale", "param"),
    [
        (b"{", "thumbs", None),
        (b"[1]", "thumbs", None),
        (_body(score=1), "thumbs", "id"),
        (_body(id="x"), "thumbs", "score"),
        (_body(id="x", score=2), "thumbs", "score"),
        (_body(id="x", score=-0.5), "stars", "score"),
        (_body(id="x", score=6), "stars", "score"),
        (_body(id="x", score=True), "thumbs", "score"),
        (_body(id="x", score="1"), "thumbs", "score"),
        (_body(id="", score=1), "thumbs", "id"),
        (_body(id="x", score=1, variant="b"), "thumbs", "variant"),
        (_body(id="x", score=1, comment="c" * 2001), "thumbs", "comment"),
    ],
)
def test_parse_feedback_refuses_bad_bodies(raw: bytes, scale: str, param: str | None) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        parse_feedback(raw, scale)
    assert exc.value.status == 400 and exc.value.param == param


# -- aggregates over time ---------------------------------------------------------------------------------
async def test_counts_are_buffered_flushed_and_read_by_window() -> None:
    clock = Clock(T0 - 3 * 3600)  # three hours ago
    store = _store(clock)
    store.record(_sample(variant="old"))
    await store.flush()
    clock.now = T0
    for s in (
        _sample(),
        _sample(status=503, completion_tokens=0),
        _sample(variant="candidate", blocked=True),
    ):
        store.record(s)
    last_hour = await store.read(3600)
    assert set(last_hour["assistant"]) == {"control", "candidate"}  # "old" is outside the window
    control = last_hour["assistant"]["control"]
    assert (control.get("n"), control.get("err"), control.get("tout")) == (2, 1, 20)
    assert control.lat == {bucket_of(0.5): 1}
    assert last_hour["assistant"]["candidate"].get("blk") == 1
    assert "old" in (await store.read(4 * 3600))["assistant"]
    assert (await store.read(3600, model="other")) == {}
    await store.close()


async def test_model_names_with_separators_survive() -> None:
    store = _store(Clock())
    store.record(_sample(model="team|assistant"))
    assert (await store.read(60))["team|assistant"]["control"].get("n") == 1
    await store.close()


async def test_a_failed_flush_is_counted_dropped_and_never_raised() -> None:
    store = _store(Clock())

    async def broken(_batch: Any) -> None:
        raise RedisConnectionError("down")

    store._backend.apply = broken  # type: ignore[method-assign]
    store.record(_sample())
    await store.flush()
    assert store.stats.flush_errors == 1 and store.stats.flushes == 0
    assert store._buffer == {}  # dropped rather than risk counting twice
    await store.close()


# -- feedback ---------------------------------------------------------------------------------------------
async def test_feedback_is_owned_mapped_and_last_write_wins() -> None:
    store, alice = _store(Clock()), _principal("alice")
    sample = _sample(variant="candidate")
    store.record(sample)
    store.remember("chatcmpl-9", sample, alice)  # not flushed yet: feedback flushes it first
    with pytest.raises(errors.PermissionDenied) as denied:
        await store.feedback(_principal("bob"), _body(id="chatcmpl-9", score=1))
    assert denied.value.status == 403
    with pytest.raises(errors.PermissionDenied):  # same sub in another tenant is another caller
        await store.feedback(_principal("alice", "other-tenant"), _body(id="chatcmpl-9", score=1))
    with pytest.raises(errors.NotFound) as missing:
        await store.feedback(alice, _body(id="chatcmpl-unknown", score=1))
    assert missing.value.status == 404
    first = await store.feedback(alice, _body(id="chatcmpl-9", score=1, comment="good"))
    assert first == {"object": "feedback", "id": "chatcmpl-9", "score": 1.0, "replaced": False}
    second = await store.feedback(alice, _body(id="chatcmpl-9", score=-1))
    assert second["replaced"] is True
    agg = (await store.read(3600))["assistant"]["candidate"]
    assert (agg.get("fb_n"), agg.get("fb_s"), agg.get("fb_q")) == (1, -1.0, 1.0)
    await store.close()


async def test_feedback_expires_with_its_mapping() -> None:
    clock = Clock()
    store, alice = _store(clock, feedback_ttl_s=60), _principal("alice")
    store.remember("chatcmpl-1", _sample(), alice)
    await store.flush()  # the mapping is written at T0
    clock.now += 61
    with pytest.raises(errors.NotFound):
        await store.feedback(alice, _body(id="chatcmpl-1", score=1))
    await store.close()


async def test_ids_that_cannot_be_keys_are_not_mapped() -> None:
    store = _store(Clock())
    store.remember(None, _sample(), _principal("a"))
    store.remember("x" * 257, _sample(), _principal("a"))
    assert store._ids == {}
    await store.close()


# -- the Observer feeds the store ---------------------------------------------------------------------
async def test_observer_records_a_finished_call_and_maps_its_completion() -> None:
    settings = ObservabilitySettings(log_format="json")
    observer = Observer(settings, multiprocess_mode=False)
    store = ExperimentStore("", settings, feedback={"assistant": 1.0})
    await observer.start(SimpleNamespace(), store)  # type: ignore[arg-type]
    alice = _principal("alice")
    call = Call(
        request_id="req_1",
        started=0.0,
        principal=alice,
        model="assistant",
        variant="b",
        backend="gpu",
        completion_id="chatcmpl-7",
        completion_tokens=3,
    )
    observer.finish(call)
    observer.finish(Call(request_id="req_2", started=0.0, model="no-such-model", status=404))
    data = await observer.experiments.read(3600)
    assert list(data) == ["assistant"] and data["assistant"]["b"].get("n") == 1
    assert (await observer.experiments.feedback(alice, _body(id="chatcmpl-7", score=1)))["replaced"] is False
    await observer.close()
