"""Heterogeneous fleets and SLO-aware routing (issue 13): descriptions, per-instance predictors, the
capacity-normalised baselines, the herding fix and SLO best fit, on real (small) simulations."""

import dataclasses
import math

import pytest

from block.offline import Honesty, SimRouter, Study, get_cluster, instance_predictors, slo_summary
from block.policies import CAPACITY_NORMALISED, Block, Candidate, Rejected, SloBestFit, make_policy
from block.predictor import Prediction
from block.protocol import LoadSignals, ProtocolError, parse_slo_headers
from simulator.cluster import Cluster
from simulator.engine import Engine
from simulator.fleet import FLEETS, Fleet, InstanceGroup, SloClass, assign_slos, parse_fleet, peak_token_throughput
from simulator.metrics import records_frame
from simulator.workload import Request, lengths_source

SMALL = parse_fleet("1xA100-80G,2xA30", max_num_seqs=48)


def _pred(name, ttft, e2e, added=float("nan"), out=11):
    return Prediction(name, ttft, e2e, 0.0, added, 0.0, 0, 0.0, False, output_tokens=out)


def _cand(name, ttft=1.0, e2e=10.0, added=float("nan"), capacity=1.0, tokens=0, running=0):
    p = _pred(name, ttft, e2e, added)
    return Candidate(name, LoadSignals(running, 0, 100, 100, tokens, 0), predictions={"e2e": p, "ttft": p},
                     capacity=capacity)


# ---- descriptions -----------------------------------------------------------------------------------
def test_compact_form_presets_and_file_form_describe_the_same_fleet():
    fleet = parse_fleet("4xA100-80G,8xA30")
    assert [(g.gpu, g.count) for g in fleet.groups] == [("A100-80G", 4), ("A30", 8)] and fleet.instances == 12
    names = [n for n, _ in fleet.members()]
    assert names == [f"instance-{i}" for i in range(12)]
    assert Fleet.from_dict(fleet.to_dict()) == fleet
    assert parse_fleet("2xA100-40G:tp2").groups[0].tensor_parallel == 2
    assert get_cluster("hetero") is FLEETS["hetero"] and get_cluster("paper").gpu == "A30"
    tp = {g.tensor_parallel for g in FLEETS["mixed_tp"].groups}
    assert tp == {1, 2} and not FLEETS["hetero"].homogeneous


@pytest.mark.parametrize(("make", "message"), [
    (lambda: parse_fleet("4xB300"), r"group 0 \(4xB300\): unknown GPU 'B300'"),
    (lambda: parse_fleet("2xA30", model="Llama-9"), "unknown model 'Llama-9'"),
    (lambda: parse_fleet("0xA30"), r"count must be an integer >= 1, got 0"),
    (lambda: Fleet((InstanceGroup("A30", "Llama-2-7B", 2, num_blocks=100),)),
     "100 KV blocks hold 1600 tokens, less than one request at Llama-2-7B's full context of 4096"),
    (lambda: Fleet((InstanceGroup("A30", "Llama-2-70B", 1),)), "no KV block fits"),
    (lambda: parse_fleet("4 A30"), "is not COUNTxGPU"),
    (lambda: Fleet(()), "has no instance groups"),
    (lambda: Fleet((InstanceGroup("A30", "Llama-2-7B", 1), InstanceGroup("A30", "Mistral-7B", 1))),
     "every group must serve the same model"),
    (lambda: Fleet.from_dict({"model": "Llama-2-7B", "groups": [{"gpu": "A30", "count": 1, "gpus": 2}]}),
     r"fleet.groups\[0\]: unknown keys \['gpus'\]"),
    (lambda: Fleet.from_dict({"groups": [{"gpu": "A30", "count": 1}]}), r"fleet.groups\[0\] needs model"),
])
def test_bad_fleets_fail_with_one_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_peak_throughput_ranks_gpus_and_tensor_parallel():
    a100, a30 = (g.world_timing() for g in FLEETS["hetero"].groups)
    cfg = FLEETS["hetero"].groups[0].engine_config()
    assert peak_token_throughput(a100, cfg) > 1.5 * peak_token_throughput(a30, cfg)
    tp2, tp1 = FLEETS["mixed_tp"].groups
    assert peak_token_throughput(tp2.world_timing(), tp2.engine_config()) > 1.5 * peak_token_throughput(
        tp1.world_timing(), tp1.engine_config())


