"""What the semantic layer embeds, and where its vectors come from.

Template guard: per partition, the user turns seen last; a prefix (or suffix) that most of them share
with this turn, long enough to be instructions rather than a common opening, is template text. It is
taken out of what is embedded and verified, and goes into the partition instead (an exact match), so
a fixed wrapper around every question cannot make all questions look alike.
Vectors: reused for texts embedded recently (LRU by digest), else from the embedder within its budget
(lookups) or its bounded store lane (new entries); every refusal is counted by stage and reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from proxy.cache.embed_queue import EmbeddingError
from proxy.cache.embedding import Embedder
from proxy.cache.store import SemanticEntry

STORE_WAIT_S = 2.0  # a new entry waits this long for its vector, then is stored for the exact layer only
KEEP_CHARS = 1024  # of each recent turn's head and tail, remembered per partition
BOUNDARIES = "\n:：。.?？!！;；"  # a template ends (or resumes) at one of these


@dataclass(frozen=True)
class OwnText:
    text: str  # the user's own content: what is embedded and verified
    template: str  # the template text taken out of it ("" when none)


def _snap_prefix(text: str, n: int) -> int:
    """The template prefix ends right after the last boundary character inside text[:n]."""
    cut = max(text.rfind(c, 0, n) for c in BOUNDARIES)
    return cut + 1 if cut >= 0 else 0


def _snap_suffix(text: str, n: int) -> int:
    """The template suffix starts right after the first boundary character inside the last n
    characters (the question keeps its own "?")."""
    start = len(text) - n
    found = [i for c in BOUNDARIES if (i := text.find(c, start)) >= 0]
    return len(text) - min(found) - 1 if found else 0


def _common(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))  # noqa: RUF071 - characters, not path components, wanted


class TemplateGuard:
    """Learns template text per partition from the recent user turns (bounded: `partitions` x `recent`)."""

    def __init__(
        self, *, recent: int = 16, share: float = 0.8, min_chars: int = 32, partitions: int = 256
    ) -> None:
        self._recent, self._share, self._min, self._partitions = recent, share, min_chars, partitions
        self._rings: OrderedDict[str, deque[tuple[str, str]]] = OrderedDict()

    def split(self, part: str, text: str, *, observe: bool = True) -> OwnText:
        ring = self._rings.get(part)
        head, tail = text[:KEEP_CHARS], text[::-1][:KEEP_CHARS]  # the tail reversed: suffixes as prefixes
        own = OwnText(text, "")
        if ring is not None and len(ring) >= self._recent // 2:
            pre = self._shared([_common(head, h) for h, _ in ring])
            suf = self._shared([_common(tail, t) for _, t in ring])
            # long enough, both sides together, to be instructions rather than a common opening
            if pre + suf < self._min:
                pre = suf = 0
            pre, suf = _snap_prefix(text, pre), _snap_suffix(text, suf)
            middle = text[pre : len(text) - suf].strip()
            if middle and (pre or suf):
                own = OwnText(middle, text[:pre] + "\x00" + text[len(text) - suf :])
        if observe:
            self._observe(part, head, tail)
        return own

    def _shared(self, lengths: list[int]) -> int:
        """The length that at least `share` of the recent turns have in common with this one."""
        lengths.sort(reverse=True)
        return lengths[max(0, math.ceil(self._share * len(lengths)) - 1)]

    def _observe(self, part: str, head: str, tail: str) -> None:
        ring = self._rings.get(part)
        if ring is None:
            ring = self._rings[part] = deque(maxlen=self._recent)
            while len(self._rings) > self._partitions:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(part)
        ring.append((head, tail))


class VectorCache:
    """Vectors of recently embedded texts, by digest; bounded (LRU)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._rows: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    def get(self, text: str) -> np.ndarray | None:
        key = self._key(text)
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put(self, text: str, row: np.ndarray) -> None:
        if self._size <= 0:
            return
        self._rows[self._key(text)] = row
        self._rows.move_to_end(self._key(text))
        while len(self._rows) > self._size:
            self._rows.popitem(last=False)


