"""The single writer: receives event batches from services and owns the workspace's DuckDB file.

DuckDB allows one writing process per file, so every service posts to this collector and readers go
through it (``POST /query``, read-only SELECTs) or through Parquet snapshots (``POST /snapshot``).
Rows of tables with a primary key are inserted with ``INSERT OR IGNORE``: a batch posted twice (a retry
after a timeout) does not create duplicates.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
from pathlib import Path

import duckdb
import orjson
import pandas as pd
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route

from store.schema import TABLES, create_all


class StoreError(ValueError):
    pass


class Store:
    """A workspace database opened for writing (one per process and file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(self.path))
        create_all(self.con)
        self._lock = threading.Lock()

    def insert(self, table: str, rows: list[dict]) -> int:
        if table not in TABLES:
            raise StoreError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
        if not rows:
            return 0
        spec = TABLES[table]
        names = spec.names
        unknown = sorted({k for r in rows for k in r} - set(names))
        if unknown:
            raise StoreError(f"table {table}: unknown columns {unknown}; columns are {names}")
        df = pd.DataFrame([[r.get(c) for c in names] for r in rows], columns=names)
        if spec.primary_key:
            missing = [c for c in spec.primary_key if df[c].isna().any()]
            if missing:
                raise StoreError(f"table {table}: rows without primary-key columns {missing}")
        cols = ", ".join(names)
        verb = "INSERT OR IGNORE" if spec.primary_key else "INSERT"
        with self._lock:
            self.con.register("_batch", df)
            try:
                self.con.execute(f"{verb} INTO {table} ({cols}) SELECT {cols} FROM _batch")
            finally:
                self.con.unregister("_batch")
        return len(rows)

    def query(self, sql: str) -> pd.DataFrame:
        head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
        if head not in ("SELECT", "WITH", "DESCRIBE", "SHOW", "SUMMARIZE"):
            raise StoreError(f"only read-only queries are allowed here, got {head or 'an empty query'!r}")
        with self._lock:
            try:
                return self.con.execute(sql).df()
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
        counts = {}
        try:
            for table, rows in batch.items():
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise StoreError(f"table {table}: rows must be a list of objects")
                counts[table] = store.insert(table, rows)
        except StoreError as exc:
            return _error(400, str(exc))
        return Response(orjson.dumps({"inserted": counts}), media_type="application/json")

    async def query(request: HttpRequest) -> Response:
        try:
            body = orjson.loads(await request.body())
            df = store.query(str(body["sql"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(400, 'query body is {"sql": "SELECT ..."}')
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