# ---- per-instance predictors ------------------------------------------------------------------------
def test_each_instance_has_its_own_calibrated_labelled_predictor():
    trace, prior = lengths_source("synthetic", 0)
    preds = instance_predictors(SMALL, Honesty(), prior, trace)
    assert list(preds) == ["instance-0", "instance-1", "instance-2"]
    assert preds["instance-0"].label.startswith("timing=calibrated") and preds["instance-0"].label.endswith("A100-80G")
    assert preds["instance-1"].label.endswith("gpu=A30")
    assert preds["instance-1"].timing is not preds["instance-2"].timing
    # each fitted on its own warm-up: the two A30s differ a little, the A100 a lot
    step = [(512, 0)], 16, 16 * 300
    t = {n: p.timing.step_time(*step) for n, p in preds.items()}
    assert t["instance-1"] != t["instance-2"] and t["instance-0"] < 0.8 * min(t["instance-1"], t["instance-2"])
    oracle = instance_predictors(SMALL, Honesty(oracle_timing=True), prior, trace)
    assert oracle["instance-0"].label.startswith("timing=oracle")


def test_hetero_runs_every_new_policy_offline_and_reports_groups_and_goodput():
    classes = (SloClass("tight", 0.3, 0.03, 0.5), SloClass("loose", 5.0, 0.2, 0.5))
    study = Study(SMALL, "synthetic", 160, slo_classes=classes)
    for name in (*CAPACITY_NORMALISED, "block", "block_impact", "block_slo"):
        result = study.run(name, 8.0, 0)
        assert len(result.records) == 160 and result.records["request_id"].is_unique, name
        assert set(result.records["group"]) <= {"A100-80G", "A30"}, name
        s = result.summary
        assert 0 < s["goodput"] <= s["request_throughput"] + 1e-9 and 0 < s["slo_attainment"] <= 1, name
    decisions = study.run("block_impact", 8.0, 0).decisions
    assert decisions["predictor"].str.contains("gpu=A100-80G").all()
    assert decisions["predictor"].str.contains("gpu=A30").all()


def test_capacity_normalised_baselines_send_more_to_the_faster_gpu():
    study = Study(SMALL, "synthetic", 300)
    plain = study.run("least_requests", 10.0, 0).records["group"].value_counts()
    assert study.run("least_tokens_cap", 10.0, 0).records["group"].value_counts()["A100-80G"] > plain["A100-80G"]
    round_robin = study.run("round_robin", 10.0, 0).records["group"].value_counts()
    weighted = study.run("weighted_rr", 10.0, 0).records["group"].value_counts()
    assert round_robin["A100-80G"] == 100 and weighted["A100-80G"] > 120  # the A100's R_peak is ~1.6x an A30's


# ---- policies on fixed candidates -------------------------------------------------------------------
REQ = Request(1, 0.0, 100, 50)


def test_weighted_round_robin_follows_capacity_and_interleaves():
    policy = make_policy("weighted_rr")
    cands = [_cand("fast", capacity=3.0), _cand("slow", capacity=1.0)]
    picks = [policy.choose(REQ, cands) for _ in range(8)]
    assert picks.count("fast") == 6 and picks[:4].count("fast") == 3


def test_normalised_load_prefers_capacity_over_raw_counts():
    fast = _cand("fast", capacity=4.0, tokens=3000, running=6)
    slow = _cand("slow", capacity=1.0, tokens=1000, running=2)
    assert make_policy("least_tokens").choose(REQ, [fast, slow]) == "slow"
    for name in CAPACITY_NORMALISED[:3]:
        assert make_policy(name).choose(REQ, [fast, slow]) == "fast", name


def test_block_impact_counts_the_delay_inflicted_on_others():
    quick_but_crowded = _cand("a", e2e=5.0, added=8.0)
    slower_but_alone = _cand("b", e2e=7.0, added=0.5)
    assert Block("e2e").choose(REQ, [quick_but_crowded, slower_but_alone]) == "a"
    impact = make_policy("block_impact")
    assert impact.wants_impact and make_policy("block_impact@1").wants_impact
    assert impact.choose(REQ, [quick_but_crowded, slower_but_alone]) == "b"


def test_slo_best_fit_takes_the_tightest_instance_that_still_meets_the_slo():
    req = dataclasses.replace(REQ, slo_ttft_s=1.0, slo_tpot_s=0.05)
    fast = _cand("fast", ttft=0.1, e2e=0.3)  # tpot 0.02: lots of headroom
    snug = _cand("snug", ttft=0.7, e2e=1.05)  # tpot 0.035: 30% headroom on both
    thin = _cand("thin", ttft=0.9, e2e=1.2)  # meets both, but within the 20% margin
    late = _cand("late", ttft=1.5, e2e=2.0)  # misses TTFT
    policy = make_policy("block_slo")
    assert policy.margin == 0.2 and policy.choose(req, [fast, thin, snug, late]) == "snug"
    assert SloBestFit(Block("e2e"), margin=0.0).choose(req, [fast, thin, snug, late]) == "thin"
    assert policy.choose(req, [late, _cand("later", ttft=3.0, e2e=4.0)]) == "late"  # misses least
    with pytest.raises(Rejected, match="no instance is predicted to meet the SLO"):
        make_policy("block_slo_reject").choose(req, [late])
    no_slo = SloBestFit(Block("e2e"))
    assert no_slo.choose(REQ, [snug, fast]) == "fast"  # no SLO: the inner objective


