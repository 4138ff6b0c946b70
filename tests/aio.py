"""Running a coroutine from a test, whichever tests ran before it in the process."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coro)` in a thread of its own. The session's sync Playwright (tests/conftest.py, `browser`)
    keeps an event loop running in the main thread of any test process that ran a browser test, and there
    asyncio.run refuses to start ("cannot be called from a running event loop")."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
