"""What the proxying services share: one pooled HTTP client, a background task run for a lifespan, waiting on
an upstream only while the client is still there, the stream relay, and the server runner.

A relayed stream is judged by what it carried, not by how its connection ended: a side-car that relays
an engine's error event and then closes cleanly has still failed, so the relay looks for OpenAI error
events (``data: {"error"...``) and for the final ``data: [DONE]`` and reports ``error`` when either says
so. That is what lets the scheduler record a request whose engine died mid-stream as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import aiohttp
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from block.openai_api import sse

T = TypeVar("T")

ERROR_EVENT = b'data: {"error"'
DONE_EVENT = b"data: [DONE]\n\n"
_MAX_ERROR_EVENT = 4096


def proxy_session(headers: Mapping[str, str] | None = None) -> aiohttp.ClientSession:
    """Pooled keep-alive connections, no overall timeout (streams last as long as generation does), a
    short connect timeout so a dead peer is noticed quickly, and bytes passed through undecoded.
    ``headers`` go with every request (the cluster token for side-cars off loopback)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0),
                                 auto_decompress=False, headers=dict(headers or {}))


@contextlib.asynccontextmanager
async def background(*jobs: Coroutine) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(job) for job in jobs]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class ClientGone(Exception):
    """The client disconnected while the server was still waiting on its upstream."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client leaves first; then cancel it and raise ClientGone.

    An ASGI server does not cancel a handler whose client left, so a handler waiting on an upstream
    (a non-streaming answer, or the first byte of a stream) would keep that upstream generating for
    nobody. Cancelling ``work`` closes its upstream connection, which is what makes the engine abort.
    Call it only after the request body was read: it consumes the ASGI receive channel.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone


class TokenCounter:
    """Counts tokens in an SSE byte stream without holding more than one partial event.

    Byte checks instead of JSON parsing keep the per-token cost of a proxy small: an event carries a
    token unless its text is empty (final chunk), it has no choices (the usage chunk) or it is an error.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.total = 0

    def feed(self, data: bytes) -> int:
        if self.buffer:
            data = self.buffer + data
        end = data.rfind(b"\n\n")
        if end < 0:
            self.buffer = data
            return 0
        self.buffer = data[end + 2:]
        tokens = 0
        for event in data[:end].split(b"\n\n"):
            if (event.startswith(b"data: {") and b'"error"' not in event[:20] and b'"text":""' not in event
                    and b'"content":""' not in event and b'"choices":[]' not in event and b'"delta":{}' not in event):
                tokens += 1
        self.total += tokens
        return tokens


def error_event(message: str, code: int = 502) -> bytes:
    return sse({"error": {"message": message, "type": "APIError", "param": None, "code": code}})


def error_message(event: bytes) -> str:
    """The message of an SSE error event (``data: {"error": {"message": ...}}``), or its raw text."""
    payload = event.split(b"\n\n", 1)[0].removeprefix(b"data: ")
    try:
        err = orjson.loads(payload)["error"]
        return str(err.get("message") if isinstance(err, dict) else err)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return payload[:300].decode("utf-8", "replace")


class IdleTimeout(Exception):
    """No upstream chunk arrived within the relay's idle timeout."""


