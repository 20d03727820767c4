"""The in-process llama.cpp backend (llama-cpp-python): the embedded default and the CPU fallback.

One worker thread runs one generation at a time behind a bounded queue (a `Llama` is not
thread-safe); tokens reach the loop as they come; closing a stream stops the model within a token.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import importlib.util
import logging
import sys
import threading
import time
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any, Protocol, cast

import jinja2
import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from backends.base import BackendError, Body, Chunk, ErrorKind, raw_prompt
from backends.collect import collect, with_usage

log = logging.getLogger("llm_gateway.llamacpp")

_PASSED = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "stop")


class LlamaCppSettings(Protocol):
    """What this backend reads: proxy.settings.LlamaCppBackendSettings fits (no import of the edge)."""

    @property
    def model_path(self) -> str: ...
    @property
    def model_package(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def context(self) -> int: ...
    @property
    def max_queue(self) -> int: ...
    @property
    def first_token_timeout_s(self) -> float: ...


class ModelLoadError(RuntimeError):
    """The configured model cannot be found or loaded: a start-up error, never a silent disable."""


class _Cancelled(Exception):
    """Raised inside llama.cpp's generation loop (worker thread) once the request is cancelled."""


def find_package_gguf(package: str) -> Path:
    """The single .gguf file inside an installed package (found by spec: its __init__ is not run)."""
    spec = None
    with contextlib.suppress(ImportError, ValueError):  # a missing parent package, a bad name
        spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model_package {package!r} is not an installed package")
    found = sorted({p for d in spec.submodule_search_locations for p in Path(d).rglob("*.gguf")})
    if len(found) != 1:
        what = ", ".join(p.name for p in found) or "no .gguf file"
        raise ModelLoadError(f"model_package {package!r} holds {what}; expected exactly one .gguf file")
    return found[0]


