"""The single writer: receives event batches from services and owns the workspace's DuckDB file.

DuckDB allows one writing process per file, so every service posts to this collector and readers go
through it (``POST /query``) or through Parquet snapshots (``POST /snapshot``). Every row is checked against
its row dataclass in store.schema before anything is written, so a producer that drifts from the contract
gets a 400 naming the column instead of a table holding NULLs or strings where numbers belong.

The collector is reachable by every service of a cluster, so it trusts no request:

- The database is opened with external access disabled and its configuration locked: no SQL can read or
  write a file, reach the network, load an extension or change a setting, whatever a parser lets through.
- ``/query`` takes exactly one statement, of DuckDB's own statement type SELECT, runs it on its own cursor
  inside a READ ONLY transaction (a SELECT may hold a data-modifying CTE), returns at most ``max_rows``
  rows (``truncated`` says when there were more) and is interrupted after ``query_timeout_s``. It answers
  JSON rows, or with ``"format": "arrow"`` an Arrow IPC stream (``x-block-truncated`` says whether it was
  cut): the live dashboard's incremental reads decode columns instead of parsing rows.
- Queries, snapshots and writes run in worker threads, never on the event loop, so ``/events`` and
  ``/health`` answer while a query runs; a client that leaves interrupts its query.
- Every table has a primary key (``event_id`` where there is no natural one) and a batch is written in one
  transaction with ``INSERT OR IGNORE``: a batch resent after a timeout adds nothing, a failed one nothing.
- Request bodies are capped (413 names the limit); snapshots go only to ``<workspace>/snapshots/<name>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import decimal
import math
import numbers
import os
import re
import threading
import types
import typing
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route

from store.auth import TokenGuard, token_for
from store.schema import TABLES, Row, create_all

Param = str | int | float | bool | None

MAX_BODY_BYTES = 8 * 1024 * 1024  # an EventSink batch is at most 4 MiB; a query is a few hundred bytes
MAX_ROWS = 100_000  # the live dashboard's largest window is 5,000 rows; a bigger read belongs in a snapshot
QUERY_TIMEOUT_S = 10.0  # a dashboard refresh takes milliseconds; anything near this is a runaway
MAX_QUERIES = 4  # queries and snapshots running at once; more are told to come back (503), not queued
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Settings fixed when the file is opened; lock_configuration makes them (and every other one) final.
_LOCKED_DOWN = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "lock_configuration": True,
}
_MAX_PROBLEMS = 5  # a batch with a systematic mistake names a few rows, not thousands
_DISCONNECT_POLL_S = 0.25
_SNAPSHOT_BATCH_ROWS = 65_536
_ARROW_BATCH_ROWS = 8_192
ARROW_MEDIA_TYPE = "application/vnd.apache.arrow.stream"
TRUNCATED_HEADER = "x-block-truncated"


class StoreError(ValueError):
    """A request the store refuses; the message names what was wrong (HTTP 400)."""


class QueryTimeout(StoreError):
    """The query ran past the store's time limit and was interrupted (HTTP 504)."""


class QueryCancelled(StoreError):
    """The query was interrupted because its client left or the store is closing."""


@dataclass(frozen=True)
class _Column:
    """What a value of one column may be, taken from the row dataclass's annotation."""

    name: str
    kind: type  # str, float, int or bool
    nullable: bool
    required: bool  # no default in the dataclass, or part of the key: a row without it is incomplete

    def problem(self, value: object) -> str | None:
        if value is None or (self.nullable and isinstance(value, float) and math.isnan(value)):
            return None if self.nullable else f"{self.name} must not be null"  # NaN: pandas' missing value
        ok = {
            str: isinstance(value, str),
            bool: isinstance(value, bool | np.bool_),
            int: (isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_))
            or (isinstance(value, float) and value.is_integer()),
            float: isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_),
        }[self.kind]
        return None if ok else f"{self.name} must be {self.kind.__name__}, got {type(value).__name__} {value!r:.60}"


