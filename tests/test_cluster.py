import pytest

from simulator.cluster import Cluster, ScaleAction
from simulator.engine import Engine, EngineConfig
from simulator.hardware import get_gpu, get_model
from simulator.metrics import capacity, records_frame, summarize
from simulator.timing import Roofline
from simulator.workload import Request

TIMING = Roofline(get_gpu("A30"), get_model("Llama-2-7B"))
CFG = EngineConfig(num_blocks=1052, max_num_seqs=48, max_num_batched_tokens=512)


def least_loaded(req, instances, now):
    return min(instances, key=lambda i: len(i.engine.running) + len(i.engine.waiting)).name


def workload(n, gap):
    return [Request(i, i * gap, 100 + (i * 37) % 300, 50 + (i * 91) % 400) for i in range(n)]


def test_every_request_is_routed_and_finished_once():
    engines = [Engine(CFG, TIMING, name=f"i{k}") for k in range(3)]
    res = Cluster(engines, least_loaded).run(workload(300, 0.05))
    df = records_frame(res.finished)
    assert sorted(df["request_id"]) == list(range(300))
    assert set(df["instance"]) == {"i0", "i1", "i2"}
    s = summarize(df, slo_ttft=1.0)
    assert s["completed"] == 300 and 0 < s["p50_ttft"] <= s["p99_ttft"]
    assert 0 <= s["slo_attainment"] <= 1


def test_router_must_return_a_known_instance():
    engines = [Engine(CFG, TIMING, name="a")]
    with pytest.raises(KeyError, match="no instance 'b'"):
        Cluster(engines, lambda r, i, t: "b").run(workload(2, 1.0))
    with pytest.raises(ValueError, match="unique"):
        Cluster([Engine(CFG, TIMING, name="a"), Engine(CFG, TIMING, name="a")], least_loaded)


class StepProvisioner:
    """Adds one instance at the first tick and drains the original at the third."""

    period = 5.0

    def __init__(self):
        self.ticks = 0

    def decide(self, now, view):
        self.ticks += 1
        if self.ticks == 1:
            return [ScaleAction("add", reason="test")]
        if self.ticks == 3:
            return [ScaleAction("drain", "i0", reason="test")]
        return []


def test_provisioner_adds_after_cold_start_and_drains_without_losing_requests():
    res = Cluster([Engine(CFG, TIMING, name="i0")], least_loaded, provisioner=StepProvisioner(),
                  engine_factory=lambda name: Engine(CFG, TIMING, name=name), cold_start=8.0).run(
        workload(400, 0.1))
    df = records_frame(res.finished)
    assert len(df) == 400
    added = df[df["instance"] == "instance-1"]
    assert len(added) > 0 and added["arrival"].min() >= 8.0  # nothing routed before it was ready
    assert df[df["instance"] == "i0"]["arrival"].max() <= 10.0 + 1e-9  # draining took no new work
    kinds = [e.kind for e in res.provisioning]
    assert kinds[:3] == ["add", "drain", "stop"]
    assert res.instance_seconds < 2 * res.end_time


def test_capacity_bisection_finds_the_knee():
    import pandas as pd

    def fake_run(qps, seed):  # latency explodes past 10 QPS
        return pd.DataFrame({"ttft": [0.1 if qps <= 10 + seed * 0.0 else 50.0] * 10})

    cap = capacity(fake_run, 3.0, lo=1.0, hi=64.0, seeds=(0, 1))
    assert cap["capacity"] == pytest.approx(10.0, rel=0.03)
    with pytest.raises(ValueError, match="SLO"):
        capacity(fake_run, 0.0)
