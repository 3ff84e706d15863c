"""What the proxying services share: one pooled HTTP client, and a background task run for a lifespan."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine

import aiohttp


def proxy_session() -> aiohttp.ClientSession:
    """Pooled keep-alive connections, no overall timeout (streams last as long as generation does), a
    short connect timeout so a dead peer is noticed quickly, and bytes passed through undecoded."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0),
                                 auto_decompress=False)


@contextlib.asynccontextmanager
async def background(job: Coroutine) -> AsyncIterator[None]:
    task = asyncio.create_task(job)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
