"""DuckDB schema of a workspace. One file per workspace; only the collector writes to it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    columns: tuple[tuple[str, str], ...]
    primary_key: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [c for c, _ in self.columns]

    def ddl(self, name: str) -> str:
        cols = [f"{c} {t}" for c, t in self.columns]
        if self.primary_key:
            cols.append(f"PRIMARY KEY ({', '.join(self.primary_key)})")
        return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)})"


def _cols(spec: str) -> tuple[tuple[str, str], ...]:
    return tuple((c.split()[0], c.split()[1]) for c in (s.strip() for s in spec.split(",")) if c)


TABLES: dict[str, Table] = {
    "runs": Table(_cols("run_id VARCHAR, started_at DOUBLE, label VARCHAR, policy VARCHAR, config VARCHAR"),
                  ("run_id",)),
    "requests": Table(_cols(
        "run_id VARCHAR, request_id VARCHAR, source VARCHAR, instance VARCHAR, policy VARCHAR, arrival_ts DOUBLE,"
        "first_token_ts DOUBLE, finish_ts DOUBLE, prompt_tokens INTEGER, output_tokens INTEGER, ttft DOUBLE,"
        "e2e DOUBLE, tpot DOUBLE, itl_mean DOUBLE, itl_max DOUBLE, status VARCHAR, error VARCHAR, retries INTEGER"),
        ("run_id", "request_id", "source")),
    "decisions": Table(_cols(
        "run_id VARCHAR, request_id VARCHAR, ts DOUBLE, policy VARCHAR, chosen VARCHAR, decision_ms DOUBLE,"
        "fallback BOOLEAN, predicted_ttft DOUBLE, predicted_e2e DOUBLE, candidates VARCHAR")),
    "counterfactuals": Table(_cols(
        "run_id VARCHAR, request_id VARCHAR, instance VARCHAR, chosen BOOLEAN, predicted_ttft DOUBLE,"
        "predicted_e2e DOUBLE, oracle_ttft DOUBLE, oracle_e2e DOUBLE")),
    "instance_samples": Table(_cols(
        "run_id VARCHAR, ts DOUBLE, instance VARCHAR, running INTEGER, waiting INTEGER, kv_usage DOUBLE,"
        "preemptions INTEGER, tracked INTEGER")),
    "provisioning": Table(_cols(
        "run_id VARCHAR, ts DOUBLE, action VARCHAR, instance VARCHAR, reason VARCHAR, signal VARCHAR, value DOUBLE,"
        "threshold DOUBLE, status VARCHAR, instances INTEGER")),
}


def create_all(con) -> None:
    for name, table in TABLES.items():
        con.execute(table.ddl(name))
