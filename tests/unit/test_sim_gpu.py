"""The simulator's GPU engine on virtual time: prefix reuse, LRU eviction, cache_salt, scheduling
order, the token budget, preemption and step costs."""

from __future__ import annotations

import pytest

from loadtest.sim_gpu import Engine, GpuParams, KVCache, Seq, block_hashes, render_prompt, text_pieces

BS = 16


def make_seq(tokens: list[str], out_len: int = 4, *, salt: str | None = None, priority: int = 0) -> Seq:
    out = [f"o{i}" for i in range(out_len)]
    return Seq(len(tokens), out_len, block_hashes([*tokens, *out], BS, salt), priority=priority)


def words(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


class Clock:
    """Drives an engine step by step, recording when each sequence got its tokens."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.now = engine, 0.0
        self.first: dict[Seq, float] = {}
        self.done: dict[Seq, float] = {}
        self.steps: list[float] = []

    def step(self) -> bool:
        duration = self.engine.plan_step()
        if duration is None:
            return False
        self.now += duration
        self.steps.append(duration)
        for seq in self.engine.finish_step():
            self.first.setdefault(seq, self.now)
            if seq.state == "finished":
                self.done[seq] = self.now
        return True

    def run(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            if not self.step():
                return
        raise AssertionError("engine never went idle")

    def ttft(self, seq: Seq, start: float = 0.0) -> float:
        return self.first[seq] - start


def test_pieces_are_lossless_words_and_cjk_characters() -> None:
    text = "Hello, world!  你好世界 ok"
    pieces = text_pieces(text)
    assert "".join(pieces) == text
    assert pieces == ("Hello,", " world!", "  你", "好", "世", "界", " ok")


def test_a_turn_and_its_answer_are_a_prefix_of_the_next_turn() -> None:
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好 there"}]
    answer = "Simulated answer to: 你好"
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "more"}]
    p1, p2 = render_prompt(first), render_prompt(second)
    assert p2[: len(p1) + len(text_pieces(answer))] == [*p1, *text_pieces(answer)]
    hashes1 = block_hashes([*p1, *text_pieces(answer)], 4, "t")
    assert block_hashes(p2, 4, "t")[: len(hashes1)] == hashes1


def test_block_hashes_chain_and_salt() -> None:
    a = block_hashes(words("x", 40), BS, None)
    assert len(a) == 2  # the partial third block has no hash
    b = block_hashes(words("x", 16) + words("y", 16), BS, None)
    assert a[0] == b[0] and a[1] != b[1]
    assert set(block_hashes(words("x", 40), BS, "tenant-a")).isdisjoint(a)
    assert block_hashes(words("x", 40), BS, "tenant-a") == block_hashes(words("x", 40), BS, "tenant-a")


def test_prefix_reuse_shortens_the_second_prefill_and_counts_hits() -> None:
    params = GpuParams(num_blocks=1000, prefill_tok_s=10_000, step_ms=5, step_ms_per_seq=0)
    engine = Engine(params)
    clock = Clock(engine)
    prompt = [*words("sys", 1000), "q"]
    first = make_seq(prompt)
    engine.add(first)
    clock.run()
    assert engine.stats.prefix_hits == 0
    second = make_seq([*prompt[:-1], "other", "question"])
    start = clock.now
    engine.add(second)
    clock.run()
    cached = (1000 // BS) * BS  # every full block of the shared 1000 tokens
    assert second.cached_tokens == engine.stats.prefix_hits == cached
    assert engine.stats.prefix_queries == len(prompt) + len(prompt) + 1
    assert clock.ttft(first) == pytest.approx(0.005 + 1001 / 10_000)
    assert clock.ttft(second, start) == pytest.approx(0.005 + (1002 - cached) / 10_000)


def test_identical_prompt_recomputes_its_last_token() -> None:
    engine = Engine(GpuParams(num_blocks=100))
    clock = Clock(engine)
    prompt = words("p", 64)  # exactly four blocks
    engine.add(make_seq(prompt))
    clock.run()
    again = make_seq(prompt)
    engine.add(again)
    clock.run()
    assert again.cached_tokens == 48  # the fourth block holds the last token, which must be computed


def test_different_cache_salt_never_shares_blocks() -> None:
    engine = Engine(GpuParams(num_blocks=100))
    clock = Clock(engine)
    prompt = words("p", 200)
    engine.add(make_seq(prompt, salt="tenant-a"))
    clock.run()
    other = make_seq(prompt, salt="tenant-b")
    engine.add(other)
    clock.run()
    assert other.cached_tokens == 0 and engine.stats.prefix_hits == 0
    same = make_seq(prompt, salt="tenant-a")
    engine.add(same)
    clock.run()
    assert same.cached_tokens == 192


def test_lru_eviction_under_pressure_keeps_the_recently_used_prefix() -> None:
    engine = Engine(GpuParams(num_blocks=24))
    clock = Clock(engine)
    old, recent = words("old", 128), words("recent", 128)  # 8 blocks each (+1 for the answer)
    for prompt in (old, recent):
        engine.add(make_seq(prompt))
        clock.run()
    touch = make_seq(recent)  # recent is used again, old is now the least recently used
    engine.add(touch)
    clock.run()
    engine.add(make_seq(words("new", 160)))  # needs 11 blocks: only evicting can make room
    clock.run()
    old_again, recent_again = make_seq(old), make_seq(recent)
    engine.add(recent_again)
    clock.run()
    engine.add(old_again)
    clock.run()
    assert recent_again.cached_tokens == 112
    assert old_again.cached_tokens < 112


def test_kv_usage_counts_blocks_in_use_not_cached_free_ones() -> None:
    engine = Engine(GpuParams(num_blocks=100))
    seq = make_seq(words("p", 320), out_len=50)
    engine.add(seq)
    engine.plan_step()
    engine.finish_step()
    assert engine.usage() == pytest.approx(20 / 100)  # the 320 prompt tokens' blocks
    Clock(engine).run()
    assert engine.usage() == 0.0
    assert KVCache(10).free == 10


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_waiting_queue_order(policy: str) -> None:
    engine = Engine(GpuParams(num_blocks=1000, max_num_seqs=1, policy=policy))
    clock = Clock(engine)
    busy = make_seq(words("b", 20), out_len=10)
    engine.add(busy)
    clock.step()
    low, tie_first, high, tie_second = (
        make_seq(words(name, 20), priority=p) for name, p in (("low", 5), ("t1", 1), ("high", 0), ("t2", 1))
    )
    for seq in (low, tie_first, high, tie_second):
        engine.add(seq)
    assert engine.waiting == 4 and len(engine.running) == 1
    clock.run()
    order = sorted((low, tie_first, high, tie_second), key=lambda s: clock.first[s])
    if policy == "priority":
        assert order == [high, tie_first, tie_second, low]  # lower value first, ties by arrival
    else:
        assert order == [low, tie_first, high, tie_second]


def test_max_num_seqs_caps_the_running_batch() -> None:
    engine = Engine(GpuParams(num_blocks=1000, max_num_seqs=3))
    for i in range(5):
        engine.add(make_seq(words(f"r{i}", 10), out_len=5))
    engine.plan_step()
    assert (len(engine.running), engine.waiting) == (3, 2)


def test_a_request_that_does_not_fit_waits_for_blocks() -> None:
    engine = Engine(GpuParams(num_blocks=12))
    clock = Clock(engine)
    big = make_seq(words("big", 150), out_len=3)  # 10 blocks
    engine.add(big)
    clock.step()
    second = make_seq(words("second", 40), out_len=3)  # 3 blocks: only 2 left
    engine.add(second)
    clock.step()
    assert second.state == "waiting" and engine.waiting == 1
    clock.run()
    assert clock.first[second] > clock.done[big] - 1e-9


def test_step_time_grows_with_the_batch() -> None:
    params = GpuParams(num_blocks=10_000, step_ms=7, step_ms_per_seq=0.111)
    assert params.step_seconds(1, 0) == pytest.approx(0.007)
    assert params.step_seconds(64, 0) == pytest.approx(0.007 + 63 * 0.000111)
    engine = Engine(params)
    for i in range(64):
        engine.add(make_seq(words(f"s{i}", 8), out_len=5))
    clock = Clock(engine)
    clock.step()  # the 64 prefills
    clock.step()
    assert clock.steps[-1] == pytest.approx(params.step_seconds(64, 0))


def test_chunked_prefill_spreads_a_long_prompt_over_budgeted_steps() -> None:
    params = GpuParams(num_blocks=1000, max_batched_tokens=512, prefill_tok_s=1000, step_ms=0)
    engine = Engine(params)
    clock = Clock(engine)
    long = make_seq(words("l", 1200), out_len=2)
    engine.add(long)
    clock.run()
    assert clock.steps[:3] == pytest.approx([0.512, 0.512, 0.176])  # no token before the last chunk
    assert clock.ttft(long) == pytest.approx(1.2)


def test_decode_shares_steps_with_a_new_prefill() -> None:
    params = GpuParams(num_blocks=1000, prefill_tok_s=1000, step_ms=10, step_ms_per_seq=1)
    engine = Engine(params)
    clock = Clock(engine)
    runner = make_seq(words("r", 10), out_len=20)
    engine.add(runner)
    clock.step()
    engine.add(make_seq(words("n", 100), out_len=2))
    clock.step()  # one decode token for the runner + 100 prefill tokens, one step
    assert clock.steps[-1] == pytest.approx(0.010 + 0.001 + 0.100)
    assert runner.generated == 2


def test_fcfs_preempts_the_latest_runner_when_decode_needs_a_block() -> None:
    engine = Engine(GpuParams(num_blocks=4))
    clock = Clock(engine)
    first = make_seq(words("a", 16), out_len=20)  # grows into a second block, then a third
    second = make_seq(words("b", 16), out_len=20)
    engine.add(first)
    engine.add(second)
    clock.run()
    assert engine.stats.preemptions >= 1
    assert first.state == second.state == "finished"
    assert clock.done[first] < clock.done[second]


def test_priority_arrival_preempts_the_least_urgent_runner_when_memory_is_short() -> None:
    engine = Engine(GpuParams(num_blocks=10, policy="priority"))
    clock = Clock(engine)
    low = make_seq(words("low", 120), out_len=30, priority=10)  # 8 of the 10 blocks after its prefill
    engine.add(low)
    clock.step()
    high = make_seq(words("high", 60), out_len=2, priority=0)
    engine.add(high)
    clock.step()
    assert engine.stats.preemptions == 1
    assert high.state == "running" and low.state == "waiting"
    clock.run()
    assert clock.done[high] < clock.done[low]


def test_abort_frees_the_blocks_and_the_slot() -> None:
    engine = Engine(GpuParams(num_blocks=100))
    seq = make_seq(words("a", 100), out_len=50)
    engine.add(seq)
    engine.plan_step()
    engine.finish_step()
    engine.abort(seq)
    assert engine.usage() == 0.0 and not engine.running and engine.plan_step() is None
    waiting = make_seq(words("w", 10))
    engine.add(waiting)
    engine.abort(waiting)
    assert engine.waiting == 0


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="scheduling policy"):
        GpuParams(policy="lifo")
    with pytest.raises(ValueError, match="num_blocks"):
        GpuParams(num_blocks=0)
