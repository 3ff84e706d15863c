"""What the proxying services share: one pooled HTTP client, a background task run for a lifespan, and the
stream relay."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine

import aiohttp

from block.openai_api import sse


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


async def relay(resp: aiohttp.ClientResponse, chunks: AsyncIterator[bytes], *, first: bytes = b"",
                on_chunk: Callable[[bytes], None] | None = None, on_end: Callable[[str, str], None],
                upstream: str) -> AsyncIterator[bytes]:
    """Pass an upstream SSE stream through to the client, byte for byte.

    ``on_end(status, error)`` runs exactly once: ``ok`` when the upstream finished, ``error`` when it
    broke (the client then gets an OpenAI-shaped error event), ``cancelled`` when the client left. A
    connection whose response was not read to the end is closed, not reused: closing is also what tells
    the upstream to abort the request.
    """
    status, error = "cancelled", "client disconnected"
    try:
        if first:
            yield first
        async for data in chunks:
            if on_chunk is not None:
                on_chunk(data)
            yield data
        status, error = "ok", ""
    except aiohttp.ClientError as exc:
        status, error = "error", f"{upstream} broke mid-stream: {exc!r}"
        yield sse({"error": {"message": error, "type": "APIError", "code": 502}})
    finally:
        if status == "ok":
            resp.release()
        else:
            resp.close()
        on_end(status, error)
