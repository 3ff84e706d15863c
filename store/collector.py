"""The single writer: receives event batches from services and owns the workspace's DuckDB file.

DuckDB allows one writing process per file, so every service posts to this collector and readers go
through it (``POST /query``, read-only SELECTs with ``?`` parameters) or through Parquet snapshots
(``POST /snapshot``). Every row is checked against its row dataclass in store.schema before anything is
written, so a producer that drifts from the contract gets a 400 naming the column instead of a table
holding NULLs or strings where numbers belong. Rows of tables with a primary key are inserted with
``INSERT OR IGNORE``: a batch posted twice (a retry after a timeout) does not create duplicates.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import numbers
import threading
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import orjson
import pandas as pd
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route

from store.schema import TABLES, Row, create_all

Param = str | int | float | bool | None
_READ_ONLY = ("SELECT", "WITH", "DESCRIBE", "SHOW", "SUMMARIZE")
_MAX_PROBLEMS = 5  # a batch with a systematic mistake names a few rows, not thousands


class StoreError(ValueError):
    pass


@dataclass(frozen=True)
class _Column:
    """What a value of one column may be, taken from the row dataclass's annotation."""

    name: str
    kind: type  # str, float, int or bool
    nullable: bool
    required: bool  # no default in the dataclass: a row without it is incomplete

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
    hints = typing.get_type_hints(row)
    out = {}
    for f in dataclasses.fields(row):
        hint = hints[f.name]
        args = typing.get_args(hint)
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        kind = next(a for a in args if a is not type(None)) if union else hint
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out[f.name] = _Column(f.name, kind, union and type(None) in args, required)
    return out


_COLUMNS: dict[str, dict[str, _Column]] = {name: _columns(table.row) for name, table in TABLES.items()}


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


class Store:
    """A workspace database opened for writing (one per process and file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(self.path))
        create_all(self.con)
        self._lock = threading.Lock()

    def insert(self, table: str, rows: list[dict]) -> int:
        """Rows as dicts (a JSON batch over HTTP), checked against the table's row dataclass first."""
        validate(table, rows)
        return self._write(table, rows)

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
        """Rows of several tables, all or nothing: every table's rows are checked before any is written, so
        a rejected batch leaves the file as it was and a producer's retry cannot duplicate half of it."""
        for table, rows in batch.items():
            validate(table, rows)
        return {table: self._write(table, rows) for table, rows in batch.items()}

    def _write(self, table: str, rows: list[dict]) -> int:
        if not rows:
            return 0
        spec = TABLES[table]
        names = spec.names
        defaults = {f.name: f.default for f in dataclasses.fields(spec.row) if f.default is not dataclasses.MISSING}
        df = pd.DataFrame([[r.get(c, defaults.get(c)) for c in names] for r in rows], columns=names)
        cols = ", ".join(names)
        verb = "INSERT OR IGNORE" if spec.primary_key else "INSERT"
        with self._lock:
            self.con.register("_batch", df)
            try:
                self.con.execute(f"{verb} INTO {table} ({cols}) SELECT {cols} FROM _batch")
            finally:
                self.con.unregister("_batch")
        return len(rows)

    def query(self, sql: str, params: Sequence[Param] | None = None) -> pd.DataFrame:
        """A read-only query; values go in ``params`` (DuckDB ``?`` placeholders), never into ``sql``."""
        head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
        if head not in _READ_ONLY:
            raise StoreError(f"only read-only queries are allowed here, got {head or 'an empty query'!r}")
        args = _check_params(params)
        with self._lock:
            try:
                return self.con.execute(sql, args).df()
            except duckdb.Error as exc:
                raise StoreError(f"query failed: {exc}") from exc

    def snapshot(self, folder: str | Path) -> list[str]:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        with self._lock:
            for table in TABLES:
                target = out / f"{table}.parquet"
                self.con.execute(f"COPY {table} TO '{target}' (FORMAT PARQUET)")
                written.append(str(target))
        return written

    def close(self) -> None:
        self.con.close()


def _error(status: int, message: str) -> Response:
    return Response(orjson.dumps({"error": {"message": message, "code": status}}), status_code=status,
                    media_type="application/json")


def build_app(store: Store) -> Starlette:
    async def events(request: HttpRequest) -> Response:
        try:
            batch = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return _error(400, f"event batch is not valid JSON: {exc}")
        if not isinstance(batch, dict):
            return _error(400, "an event batch is an object {table: [rows]}")
        try:
            for table, rows in batch.items():
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise StoreError(f"table {table}: rows must be a list of objects")
            counts = store.insert_batch(batch)
        except StoreError as exc:
            return _error(400, str(exc))
        return Response(orjson.dumps({"inserted": counts}), media_type="application/json")

    async def query(request: HttpRequest) -> Response:
        try:
            body = orjson.loads(await request.body())
            df = store.query(str(body["sql"]), body.get("params"))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(400, 'query body is {"sql": "SELECT ... WHERE x = ?", "params": [scalars]} (params optional)')
        except StoreError as exc:
            return _error(400, str(exc))
        payload = {"columns": list(df.columns), "rows": df.astype(object).where(df.notna(), None).values.tolist()}
        return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    async def snapshot(request: HttpRequest) -> Response:
        try:
            folder = orjson.loads(await request.body())["folder"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(400, 'snapshot body is {"folder": "/path"}')
        return Response(orjson.dumps({"files": store.snapshot(folder)}), media_type="application/json")

    async def health(request: HttpRequest) -> Response:
        return Response(orjson.dumps({"db": str(store.path)}), media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        store.close()

    return Starlette(routes=[
        Route("/events", events, methods=["POST"]),
        Route("/query", query, methods=["POST"]),
        Route("/snapshot", snapshot, methods=["POST"]),
        Route("/health", health),
    ], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="Block collector: the single DuckDB writer of a workspace")
    p.add_argument("--db", required=True, help="DuckDB file of the workspace")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8300)
    args = p.parse_args(argv)
    uvicorn.run(build_app(Store(args.db)), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
