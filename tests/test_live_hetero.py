"""Heterogeneous instances and SLOs live: each side-car predicts with its own GPU's timing, the scheduler
weighs instances by the capacity their own models give, and SLO headers reach the SLO-aware policy."""

import contextlib
from concurrent.futures import ThreadPoolExecutor

import httpx

from block.engines.emulator import EmulatedEngine
from block.engines.emulator import build_app as emulator_app
from block.engines.settings import EngineSettings
from block.predictor import build_predictor
from block.predictor.service import InstanceTracker, SideCar
from block.predictor.service import build_app as sidecar_app
from block.scheduler.app import Scheduler
from block.scheduler.app import build_app as scheduler_app
from simulator.workload import LengthPrior, Request
from tests.servers import serve
from tests.test_sidecar_scheduler import cluster, complete, eventually, mirrors_current

SCALE = 20.0


@contextlib.contextmanager
def emulated(name: str, gpu: str):
    settings = EngineSettings(gpu=gpu, time_scale=SCALE)
    cfg, timing = settings.engine_config(), settings.timing()
    with serve(emulator_app(EmulatedEngine(cfg, timing, time_scale=SCALE, name=name), "llama")) as engine_url:
        car = SideCar(name, engine_url, InstanceTracker(cfg, SCALE), build_predictor(LengthPrior.embedded(), timing),
                      metrics_interval=0.05)
        with serve(sidecar_app(car)) as url:
            yield url


def test_each_instance_is_weighed_by_the_capacity_its_own_side_car_predicts_with():
    with emulated("fast", "A100-80G") as fast, emulated("slow", "A30") as slow:
        sched = Scheduler({"fast": fast, "slow": slow}, "least_tokens_cap", ["llama"], 4096, poll_interval=0.05)
        with serve(scheduler_app(sched)) as url:
            mirrors_current(sched)
            caps = {c.name: c.capacity for c in sched.registry.candidates(set())}
            assert caps["fast"] > 1.5 * caps["slow"] > 0  # an A100-80G prefills ~1.9x an A30's tokens/s
            labels = {i.name: i.mirror.model.predictor.timing.gpu.name for i in sched.registry.instances.values()}
            assert labels == {"fast": "A100-80G", "slow": "A30"}
            assert complete(url).status_code == 200


def test_slo_headers_reach_the_slo_aware_policy_and_an_unmeetable_slo_is_shed(tmp_path):
    with cluster(tmp_path, n=2, policy="block_slo_reject") as (sched, url, _insts, _collector):
        mirrors_current(sched)
        body = {"model": "llama", "prompt": "hello " * 20, "max_tokens": 8}
        bad = httpx.post(url + "/v1/completions", json=body, headers={"x-slo-ttft-ms": "soon"})
        assert bad.status_code == 400 and "x-slo-ttft-ms" in bad.json()["error"]["message"]
        easy = httpx.post(url + "/v1/completions", json=body, headers={"x-slo-ttft-ms": "60000"})
        assert easy.status_code == 200
        shed = httpx.post(url + "/v1/completions", json=body, headers={"x-slo-ttft-ms": "0.001"})
        assert shed.status_code == 429 and shed.headers["retry-after"] == "1"
        assert "no instance is predicted to meet the SLO" in shed.json()["error"]["message"]
        assert sched.slo_rejected_total == 1
        metrics = httpx.get(url + "/metrics").text
        assert "block:scheduler_slo_rejected_total 1.0" in metrics


def test_the_impact_objective_gets_its_added_delay_from_mirror_and_side_car_alike(tmp_path):
    with cluster(tmp_path, n=1, policy="block_impact", mirror_max_age_s=3.0) as (sched, url, insts, _collector):
        mirrors_current(sched)
        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(complete, url, 300) for _ in range(3)]
            inst = sched.registry["i0"]
            assert eventually(lambda: len(inst.mirror.state().state.requests) == 3)
            sched.registry.candidates(set())
            mirrored = inst.mirror.predict(inst.view, Request(9, 0.0, 200, 1), "e2e", with_impact=True)
            asked = httpx.post(insts[0][2] + "/predict", json={"with_impact": True, "candidates": [
                {"prompt_tokens": 200}]}).json()["predictions"][0]
            assert mirrored.added_delay > 0 and asked["added_delay"] > 0  # three requests to slow down
            bad = httpx.post(insts[0][2] + "/predict", json={"with_impact": "yes", "candidates": [
                {"prompt_tokens": 200}]})
            assert bad.status_code == 400 and "with_impact" in bad.json()["error"]["message"]
            assert all(f.result().status_code == 200 for f in running)