class _Model(llama_cpp.Llama):
    """A Llama that stops when cancelled (checked per prompt batch and per token) and counts its
    tokens, since llama.cpp's stream reports no usage. Touched by the worker thread only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gw_cancel, self.gw_sampled, self.gw_last, self.gw_total = threading.Event(), 0, -1, 0

    def arm(self, cancel: threading.Event) -> None:
        self.gw_cancel, self.gw_sampled, self.gw_last = cancel, 0, -1

    def eval(self, tokens: Any) -> None:
        step = max(1, self.n_batch)
        for i in range(0, len(tokens), step):
            if self.gw_cancel.is_set():
                raise _Cancelled
            super().eval(tokens[i : i + step])

    def sample(self, *args: Any, **kwargs: Any) -> int:
        if self.gw_cancel.is_set():
            raise _Cancelled
        self.gw_last = int(super().sample(*args, **kwargs))
        self.gw_sampled, self.gw_total = self.gw_sampled + 1, self.gw_total + 1
        return self.gw_last

    def completion_tokens(self) -> int:
        """Sampled tokens less a final end-of-generation token (llama.cpp's own usage rule)."""
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        return self.gw_sampled - int(self.gw_last >= 0 and llama_cpp.llama_vocab_is_eog(vocab, self.gw_last))


# worker -> loop: (content, finish_reason) per piece; the completion tokens (int) or an error to end
_Item = tuple[str, str | None] | int | BackendError


def _bad(message: str, param: str) -> BackendError:
    return BackendError(ErrorKind.BAD_REQUEST, message, status=400, param=param)


def _messages(messages: list[Any]) -> list[dict[str, str]]:
    """Role + text only; content parts keep their text; 'developer' is a system message here."""
    out = []
    for m in messages:
        m = m.model_dump() if hasattr(m, "model_dump") else m
        content = m.get("content") or ""
        if not isinstance(content, str):
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        role = "system" if m.get("role") == "developer" else str(m.get("role") or "user")
        out.append({"role": role, "content": content})
    return out


def _response_format(fmt: Any) -> dict[str, Any] | None:
    """json_object and json_schema become a grammar inside llama-cpp-python's chat handler."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in (None, "text"):
        return None
    if kind not in ("json_object", "json_schema"):
        raise _bad("response_format must be text, json_object or json_schema", "response_format")
    schema = (fmt.get("json_schema") or {}).get("schema")
    return {"type": "json_object", "schema": schema} if schema else {"type": "json_object"}


def _generation_kwargs(body: Body, messages: list[dict[str, str]], n_vocab: int) -> dict[str, Any]:
    """The allow-listed request fields in llama-cpp-python's names, with OpenAI's defaults; a
    legacy completions request's raw prompt as `prompt` (create_completion) instead of `messages`."""
    if body.get("n", 1) != 1:
        raise _bad("this model supports only n=1", "n")
    prompt = raw_prompt(body)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("this model does not return logprobs", "logprobs")
    if body.get("tools") and body.get("tool_choice") != "none":
        raise _bad("this model does not call tools; send the request without tools", "tools")
    kw: dict[str, Any] = {"messages": messages} if prompt is None else {"prompt": prompt}
    kw |= {"temperature": 1.0, "top_p": 1.0}
    kw.update({k: body[k] for k in _PASSED if body.get(k) not in (None, [], "")})
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    repeat = body.get("repeat_penalty", body.get("repetition_penalty"))
    extra = {"max_tokens": max_tokens, "repeat_penalty": repeat}
    extra["response_format"] = _response_format(body.get("response_format"))
    if body.get("logit_bias"):  # checked here: a bad id would fail unseen in a ctypes callback
        try:
            extra["logit_bias"] = bias = {int(k): float(v) for k, v in dict(body["logit_bias"]).items()}
        except (TypeError, ValueError):
            raise _bad("logit_bias must map token ids to numbers", "logit_bias") from None
        if any(not 0 <= k < n_vocab for k in bias):
            raise _bad(f"logit_bias token ids must be in [0, {n_vocab})", "logit_bias")
    return kw | {k: v for k, v in extra.items() if v is not None}


class LlamaCppStream:
    """One generation: the ChunkStream the loop reads, and the job the worker thread runs."""

    def __init__(self, kwargs: dict[str, Any], model: str, prompt_tokens: int, include_usage: bool) -> None:
        self.kwargs, self._model = kwargs, model
        self._prompt_tokens, self._include_usage = prompt_tokens, include_usage
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.cancel = threading.Event()
        self.future: concurrent.futures.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pending: collections.deque[_Item] = collections.deque()  # the first item, from first()
        self._started = self._finished = self._closed = False

    def put(self, item: _Item) -> None:  # called on the worker thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancel.set()

    async def first(self, limit_s: float) -> None:
        """Wait for the first token (queue wait included): refusals surface before any byte is sent."""
        try:
            async with asyncio.timeout(limit_s):
                item = await self._queue.get()
            if isinstance(item, BackendError):
                raise item
        except BaseException as exc:  # a timeout, a refusal, or the caller was cancelled
            await self.aclose()
            if isinstance(exc, TimeoutError):
                msg = f"the local model gave no first token within {limit_s:g}s"
                raise BackendError(ErrorKind.TIMEOUT, msg) from None
            raise
        self._pending.append(item)

    def __aiter__(self) -> LlamaCppStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._finished or self._closed:
            raise StopAsyncIteration
        if not self._started:
            self._started = True
            return self._chunk({"role": "assistant", "content": ""})
        item = self._pending.popleft() if self._pending else await self._queue.get()
        if isinstance(item, BackendError):
            self._finished = True
            raise BackendError(ErrorKind.MID_STREAM, item.message, cause=item.kind, param=item.param)
        return self._handle(item)

    def _handle(self, item: tuple[str, str | None] | int) -> Chunk:
        if isinstance(item, tuple):
            content, finish_reason = item
            return self._chunk({"content": content} if content else {}, finish_reason)
        self._finished = True
        if not self._include_usage:
            raise StopAsyncIteration
        usage = dict(prompt_tokens=self._prompt_tokens, completion_tokens=item)
        return self._chunk(None, usage=usage | {"total_tokens": self._prompt_tokens + item})

    def _chunk(self, delta: dict[str, str] | None, finish_reason: str | None = None, **extra: Any) -> Chunk:
        """A chunk with one choice, or with none (delta None: the usage chunk)."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        head = dict(id=self.id, object="chat.completion.chunk", created=self.created, model=self._model)
        return head | {"choices": [] if delta is None else [choice]} | extra

    async def aclose(self) -> None:
        """Cancel (a queued request then never starts) and return once the model is free."""
        if self._closed:
            return
        self._closed = True
        self.cancel.set()
        if self.future is None or self.future.cancel() or self.future.done():
            return
        with contextlib.suppress(Exception):  # the worker reports failures through the queue
            await asyncio.wrap_future(self.future)


class LlamaCppBackend:
    """One GGUF model loaded in this process, serving one request at a time."""

    def __init__(self, name: str, settings: LlamaCppSettings) -> None:
        self.name, self.model = name, settings.model
        self.context_length: int | None = settings.context
        self.model_file: Path | None = None  # resolved in start()
        self._settings = settings
        self._llm: _Model | None = None
        self._formatter: Jinja2ChatFormatter | None = None  # the GGUF's chat template
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # for the two below: changed on the loop and the worker
        self._outstanding = 0  # the running request plus those waiting behind it
        self._jobs: set[LlamaCppStream] = set()

    async def start(self) -> None:
        s = self._settings
        self.model_file = path = Path(s.model_path) if s.model_path else find_package_gguf(s.model_package)
        if not path.is_file():
            raise ModelLoadError(f"backend {self.name!r}: model file {path} does not exist")
        threads = {"n_threads": s.threads, "n_threads_batch": s.threads}
        size_mb = path.stat().st_size / 1e6
        print(f"llama.cpp: loading {path.name} ({size_mb:.0f} MB) for {self.name!r} ...", file=sys.stderr)
        started = time.perf_counter()
        try:
            llm = await asyncio.to_thread(_Model, str(path), n_ctx=s.context, verbose=False, **threads)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"backend {self.name!r}: cannot load {path}: {exc}") from None
        print(f"llama.cpp: {path.name} loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        self._formatter = self._chat_formatter(llm)
        llm.chat_handler = self._formatter.to_chat_handler()  # the one count_tokens uses: exact usage
        self._llm = llm
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"llamacpp-{self.name}")

    def _chat_formatter(self, llm: _Model) -> Jinja2ChatFormatter:
        """The GGUF's own chat template, built as llama-cpp-python builds it."""
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:  # llama-cpp-python would guess a format: wrong prompts, wrong counts
            llm.close()
            raise ModelLoadError(f"backend {self.name!r}: the GGUF file has no chat template")
        ids = (llm.token_eos(), llm.token_bos())
        eos, bos = (llm.detokenize([t], special=True).decode() if t >= 0 else "" for t in ids)
        return Jinja2ChatFormatter(template, eos, bos, stop_token_ids=[ids[0]])

    async def close(self) -> None:
        for job in self._jobs.copy():  # requests waiting for a first token get an answer, not a hang
            job.cancel.set()
            job.put(BackendError(ErrorKind.CONNECT, f"backend {self.name!r} is shutting down"))
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    async def health(self) -> bool:
        return self._llm is not None and self._executor is not None

    async def load(self) -> float | None:
        return float(max(0, self._outstanding - 1))  # one int read: no lock needed

    @property
    def tokens_generated(self) -> int:  # since start, cancelled requests included
        return self._llm.gw_total if self._llm is not None else 0

    def count_text_tokens(self, text: str) -> int:
        """Tokens of plain text by the model's tokenizer (no BOS; special tokens read as text)."""
        return len(self._model().tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def count_tokens(self, messages: list[Any]) -> int | None:
        # Runs on the event loop while the worker may be generating: llama_tokenize only reads
        # the immutable vocabulary (llama-server tokenizes on its HTTP threads the same way).
        try:
            return self._count(_messages(messages)) if self._llm is not None else None
        except BackendError:  # the chat template refuses these messages; stream() will say so
            return None

    def _count(self, messages: list[dict[str, str]]) -> int:
        assert self._formatter is not None
        try:
            prompt = self._formatter(messages=cast(Any, messages)).prompt
        except (ValueError, jinja2.TemplateError) as exc:  # raise_exception() in the template
            raise _bad(f"the model's chat template refused the messages: {exc}", "messages") from None
        return len(self._model().tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    def _count_raw(self, prompt: str) -> int:
        """Tokens of a raw prompt as create_completion reads it (BOS added, special tokens parsed)."""
        return len(self._model().tokenize(prompt.encode("utf-8"), add_bos=True, special=True))

    def _model(self) -> _Model:
        if self._llm is None:
            raise BackendError(ErrorKind.CONNECT, f"backend {self.name!r} is not running")
        return self._llm

    async def chat(self, body: Body) -> Body:
        return await collect(await self.stream(with_usage(body)))

    async def stream(self, body: Body) -> LlamaCppStream:
        messages = _messages(body.get("messages") or [])
        kwargs = _generation_kwargs(body, messages, self._model().n_vocab())
        if "prompt" in kwargs:  # legacy completions: the raw prompt, without the chat template
            prompt_tokens, what = self._count_raw(kwargs["prompt"]), "prompt"
        else:
            prompt_tokens, what = self._count(messages), "messages"
        context = self._settings.context
        if prompt_tokens >= context:
            msg = f"{prompt_tokens} tokens in the {what}; this model's context is {context} tokens"
            raise _bad(msg, what)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stream = LlamaCppStream(kwargs, self.model, prompt_tokens, include_usage)
        self._submit(stream)
        await stream.first(self._settings.first_token_timeout_s)
        return stream

    def _submit(self, job: LlamaCppStream) -> None:
        executor = self._executor
        if executor is None:
            raise BackendError(ErrorKind.CONNECT, f"backend {self.name!r} is not running")
        with self._lock:
            if self._outstanding > self._settings.max_queue:
                msg = f"the local model is busy ({self._settings.max_queue} requests already waiting)"
                raise BackendError(ErrorKind.OVERLOADED, msg)
            self._outstanding += 1
            self._jobs.add(job)
        job.future = executor.submit(self._generate, job)
        job.future.add_done_callback(lambda _f: self._release(job))

    def _release(self, job: LlamaCppStream) -> None:
        with self._lock:  # on whichever thread ended the future
            self._outstanding -= 1
            self._jobs.discard(job)

    def _generate(self, job: LlamaCppStream) -> None:
        """The worker thread: run one generation, handing each token to the loop as it comes."""
        if job.cancel.is_set():
            return  # cancelled while it waited: never start
        llm = self._model()
        llm.arm(job.cancel)
        raw = "prompt" in job.kwargs  # legacy completions: text chunks, not chat deltas
        try:
            create = llm.create_completion if raw else llm.create_chat_completion
            chunks = create(stream=True, **job.kwargs)
            assert isinstance(chunks, Generator)
            try:
                for chunk in chunks:
                    choice: Any = chunk["choices"][0]
                    content = (choice["text"] if raw else choice["delta"].get("content")) or ""
                    finish_reason = choice["finish_reason"]
                    if content or finish_reason:
                        job.put((content, finish_reason))
            finally:
                chunks.close()  # here, not in a GC finalizer on another thread: it holds model state
            end: _Item = llm.completion_tokens()
        except _Cancelled:
            return
        except ValueError as exc:  # llama.cpp's way to refuse input (context overflow, template)
            end = _bad(f"the local model refused the request: {exc}", "prompt" if raw else "messages")
        except Exception as exc:
            log.error("llama.cpp generation failed: %s", type(exc).__name__)
            end = BackendError(ErrorKind.UPSTREAM_5XX, "the local model failed while generating")
        finally:
            llm.arm(threading.Event())
        job.put(end)
