"""A vLLM-compatible simulator: the load target for benchmarks and the stand-in for a GPU vLLM
server in tests. `SimulatorThread` runs it inside a test process; `python -m loadtest.vllm_sim`
runs it as a server (driven from other processes through its /_sim/* admin API).

The wire format, the server and the request planning live in sim_wire, sim_server and sim_plan.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from loadtest.sim_plan import FAULTS, SimConfig
from loadtest.sim_server import Simulator

__all__ = ["FAULTS", "SimConfig", "Simulator", "SimulatorThread", "main"]

_T = TypeVar("_T")
_Records = list[dict[str, Any]]


class SimulatorThread:
    """A Simulator on 127.0.0.1 (free port) in a daemon thread with its own event loop.

    Every method is safe to call from any thread; they run on the simulator's loop and wait.
    """

    def __init__(
        self, config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0, **changes: Any
    ) -> None:
        self._sim = Simulator((config or SimConfig()).replace(changes), host=host, port=port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._sim.port

    @property
    def url(self) -> str:
        return f"http://{self._sim.host}:{self._sim.port}"

    @property
    def config(self) -> SimConfig:
        return self._sim.config

    def start(self, timeout: float = 10.0) -> SimulatorThread:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, args=(loop,), name="vllm-sim", daemon=True)
        self._thread.start()
        try:
            self._call(self._sim.start(), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            # Finish what the simulator's close() cancelled (handlers of dropped connections).
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        if self._loop is None or self._loop.is_closed():
            coro.close()
            raise RuntimeError("simulator is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def configure(self, **changes: Any) -> SimConfig:
        """Apply a partial update (validated; unknown keys raise ValueError); returns the new config."""
        return self._call(self._sim.configure(changes))

    def requests(self) -> _Records:
        """A copy of the request records, oldest first (the last 10,000 chat completions)."""
        return self._call(self._sim.records())

    def reset(self) -> SimConfig:
        """Clear the records and restore the configuration the simulator started with."""
        return self._call(self._sim.reset())

    def wait_for(
        self, predicate: Callable[[_Records], bool], timeout: float = 5.0, interval: float = 0.005
    ) -> _Records:
        """Poll `predicate(records)` until it holds; return those records or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.requests()
            if predicate(records):
                return records
            if time.monotonic() >= deadline:
                raise TimeoutError(f"simulator condition not met within {timeout}s; records: {records!r}")
            time.sleep(interval)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        try:
            self._call(self._sim.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.vllm_sim", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="also serve /_sim/* here; it stays up while the main port refuses connections",
    )
    p.add_argument("--model", default="sim-model")
    p.add_argument("--ttft-ms", type=float, default=0)
    p.add_argument("--itl-ms", type=float, default=0)
    p.add_argument("--reply-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--waiting", type=int, default=0, help="extra vllm:num_requests_waiting")
    p.add_argument("--fault", choices=sorted(FAULTS), default="none")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    gpu = p.add_argument_group("GPU-modelling mode (--mode gpu; calibration in loadtest/SIM_GPU.md)")
    gpu.add_argument("--mode", choices=("zero", "gpu"), default="zero")
    gpu.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs")
    defaults = SimConfig()
    for name in (
        "gpu_kv_blocks",
        "gpu_block_size",
        "gpu_max_batched_tokens",
        "gpu_prefill_tok_s",
        "gpu_step_ms",
        "gpu_step_ms_per_seq",
    ):
        default = getattr(defaults, name)
        gpu.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return p.parse_args(argv)


async def _serve(sim: Simulator, ready: Callable[[], None]) -> None:
    await sim.start()
    ready()
    try:
        await asyncio.Event().wait()
    finally:
        await sim.close()


def _run(coro: Coroutine[Any, Any, None], choice: str) -> None:
    """uvloop when importable (or demanded), else the standard loop."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    config = SimConfig(
        model=args.model,
        max_model_len=args.max_model_len,
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        reply_tokens=args.reply_tokens,
        max_num_seqs=args.max_num_seqs,
        waiting=args.waiting,
        fault=args.fault,
        mode=args.mode,
        scheduling_policy=args.scheduling_policy,
        gpu_kv_blocks=args.gpu_kv_blocks,
        gpu_block_size=args.gpu_block_size,
        gpu_max_batched_tokens=args.gpu_max_batched_tokens,
        gpu_prefill_tok_s=args.gpu_prefill_tok_s,
        gpu_step_ms=args.gpu_step_ms,
        gpu_step_ms_per_seq=args.gpu_step_ms_per_seq,
    )
    sim = Simulator(config, host=args.host, port=args.port, admin_port=args.admin_port)

    def ready() -> None:
        loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
        print(f"vllm-sim: serving {config.model} on http://{args.host}:{sim.port} ({loop_name})", flush=True)

    try:
        _run(_serve(sim, ready), args.loop)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