def test_early_rejection_is_counted_and_never_served():
    classes = (SloClass("impossible", 0.001, None),)
    nothing = Study(SMALL, "synthetic", 60, slo_classes=classes).run("block_slo_reject", 6.0, 0).summary
    assert (nothing["completed"], nothing["rejected"], nothing["slo_attainment"]) == (0, 60, 0.0)
    loose = Study(SMALL, "synthetic", 80, slo_classes=(SloClass("tight", 0.05, None, 0.5),
                                                       SloClass("none", None, None, 0.5)))
    result = loose.run("block_slo_reject", 20.0, 0)
    s = result.summary
    assert s["rejected"] > 0 and len(result.records) + s["rejected"] == 80
    assert s["slo_attainment"] <= len(result.records) / 80


def test_cluster_counts_a_rejecting_router():
    eng = Engine(SMALL.groups[0].engine_config(), SMALL.groups[0].world_timing(), name="only")
    reqs = [Request(i, i * 0.1, 50, 5) for i in range(6)]
    result = Cluster([eng], lambda r, insts, now: None if r.id % 2 else "only").run(reqs)
    assert [r.id for r in result.rejected] == [1, 3, 5] and len(result.finished) == 3


def test_goodput_counts_each_request_against_its_own_slo():
    eng = Engine(SMALL.groups[1].engine_config(), SMALL.groups[1].world_timing(), name="x")
    reqs = assign_slos([Request(i, 0.0, 100, 20) for i in range(4)], (SloClass("t", 1e-4, None),), 0)
    records = records_frame(Cluster([eng], lambda r, i, n: "x").run(reqs).finished)
    s = slo_summary(records, reqs, [], 10.0)
    assert s == {"goodput": 0.0, "slo_attainment": 0.0, "rejected": 0}
    relaxed = [dataclasses.replace(r, slo_ttft_s=100.0, slo_tpot_s=1.0) for r in reqs]
    assert slo_summary(records, relaxed, relaxed[:1], 10.0) == {"goodput": 0.4, "slo_attainment": 0.8,
                                                                 "rejected": 1}


def test_slo_headers_parse_to_seconds_and_refuse_nonsense():
    assert parse_slo_headers({}) == (None, None)
    assert parse_slo_headers({"x-slo-ttft-ms": "250", "x-slo-tpot-ms": "40.5"}) == (0.25, 0.0405)
    for bad in ("fast", "-3", "0", "nan", "inf", "1e12"):
        with pytest.raises(ProtocolError, match="x-slo-ttft-ms") as info:
            parse_slo_headers({"x-slo-ttft-ms": bad})
        assert info.value.field == "x-slo-ttft-ms"


def test_slo_classes_are_drawn_by_share_and_validated():
    reqs = [Request(i, 0.0, 10, 10) for i in range(400)]
    out = assign_slos(reqs, (SloClass("a", 1.0, None, 3.0), SloClass("b", None, 0.1, 1.0)), seed=1)
    tight = sum(r.slo_ttft_s == 1.0 for r in out)
    assert 250 < tight < 350 and all(r.slo_tpot_s == 0.1 for r in out if r.slo_ttft_s is None)
    assert out == assign_slos(reqs, (SloClass("a", 1.0, None, 3.0), SloClass("b", None, 0.1, 1.0)), seed=1)
    with pytest.raises(ValueError, match="ttft_s must be > 0"):
        SloClass("bad", -1.0, None)


def test_cli_simulates_a_fleet_and_refuses_a_bad_one(capsys):
    from workbench.cli import main

    assert main(["simulate", "--cluster", "1xA100-80G,2xA30", "--requests", "60", "--qps", "6",
                 "--policy", "least_tokens_cap"]) == 0
    out = capsys.readouterr().out
    assert "1 x A100-80G" in out and "2 x A30" in out and "completed 60 requests" in out
    assert main(["capacity", "--cluster", "2xA30,0xA100-80G", "--requests", "5"]) == 2
    assert "group 1 (0xA100-80G).count must be an integer >= 1, got 0" in capsys.readouterr().err


def test_block_impact_asks_the_predictors_for_the_delay_it_inflicts():
    trace, prior = lengths_source("synthetic", 0)
    router = SimRouter(make_policy("block_impact"), instance_predictors(SMALL, Honesty(), prior, trace), 0.02)
    engines = [Engine(g.engine_config(), g.world_timing(), name=n) for n, g in SMALL.members()]
    Cluster(engines, router).run([Request(i, i * 0.05, 200, 100) for i in range(30)])
    last = router.decisions[-1].candidates
    assert len(last) == 3 and all(math.isfinite(c.prediction("e2e").added_delay) for c in last)
    assert any(c.prediction("e2e").added_delay > 0 for c in last)
    assert router.decisions[-1].predictor.count("gpu=") == 2  # one label per GPU type