def _columns(row: type[Row]) -> dict[str, _Column]:
    """Key columns are required on the wire even where the dataclass makes a default (``event_id``): a row
    without its key could not be recognised when it is sent again."""
    hints = typing.get_type_hints(row)
    out = {}
    for f in dataclasses.fields(row):
        hint = hints[f.name]
        args = typing.get_args(hint)
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        kind = next(a for a in args if a is not type(None)) if union else hint
        required = ((f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                    or f.name in row.PRIMARY_KEY)
        out[f.name] = _Column(f.name, kind, union and type(None) in args, required)
    return out


_COLUMNS: dict[str, dict[str, _Column]] = {name: _columns(table.row) for name, table in TABLES.items()}
_ARROW_TYPES = {"VARCHAR": pa.string(), "DOUBLE": pa.float64(), "INTEGER": pa.int64(), "BOOLEAN": pa.bool_()}
_ARROW_COLUMNS = {name: [(c, _ARROW_TYPES[t]) for c, t in table.columns] for name, table in TABLES.items()}
_DEFAULTS = {name: {f.name: f.default for f in dataclasses.fields(table.row) if f.default is not dataclasses.MISSING}
             for name, table in TABLES.items()}


def _arrow_batch(table: str, rows: list[dict]) -> pa.Table:
    """Validated rows as an Arrow table typed like their DuckDB table: DuckDB scans Arrow without converting
    it, where a pandas frame of object columns cost ~10 ms per small batch to analyse (measured). NaN is
    pandas' missing value and becomes NULL, as it did through pandas; a value its column type cannot hold
    (an integer past 64 bits) is the batch's error, named."""
    defaults = _DEFAULTS[table]
    columns = {}
    for name, kind in _ARROW_COLUMNS[table]:
        values = [r.get(name, defaults.get(name)) for r in rows]
        try:
            columns[name] = pa.array([None if isinstance(v, float) and math.isnan(v) else v for v in values], kind)
        except (OverflowError, pa.ArrowException) as exc:
            raise StoreError(f"table {table}: column {name} holds a value its type ({kind}) cannot: {exc}") from None
    return pa.table(columns)


def validate(table: str, rows: Sequence[dict]) -> None:
    """Raise StoreError naming the table, row and column of the first few values that break the contract."""
    if table not in TABLES:
        raise StoreError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
    columns = _COLUMNS[table]
    problems: list[str] = []
    for i, row in enumerate(rows):
        unknown = sorted(set(row) - set(columns))
        missing = [c.name for c in columns.values() if c.required and c.name not in row]
        found = [f"unknown columns {unknown}"] if unknown else []
        found += [f"missing columns {missing}"] if missing else []
        found += [p for name, value in row.items() if name in columns and (p := columns[name].problem(value))]
        problems += [f"row {i}: {p}" for p in found]
        if len(problems) >= _MAX_PROBLEMS:
            break
    if problems:
        raise StoreError(f"table {table}: " + "; ".join(problems[:_MAX_PROBLEMS])
                         + f" (columns are {list(columns)})")


def _check_params(params: object) -> list[Param]:
    if params is None:
        return []
    if not isinstance(params, list | tuple) or not all(
            p is None or isinstance(p, str | int | float | bool) for p in params):
        raise StoreError("query params must be a list of scalars (string, number, boolean or null), "
                         f"got {params!r:.200}")
    return list(params)


def _one_select(cursor: duckdb.DuckDBPyConnection, sql: str) -> duckdb.Statement:
    """The single SELECT statement ``sql`` holds, as DuckDB's parser sees it (no guessing from its text)."""
    try:
        statements = cursor.extract_statements(sql)
    except duckdb.Error as exc:
        raise StoreError(f"query does not parse: {exc}") from exc
    if len(statements) != 1:
        raise StoreError(f"a query is exactly one statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise StoreError(f"only SELECT queries are allowed here, got a statement of type {kind.name}")
    return statements[0]


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple]
    truncated: bool  # the query had more than the store's max_rows rows; ``rows`` holds the first ones

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=self.columns)


