"""Chaos: a supervised local cluster under traffic while things go wrong; then what the clients saw is held
against what the store holds. Prints a table per check and a final RESULT line.

Faults injected during streamed traffic (each from outside, as the OS or an operator would): an engine
SIGKILLed mid-stream, a side-car SIGKILLed, a side-car SIGSTOPped for a few seconds, the collector
SIGKILLed, the scheduler SIGTERMed, the scheduler SIGKILLed, a query that would run for hours. A fault
is survived when the supervisor has the signalled service running again (killed ones) and, within 30 s,
a probe request through the scheduler completes and the collector answers.
Then hostile queries, hostile ingest batches, malformed OpenAI bodies and headers, and five requests with
one x-request-id are sent to the recovered cluster.

Afterwards (cluster stopped, DuckDB file read directly):
- lost_acknowledged: requests the client saw complete that have no ``ok`` scheduler row;
- duplicates: extra scheduler rows for one client request (beyond the five of the duplicate-id check);
- misrecorded: scheduler rows whose status disagrees with what the client saw, and a duplicate-id check
  that does not leave exactly five rows;
- stalled_requests: requests that waited longer than the scheduler's idle timeout + 1 s for a token.
--quick: 2 instances, ~25 s of traffic; the full run: 4 instances, ~60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pandas as pd

from block.engines.settings import EngineSettings
from store.read import Reader
from workbench.cluster import Cluster, ClusterSpec
from workbench.loadgen import run_load
from workbench.loadgen import summarize as summarize_load

MODEL = "Llama-2-7B"
IDLE_TIMEOUT_S = 5.0  # the scheduler's idle and first-byte timeouts in this run: emulated prompts are short
SCHEDULER_FLAGS = ["--idle-timeout", str(IDLE_TIMEOUT_S), "--first-byte-timeout", str(IDLE_TIMEOUT_S)]

HOSTILE_QUERIES = [
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM glob('/root/*')",
    "SELECT * FROM '/etc/hostname'",
    "SELECT * FROM read_parquet('/tmp/*.parquet')",
    "SELECT 1; COPY requests TO '/tmp/block-chaos-leak.csv'",
    "COPY (SELECT 1) TO '/tmp/block-chaos-leak.csv'",
    "DROP TABLE requests",
    "DELETE FROM requests",
    "UPDATE requests SET status = 'ok'",
    "INSERT INTO runs VALUES ('x', 0, 'x', 'x', 'x', 'x')",
    "CREATE TABLE evil AS SELECT 1",
    "ATTACH '/tmp/block-chaos-evil.duckdb' AS evil",
    "SET enable_external_access = true",
    "PRAGMA database_list",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CALL pragma_version()",
    "EXPORT DATABASE '/tmp/block-chaos-export'",
    "WITH x AS (DELETE FROM requests RETURNING *) SELECT count(*) FROM x",
    "SELECT getenv('HOME')",
    "SELECT * FROM duckdb_secrets()",
]

HOSTILE_BATCHES: list[bytes] = [
    b"not json",
    b"[]",
    b'{"nope": [{"a": 1}]}',
    b'{"requests": {"not": "a list"}}',
    b'{"requests": [1, 2, 3]}',
    b'{"requests": [{"request_id": "x", "source": "client", "sql": "DROP TABLE requests"}]}',
    b'{"instance_samples": [{"ts": "yesterday", "instance": "a", "tracked": 1}]}',
    b'{"decisions": [{"request_id": null}]}',
    b'{"runs": [{"run_id": "' + b"x" * (9 * 1024 * 1024) + b'"}]}',
]


def bad_openai_inputs() -> list[tuple[str, bytes, dict[str, str]]]:
    """(path, body, extra headers) that a correct server answers with a 4xx naming the problem."""
    good = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    bodies: list[object] = [
        {**good, "model": "nope"}, {**good, "model": 5}, {k: v for k, v in good.items() if k != "model"},
        {**good, "prompt": ""}, {**good, "prompt": 5}, {**good, "prompt": [1, "a"]}, {**good, "prompt": None},
        {**good, "max_tokens": -1}, {**good, "max_tokens": 10**12}, {**good, "max_tokens": "4"},
        {**good, "max_tokens": 1.5}, {**good, "stream": "yes"}, {**good, "ignore_eos": "no"}, {**good, "n": 2},
        {**good, "n": "1"}, {**good, "best_of": 3}, {**good, "logprobs": 5}, {**good, "echo": True},
        {**good, "temperature": "hot"}, {**good, "top_p": [1]}, {**good, "stop": 5},
        {**good, "stream_options": "x"}, {**good, "suffix": "x"}, {**good, "prompt": "x" * (20 * 4096)},
        [good], "just a string", 5, None,
    ]
    out = [("/v1/completions", orjson.dumps(b), {}) for b in bodies]
    chat = {"model": MODEL, "max_tokens": 4}
    chats: list[object] = [
        {**chat, "messages": []}, {**chat, "messages": "hi"}, {**chat, "messages": [{"content": "x"}]},
        {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {**chat, "messages": [{"role": "user", "content": 5}]},
        {**chat, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        {**chat, "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"},
        {**chat, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
        {**chat, "messages": [{"role": 3, "content": "x"}]},
    ]
    out += [("/v1/chat/completions", orjson.dumps(b), {}) for b in chats]
    out += [("/v1/completions", raw, {}) for raw in (b"", b"{", b"\xff\xfe", b'{"model": ')]
    out += [("/v1/completions", orjson.dumps({**good, "model": "nope"}), {"x-block-predicted-tokens": h})
            for h in ("1e20", "-5", "abc")]
    return out


class Chaos:
    def __init__(self, cluster: Cluster, quick: bool):
        self.cluster = cluster
        self.quick = quick
        self.faults: list[dict] = []
        self.inputs: list[dict] = []

    def pid(self, service: str) -> int:
        return self.cluster.started[service].pid

    async def probe(self, deadline_s: float = 30.0) -> bool:
        """A short request through the scheduler completes and the collector answers, within the deadline."""
        end = time.monotonic() + deadline_s
        body = {"model": MODEL, "prompt": "probe " * 8, "max_tokens": 3, "ignore_eos": True}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while time.monotonic() < end:
                try:
                    async with http.post(self.cluster.scheduler_url + "/v1/completions", json=body) as r:
                        served = r.status == 200
                    async with http.get(self.cluster.collector_url + "/health") as r:
                        if served and r.status == 200:
                            return True
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.5)
        return False

    async def fault(self, name: str, inject: Callable[[], Awaitable[None]]) -> None:
        t0 = time.monotonic()
        await inject()
        survived = await self.probe()
        self.faults.append({"fault": name, "survived": survived, "recovered_s": round(time.monotonic() - t0, 1)})
        print(f"  {name:32} survived={survived} in {time.monotonic() - t0:.1f} s", flush=True)

    async def kill(self, service: str, sig: int = signal.SIGKILL, deadline_s: float = 30.0) -> None:
        """Signal the service, then wait until the supervisor has it running again under a new pid."""
        old = self.pid(service)
        os.kill(old, sig)
        end = time.monotonic() + deadline_s
        while self.pid(service) == old or not (await self.cluster.status())[service]["alive"]:
            if time.monotonic() > end:
                raise RuntimeError(f"{service} was not restarted within {deadline_s:.0f} s")
            await asyncio.sleep(0.2)

    async def sigstop(self, service: str, seconds: float) -> None:
        pid = self.pid(service)
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(seconds)
        os.kill(pid, signal.SIGCONT)

    async def slow_query(self) -> None:
        """A query that would run for hours: the collector must cut it off and keep ingesting meanwhile."""
        async with aiohttp.ClientSession() as http:
            query = asyncio.create_task(http.post(self.cluster.collector_url + "/query",
                                                  json={"sql": "SELECT count(*) FROM range(1000000000000) t, "
                                                               "range(1000) u WHERE t.range % 7 = u.range"}))
            slowest = 0.0
            for _ in range(10):
                t0 = time.monotonic()
                async with http.get(self.cluster.collector_url + "/health") as r:
                    r.raise_for_status()
                slowest = max(slowest, time.monotonic() - t0)
                await asyncio.sleep(0.3)
            resp = await query
            status = resp.status
            resp.release()
        if status == 200 or slowest > 1.0:
            raise RuntimeError(f"slow query answered {status}; slowest /health meanwhile {slowest:.2f} s")

    async def hostile(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            for sql in HOSTILE_QUERIES:
                async with http.post(self.cluster.collector_url + "/query", json={"sql": sql}) as r:
                    self.inputs.append({"kind": "hostile query", "input": sql[:60], "status": r.status})
            for raw in HOSTILE_BATCHES:
                async with http.post(self.cluster.collector_url + "/events", data=raw,
                                     headers={"content-type": "application/json"}) as r:
                    self.inputs.append({"kind": "hostile ingest", "input": raw[:60].decode("utf-8", "replace"),
                                        "status": r.status})
            for path, raw, headers in bad_openai_inputs():
                async with http.post(self.cluster.scheduler_url + path, data=raw,
                                     headers={"content-type": "application/json", **headers}) as r:
                    await r.read()
                    self.inputs.append({"kind": "bad OpenAI input", "input": (path + " " + raw[:50].decode(
                        "utf-8", "replace") + " " + str(headers))[:90], "status": r.status})

    async def duplicate_ids(self) -> list[int]:
        """Five concurrent requests carrying one client x-request-id: five answers, five rows."""
        body = {"model": MODEL, "prompt": "same id " * 4, "max_tokens": 4, "ignore_eos": True}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async def one() -> int:
                async with http.post(self.cluster.scheduler_url + "/v1/completions", json=body,
                                     headers={"x-request-id": "chaos-same-id"}) as r:
                    await r.read()
                    return r.status

            return list(await asyncio.gather(*(one() for _ in range(5))))


def traffic(quick: bool, seed: int = 0) -> list:
    from simulator.workload import Request

    rng = np.random.default_rng(seed)
    n, qps = (180, 7.0) if quick else (600, 10.0)
    arrivals = np.cumsum(rng.exponential(1 / qps, n))
    return [Request(i, float(t), int(rng.integers(40, 200)), int(rng.integers(20, 90))) for i, t in enumerate(arrivals)]


async def run(quick: bool, workdir: Path) -> dict:
    spec = ClusterSpec.local(2 if quick else 4, EngineSettings(time_scale=10.0), "block", workdir)
    spec.scheduler.flags = SCHEDULER_FLAGS
    cluster = Cluster(spec, run_id="chaos", ready_timeout=90.0)
    await cluster.start()
    chaos = Chaos(cluster, quick)
    requests = traffic(quick)
    load = asyncio.create_task(run_load(cluster.scheduler_url, requests, MODEL, timeout_s=120.0))
    schedule = [
        ("engine SIGKILL mid-stream", lambda: chaos.kill("instance-0-engine")),
        ("side-car SIGKILL", lambda: chaos.kill("instance-1-sidecar")),
        ("side-car SIGSTOP 3 s", lambda: chaos.sigstop("instance-0-sidecar", 3.0)),
        ("collector SIGKILL", lambda: chaos.kill("collector")),
        ("scheduler SIGTERM", lambda: chaos.kill("scheduler", signal.SIGTERM)),
        ("scheduler SIGKILL", lambda: chaos.kill("scheduler")),
        ("query that runs for hours", chaos.slow_query),
    ]
    try:
        for name, inject in schedule:
            await asyncio.sleep(1.5)
            try:
                await chaos.fault(name, inject)
            except (RuntimeError, OSError, aiohttp.ClientError) as exc:
                chaos.faults.append({"fault": name, "survived": False, "recovered_s": None, "error": str(exc)})
                print(f"  {name:32} FAILED: {exc}", flush=True)
        records = await load
        await chaos.hostile()
        dup = await chaos.duplicate_ids()
        await asyncio.sleep(1.0)  # the last rows reach the collector
        restarts = dict(cluster.restarts)
    finally:
        await cluster.stop()
    return {"records": records, "dup": dup, "faults": chaos.faults, "inputs": chaos.inputs, "restarts": restarts,
            "db": Path(spec.collector.db)}


def audit(result: dict) -> dict:
    reader = Reader(db_path=result["db"])
    rows = reader.sql("SELECT client_request_id, status, error FROM requests WHERE source = 'scheduler'")
    by_client = {cid: g for cid, g in rows.groupby("client_request_id")}
    lost = misrecorded = duplicates = stalled = 0
    for rec in result["records"]:
        mine = by_client.get(rec.request_id)
        if mine is not None and len(mine) > 1:
            duplicates += len(mine) - 1
        if rec.status == "ok" and (mine is None or not (mine["status"] == "ok").any()):
            lost += 1
        if mine is not None and ((rec.status == "ok") != (mine["status"] == "ok").any()):
            misrecorded += 1
        waits = [rec.ttft or 0.0, *rec.itls]
        if max(waits) > IDLE_TIMEOUT_S + 1.0:
            stalled += 1
    dup = by_client.get("chaos-same-id")
    if dup is None or len(dup) != 5:
        misrecorded += 1
    samples = reader.sql("SELECT instance, ts, count(*) AS n FROM instance_samples GROUP BY 1, 2 HAVING n > 1")
    duplicates += int(samples["n"].sum() - len(samples)) if len(samples) else 0
    inputs = pd.DataFrame(result["inputs"])
    hostile_q = inputs[inputs["kind"] == "hostile query"]
    bad = inputs[inputs["kind"] != "hostile query"]
    return {
        "faults": len(result["faults"]), "survived": sum(f["survived"] for f in result["faults"]),
        "lost_acknowledged": lost, "duplicates": duplicates, "misrecorded": misrecorded,
        "hostile_queries_allowed": int((hostile_q["status"] == 200).sum()),
        "bad_inputs": int(((bad["status"] >= 400) & (bad["status"] < 500)).sum()),
        "server_errors": int((inputs["status"] >= 500).sum()),
        "stalled_requests": stalled,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 instances, ~25 s of traffic")
    args = parser.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="block-chaos-") as tmp:
        print(f"cluster in {tmp}; injecting faults during traffic ...", flush=True)
        result = asyncio.run(run(args.quick, Path(tmp)))
        summary = audit(result)
    load = summarize_load(result["records"])
    print(f"\nTraffic: {load['completed']} completed, {load.get('failed', 0)} failed (faults make some fail; what "
          "matters is that the store says so)")
    print(pd.DataFrame(result["faults"]).to_string(index=False))
    inputs = pd.DataFrame(result["inputs"])
    wrong = inputs[(inputs["status"] < 400) | (inputs["status"] >= 500)]
    print(f"\n{len(inputs)} hostile or malformed inputs; answered outside 4xx: {len(wrong)}")
    if len(wrong):
        print(wrong.to_string(index=False))
    print(f"restarts by the supervisor: {result['restarts']}; wall {time.time() - t0:.0f} s")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
