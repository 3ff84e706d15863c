"""Event batches from services to the collector (the single DuckDB writer).

Services emit store.schema row dataclasses (the table comes from the row, so a producer cannot send a
column its table lacks) and the sink posts them every ``interval`` seconds. A collector that is down
does not lose events: batches stay buffered (up to ``max_buffer`` rows per table, then the oldest are
counted as dropped and the count is reported) and are retried on the next flush. A batch the collector
refuses (HTTP 4xx: rows that break the contract) would be refused again, so it is logged with the
collector's reason and counted as rejected instead of blocking every later row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
import orjson

from store.schema import Row

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
        self.rejected = 0
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def emit(self, row: Row) -> None:
        """Buffer one row for its table; an empty ``run_id`` becomes this sink's run."""
        if not isinstance(row, Row) or not row.TABLE:
            raise TypeError(f"EventSink.emit takes a store.schema row dataclass, got {type(row).__name__}")
        if self.url is None:
            return
        data = row.to_dict()
        if not data["run_id"]:
            data["run_id"] = self.run_id
        rows = self._rows.setdefault(row.TABLE, [])
        rows.append(data)
        if len(rows) > self.max_buffer:
            del rows[0]
            self.dropped += 1

    async def flush(self) -> None:
        if self.url is None or not any(self._rows.values()):
            return
        batch, self._rows = self._rows, {}
        count = sum(len(v) for v in batch.values())
        try:
            assert self._client is not None
            resp = await self._client.post(self.url, content=orjson.dumps(batch, option=orjson.OPT_SERIALIZE_NUMPY),
                                           headers={"content-type": "application/json"})
            if 400 <= resp.status_code < 500:
                self.rejected += count
                log.error("collector %s refused %d rows (HTTP %d): %s", self.url, count, resp.status_code,
                          resp.text[:1000])
                return
            resp.raise_for_status()
            self.sent += count
        except (httpx.HTTPError, AssertionError) as exc:
            log.warning("collector %s unavailable (%s); keeping %d rows for the next flush", self.url, exc, count)
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
