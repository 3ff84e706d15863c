"""The store contract: one row dataclass per table; the DuckDB tables are generated from them.

Every producer (scheduler, side-cars, load generator, offline runs, autoscaler) builds these rows and
nothing else, so a column cannot exist in one producer and be missing in another, and an offline run
writes exactly the columns a live one does. One DuckDB file per workspace; only the collector writes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar

_DUCK_TYPES = {str: "VARCHAR", float: "DOUBLE", int: "INTEGER", bool: "BOOLEAN"}


def new_event_id() -> str:
    """128 random bits as hex, a uuid4's worth; two rows a routed request, and ``uuid4().hex`` cost 3.2 us
    against 0.4 us for the same bits without the UUID object."""
    return os.urandom(16).hex()


@dataclass(kw_only=True)
class Row:
    """Base of every table row; ``run_id`` is filled in by the EventSink when a producer leaves it out.

    ``event_id`` is made when the row is made, so a batch the EventSink posts again after a timeout (the
    collector may have written it) carries the same ids: tables without a natural key are keyed by it and
    the collector inserts with ``INSERT OR IGNORE``, so a resend is a no-op. Producers never set it.
    """

    TABLE: ClassVar[str] = ""
    PRIMARY_KEY: ClassVar[tuple[str, ...]] = ("event_id",)

    run_id: str = ""
    event_id: str = field(default_factory=new_event_id)

    def to_dict(self) -> dict:
        """A row holds scalars only, so a shallow copy of its fields is the whole row (``dataclasses.asdict``
        deep-copies each value: 5% of a scheduler's CPU at a few hundred requests per second, py-spy)."""
        return {name: getattr(self, name) for name in _field_names(type(self))}


@functools.cache
def _field_names(row: type[Row]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(row))


@dataclass(kw_only=True)
class RunRow(Row):
    TABLE = "runs"
    PRIMARY_KEY = ("run_id",)

    started_at: float
    label: str
    policy: str
    config: str = ""


@dataclass(kw_only=True)
class RequestRow(Row):
    """One request as one observer saw it: ``source`` is client, scheduler or sim (offline)."""

    TABLE = "requests"
    PRIMARY_KEY = ("run_id", "request_id", "source")

    request_id: str  # the id of the observer that wrote the row (the scheduler's own id, unique per request)
    source: str
    client_request_id: str | None = None  # the client's x-request-id, kept as given (not unique)
    instance: str | None
    policy: str | None
    arrival_ts: float
    first_token_ts: float | None
    finish_ts: float | None
    prompt_tokens: int
    output_tokens: int
    ttft: float | None
    e2e: float | None
    tpot: float | None = None
    itl_mean: float | None = None
    itl_max: float | None = None
    status: str = "ok"
    error: str = ""
    retries: int = 0


@dataclass(kw_only=True)
class DecisionRow(Row):
    """One routing decision (block.routing.RoutingDecision.row), offline and live alike.

    ``fallback`` is none (every asked predictor answered, or the policy asks none), partial (some did not)
    or all (none did: the policy decided on load signals); ``predictor`` says what the predictors knew.
    """

    TABLE = "decisions"

    request_id: str
    ts: float
    policy: str
    chosen: str
    decision_ms: float
    target: str | None
    considered: int  # candidates that could take the request
    asked: int  # predictions requested (the policy's shortlist, or 0)
    fallback: str
    predictor: str
    predicted_ttft: float | None
    predicted_e2e: float | None
    candidates: str  # JSON list of {instance, running, waiting, free_blocks, predicted_ttft, predicted_e2e}


@dataclass(kw_only=True)
class CounterfactualRow(Row):
    TABLE = "counterfactuals"

    request_id: str
    instance: str
    chosen: bool
    predicted_ttft: float
    predicted_e2e: float
    oracle_ttft: float
    oracle_e2e: float


@dataclass(kw_only=True)
class InstanceSampleRow(Row):
    TABLE = "instance_samples"

    ts: float
    instance: str
    running: int | None
    waiting: int | None
    kv_usage: float | None
    preemptions: int | None
    tracked: int


@dataclass(kw_only=True)
class ProvisioningRow(Row):
    TABLE = "provisioning"

    ts: float
    action: str
    instance: str | None
    reason: str
    signal: str
    value: float
    threshold: float
    status: str
    instances: int


@dataclass(kw_only=True)
class ServiceEventRow(Row):
    """What the cluster driver did to a service: started, crashed, restarted (with back-off), stopped."""

    TABLE = "service_events"

    ts: float
    service: str
    host: str
    event: str
    detail: str = ""


@dataclass(kw_only=True)
class SweepCellRow(Row):
    """One finished cell of a sweep (workbench.sweep): what it ran and its headline numbers; the per-request
    records are in its run folder. ``run_id`` is the sweep's name and ``cell`` a hash of the cell's config,
    so a rerun of a sweep sees which cells it already holds and skips them."""

    TABLE = "sweep_cells"
    PRIMARY_KEY = ("run_id", "cell")

    cell: str
    policy: str
    workload: str
    preset: str
    instances: int
    max_num_seqs: int | None  # None: a fleet whose groups differ
    max_num_batched_tokens: int | None
    qps: float
    seed: int
    mode: str  # what the predictor knew: honest, oracle-lengths, oracle-timing
    config: str  # the whole cell config, JSON
    gave_up: bool  # stopped once its P99 TTFT was certain to miss the cell's give-up bound
    completed: int
    p50_ttft: float | None
    p99_ttft: float | None
    p50_e2e: float | None
    p99_e2e: float | None
    goodput: float | None  # requests/s within the cell's SLOs (None without SLOs)
    request_throughput: float | None
    preemptions: int | None
    wall_s: float
    finished_at: float
    folder: str = ""


ROWS: tuple[type[Row], ...] = (RunRow, RequestRow, DecisionRow, CounterfactualRow, InstanceSampleRow,
                               ProvisioningRow, ServiceEventRow, SweepCellRow)


def _duck_type(annotation: object) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    return _DUCK_TYPES[annotation]  # type: ignore[index]


@dataclass(frozen=True)
class Table:
    row: type[Row]
    columns: tuple[tuple[str, str], ...]
    primary_key: tuple[str, ...] = ()

    @classmethod
    def of(cls, row: type[Row]) -> Table:
        hints = typing.get_type_hints(row)
        cols = tuple((f.name, _duck_type(hints[f.name])) for f in dataclasses.fields(row))
        return cls(row, cols, row.PRIMARY_KEY)

    @property
    def names(self) -> list[str]:
        return [c for c, _ in self.columns]

    def ddl(self, name: str) -> str:
        cols = [f"{c} {t}" for c, t in self.columns]
        if self.primary_key:
            cols.append(f"PRIMARY KEY ({', '.join(self.primary_key)})")
        return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)})"


TABLES: dict[str, Table] = {row.TABLE: Table.of(row) for row in ROWS}


def create_all(con) -> None:
    for name, table in TABLES.items():
        con.execute(table.ddl(name))
