"""The gateway's content-policy stage: word lists loaded from disk, hot-reloaded, and applied to
requests (input), completions and streams (output) with the configured action.

A reload builds a whole new `Matcher` off the event loop and then swaps one reference, so a
request sees either the old lists or the new ones, never a half-built matcher. A broken file at
reload keeps the old lists and logs an error; at start-up it is a start-up error. Logs name the
file and line of a listed word, never the word.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import os
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from policies.bodies import Hit, scan_completion, scan_request
from policies.stream import ChunkFilter
from policies.words import Matcher, WordListError
from proxy.errors import ContentFiltered
from proxy.settings import ConfigError, PolicySettings

log = logging.getLogger("llm_gateway.policy")

BLOCK_MESSAGE = "The request was rejected by the gateway's content policy."
OUTPUT_BLOCK_MESSAGE = "The response was stopped by the gateway's content policy."
FileStamp = tuple[int, int, int]  # (mtime_ns, size, inode)
OFF_LOOP_SCAN_BYTES = 64 * 1024  # larger requests are scanned in a worker thread


class PolicyGuard:
    def __init__(self, settings: PolicySettings) -> None:
        self._settings = settings
        self._matcher: Matcher | None = None
        self._stamps: dict[str, FileStamp | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []
        self._signal_loop: asyncio.AbstractEventLoop | None = None
        # (direction, action) -> requests that took it; the lead wires these to Prometheus
        self.counts: Counter[tuple[str, str]] = Counter()
        self.reloads = 0
        self.reload_errors = 0
        self.output_stamp: str | None = None  # identifies the output check in force (see output_checked)

    @property
    def matcher(self) -> Matcher:
        if self._matcher is None:
            raise RuntimeError("PolicyGuard.start() has not run")
        return self._matcher

    async def start(self) -> None:
        """Load the lists (a missing or broken file is a ConfigError), then watch them."""
        self._matcher, self._stamps, self.output_stamp = await asyncio.to_thread(self._load)
        self._task = asyncio.create_task(self._watch(), name="policy-reload")
        if threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, self._wake.set)
                self._signal_loop = loop

    async def close(self) -> None:
        if self._signal_loop is not None:
            self._signal_loop.remove_signal_handler(signal.SIGHUP)
            self._signal_loop = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload_now(self) -> bool:
        """Rebuild from the files and swap; on any error keep the old lists. True if swapped."""
        try:
            matcher, stamps, output_stamp = await asyncio.to_thread(self._load)
        except ConfigError as exc:
            self.reload_errors += 1
            self._stamps = await asyncio.to_thread(self._stat_all)  # don't retry until it changes again
            log.error("word lists not reloaded, keeping the previous ones: %s", exc)
            return False
        self._matcher, self._stamps, self.output_stamp = matcher, stamps, output_stamp
        self.reloads += 1
        log.info("word lists reloaded: %d entries", matcher.words)
        return True

    def next_reload(self) -> asyncio.Future[None]:
        """A future that resolves after the watcher's next reload attempt (file change or SIGHUP)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    @property
    def handles_sighup(self) -> bool:
        return self._signal_loop is not None

    def changed(self) -> bool:
        """Has any word file changed (mtime, size or inode) since the last load attempt?"""
        return self._stat_all() != self._stamps

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.reload_interval_s)
            signalled = self._wake.is_set()
            self._wake.clear()
            if signalled or await asyncio.to_thread(self.changed):
                await self.reload_now()
                waiters, self._waiters = self._waiters, []
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(None)

    def _stat_all(self) -> dict[str, FileStamp | None]:
        stamps: dict[str, FileStamp | None] = {}
        for path in self._settings.words:
            try:
                st = os.stat(path)
                stamps[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                stamps[path] = None
        return stamps

    def _load(self) -> tuple[Matcher, dict[str, FileStamp | None], str]:
        stamps = self._stat_all()
        texts = []
        for path in self._settings.words:
            try:
                texts.append(Path(path).read_bytes().decode("utf-8"))
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read word list: {exc.strerror}") from None
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{path}: word list is not UTF-8 (byte {exc.start})") from None
        names = [os.path.basename(p) for p in self._settings.words]
        try:
            matcher = Matcher.from_texts(
                texts, max_gap=self._settings.max_gap, pinyin=self._settings.pinyin, names=names
            )
        except (WordListError, ImportError) as exc:
            raise ConfigError(f"word lists: {exc}") from None
        return matcher, stamps, self._output_digest(texts)

    def _output_digest(self, texts: list[str]) -> str:
        """What the output check depends on: action, matching options and the lists' contents.
        Equal on every replica that loads the same lists (the cache is shared between them)."""
        s = self._settings
        digest = hashlib.sha256(f"{s.output}|{s.max_gap}|{s.pinyin}".encode())
        for text in texts:
            digest.update(b"\0" + text.encode())
        return digest.hexdigest()[:24]

    def output_checked(self, stamp: str | None) -> bool:
        """True when an answer checked under `stamp` needs no new output check: the output policy
        and the word lists are what they were then (a cached answer is stored already filtered)."""
        return stamp is not None and stamp == self.output_stamp

    async def screen_input(self, body: dict[str, Any], size: int) -> tuple[dict[str, Any], str | None]:
        """`check_input` for a request of `size` bytes: a big one (~40 ms per MB) off the event loop."""
        if size > OFF_LOOP_SCAN_BYTES:
            return await asyncio.to_thread(self.check_input, body)
        return self.check_input(body)

    def check_input(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """Apply the input action. Returns the (possibly masked) body and the action taken, or
        raises ContentFiltered for "block". CPU-bound: about 40 ms for a 1 MB body."""
        action = self._settings.input
        matcher = self._matcher  # one reference for the whole request, whatever reloads do
        if action == "off" or matcher is None or not matcher.words:
            return body, None
        new, hits = scan_request(matcher, body, mask=action == "mask")
        if not hits:
            return body, None
        self._record("input", action, hits)
        if action == "block":
            raise ContentFiltered(BLOCK_MESSAGE, param="messages")
        return new, action

    def filter_output(self, completion: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """Apply the output action to a `chat.completion`. "block" empties each choice that hit
        and sets its finish_reason to "content_filter"."""
        action = self._settings.output
        matcher = self._matcher
        if action == "off" or matcher is None or not matcher.words:
            return completion, None
        new, hits = scan_completion(matcher, completion, mask=action == "mask")
        if not hits:
            return completion, None
        self._record("output", action, hits)
        if action == "block":
            new = _blank_choices(completion, {h.choice for h in hits})
        return new, action

    def stream_filter(self) -> ChunkFilter | None:
        """A filter for one streamed response, or None when the output policy is off."""
        action = self._settings.output
        matcher = self._matcher
        if action == "off" or matcher is None or not matcher.words:
            return None
        return ChunkFilter(matcher, action)

    def stream_finished(self, stream_filter: ChunkFilter) -> None:
        """Count and log a finished stream's hits (call once, when the stream ends)."""
        if stream_filter.hits:
            self.counts["output", stream_filter.action] += 1
            log.warning("policy %s on output stream: %d hit(s)", stream_filter.action, stream_filter.hits)

    @staticmethod
    def stream_block_error() -> ContentFiltered:
        """The error to send as the SSE error frame after a block mid-stream."""
        return ContentFiltered(OUTPUT_BLOCK_MESSAGE)

    def _record(self, direction: str, action: str, hits: list[Hit]) -> None:
        self.counts[direction, action] += 1
        where = ", ".join(sorted({f"{h.where} ({h.source})" for h in hits}))
        log.warning("policy %s on %s: %d hit(s) at %s", action, direction, len(hits), where)


def _blank_choices(completion: dict[str, Any], choices: set[int | None]) -> dict[str, Any]:
    new = copy.deepcopy(completion)
    for i, choice in enumerate(new.get("choices") or []):
        if not isinstance(choice, dict) or choice.get("index", i) not in choices:
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            for key in ("reasoning", "reasoning_content", "refusal", "tool_calls", "function_call"):
                message.pop(key, None)
            message["content"] = ""
        choice["finish_reason"] = "content_filter"
        if "logprobs" in choice:
            choice["logprobs"] = None
    return new
