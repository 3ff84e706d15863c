"""Real processes: a local cluster started, loaded, broken and stopped (bounded, loopback only)."""

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from block.engines.settings import EngineSettings
from block.events import EventSink
from simulator.workload import Request, poisson_arrivals
from workbench.loadgen import run_load, summarize
from workbench.local import LocalCluster


def workload(n, qps, prompt=60, out=48, seed=0):
    arr = poisson_arrivals(n, qps, np.random.default_rng(seed))
    return [Request(i, float(arr[i]), prompt, out) for i in range(n)]


def replay(cluster, requests, label):
    async def go():
        sink = EventSink(cluster.collector_url, cluster.run_id)
        await sink.start()
        try:
            return await run_load(cluster.scheduler_url, requests, "Llama-2-7B", sink=sink, policy=label)
        finally:
            await sink.stop()

    return asyncio.run(go())


@pytest.fixture
def local(tmp_path):
    c = LocalCluster(tmp_path / "ws", instances=3, policy="block", engine=EngineSettings(time_scale=10.0))
    c.start()
    yield c
    pids = c.pids()
    c.stop()
    for pid in pids:  # exactly the processes it started are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_killing_an_engine_mid_run_loses_no_request(local):
    reqs = workload(150, 25.0, out=96)
    timer = threading.Timer(2.0, local.kill, args=("instance-1-engine",))
    timer.start()
    records = replay(local, reqs, "block")
    timer.join()
    assert len(records) == 150
    failed = [r for r in records if r.status != "ok"]
    for r in failed:  # only requests already streaming from the dead engine may fail, and they say why
        assert "instance-1" in r.error or "broke" in r.error, r.error
    assert len(failed) < 30
    late = [r for r in records if r.arrival_ts > records[0].arrival_ts + 3.0]
    assert late and all(r.status == "ok" and r.instance != "instance-1" for r in late)
    time.sleep(0.5)
    down = local.admin("GET", "/admin/instances")
    assert next(i for i in down if i["name"] == "instance-1")["status"] == "down"


def test_stopping_a_sidecar_routes_around_it(local):
    local.kill("instance-0-sidecar")
    records = replay(local, workload(60, 20.0), "block")
    assert all(r.status == "ok" for r in records)
    assert "instance-0" not in {r.instance for r in records}


def test_soak_every_request_once_in_duckdb(local):
    n = 1000
    records = replay(local, workload(n, 60.0, prompt=40, out=24, seed=3), "soak")
    s = summarize(records)
    assert s["completed"] == n and s["failed"] == 0
    time.sleep(0.8)
    reader = local.reader()
    counts = reader.sql("SELECT source, count(*) AS n, count(DISTINCT request_id) AS d FROM requests "
                        "WHERE status = 'ok' GROUP BY source ORDER BY source")
    assert counts.to_dict("records") == [{"source": "client", "n": n, "d": n}, {"source": "scheduler", "n": n, "d": n}]
    joined = reader.sql("SELECT count(*) AS n FROM requests c JOIN requests s ON s.run_id = c.run_id "
                        "AND s.client_request_id = c.request_id WHERE c.source = 'client' AND s.source = 'scheduler'")
    assert joined["n"][0] == n
