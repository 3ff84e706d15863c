"""Event batches from services to the collector (the single DuckDB writer).

Services buffer rows per table and post them every ``interval`` seconds. A collector that is down does
not lose events: batches stay buffered (up to ``max_buffer`` rows, then the oldest are counted as
dropped and the count is reported) and are retried on the next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
import orjson

log = logging.getLogger(__name__)


class EventSink:
    def __init__(self, collector_url: str | None, run_id: str, *, interval: float = 0.25, max_buffer: int = 200_000):
        self.url = collector_url.rstrip("/") + "/events" if collector_url else None
        self.run_id = run_id
        self.interval = interval
        self.max_buffer = max_buffer
        self._rows: dict[str, list[dict]] = {}
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self.dropped = 0
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def emit(self, table: str, row: dict) -> None:
        if self.url is None:
            return
        rows = self._rows.setdefault(table, [])
        rows.append({"run_id": self.run_id, **row})
        if len(rows) > self.max_buffer:
            del rows[0]
            self.dropped += 1

    async def flush(self) -> None:
        if self.url is None or not any(self._rows.values()):
            return
        batch, self._rows = self._rows, {}
        try:
            assert self._client is not None
            resp = await self._client.post(self.url, content=orjson.dumps(batch),
                                           headers={"content-type": "application/json"})
            resp.raise_for_status()
            self.sent += sum(len(v) for v in batch.values())
        except (httpx.HTTPError, AssertionError) as exc:
            log.warning("collector %s unavailable (%s); keeping %d rows for the next flush", self.url, exc,
                        sum(len(v) for v in batch.values()))
            for table, rows in batch.items():
                self._rows[table] = rows + self._rows.get(table, [])

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def start(self) -> None:
        if self.url is not None and self._task is None:
            self._client = httpx.AsyncClient(timeout=5.0)
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
