import asyncio
import time

import numpy as np
import pytest

from block.engines.settings import EngineSettings
from block.events import EventSink
from block.offline import get_preset, run_provisioning
from block.predictor import Predictor
from block.provisioner import InstanceView, Observation, Provisioner, ProvisionerConfig
from simulator.engine import EngineConfig, InstanceState
from simulator.hardware import get_gpu, get_model
from simulator.timing import Roofline
from simulator.workload import LengthPrior, Request, lengths_source, rate_arrivals
from workbench.autoscale import LiveAutoscaler
from workbench.loadgen import run_load
from workbench.local import LocalCluster

PRED = Predictor(Roofline(get_gpu("A30"), get_model("Llama-2-7B")), LengthPrior.embedded())


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="min_instances"):
        ProvisionerConfig(min_instances=5, max_instances=2)
    with pytest.raises(ValueError, match="SLO must be > 0"):
        ProvisionerConfig(slo_ttft=0)
    with pytest.raises(ValueError, match="unknown provisioning mode"):
        ProvisionerConfig(mode="magic")
    with pytest.raises(ValueError, match="needs a predictor"):
        Provisioner(ProvisionerConfig(mode="predictive"))


def _obs(now, n, rate, ready=True):
    cfg = EngineConfig(num_blocks=1052, max_num_seqs=48, max_num_batched_tokens=512)
    arrivals = list(np.arange(now - 120, now, 1 / rate)) if rate else []
    return Observation(now, [InstanceView(f"i{k}", InstanceState(cfg, now), ready) for k in range(n)], arrivals, [])


def test_predictive_adds_enough_for_a_heavy_forecast_and_respects_max_and_starting():
    p = Provisioner(ProvisionerConfig(mode="predictive", max_instances=6, cold_start=60), PRED)
    adds = p.decide(_obs(1000.0, 2, 15.0))
    assert 2 <= len(adds) <= 4 and all(d.action == "add" for d in adds)
    assert p.decide(_obs(1005.0, 2, 15.0)) == []  # cooldown
    capped = Provisioner(ProvisionerConfig(mode="predictive", max_instances=3), PRED).decide(_obs(1000.0, 2, 40.0))
    assert len(capped) == 1


def test_idle_cluster_drains_after_the_hold_to_the_minimum():
    p = Provisioner(ProvisionerConfig(mode="predictive", min_instances=1, hold_in=30, cooldown_in=30), PRED)
    assert p.decide(_obs(1000.0, 3, 0.2)) == []  # low, holding
    drains = p.decide(_obs(1031.0, 3, 0.2))
    assert [d.action for d in drains] == ["drain", "drain"]


def test_offline_predictive_beats_reactive_on_a_ramp(data_dir):
    trace, prior = lengths_source("alpaca", 0)
    rng = np.random.default_rng(0)
    rate = lambda t: 4.0 if t < 60 or t > 420 else 4.0 + 10.0 * min(1.0, (t - 60) / 120)  # noqa: E731
    arr = rate_arrivals(rate, 500.0, 14.0, rng)
    reqs = [Request(i, a, int(trace.prompt_tokens[j]), int(trace.output_tokens[j]))
            for i, (a, j) in enumerate(zip(arr, rng.integers(0, len(trace), len(arr)), strict=True))]
    out = {}
    for mode in ("reactive", "predictive"):
        cfg = ProvisionerConfig(mode=mode, min_instances=2, max_instances=8, cold_start=60)
        out[mode] = run_provisioning(get_preset("paper"), reqs, cfg, start_instances=2, prior=prior,
                                     calibration_trace=trace)
    assert out["predictive"]["slo_violations"] < out["reactive"]["slo_violations"]
    assert out["predictive"]["peak_instances"] <= 8
    assert len({r for r in (e.instance for e in out["predictive"]["events"])}) > 2


def test_live_controller_scales_out_under_a_step_and_back_in(tmp_path):
    flags = EngineSettings(gpu="L4", max_num_seqs=8, num_blocks=900, time_scale=4.0)
    cluster = LocalCluster(tmp_path / "ws", instances=1, policy="least_requests", engine=flags)
    config = ProvisionerConfig(mode="predictive", slo_ttft=3.0, min_instances=1, max_instances=3, cold_start=12.0,
                               period=2.0, cooldown_out=4.0, cooldown_in=8.0, hold_in=8.0, window=8.0)
    with cluster:
        scaler = LiveAutoscaler(cluster, Provisioner(config, Predictor(
            Roofline(get_gpu("L4"), get_model("Llama-2-7B")), LengthPrior.embedded())))
        scaler.start()
        rng = np.random.default_rng(1)
        arrivals = np.concatenate([np.sort(rng.uniform(0, 3, 6)), np.sort(rng.uniform(3, 11, 160)),
                                   np.sort(rng.uniform(11, 14, 4))])
        reqs = [Request(i, float(a), 64, 64) for i, a in enumerate(arrivals)]
        peak = [1]

        def watch():
            peak[0] = max(peak[0], len(cluster.instance_names()))

        async def go():
            sink = EventSink(cluster.collector_url, cluster.run_id)
            await sink.start()
            task = asyncio.create_task(run_load(cluster.scheduler_url, reqs, "Llama-2-7B", sink=sink))
            while not task.done():
                watch()
                await asyncio.sleep(0.2)
            await sink.stop()
            return task.result()

        records = asyncio.run(go())
        deadline = time.monotonic() + 40
        while len(cluster.instance_names()) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        scaler.stop()
        final = cluster.instance_names()
        rows = cluster.reader().sql("SELECT action, status FROM provisioning")
    assert all(r.status == "ok" for r in records), [r.error for r in records if r.status != "ok"][:3]
    assert peak[0] >= 2, "never scaled out"
    assert len(final) == 1, f"did not scale back in: {final}"
    assert {"add", "drain"} <= set(rows["action"]) and set(rows["status"]) == {"ok"}
