"""The simulated vLLM server: owns the listening socket, the aiohttp runner, the scheduler slots
behind `vllm:num_requests_running/waiting`, the request records and the admin API (/_sim/*).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from loadtest.sim_gpu_serve import ZERO_GPU_COUNTERS, GpuReplica
from loadtest.sim_plan import Plan, RequestError, SimConfig
from loadtest.sim_text import COMPLETIONS_PATH, embeddings_body, plan_body, plan_frames, plan_request
from loadtest.sim_wire import JSON_HEADERS, SSE_HEADERS, error_body, metrics_text, model_list

MAX_RECORDS = 10_000
_SLOW_FACTOR = 10
_METRICS_HEADERS = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
_Record = dict[str, Any]


class Simulator:
    """One simulated vLLM server. Every method runs on the event loop that called `start()`."""

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        admin_port: int | None = None,
    ) -> None:
        self.initial = config or SimConfig()
        self.config = self.initial
        self.host, self.port, self.admin_port = host, port, admin_port
        self._records: deque[_Record] = deque(maxlen=MAX_RECORDS)
        self._running = 0
        self._queue: deque[asyncio.Future[None]] = deque()
        self._busy: set[object] = set()  # connections serving a chat request now
        self._counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0}
        self._success = {"stop": 0, "length": 0}
        self._created = int(time.time())
        self._perm_id = "modelperm-" + os.urandom(16).hex()
        self._runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._gpu: GpuReplica | None = None  # mode="gpu": the modelled GPU behind this server
        self._sync_gpu()

    # lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> int:
        """Listen (port 0 picks a free one, kept for the simulator's lifetime); return the port."""
        app = web.Application()
        app.add_routes(
            [
                web.post("/v1/chat/completions", self._chat),
                web.post(COMPLETIONS_PATH, self._chat),  # planned alike, answered as text_completion
                web.post("/v1/embeddings", self._embeddings),
                web.get("/v1/models", self._models),
                web.get("/health", self._health),
                web.get("/metrics", self._metrics),
            ]
        )
        app.add_routes(self._admin_routes())
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen()  # even when refusing from the start, to own a port to come back on
        if self.config.fault == "refuse":
            self._refuse()
        if self.admin_port is not None:  # stays reachable while the main port refuses connections
            admin = web.Application()
            admin.add_routes(self._admin_routes())
            self._admin_runner = web.AppRunner(admin, access_log=None)
            await self._admin_runner.setup()
            site = web.TCPSite(self._admin_runner, self.host, self.admin_port, reuse_address=True)
            await site.start()
        return self.port

    async def close(self) -> None:
        self._stop_listening()
        if self._gpu is not None:
            await self._gpu.close()
        for runner in (self._runner, self._admin_runner):
            if runner is not None:
                for conn in runner.server.connections if runner.server else ():
                    conn.force_close()
                await runner.cleanup()
        self._runner = self._admin_runner = None

    async def _listen(self) -> None:
        assert self._runner is not None and self._runner.server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._runner.server, self.host, self.port, reuse_address=True, backlog=2048
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _refuse(self) -> None:
        """Like a dead process: nothing listens, idle kept-alive connections are closed, and a
        request in flight closes its connection once answered."""
        self._stop_listening()
        if self._runner is not None and self._runner.server is not None:
            for conn in self._runner.server.connections:
                if conn in self._busy:
                    conn.close()
                else:
                    conn.force_close()

    # control ---------------------------------------------------------------------------------------
    async def configure(self, changes: Mapping[str, Any]) -> SimConfig:
        new = self.config.replace(changes)
        old, self.config = self.config, new
        if new.fault == "refuse" and old.fault != "refuse":
            self._refuse()
            await asyncio.sleep(0)  # let the loop finish closing the listener before we answer
        elif old.fault == "refuse" and new.fault != "refuse":
            await self._listen()
        self._promote()
        self._sync_gpu()
        return new

    def _sync_gpu(self, *, fresh: bool = False) -> None:
        """A new GPU replica (empty KV cache) when GPU parameters change, or a fresh one on demand;
        the old one finishes its requests in flight."""
        want = self.config.gpu_params() if self.config.mode == "gpu" else None
        if self._gpu is not None and (fresh or want != self._gpu.params):
            self._gpu.retire()
            self._gpu = None
        if want is not None and self._gpu is None:
            self._gpu = GpuReplica(want)

    async def reset(self) -> SimConfig:
        """Forget the records and go back to the configuration the simulator started with."""
        self._records.clear()
        self._sync_gpu(fresh=True)
        return await self.configure(dataclasses.asdict(self.initial))

    async def records(self) -> list[_Record]:
        return [dict(r) for r in self._records]

    # scheduler slots: running <= max_num_seqs, the rest queue in arrival order --------------------------
    async def _admit(self) -> None:
        if self._running < self.config.max_num_seqs and not self._queue:
            self._running += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # a slot was handed over just as the client left
            else:
                self._queue.remove(waiter)
            raise

    def _release(self) -> None:
        self._running -= 1
        self._promote()

    def _promote(self) -> None:
        while self._queue and self._running < self.config.max_num_seqs:
            waiter = self._queue.popleft()
            if not waiter.done():
                self._running += 1
                waiter.set_result(None)

    # chat completions ----------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config  # one consistent config per request, even if changed meanwhile
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        rid = ("cmpl-" if request.path == COMPLETIONS_PATH else "chatcmpl-") + (
            request.headers.get("X-Request-Id")
            or (body.get("request_id") if isinstance(body, dict) else None)
            or os.urandom(16).hex()
        )
        rec = _new_record(request, rid, body)
        self._records.append(rec)
        self._busy.add(request.protocol)
        try:
            return await self._answer(request, rec, cfg, body)
        except asyncio.CancelledError:
            rec["cancelled"] = not rec["dropped"]
            raise
        except ConnectionResetError:  # the client left between two writes
            rec["cancelled"] = True
            return web.StreamResponse()
        finally:
            rec["finished"] = time.monotonic()
            self._busy.discard(request.protocol)

    async def _answer(
        self, request: web.Request, rec: _Record, cfg: SimConfig, body: Any
    ) -> web.StreamResponse:
        if cfg.fault == "refuse":  # arrived on a connection opened before the refusal
            return _drop(request, rec)
        if cfg.fault == "status":
            return await _send_error(request, rec, cfg, cfg.fault_status, cfg.fault_message)
        try:
            plan, body = plan_request(request.path, body, cfg, rec["id"])
        except RequestError as exc:
            return await _send_error(request, rec, cfg, exc.status, exc.message)
        if cfg.mode == "gpu" and self._gpu is not None:
            return await self._gpu_answer(request, rec, cfg, plan, body)
        await self._admit()
        try:
            if cfg.fault == "stall":  # a hung engine: the request holds its slot, nothing is sent
                await asyncio.sleep(cfg.stall_s)
            self._counters["prompt_tokens_total"] += plan.prompt_tokens
            factor = _SLOW_FACTOR / 1000 if cfg.fault == "slow" else 1 / 1000
            ttft, itl = cfg.ttft_ms * factor, cfg.itl_ms * factor
            cut = Cut(cfg.fault, cfg.drop_after_chunks if cfg.fault in CUTS else -1, cfg.stall_s)
            if plan.stream:
                resp = await _stream(request, rec, plan, ttft, itl, cut)
            else:
                resp = await _complete(request, rec, plan, ttft + itl * (len(plan.tokens) - 1), cut)
            if rec["completed"]:
                self._counters["generation_tokens_total"] += plan.n * len(plan.tokens)
                self._success[plan.finish] += 1
            return resp
        finally:
            self._release()

    async def _gpu_answer(
        self, request: web.Request, rec: _Record, cfg: SimConfig, plan: Plan, body: Any
    ) -> web.StreamResponse:
        """GPU mode: the engine's queue and steps replace the slots and the fixed delays."""
        gpu = self._gpu
        assert gpu is not None
        try:  # the engine re-splits the answer's text into its tokens: agent answers are plain here
            plan, ticket = gpu.prepare(dataclasses.replace(plan, agent=None), body, cfg.max_model_len)
        except RequestError as exc:
            return await _send_error(request, rec, cfg, exc.status, exc.message)
        gpu.submit(ticket)
        cut = Cut(cfg.fault, cfg.drop_after_chunks if cfg.fault in CUTS else -1, cfg.stall_s)
        try:
            if plan.stream:  # unit delays mark where each token's frames start; the pacer waits
                resp = await _stream(request, rec, plan, 1.0, 1.0, cut, wait=gpu.pacer(ticket))
            else:
                await gpu.wait_tokens(ticket, len(plan.tokens))
                resp = await _complete(request, rec, plan, 0, cut)
            rec["prompt_tokens"], rec["cached_tokens"] = plan.prompt_tokens, ticket.seq.cached_tokens
            if rec["completed"]:
                self._success[plan.finish] += 1
            return resp
        finally:
            gpu.release(ticket)

    # other endpoints -------------------------------------------------------------------------------
    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        """Deterministic vectors at once; the faults that apply before an answer (refuse, status,
        stall) as for chat, and a client leaving is recorded as a cancellation."""
        cfg = self.config
        try:
            body: Any = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        rec = _new_record(request, "embd-" + os.urandom(16).hex(), body)
        self._records.append(rec)
        try:
            if cfg.fault == "refuse":
                return _drop(request, rec)
            if cfg.fault == "stall":
                await asyncio.sleep(cfg.stall_s)
            payload = embeddings_body(body, cfg, rec["id"])
            if cfg.fault == "status":
                raise RequestError(cfg.fault_status, cfg.fault_message)
        except RequestError as exc:
            return await _send_error(request, rec, cfg, exc.status, exc.message)
        except asyncio.CancelledError:
            rec["cancelled"] = True
            raise
        finally:
            rec["finished"] = time.monotonic()
        rec["status"], rec["completed"] = 200, True
        return web.Response(body=payload, headers=JSON_HEADERS)

    async def _models(self, request: web.Request) -> web.Response:
        cfg = self.config
        return web.Response(
            body=model_list(cfg.model, cfg.max_model_len, self._created, self._perm_id), headers=JSON_HEADERS
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        cfg = self.config
        gauges = {
            "num_requests_running": self._running,
            "num_requests_waiting": cfg.waiting + len(self._queue),
            "kv_cache_usage_perc": min(1.0, self._running / cfg.max_num_seqs),
        }
        counters: dict[str, float] = {**self._counters, **ZERO_GPU_COUNTERS}
        if cfg.mode == "gpu" and self._gpu is not None:
            gauges, counters = self._gpu.metrics(cfg.waiting)
        gauges["gpu_cache_usage_perc"] = gauges["kv_cache_usage_perc"]
        body = metrics_text(cfg.model, gauges, counters, self._success)
        return web.Response(body=body, headers=_METRICS_HEADERS)

    def _admin_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_sim/config", self._get_config),
            web.post("/_sim/config", self._post_config),
            web.get("/_sim/requests", self._get_requests),
            web.post("/_sim/reset", self._post_reset),
        ]

    async def _get_config(self, request: web.Request) -> web.Response:
        return web.Response(body=self.config.to_json(), headers=JSON_HEADERS)

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("config changes must be a JSON object")
            config = await self.configure(changes)
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            return web.Response(status=400, body=error_body(400, str(exc)), headers=JSON_HEADERS)
        return web.Response(body=config.to_json(), headers=JSON_HEADERS)

    async def _get_requests(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(await self.records()), headers=JSON_HEADERS)

    async def _post_reset(self, request: web.Request) -> web.Response:
        return web.Response(body=(await self.reset()).to_json(), headers=JSON_HEADERS)


def _new_record(request: web.Request, rid: str, body: Any) -> _Record:
    return {
        "id": rid,
        "path": request.path,
        "body": body,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "started": time.monotonic(),
        "finished": None,
        "completed": False,
        "cancelled": False,
        "dropped": False,
        "stalled": False,
        "status": None,
    }


CUTS = frozenset({"drop", "reset", "stall_stream"})  # faults that strike after `drop_after_chunks` frames


class Cut(NamedTuple):
    """What happens to a response after `after` frames (-1: never): the connection is closed
    (`drop`), reset (`reset`, an RST), or the response stalls for `stall_s` and then goes on
    (`stall_stream`; after 0 frames: headers sent, no first token)."""

    how: str
    after: int
    stall_s: float = 0.0

    @classmethod
    def of(cls, after: int) -> Cut:
        return cls("drop", after)


async def _strike(request: web.Request, rec: _Record, cut: Cut) -> web.StreamResponse | None:
    """Apply `cut`; the response to return when it ended the request, else None (go on)."""
    if cut.how == "stall_stream":
        rec["stalled"] = True
        await asyncio.sleep(cut.stall_s)
        return None
    if cut.how == "reset" and request.transport is not None:
        sock = request.transport.get_extra_info("socket")
        if sock is not None:  # linger 0: close() sends an RST instead of a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rec["dropped"] = True
        request.transport.abort()
        return web.StreamResponse()
    return _drop(request, rec)


def _drop(request: web.Request, rec: _Record) -> web.StreamResponse:
    """Close the connection with no (further) response bytes: what a crashed server looks like."""
    rec["dropped"] = True
    if request.transport is not None:
        request.transport.close()
    return web.StreamResponse()  # aiohttp's write of it fails quietly on the closed transport


async def _send_error(
    request: web.Request, rec: _Record, cfg: SimConfig, status: int, message: str
) -> web.Response:
    resp = web.Response(
        status=status, body=error_body(status, message, legacy=cfg.legacy_errors), headers=JSON_HEADERS
    )
    await resp.prepare(request)
    await resp.write_eof()
    rec["status"], rec["completed"] = status, True
    return resp


async def _complete(
    request: web.Request, rec: _Record, plan: Plan, delay: float, cut: Cut | int
) -> web.StreamResponse:
    cut = Cut.of(cut) if isinstance(cut, int) else cut
    if delay > 0:
        await asyncio.sleep(delay)
    resp = web.Response(body=plan_body(plan), headers=JSON_HEADERS)
    if cut.after >= 0 and cut.how == "stall_stream":
        await resp.prepare(request)  # headers out, body held back
        await _strike(request, rec, cut)
    elif cut.after >= 0 and (ended := await _strike(request, rec, cut)) is not None:
        return ended
    await resp.prepare(request)
    await resp.write_eof()
    rec["status"], rec["completed"] = 200, True
    return resp


async def _stream(
    request: web.Request,
    rec: _Record,
    plan: Plan,
    ttft: float,
    itl: float,
    cut: Cut | int,
    wait: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> web.StreamResponse:
    """Frames due at the same moment go out in one write; zero delays never sleep."""
    cut = Cut.of(cut) if isinstance(cut, int) else cut
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    rec["status"] = 200
    if cut.after == 0 and (ended := await _strike(request, rec, cut)) is not None:
        return ended
    pending: list[bytes] = []
    sent = 0
    for delay, frame in plan_frames(plan, ttft, itl):
        if delay > 0:
            if pending:
                await resp.write(b"".join(pending))
                pending.clear()
            await wait(delay)
        pending.append(frame)
        sent += 1
        if sent == cut.after:
            await resp.write(b"".join(pending))
            pending.clear()
            if (ended := await _strike(request, rec, cut)) is not None:
                return ended
    await resp.write(b"".join(pending))
    await resp.write_eof()
    rec["completed"] = True
    return resp
