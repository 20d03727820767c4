"""The GPU-modelling engine of the vLLM simulator: tokenization, a paged KV cache with prefix reuse
and LRU eviction, and vLLM V1's scheduler loop (continuous batching, chunked prefill, preemption).
Pure logic on virtual time; calibration and sources in loadtest/SIM_GPU.md.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import re
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

POLICIES = frozenset({"fcfs", "priority"})
# One token per CJK character (Han, kana, Hangul, full-width forms) or word, with its leading
# whitespace. Lossless: the pieces of a text concatenate back to it.
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_PIECE = re.compile(rf"\s*[{_CJK}]|\s*[^\s{_CJK}]+|\s+")


@dataclass(frozen=True)
class GpuParams:
    """One replica: Llama-3.1-8B in bf16 on one H100 80GB under vLLM V1 (see SIM_GPU.md)."""

    num_blocks: int = 25_000  # x 16 tokens = 400k tokens of KV cache
    block_size: int = 16  # vLLM's default
    max_num_seqs: int = 1024  # vLLM V1's default for the OpenAI server on >= 70 GiB GPUs
    max_batched_tokens: int = 8192  # the same default: the per-step token budget (chunked prefill)
    prefill_tok_s: float = 20_000.0  # uncached prompt tokens per second
    step_ms: float = 7.0  # a decode step at batch 1
    step_ms_per_seq: float = 0.111  # each further sequence in the step: 14 ms at batch 64
    policy: str = "fcfs"  # vLLM's --scheduling-policy

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.prefill_tok_s <= 0 or self.step_ms < 0 or self.step_ms_per_seq < 0:
            raise ValueError("prefill_tok_s must be > 0, step times >= 0")

    def step_seconds(self, seqs: int, prefill_tokens: int) -> float:
        """One engine step: a decode cost growing with the batch plus the prefill tokens it computes."""
        decode_ms = self.step_ms + self.step_ms_per_seq * max(0, seqs - 1)
        return decode_ms / 1000 + prefill_tokens / self.prefill_tok_s


@functools.lru_cache(maxsize=8192)
def text_pieces(text: str) -> tuple[str, ...]:
    return tuple(_PIECE.findall(text))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def render_prompt(messages: Iterable[dict[str, Any]]) -> list[str]:
    """The prompt as a chat template renders it: role marker, content, end of turn; then the
    generation prompt. Turn n's prompt + its answer is a prefix of turn n+1's prompt."""
    tokens: list[str] = []
    for message in messages:
        tokens.append(f"<|{message.get('role')}|>")
        tokens += text_pieces(_content_text(message.get("content")))
        tokens.append("<|eot|>")
    tokens.append("<|assistant|>")
    return tokens


def block_hashes(tokens: Sequence[str], block_size: int, salt: str | None) -> list[int]:
    """Chained hash of every full block (previous hash + the block's tokens); the salt enters the
    first block only, as vLLM's cache_salt does, so different salts never share a block."""
    hashes: list[int] = []
    prev = hash(("salt", salt))
    for start in range(0, len(tokens) - block_size + 1, block_size):
        prev = hash((prev, *tokens[start : start + block_size]))
        hashes.append(prev)
    return hashes


class KVCache:
    """Paged KV blocks. Free blocks (ref 0) sit in LRU order; a free block that still holds a full,
    hashed block can be matched again until it is evicted by an allocation."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def free(self) -> int:
        return len(self._free)

    def match(self, hashes: Sequence[int], limit: int) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (at most `limit`), not yet taken."""
        found: list[int] = []
        for h in hashes[:limit]:
            block = self._by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def take(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1

    def allocate(self, n: int) -> list[int] | None:
        """n blocks from the LRU end of the free list (evicting what they cached), or None."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            old = self._hash[block]
            if old is not None:
                self._hash[block] = None
                if self._by_hash.get(old) == block:
                    del self._by_hash[old]
            self._ref[block] = 1
            out.append(block)
        return out

    def cache(self, block: int, h: int) -> None:
        if self._hash[block] is None and h not in self._by_hash:
            self._hash[block] = h
            self._by_hash[h] = block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference each; tail blocks go first so a sequence's prefix is evicted last."""
        for block in reversed(blocks):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free[block] = None


_arrivals = itertools.count()


@dataclass(eq=False)
class Seq:
    """One request in the engine. `tokens` is prompt + the answer it will generate."""

    prompt_len: int
    out_len: int
    hashes: list[int]
    priority: int = 0
    arrival: int = field(default_factory=lambda: next(_arrivals))
    generated: int = 0
    computed: int = 0  # tokens whose KV is in the cache
    blocks: list[int] = field(default_factory=list)
    cached_blocks: int = 0  # how many of `blocks` are registered in the prefix cache
    cached_tokens: int = 0  # prompt tokens found in the cache at its (last) admission
    state: str = "new"  # new | waiting | running | finished | aborted

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.generated

    def __lt__(self, other: Seq) -> bool:  # the priority queue's order: value, then arrival
        return (self.priority, self.arrival) < (other.priority, other.arrival)


@dataclass
class EngineStats:
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


class Engine:
    """vLLM V1's scheduler on virtual time: `plan_step()` picks the next batch and says how long it
    takes, `finish_step()` applies it. Whoever drives the engine sleeps in between."""

    def __init__(self, params: GpuParams) -> None:
        self.params = params
        self.kv = KVCache(params.num_blocks)
        self.running: list[Seq] = []
        self._fifo: deque[Seq] = deque()
        self._heap: list[Seq] = []
        self._batch: dict[Seq, int] = {}
        self.stats = EngineStats()

    # queue ----------------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._heap) if self.params.policy == "priority" else len(self._fifo)

    def add(self, seq: Seq) -> None:
        seq.state = "waiting"
        self._push(seq, front=False)

    def _push(self, seq: Seq, *, front: bool) -> None:
        if self.params.policy == "priority":
            heapq.heappush(self._heap, seq)
        elif front:
            self._fifo.appendleft(seq)
        else:
            self._fifo.append(seq)

    def _peek(self) -> Seq | None:
        queue: Sequence[Seq] = self._heap if self.params.policy == "priority" else self._fifo
        return queue[0] if queue else None

    def _pop(self) -> None:
        if self.params.policy == "priority":
            heapq.heappop(self._heap)
        else:
            self._fifo.popleft()

    def abort(self, seq: Seq) -> None:
        """The client left: drop the request wherever it is and free its blocks."""
        if seq.state == "running":
            self.running.remove(seq)
            self._batch.pop(seq, None)
        elif seq.state == "waiting":
            if self.params.policy == "priority":
                self._heap.remove(seq)
                heapq.heapify(self._heap)
            else:
                self._fifo.remove(seq)
        self._free(seq)
        seq.state = "aborted"

    def usage(self) -> float:
        """vLLM's kv_cache_usage_perc: blocks not free (cached-but-unused blocks count as free)."""
        return 1.0 - self.kv.free / self.kv.num_blocks

    # one step -----------------------------------------------------------------------------------------
    def plan_step(self) -> float | None:
        """Schedule running requests first (decode or the next prefill chunk), then admit waiting
        ones within the token budget; None when there is nothing to run."""
        self._batch = {}
        budget = self.params.max_batched_tokens
        budget, preempted = self._schedule_running(budget)
        if not preempted:
            self._admit_waiting(budget)
        if not self._batch:
            return None
        prefill = sum(n for seq, n in self._batch.items() if n > 1 or seq.computed < seq.prompt_len)
        return self.params.step_seconds(len(self._batch), prefill)

    def _schedule_running(self, budget: int) -> tuple[int, bool]:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.computed, budget)
            while not self._grow(seq, seq.computed + n):
                victim = self._victim()
                budget += self._batch.pop(victim, 0)
                if self.running.index(victim) < i:
                    i -= 1
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self._batch[seq] = n
                budget -= n
                i += 1
        return budget, preempted

    def _admit_waiting(self, budget: int) -> None:
        while budget > 0 and len(self.running) < self.params.max_num_seqs:
            seq = self._peek()
            if seq is None:
                return
            hit = self._lookup(seq)
            n = min(seq.num_tokens - seq.computed, budget)
            while not self._grow(seq, seq.computed + n):
                # Under priority scheduling a more urgent arrival may evict the least urgent runner.
                victim = self._victim() if self.running else None
                if victim is None or self.params.policy != "priority" or not seq < victim:
                    self._free(seq)  # blocks found in the cache go back until it fits
                    return
                budget += self._batch.pop(victim, 0)
                self._preempt(victim)
            self._pop()
            self.stats.prefix_queries += seq.num_tokens
            self.stats.prefix_hits += hit
            seq.cached_tokens = hit
            seq.state = "running"
            self.running.append(seq)
            self._batch[seq] = n
            budget -= n

    def _lookup(self, seq: Seq) -> int:
        """Take the cached prefix blocks; the last token is always computed (it yields the logits)."""
        bs = self.params.block_size
        blocks = self.kv.match(seq.hashes, (seq.num_tokens - 1) // bs)
        self.kv.take(blocks)
        seq.blocks = blocks
        seq.cached_blocks = len(blocks)
        seq.computed = len(blocks) * bs
        return seq.computed

    def _grow(self, seq: Seq, tokens: int) -> bool:
        need = -(-tokens // self.params.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        new = self.kv.allocate(need)
        if new is None:
            return False
        seq.blocks += new
        return True

    def _victim(self) -> Seq:
        if self.params.policy == "priority":
            return max(self.running, key=lambda s: (s.priority, s.arrival))
        return self.running[-1]

    def _preempt(self, seq: Seq) -> None:
        """Recompute mode (vLLM V1): free its blocks, back to the front of the queue."""
        self.running.remove(seq)
        self._free(seq)
        self.stats.preemptions += 1
        seq.state = "waiting"
        self._push(seq, front=True)

    def _free(self, seq: Seq) -> None:
        self.kv.release(seq.blocks)
        seq.blocks, seq.cached_blocks, seq.computed = [], 0, 0

    def finish_step(self) -> list[Seq]:
        """Apply the planned step: the requests that produced a token (finished ones included)."""
        produced: list[Seq] = []
        bs = self.params.block_size
        for seq, n in self._batch.items():
            seq.computed += n
            full = min(seq.computed // bs, len(seq.hashes))
            for j in range(seq.cached_blocks, full):
                self.kv.cache(seq.blocks[j], seq.hashes[j])
            seq.cached_blocks = max(seq.cached_blocks, full)
            if seq.computed < seq.num_tokens:
                continue  # a prefill chunk, more to come
            if seq.generated == 0:
                self.stats.prompt_tokens += seq.prompt_len
            seq.generated += 1
            self.stats.generation_tokens += 1
            produced.append(seq)
            if seq.generated >= seq.out_len:
                seq.state = "finished"
                self.running.remove(seq)
                self._free(seq)
        self._batch = {}
        return produced