@dataclass
class VectorStats:
    embedded: int = 0  # vectors the embedder computed for the cache
    reused: int = 0  # vectors found in the LRU
    errors: int = 0  # the embedder failed (lookups and stores)
    max_wait_s: float = 0.0  # the longest any lookup waited for the embedder


class Vectors:
    """The semantic layer's source of vectors: LRU first, then the embedder within its bounds."""

    def __init__(
        self, embedder: Embedder, size: int, skips: Counter[tuple[str, str]], stats: VectorStats
    ) -> None:
        self.embedder, self.cache, self.stats = embedder, VectorCache(size), stats
        self.skips = skips  # (lookup | store, reason) -> count

    async def lookup(self, text: str) -> np.ndarray | None:
        return await self._get(text, lookup=True)

    async def store(self, text: str, *, urgent: bool = False) -> np.ndarray | None:
        return await self._get(text, lookup=False, urgent=urgent)

    def recent(self, text: str) -> np.ndarray | None:
        """The vector if the LRU holds it, without waiting for anything."""
        row = self.cache.get(text)
        if row is not None:
            self.stats.reused += 1
        return row

    async def _get(self, text: str, *, lookup: bool, urgent: bool = False) -> np.ndarray | None:
        stage = "lookup" if lookup else "store"
        if not self.embedder.fits(text):
            self.skips[stage, "window"] += 1
            return None
        row = self.cache.get(text)
        if row is not None:
            self.stats.reused += 1
            return row
        try:
            ticket = self.embedder.offer(text, lookup=lookup, urgent=urgent)
        except EmbeddingError:  # closed or not started
            self.stats.errors += 1
            self.skips[stage, "error"] += 1
            return None
        if ticket is None:
            self.skips[stage, "budget" if lookup else "full"] += 1
            return None
        ticket.future.add_done_callback(lambda f: self._arrived(text, f))
        clock = self.embedder.queue.clock
        start = clock()
        try:
            # shielded: a waiter that gives up leaves the text queued; its vector still lands in the
            # LRU, where the store that follows this request's answer will find it
            async with asyncio.timeout(max(0.0, ticket.deadline - start) if lookup else STORE_WAIT_S):
                row = await asyncio.shield(ticket.future)
        except TimeoutError:
            self.skips[stage, "late"] += 1
            return None
        except EmbeddingError:
            self.stats.errors += 1
            self.skips[stage, "error"] += 1
            return None
        finally:
            if lookup:
                self.stats.max_wait_s = max(self.stats.max_wait_s, clock() - start)
        if np.isnan(row[0]):
            self.skips[stage, "window"] += 1
            return None
        return row

    def _arrived(self, text: str, fut: asyncio.Future[np.ndarray]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        row = fut.result()
        if not np.isnan(row[0]):
            self.stats.embedded += 1
            self.cache.put(text, row)


Write = Callable[[str, bytes, SemanticEntry], Awaitable[None]]


class Backfill:
    """Entries stored without a vector (the embedder was behind), by exact key. When one is served
    again from the exact layer (a question that is asked again), its vector goes to the head of
    the store lane and the entry is rewritten with it: the few vectors an overloaded embedder
    makes go to the questions people repeat, which are the ones paraphrases are paraphrases of."""

    def __init__(self, vectors: Vectors, write: Write, size: int = 4096, in_flight: int = 16) -> None:
        self._vectors, self._write = vectors, write
        self._size, self._in_flight = size, in_flight
        self._entries: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self.done = 0  # entries given their vector this way (metrics, tests)

    def remember(self, key: str, text: str, part: str) -> None:
        self._entries[key] = (text, part)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def served(self, key: str, payload: bytes) -> None:
        """An exact hit: when its entry has no vector, fetch one (at most `in_flight` at once)."""
        if key not in self._entries or len(self._tasks) >= self._in_flight:
            return
        text, part = self._entries.pop(key)
        task = asyncio.create_task(self._fill(key, text, part, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fill(self, key: str, text: str, part: str, payload: bytes) -> None:
        vector = await self._vectors.store(text, urgent=True)
        if vector is None:  # refused or failed (counted): the next hit tries again
            self.remember(key, text, part)
            return
        await self._write(key, payload, SemanticEntry(part, vector, text))
        self.done += 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
