"""Event batches from services to the collector (the single DuckDB writer).

Services emit store.schema row dataclasses (the table comes from the row, so a producer cannot send a
column its table lacks) and the sink posts them every ``interval`` seconds (1 s by default: a DuckDB
transaction costs the collector ~3.5 ms however few rows it carries, so nine services posting every
0.25 s kept a fifth of a core busy on an idle cluster; once a second is how often the dashboards
refresh). A collector that is down
does not lose events: batches stay buffered (up to ``max_buffer`` rows per table, then the oldest are
counted as dropped and the count is reported) and are retried on the next flush. A batch the collector
refuses (HTTP 4xx: rows that break the contract) would be refused again, so it is logged with the
collector's reason and counted as rejected instead of blocking every later row.

A batch the collector wrote but whose answer timed out is sent again; every row carries the ``event_id``
it got when it was made, so the collector ignores the copy. Rows are posted in batches of at most
``max_batch_bytes`` (4 MiB, half the collector's body limit), so a backlog built up while the collector
was down is not refused whole as too large. With a cluster token configured (store.auth) every post
carries it.

With a ``journal`` folder, every row is also appended to a file as it is emitted (one unbuffered write,
so it is in the kernel's hands before the request it describes is answered), and a service killed with
SIGKILL loses nothing: when it starts again it sends what its journal still holds, and the collector
ignores what it already has. Segments are deleted once the collector has answered for every row in them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import httpx
import orjson

from store.auth import cluster_token
from store.schema import Row

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 4 * 1024 * 1024

Batch = dict[str, list[dict]]


def _encode(value: dict) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def split_batch(rows: Batch, limit: int) -> tuple[Batch, Batch]:
    """The first rows, in table order, whose JSON fits in ``limit`` bytes (at least one row, so a row over
    the limit is sent, refused and reported rather than kept forever), and the rows left for later."""
    head: Batch = {}
    rest: Batch = {}
    size = 2  # the braces
    for table, table_rows in rows.items():
        if rest:
            rest[table] = table_rows
            continue
        overhead = len(orjson.dumps(table)) + 4  # "table":[ ... ],
        for i, row in enumerate(table_rows):
            grown = size + len(_encode(row)) + 1 + (0 if table in head else overhead)
            if grown > limit and head:
                rest[table] = table_rows[i:]
                break
            head.setdefault(table, []).append(row)
            size = grown
    return head, rest


class Journal:
    """Numbered segment files of emitted rows: the current one takes new rows; a flush seals it, and the
    sealed ones go once the collector has answered for them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        found = sorted(int(p.stem) for p in self.folder.glob("*.jsonl") if p.stem.isdigit())
        self.left: list[tuple[str, dict]] = []  # rows a previous process emitted and may not have sent
        for n in found:
            for line in self._path(n).read_bytes().splitlines():
                try:
                    table, data = orjson.loads(line)
                except (orjson.JSONDecodeError, ValueError):
                    log.warning("journal %s: skipping a torn line", self._path(n))
                    continue
                self.left.append((table, data))
        self._current = (found[-1] + 1) if found else 0
        self._fh = self._path(self._current).open("ab", buffering=0)

    def _path(self, n: int) -> Path:
        return self.folder / f"{n:08d}.jsonl"

    def write(self, table: str, data: dict) -> None:
        self._fh.write(orjson.dumps([table, data], option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")

    def seal(self) -> int:
        """Start a new segment; every row written so far is in segments up to the returned number."""
        sealed = self._current
        self._fh.close()
        self._current += 1
        self._fh = self._path(self._current).open("ab", buffering=0)
        return sealed

    def answered(self, upto: int) -> None:
        for path in self.folder.glob("*.jsonl"):
            if path.stem.isdigit() and int(path.stem) <= upto:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        self._fh.close()


class EventSink:
    def __init__(self, collector_url: str | None, run_id: str, *, interval: float = 1.0, max_buffer: int = 200_000,
                 max_batch_bytes: int = MAX_BATCH_BYTES, timeout: float = 5.0, journal: str | Path | None = None):
        self.url = collector_url.rstrip("/") + "/events" if collector_url else None
        self.run_id = run_id
        self.interval = interval
        self.max_buffer = max_buffer
        self.max_batch_bytes = max_batch_bytes
        self.timeout = timeout
        token = cluster_token() if collector_url else None
        self._headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
        self._rows: Batch = {}
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self.dropped = 0
        self.rejected = 0
        self.sent = 0
        self.journal = Journal(journal) if journal is not None and self.url is not None else None
        if self.journal is not None:
            for table, data in self.journal.left:
                self._rows.setdefault(table, []).append(data)

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
        if self.journal is not None:
            self.journal.write(row.TABLE, data)
        rows = self._rows.setdefault(row.TABLE, [])
        rows.append(data)
        if len(rows) > self.max_buffer:
            del rows[0]
            self.dropped += 1

    async def flush(self) -> None:
        """Post every buffered row, batch after batch. Rows not answered for (the collector unreachable, or
        this flush cancelled mid-post by stop()) go back to the front of the buffer: resending them is safe."""
        pending, self._rows = self._rows, {}
        sealed = self.journal.seal() if self.journal is not None and any(pending.values()) else None
        try:
            while any(pending.values()):
                batch, rest = split_batch(pending, self.max_batch_bytes)
                if not await self._post(batch):
                    return
                pending = rest
            if sealed is not None and self.journal is not None:
                self.journal.answered(sealed)
        finally:
            for table, rows in pending.items():
                if rows:
                    self._rows[table] = rows + self._rows.get(table, [])

    async def _post(self, batch: Batch) -> bool:
        """False when the collector could not be reached (keep the rows); True when it answered."""
        count = sum(len(v) for v in batch.values())
        try:
            assert self.url is not None and self._client is not None
            resp = await self._client.post(self.url, content=_encode(batch), headers=self._headers)
            if 400 <= resp.status_code < 500:
                self.rejected += count
                log.error("collector %s refused %d rows (HTTP %d): %s", self.url, count, resp.status_code,
                          resp.text[:1000])
                return True
            resp.raise_for_status()
            self.sent += count
            return True
        except (httpx.HTTPError, AssertionError) as exc:
            log.warning("collector %s unavailable (%s); keeping %d rows for the next flush", self.url, exc, count)
            return False

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def start(self) -> None:
        if self.url is not None and self._task is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
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
        if self.journal is not None:
            self.journal.close()
