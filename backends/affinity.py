"""Affinity routing's pure parts: the affinity key of a request (its session, or the head of its
conversation), rendezvous ranking of replicas by stable 64-bit hashes, and the bounded-load cap.
No I/O, no clock, and no Python `hash()` (salted per process): every gateway process agrees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

_MASK = (1 << 64) - 1


def stable_hash(data: bytes) -> int:
    """64 bits of BLAKE2b: the same number in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def replica_seed(name: str) -> int:
    """A replica's identity in the ranking: its configured name, so every gateway that reads the
    same config ranks the same way, and a replica keeps its place however the list is ordered."""
    return stable_hash(b"replica\x00" + name.encode())


def weight(key: int, seed: int) -> int:
    """Rendezvous (highest random weight) score of one replica for one key: splitmix64's
    finaliser over key XOR seed. Each replica's scores are independent and uniform, so the
    replica with the top score wins a key; removing one moves only the keys it won, and adding
    one takes only the keys it now wins (about 1/n of them). Integer arithmetic: ~0.2 us."""
    z = ((key ^ seed) + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def request_key(scope: str, messages: Sequence[Mapping[str, Any]], session: str | None, limit: int) -> int:
    """A request's affinity key: its named session when it has one, else its conversation's head."""
    if session:
        return session_key(scope, session)
    return conversation_key(scope, messages, limit)


def session_key(scope: str, session: str) -> int:
    """The key of an explicitly named session (header or OpenAI `user`), within a cache scope."""
    return stable_hash(b"session\x00" + scope.encode() + b"\x00" + session.encode())


def conversation_key(scope: str, messages: Sequence[Mapping[str, Any]], limit: int) -> int:
    """The key of a conversation: its head, cut to its first `limit` tokens (estimated).

    The head is every message up to and including the first user message (system and developer
    prompts, an app's greeting, the opening question). A chat client resends the whole history
    each turn and appends to its end, so the head of turn n+1 is the head of turn n: every turn
    hashes to the same key. A key over the whole prefix (all but the last user turn) would change
    at every turn, since each turn adds an answer and a question to that prefix.

    The cut makes the key the conversation's first prefix blocks (`limit` tokens, `limit`/16 of
    vLLM's blocks), counted as tokens so that a Chinese prompt and an English one of the same
    length cut alike: when a long shared system prompt fills them, every conversation under that
    prompt gets one key and meets its cached prefix on one replica (the bounded load spreads the
    key when it is hot); when the prompt is short, the opening question tells conversations
    apart. `scope` is the prefix-cache scope (vLLM's cache_salt): two scopes never share cached
    blocks, so they need not share a replica either."""
    h = hashlib.blake2b(digest_size=8)
    h.update(b"conversation\x00" + scope.encode() + b"\x00")
    room = limit
    for message in messages:
        role = message.get("role")
        text, used = _cut(_text(message.get("content")), room)
        h.update(f"{role}\x00".encode())
        h.update(text.encode())
        h.update(b"\x01")
        room -= used
        if role == "user" or room <= 0:
            break
    return int.from_bytes(h.digest(), "big")


def _cut(text: str, tokens: int) -> tuple[str, int]:
    """`text` cut to about `tokens` tokens, and the tokens it kept: ~4 ASCII characters a token,
    one token per other character (CJK is about one token a character), as the limiter estimates."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    estimate = (ascii_chars + 3) // 4 + len(text) - ascii_chars
    if estimate <= tokens:
        return text, estimate
    return text[: max(1, len(text) * tokens // max(1, estimate))], tokens


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the text parts are what the prefix cache sees first
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def load_cap(in_flight: int, replicas: int, factor: float, floor: int) -> float:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018): with this
    request the pool holds `in_flight + 1`; a replica may take it only while it holds fewer than
    `factor` x the mean, so a hot key walks on to its next replica. The floor keeps a lightly
    loaded pool sticky: a GPU batches dozens of requests, and spreading a handful buys nothing
    but cold prefix caches."""
    return max(float(floor), factor * (in_flight + 1) / max(1, replicas))