@dataclass(frozen=True)
class ArrowResult:
    table: pa.Table
    truncated: bool  # as QueryResult's: the table holds the first ``max_rows`` rows of more

    def ipc(self) -> bytes:
        """The table as one Arrow IPC stream (what ``pyarrow.ipc.open_stream`` reads)."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.table.schema) as out:
            out.write_table(self.table)
        return sink.getvalue().to_pybytes()


def _fetch_rows(cursor: duckdb.DuckDBPyConnection, statement: duckdb.Statement, args: list[Param],
                max_rows: int) -> QueryResult:
    cursor.execute(statement, args)
    columns = [d[0] for d in cursor.description or ()]
    rows = cursor.fetchmany(max_rows + 1)
    return QueryResult(columns, rows[:max_rows], len(rows) > max_rows)


def _fetch_arrow(cursor: duckdb.DuckDBPyConnection, statement: duckdb.Statement, args: list[Param],
                 max_rows: int) -> ArrowResult:
    """Record batches up to one past the cap, so a huge result is never materialised whole."""
    reader = cursor.sql(statement.query, params=args).to_arrow_reader(_ARROW_BATCH_ROWS)
    batches, n = [], 0
    for batch in reader:
        batches.append(batch)
        n += batch.num_rows
        if n > max_rows:
            break
    return ArrowResult(pa.Table.from_batches(batches, reader.schema).slice(0, max_rows), n > max_rows)


class Query:
    """One read-only query: run() in a worker thread on its own cursor; cancel() from any thread.

    The cursor exists only while the query runs, so an interrupt can reach exactly this query and a late
    one (the timer firing as the query ends) lands on a cursor that is about to be closed.
    """

    def __init__(self, store: Store, sql: str, params: object = None, *, arrow: bool = False):
        if not isinstance(sql, str):
            raise StoreError(f"sql must be a string, got {type(sql).__name__}")
        self.store = store
        self.fetch = _fetch_arrow if arrow else _fetch_rows
        self.sql = sql
        self.args = _check_params(params)
        self._lock = threading.Lock()
        self._cursor: duckdb.DuckDBPyConnection | None = None
        self._cancelled = False
        self._timed_out = False

    def run(self) -> QueryResult | ArrowResult:
        limit_s, max_rows = self.store.query_timeout_s, self.store.max_rows
        with self._lock:
            if self._cancelled:
                raise QueryCancelled("the query was cancelled before it started")
            self._cursor = cursor = self.store.cursor()
        self.store.running.add(self)
        timer = threading.Timer(limit_s, self._expire)
        timer.start()
        try:
            statement = _one_select(cursor, self.sql)
            cursor.execute("BEGIN TRANSACTION READ ONLY")
            result = self.fetch(cursor, statement, self.args, max_rows)
        except (duckdb.InterruptException, pa.ArrowException) as exc:  # Arrow: interrupted mid-stream
            if not (self._timed_out or self._cancelled):
                raise StoreError(f"query failed: {exc}") from exc
            if self._timed_out:
                raise QueryTimeout(f"query interrupted after {limit_s:g} s, the collector's time limit "
                                   "(--query-timeout); narrow it with WHERE or LIMIT, or read a snapshot") from exc
            raise QueryCancelled("query interrupted: its client left or the collector is stopping") from exc
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {exc}") from exc
        finally:
            timer.cancel()
            self.store.running.discard(self)
            with self._lock:
                self._cursor = None
            cursor.close()
        return result

    def _expire(self) -> None:
        self._timed_out = True
        self.cancel()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._cursor is not None:
                self._cursor.interrupt()


class Store:
    """A workspace database opened for writing (one per process and file).

    Writes go through one cursor under a lock, each batch one transaction; reads get a cursor each and see
    a consistent snapshot of the file while writes go on (DuckDB's MVCC).
    """

    def __init__(self, path: str | Path, *, query_timeout_s: float = QUERY_TIMEOUT_S, max_rows: int = MAX_ROWS):
        if query_timeout_s <= 0 or max_rows <= 0:
            raise ValueError(f"query_timeout_s and max_rows must be positive, got {query_timeout_s} and {max_rows}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.query_timeout_s = query_timeout_s
        self.max_rows = max_rows
        self.running: set[Query] = set()  # so that close() can interrupt them
        self._root = duckdb.connect(str(self.path), config=dict(_LOCKED_DOWN))
        self._cursor_lock = threading.Lock()
        self._lock = threading.Lock()
        self._writer = self.cursor()
        create_all(self._writer)

    @property
    def snapshot_root(self) -> Path:
        return self.path.parent / "snapshots"

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own to this database (same settings, same lock-down) for one thread's work."""
        with self._cursor_lock:
            return self._root.cursor()

    def insert(self, table: str, rows: list[dict]) -> int:
        """Rows as dicts (a JSON batch over HTTP), checked against the table's row dataclass first."""
        return self.insert_batch({table: rows})[table]

    def insert_rows(self, rows: Sequence[Row]) -> int:
        """Row dataclasses from an in-process producer (offline runs, notebooks), grouped by table."""
        by_table: dict[str, list[dict]] = {}
        for row in rows:
            table = getattr(row, "TABLE", "")
            if not isinstance(row, Row) or table not in TABLES or type(row) is not TABLES[table].row:
                raise StoreError(f"insert_rows takes store.schema row dataclasses, got {type(row).__name__}")
            by_table.setdefault(table, []).append(row.to_dict())
        return sum(self.insert_batch(by_table).values())

    def insert_batch(self, batch: Mapping[str, list[dict]]) -> dict[str, int]:
        """Rows of several tables, all or nothing; the rows each table gained (rows it had already are not
        counted). Every row is checked before any is written, and the writes are one transaction.

        A batch is first written with a plain ``INSERT``; only when that meets a key it already has (a resend)
        is the transaction rolled back and written again with ``INSERT OR IGNORE``. DuckDB's conflict check
        cost ~4 ms per statement however few the rows (measured: 6.7 against 2.7 ms for three rows), and a
        resend is rare."""
        for table, rows in batch.items():
            validate(table, rows)
        frames = {table: _arrow_batch(table, rows) for table, rows in batch.items() if rows}
        with self._lock:
            for table, df in frames.items():  # outside the transaction: unregistering cannot fail after an error
                self._writer.register(f"_batch_{table}", df)
            try:
                try:
                    return self._write(batch, frames, or_ignore=False)
                except duckdb.ConstraintException:
                    return self._write(batch, frames, or_ignore=True)
            finally:
                for table in frames:
                    self._writer.unregister(f"_batch_{table}")

    def _write(self, batch: Mapping[str, list[dict]], frames: Mapping[str, pa.Table], *, or_ignore: bool
               ) -> dict[str, int]:
        """One transaction over the registered frames. A constraint error of a plain insert propagates (rolled
        back) for the caller to retry with the conflict check; every other DuckDB error, and one the retry
        meets too, becomes a StoreError naming the table and DuckDB's reason."""
        counts = dict.fromkeys(batch, 0)
        writing = ""
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        try:
            self._writer.execute("BEGIN TRANSACTION")
            try:
                for writing in frames:
                    cols = ", ".join(TABLES[writing].names)  # names from store.schema, not from the request
                    (inserted,) = self._writer.execute(  # type: ignore[misc]
                        f"{verb} INTO {writing} ({cols}) SELECT {cols} FROM _batch_{writing}").fetchone()
                    counts[writing] = int(inserted)
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
        except duckdb.Error as exc:
            if isinstance(exc, duckdb.ConstraintException) and not or_ignore:
                raise
            raise StoreError(f"table {writing}: the batch could not be written, nothing was: {exc}") from exc
        return counts

    def query(self, sql: str, params: Sequence[Param] | None = None) -> QueryResult:
        """A read-only query; values go in ``params`` (DuckDB ``?`` placeholders), never into ``sql``."""
        return Query(self, sql, params).run()  # type: ignore[return-value]

    def query_arrow(self, sql: str, params: Sequence[Param] | None = None) -> ArrowResult:
        """The same read-only query, answered as an Arrow table."""
        return Query(self, sql, params, arrow=True).run()  # type: ignore[return-value]

    def snapshot(self, name: str) -> list[str]:
        """Every table as Parquet under ``<workspace>/snapshots/<name>/``, all read in one transaction so
        the files agree with each other. pyarrow writes the files: the database itself cannot."""
        if not isinstance(name, str) or not SNAPSHOT_NAME.fullmatch(name) or ".." in name:
            raise StoreError(f"a snapshot name is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                             f"or digit, without '..'; got {name!r:.80}")
        folder = self.snapshot_root / name
        cursor = self.cursor()
        written = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            cursor.execute("BEGIN TRANSACTION READ ONLY")
            for table in TABLES:
                target, partial = folder / f"{table}.parquet", folder / f".{table}.parquet.partial"
                reader = cursor.sql(f"FROM {table}").to_arrow_reader(_SNAPSHOT_BATCH_ROWS)  # a schema name
                with pq.ParquetWriter(partial, reader.schema) as out:
                    for chunk in reader:
                        out.write_batch(chunk)
                os.replace(partial, target)
                written.append(str(target))
        except OSError as exc:
            raise StoreError(f"cannot write snapshot {name!r} under {self.snapshot_root}: {exc}") from exc
        finally:
            cursor.close()
        return written

    def interrupt_queries(self) -> None:
        for query in list(self.running):
            query.cancel()

    def close(self) -> None:
        self.interrupt_queries()
        with self._lock:
            self._writer.close()
            self._root.close()


def _error(status: int, message: str) -> Response:
    return Response(orjson.dumps({"error": {"message": message, "code": status}}), status_code=status,
                    media_type="application/json")


class _BodyTooLarge(Exception):
    pass


async def _body(request: HttpRequest, limit: int) -> bytes:
    """The request body, read no further than ``limit`` bytes whatever Content-Length claims."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _json_value(value: object) -> object:
    """SQL values orjson does not know: DECIMAL (avg, round, SUMMARIZE) as a number, the rest as text."""
    return float(value) if isinstance(value, decimal.Decimal) else str(value)


def build_app(store: Store, *, max_body_bytes: int = MAX_BODY_BYTES, max_queries: int = MAX_QUERIES) -> Starlette:
    readers = ThreadPoolExecutor(max_queries, thread_name_prefix="collector-query")
    writer = ThreadPoolExecutor(1, thread_name_prefix="collector-writer")
    slots = asyncio.Semaphore(max_queries)
    too_large = (f"request body over the collector's limit of {max_body_bytes} bytes "
                 f"({max_body_bytes / 2**20:g} MiB); send smaller batches")
    busy = f"the collector is already running {max_queries} queries; retry shortly"
    registry = CollectorRegistry()  # this collector's own /metrics, not the process-global registry
    rows_inserted = Counter("block:collector_rows_inserted", "Rows written, by table.", ["table"], registry=registry)
    answered = Counter("block:collector_requests", "Answers to /events, /query and /snapshot, by route and status.",
                       ["route", "status"], registry=registry)

    async def events(request: HttpRequest) -> Response:
        try:
            batch = orjson.loads(await _body(request, max_body_bytes))
        except _BodyTooLarge:
            return _error(413, too_large)
        except orjson.JSONDecodeError as exc:
            return _error(400, f"event batch is not valid JSON: {exc}")
        if not isinstance(batch, dict):
            return _error(400, "an event batch is an object {table: [rows]}")
        for table, rows in batch.items():
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                return _error(400, f"table {table}: rows must be a list of objects")
        try:
            counts = await asyncio.get_running_loop().run_in_executor(writer, store.insert_batch, batch)
        except StoreError as exc:
            return _error(400, str(exc))
        for table, n in counts.items():
            rows_inserted.labels(table).inc(n)
        return Response(orjson.dumps({"inserted": counts}), media_type="application/json")

    async def query(request: HttpRequest) -> Response:
        usage = ('query body is {"sql": "SELECT ... WHERE x = ?", "params": [scalars], "format": "json" or "arrow"} '
                 '(params and format optional)')
        try:
            body = orjson.loads(await _body(request, max_body_bytes))
            fmt = body.get("format", "json")
            if fmt not in ("json", "arrow"):
                return _error(400, f'query format must be "json" or "arrow", got {fmt!r:.40}')
            job = Query(store, body["sql"], body.get("params"), arrow=fmt == "arrow")
        except _BodyTooLarge:
            return _error(413, too_large)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return _error(400, usage)
        except StoreError as exc:
            return _error(400, str(exc))
        if slots.locked():
            return _error(503, busy)
        async with slots:
            running = asyncio.get_running_loop().run_in_executor(readers, job.run)
            while not (await asyncio.wait({running}, timeout=_DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    job.cancel()
                    break
            try:
                result = await running
            except QueryTimeout as exc:
                return _error(504, str(exc))
            except StoreError as exc:
                return _error(400, str(exc))
        if isinstance(result, ArrowResult):
            body = await asyncio.get_running_loop().run_in_executor(readers, result.ipc)
            return Response(body, media_type=ARROW_MEDIA_TYPE,
                            headers={TRUNCATED_HEADER: "true" if result.truncated else "false"})
        payload = {"columns": result.columns, "rows": result.rows, "truncated": result.truncated}
        return Response(orjson.dumps(payload, default=_json_value), media_type="application/json")

    async def snapshot(request: HttpRequest) -> Response:
        try:
            name = orjson.loads(await _body(request, max_body_bytes))["name"]
        except _BodyTooLarge:
            return _error(413, too_large)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(400, 'snapshot body is {"name": "NAME"}: written to <workspace>/snapshots/NAME/')
        if slots.locked():
            return _error(503, busy)
        async with slots:
            try:
                files = await asyncio.get_running_loop().run_in_executor(readers, store.snapshot, name)
            except StoreError as exc:
                return _error(400, str(exc))
        return Response(orjson.dumps({"files": files}), media_type="application/json")

    async def health(request: HttpRequest) -> Response:
        return Response(orjson.dumps({"db": str(store.path)}), media_type="application/json")

    async def metrics(request: HttpRequest) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    def counted(route: str, handler: typing.Callable[[HttpRequest], typing.Awaitable[Response]]) -> Route:
        async def endpoint(request: HttpRequest) -> Response:
            response = await handler(request)
            answered.labels(route, str(response.status_code)).inc()
            return response
        return Route(route, endpoint, methods=["POST"])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> typing.AsyncIterator[None]:
        yield
        store.interrupt_queries()
        readers.shutdown(wait=True)
        writer.shutdown(wait=True)
        store.close()

    return Starlette(routes=[
        counted("/events", events),
        counted("/query", query),
        counted("/snapshot", snapshot),
        Route("/health", health),
        Route("/metrics", metrics),
    ], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="Block collector: the single DuckDB writer of a workspace")
    p.add_argument("--db", required=True, help="DuckDB file of the workspace (snapshots go beside it)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--query-timeout", type=float, default=QUERY_TIMEOUT_S, help="seconds before a query is interrupted")
    p.add_argument("--max-rows", type=int, default=MAX_ROWS, help="rows a query returns at most")
    args = p.parse_args(argv)
    token = token_for(args.host, "collector")
    app = build_app(Store(args.db, query_timeout_s=args.query_timeout, max_rows=args.max_rows))
    uvicorn.run(TokenGuard(app, token, ("/events", "/query", "/snapshot")), host=args.host, port=args.port,
                log_level="info", access_log=False)


if __name__ == "__main__":
    main()
