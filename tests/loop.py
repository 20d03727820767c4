"""Waiting for the event loop without the wall clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(check: Callable[[], bool], *, turns: int = 1_000_000) -> None:
    """Let the event loop run until `check()` holds; fails after `turns` turns of it."""
    for _ in range(turns):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")