class Relay:
    """Pass an upstream SSE stream through to the client, byte for byte, and say how it ended.

    ``on_end(status, error)`` runs exactly once: ``ok`` when the upstream finished with ``data: [DONE]``
    and sent no error event; ``error`` when it broke, went idle for ``idle_timeout`` seconds, sent an
    error event or ended without ``[DONE]`` (the client then gets an OpenAI-shaped error event unless
    the upstream's own was passed on); ``cancelled`` when the client left. ``failure`` names the kind of
    error (``broken``, ``idle_timeout``, ``upstream_error``, ``incomplete``). A connection whose response
    was not read to the end is closed, not reused: closing is also what tells the upstream to abort.
    """

    def __init__(self, resp: aiohttp.ClientResponse, chunks: AsyncIterator[bytes], *, upstream: str,
                 on_end: Callable[[str, str], None], first: bytes = b"",
                 on_chunk: Callable[[bytes], None] | None = None, idle_timeout: float | None = None):
        self.resp = resp
        self.chunks = chunks
        self.upstream = upstream
        self.on_end = on_end
        self.first = first
        self.on_chunk = on_chunk
        self.idle_timeout = idle_timeout
        self.failure: str | None = None
        self._tail = b""
        self._error_event: bytes | None = None
        self._gen: AsyncGenerator[bytes, None] | None = None
        self._ended = False
        self._loop = asyncio.get_running_loop()
        self._reader: asyncio.Task | None = None  # the task awaiting an upstream chunk, while it waits
        self._waiting_since = 0.0
        self._idle = False
        self._timer: asyncio.TimerHandle | None = None

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        self._gen = self._relay()
        return self._gen

    def _watch(self, data: bytes) -> None:
        """Keep the stream's last bytes (is it [DONE]?) and its first error event, across chunk boundaries."""
        joined = self._tail + data
        if self._error_event is None:
            at = joined.find(ERROR_EVENT)
            if at >= 0:
                self._error_event = joined[at:]
        elif len(self._error_event) < _MAX_ERROR_EVENT and b"\n\n" not in self._error_event:
            self._error_event += data
        self._tail = joined[-len(DONE_EVENT):]

    def upstream_error(self) -> str | None:
        """The message of the first error event the upstream sent, if it sent one."""
        if self._error_event is None:
            return None
        return f"{self.upstream} sent an error: {error_message(self._error_event)}"

    async def _next(self) -> bytes | None:
        if self.idle_timeout is None:
            return await anext(self.chunks, None)
        self._waiting_since = self._loop.time()
        self._reader = asyncio.current_task()
        try:
            return await anext(self.chunks, None)
        except asyncio.CancelledError:
            if self._idle and self._reader is not None and self._reader.uncancel() == 0:
                raise IdleTimeout from None
            raise
        finally:
            self._reader = None

    def _watchdog(self) -> None:
        """Every quarter of the idle timeout, cancel a read that has waited longer than it: one timer per
        stream instead of one per chunk, so a stall is noticed within 1.25 idle timeouts. Time the relay
        spends waiting on a slow client is not counted: only a pending upstream read is."""
        if self._ended or self.idle_timeout is None:
            return
        if self._reader is not None and self._loop.time() - self._waiting_since >= self.idle_timeout:
            self._idle = True
            self._reader.cancel()
            return
        self._timer = self._loop.call_later(self.idle_timeout / 4, self._watchdog)

    async def _relay(self) -> AsyncGenerator[bytes, None]:
        status, error = "cancelled", "client disconnected"
        self._watchdog()
        try:
            if self.first:
                self._watch(self.first)
                yield self.first
            while (data := await self._next()) is not None:
                self._watch(data)
                if self.on_chunk is not None:
                    self.on_chunk(data)
                yield data
            message = self.upstream_error()
            if message is not None:
                status, error, self.failure = "error", message, "upstream_error"
            elif self._tail != DONE_EVENT:
                status, error = "error", f"{self.upstream} ended the stream without data: [DONE]"
                self.failure = "incomplete"
                yield error_event(error)
            else:
                status, error = "ok", ""
        except aiohttp.ClientError as exc:
            status, error, self.failure = "error", f"{self.upstream} broke mid-stream: {exc!r}", "broken"
            yield error_event(error)
        except IdleTimeout:
            status, self.failure = "error", "idle_timeout"
            error = f"idle timeout: {self.upstream} sent nothing for {self.idle_timeout:g} s mid-stream"
            yield error_event(error, 504)
        finally:
            self.end(status, error)

    def end(self, status: str, error: str) -> None:
        """Release the upstream connection and report, once; later calls do nothing."""
        if self._ended:
            return
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
        if status == "ok":
            self.resp.release()
        else:
            self.resp.close()
        self.on_end(status, error)

    async def aclose(self) -> None:
        """End the relay even if the response never started streaming it (the client left first)."""
        if self._gen is not None:
            with contextlib.suppress(Exception):
                await self._gen.aclose()
        self.end("cancelled", "client disconnected")


class RelayResponse(StreamingResponse):
    """A StreamingResponse over a Relay that always ends the relay, however the response ends: a client
    that leaves before the first chunk would otherwise leave the upstream connection open and the request
    unrecorded until garbage collection."""

    def __init__(self, relay: Relay, headers: Mapping[str, str] | None = None):
        super().__init__(relay, media_type="text/event-stream", headers=headers)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.relay.aclose()


GC_THRESHOLD = (20_000, 10, 10)


def run_server(app: Any, host: str, port: int, *, graceful_timeout_s: float,
               on_signal: Callable[[], None] | None = None) -> None:
    """Serve ``app`` with uvicorn until SIGTERM/SIGINT, then shut down within ``graceful_timeout_s``.

    uvicorn waits for open responses before it runs the lifespan exit (where services flush their event
    rows); a stream that lasts minutes would hold that exit past the cluster driver's SIGKILL and lose
    the rows, so open responses get ``graceful_timeout_s`` and are then cancelled. ``on_signal`` runs when
    the signal arrives, so a service can tell a shutdown from a client that left.
    """
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            """Once started, the heap built so far (modules, clients, models) is frozen out of the garbage
            collector: its oldest-generation passes over it paused the scheduler 90-105 ms mid-decision at
            150 req/s (17 ms after), as vLLM freezes its engine's startup heap. The youngest generation is
            then collected every ``GC_THRESHOLD[0]`` allocations instead of CPython's 700: a request's
            objects are freed by reference counting, yet at 700 the collector's passes took 11-13% of the
            scheduler's CPU routing ~1,150 req/s with least_requests on 2 cores (5-7% with block's
            in-process predictions), and 0-1.5% at 20,000."""
            await super().startup(sockets)
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLD)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if on_signal is not None:
                on_signal()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=graceful_timeout_s)
    server = Server(config)
    server.run()
    if not server.started:
        sys.exit(3)  # what uvicorn.run exits with when the server could not start
