"""The response store's chain logic and its in-process twin, on an injected clock: chains across
windows, tenants apart, TTL restarted by each turn, LRU by bytes, the caps."""

from __future__ import annotations

from typing import Any

import pytest

from proxy import errors
from proxy.apis.responses import StoredTurn
from proxy.conversations import WINDOW, MemoryConversations, build_conversations
from proxy.settings import ResponsesSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Counting(MemoryConversations):
    """Counts the reads a chain takes."""

    reads = 0

    async def _read(self, keys: list[str]) -> list[bytes | None]:
        self.reads += 1
        return await super()._read(keys)


def _id(n: int) -> str:
    return f"resp_{n:032x}"


def _turn(n: int, text: str = "") -> StoredTurn:
    return StoredTurn({"id": _id(n), "output": [{"type": "message", "text": text or f"out {n}"}]},
                      [{"type": "message", "role": "user", "content": f"in {n}"}])


async def _conversation(store: MemoryConversations, n: int, tenant: str = "acme") -> list[str]:
    """n turns, each continuing the last, as the translator stores them."""
    ids: list[str] = []
    for i in range(n):
        await store.put(tenant, _id(i), _turn(i), list(ids))
        ids.append(_id(i))
    return ids


def _store(clock: Clock | None = None, **settings: Any) -> Counting:
    return Counting(ResponsesSettings(**settings), clock or Clock())


async def test_a_chain_longer_than_a_window_loads_whole_in_few_reads() -> None:
    store = _store()
    n = 2 * WINDOW + 10
    ids = await _conversation(store, n)
    store.reads = 0
    chain = await store.chain("acme", ids[-1])
    assert chain is not None and chain.ids == ids
    assert [t.response["id"] for t in chain.turns] == ids
    assert chain.turns[3].input == [{"type": "message", "role": "user", "content": "in 3"}]
    assert store.reads == 1 + 3  # the head, then one read per window of ancestors


async def test_a_branch_keeps_its_own_history() -> None:
    store = _store()
    ids = await _conversation(store, 3)
    await store.put("acme", _id(99), _turn(99), ids[:1])  # a second answer to the first turn
    chain = await store.chain("acme", _id(99))
    assert chain is not None and chain.ids == [ids[0], _id(99)]


async def test_another_tenant_finds_nothing() -> None:
    store = _store()
    ids = await _conversation(store, 2, tenant="acme")
    assert await store.chain("globex", ids[-1]) is None
    assert await store.get("globex", ids[-1]) is None
    assert await store.delete("globex", ids[-1]) is False
    assert await store.get("acme", ids[-1]) == _turn(1).response


async def test_each_turn_restarts_the_ttl_of_its_whole_chain() -> None:
    clock = Clock()
    store = _store(clock, ttl_s=100)
    ids = await _conversation(store, 2)
    clock.now += 90
    await store.put("acme", _id(2), _turn(2), ids)
    clock.now += 90  # 180 s after the first turn, 90 after the last
    chain = await store.chain("acme", _id(2))
    assert chain is not None and len(chain.ids) == 3
    clock.now += 11
    assert await store.chain("acme", _id(2)) is None
    assert store.bytes == sum(len(k) + len(v[1]) + 128 for k, v in store._entries.items())


async def test_a_deleted_link_breaks_the_chains_through_it() -> None:
    store = _store()
    ids = await _conversation(store, 3)
    assert await store.delete("acme", ids[1]) is True
    assert await store.get("acme", ids[1]) is None
    with pytest.raises(errors.InvalidRequest) as caught:
        await store.chain("acme", ids[2])
    assert caught.value.code == "previous_response_not_found" and ids[1] in caught.value.message


async def test_a_chain_at_max_depth_is_refused() -> None:
    store = _store(max_depth=5)
    ids = await _conversation(store, 5)
    assert (await store.chain("acme", ids[3])) is not None  # 4 stored + this request: 5
    with pytest.raises(errors.InvalidRequest) as caught:
        await store.chain("acme", ids[4])
    assert caught.value.code == "conversation_too_long"


async def test_least_recently_used_records_go_first_past_the_byte_budget() -> None:
    store = _store(memory_bytes=1_048_576)
    big = "x" * 300_000
    for i in range(3):
        await store.put("acme", _id(i), _turn(i, big), [])
    assert await store.get("acme", _id(0)) is not None  # read: now the most recent
    await store.put("acme", _id(3), _turn(3, big), [])
    assert await store.get("acme", _id(1)) is None  # the least recently used went
    assert all([await store.get("acme", _id(i)) for i in (0, 2, 3)])
    assert store.bytes <= 1_048_576


async def test_a_response_over_max_bytes_is_answered_but_not_kept() -> None:
    store = _store(max_bytes=2048)
    await store.put("acme", _id(0), _turn(0, "y" * 4096), [])
    assert await store.get("acme", _id(0)) is None and store.bytes == 0


def test_without_redis_the_store_is_in_process() -> None:
    assert isinstance(build_conversations(ResponsesSettings(), None), MemoryConversations)
