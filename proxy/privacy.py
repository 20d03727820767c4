"""The personal-data stage: recognizers built at start-up (policies/pii.py), the input action on
every request and, per request, a `Restorer` for its answer (the output action on what the model
wrote itself, then the user's own values put back; JSON and streams).

Order in the pipeline: this stage runs first, on the client's forwarded body, then the variant's
system prompt is added (operator text, not scanned) and the word policy reads the result. So the
word policy never reads a personal value, and cannot break one: a listed word inside an address
(cassandra@..., a listed number inside a card number) is no hit, and its masking cannot leave the
recognizers a mangled value that would reach the model. What such a value contained never reaches
the model either; the user gets their own value back in the answer.

Pseudonymized requests are cached as such: the exact key is computed over the placeholders, the
semantic layer embeds them, the answer is stored as the model wrote it (placeholders, never a
user's value) and restored for each request with that request's own mapping, so a cached answer
serves every user of the tenant correctly and holds no one's data. The mapping lives in the
request's `Restorer` only. Counts go to `Call.pii` ("direction:type:action" -> values): the log
line and metrics show what was found and done by type, never a value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from policies.pii import CustomPattern, Found, Recognizer
from policies.pii_stream import ChunkRestorer
from policies.pii_text import AnswerCheck, Pseudonyms, RequestScan
from proxy.errors import ContentFiltered
from proxy.guard import OFF_LOOP_SCAN_BYTES  # as the word policy: bigger bodies in a worker thread
from proxy.protocol import ChatRequest, Message
from proxy.settings import PrivacySettings

BLOCK_MESSAGE = "The request was rejected by the gateway's personal-data policy ({types})."

Counts = dict[str, int]


class Restorer:
    """One request's answer side. `changed`: the request went out with placeholders."""

    __slots__ = ("_check", "changed")

    def __init__(self, check: AnswerCheck, changed: bool) -> None:
        self._check, self.changed = check, changed

    @property
    def active(self) -> bool:
        """Anything to do to an answer: values to put back, or an output check."""
        return bool(self._check.names.values) or self._check.recognizer is not None

    def completion(self, completion: dict[str, Any]) -> dict[str, Any]:
        """A `chat.completion` as the client gets it (a copy; the cached one is not touched)."""
        return self._check.completion(completion) if self.active else completion

    def stream(self) -> ChunkRestorer | None:
        """The chunk stage of one streamed answer, or None when there is nothing to do."""
        return ChunkRestorer(self._check) if self.active else None

    def cache_request(self, req: ChatRequest, body: dict[str, Any]) -> ChatRequest:
        """`req` as the cache reads it (the semantic layer embeds the last user turn): with the
        placeholders of `body` (the forwarded body) when the request went out with placeholders."""
        if not self.changed:
            return req
        messages = [Message.model_validate(m) for m in body["messages"]]
        return req.model_copy(update={"messages": messages})


class Privacy:
    """Built unstarted by the lifespan; `start` compiles the recognizers off the event loop."""

    def __init__(self, settings: PrivacySettings) -> None:
        self.settings = settings
        self.recognizer: Recognizer | None = None

    @property
    def on(self) -> bool:
        return self.settings.input != "off" or self.settings.output != "off"

    async def start(self) -> None:
        if self.on:
            self.recognizer = await asyncio.to_thread(self._build)

    async def close(self) -> None:
        return None

    def _build(self) -> Recognizer:
        custom = [
            CustomPattern(p.name, p.pattern, p.label, p.validator, tuple(p.context))
            for p in self.settings.patterns
        ]
        return Recognizer(self.settings.types, custom)

    async def check_input(
        self, body: dict[str, Any], size: int, counts: Counts
    ) -> tuple[dict[str, Any], Restorer | None]:
        """The input action on a forwarded chat body: the body to send on (placeholders in place of
        values for pseudonymize and mask) and the request's Restorer (None: nothing to do to the
        answer). Raises ContentFiltered for block."""
        if self.recognizer is None:
            return body, None
        if size > OFF_LOOP_SCAN_BYTES:
            return await asyncio.to_thread(self._input, body, counts)
        return self._input(body, counts)

    def _input(self, body: dict[str, Any], counts: Counts) -> tuple[dict[str, Any], Restorer | None]:
        assert self.recognizer is not None
        action, output = self.settings.input, self.settings.output
        names = Pseudonyms(keep=action == "pseudonymize")
        new = body
        if action != "off":
            seen = _counter(counts, "input", action)
            scan = RequestScan(self.recognizer, names if action in ("mask", "pseudonymize") else None, seen)
            new = scan.body(body)
            if action == "block":
                _refuse(counts, "messages")
        if new is body and output == "off":
            return body, None
        recognizer = self.recognizer if output != "off" else None
        check = AnswerCheck(recognizer, output, names, _counter(counts, "output", output))
        return new, Restorer(check, new is not body)

    async def check_texts(self, texts: list[str], size: int, counts: Counts) -> list[str]:
        """The input action on plain texts (embeddings' input): pseudonymize masks (a vector has
        no text to put values back into). Raises ContentFiltered for block."""
        if self.recognizer is None or self.settings.input == "off":
            return texts
        if size > OFF_LOOP_SCAN_BYTES:
            return await asyncio.to_thread(self._texts, texts, counts)
        return self._texts(texts, counts)

    def _texts(self, texts: list[str], counts: Counts) -> list[str]:
        assert self.recognizer is not None
        action = self.settings.input
        names = Pseudonyms(keep=False) if action in ("mask", "pseudonymize") else None
        scan = RequestScan(self.recognizer, names, _counter(counts, "input", action))
        out = [scan.text(t) for t in texts]
        if action == "block":
            _refuse(counts, "input")
        return out


def _refuse(counts: Counts, param: str) -> None:
    """block: a request with any value is refused; the error names the types, never a value."""
    types = sorted({key.split(":")[1] for key in counts if key.startswith("input:")})
    if types:
        raise ContentFiltered(BLOCK_MESSAGE.format(types=", ".join(types)), param=param)


def _counter(counts: Counts, direction: str, action: str) -> Callable[[Found], None]:
    def seen(found: Found) -> None:
        key = f"{direction}:{found.kind}:{action}"
        counts[key] = counts.get(key, 0) + 1

    return seen
