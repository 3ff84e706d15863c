import dataclasses

import pytest

from block.offline import Honesty, Study, get_preset
from block.policies import POLICIES, Block, Candidate, PowerOfK, make_policy
from block.predictor import Prediction
from block.protocol import LoadSignals
from block.routing import Router
from simulator.workload import LengthPrior, Request


def _pred(name, ttft, e2e):
    return Prediction(name, ttft, e2e, 0.0, float("nan"), 0.0, 0, 0.0, False)


def cand(name, signals, ttft=1.0, e2e=10.0, answers=True):
    """A Candidate with fixed predictions (or none, as when its predictor missed the budget)."""
    p = _pred(name, ttft, e2e) if answers else None
    return Candidate(name, signals, predictions={"e2e": p, "ttft": p})


def sig(running=0, waiting=0, free=100, tokens=0, queued=0):
    return LoadSignals(running, waiting, free, 100, tokens, queued)


REQ = Request(1, 0.0, 100, 50)


def test_heuristics_pick_the_least_loaded():
    a = cand("a", sig(running=5, waiting=2, free=10, tokens=900, queued=5))
    b = cand("b", sig(running=4, waiting=0, free=60, tokens=100, queued=0))
    for name in ("least_requests", "least_tokens", "llumnix", "infaas"):
        assert make_policy(name).choose(REQ, [a, b]) == "b", name


def test_llumnix_counts_queued_prefills_but_infaas_does_not():
    a = cand("a", sig(running=1, free=50, queued=45))
    b = cand("b", sig(running=1, free=30, queued=0))
    assert make_policy("llumnix").choose(REQ, [a, b]) == "b"
    assert make_policy("infaas").choose(REQ, [a, b]) == "a"


def test_block_minimises_the_chosen_target_and_falls_back_without_answers():
    a = cand("a", sig(running=9), ttft=0.5, e2e=20.0)
    b = cand("b", sig(running=1), ttft=2.0, e2e=12.0)
    assert make_policy("block").choose(REQ, [a, b]) == "b"
    assert make_policy("block_ttft").choose(REQ, [a, b]) == "a"
    silent = [cand("a", sig(running=9), answers=False), cand("b", sig(running=1), answers=False)]
    assert make_policy("block").choose(REQ, silent) == "b"
    partly = [cand("a", sig(), e2e=5.0, answers=False), cand("b", sig(), e2e=50.0)]
    assert make_policy("block").choose(REQ, partly) == "b"  # the silent one is skipped


def test_router_hides_the_estimate_from_policies_that_do_not_use_it():
    seen = []

    def predict(c, req, target):
        seen.append(req.predicted_output_tokens)
        return _pred(c.name, 1.0, 1.0)

    req = Request(1, 0.0, 100, 50, predicted_output_tokens=77)
    for policy in (Block("e2e", use_length_estimates=False), Block("e2e", use_length_estimates=True)):
        Router(policy).route(req, [Candidate("a", sig())], predict, request_id="1", ts=0.0)
    assert seen == [None, 77]


def test_round_robin_cycles_and_power_of_k_asks_only_k():
    cands = [cand(n, sig()) for n in "abcd"]
    rr = make_policy("round_robin")
    assert [rr.choose(REQ, cands) for _ in range(5)] == ["a", "b", "c", "d", "a"]
    p = make_policy("block", power_of_k=2, seed=3)
    assert isinstance(p, PowerOfK) and p.name == "block@2"
    asked = []
    router = Router(p)
    for i in range(10):
        fresh = [Candidate(n, sig()) for n in "abcd"]
        d = router.route(REQ, fresh, lambda c, req, t: asked.append(c.name) or _pred(c.name, 1.0, 1.0),
                         request_id=str(i), ts=0.0)
        assert (d.asked, d.considered, d.fallback) == (2, 4, "none")
        assert d.choice in {c.name for c in d.candidates}
    assert len(asked) == 20


def test_fallback_is_none_partial_or_all_and_heuristics_ask_nothing():
    def run(policy, answers):
        it = iter(answers)
        return Router(make_policy(policy)).route(
            REQ, [Candidate(n, sig(running=i)) for i, n in enumerate("abc")],
            lambda c, req, t: _pred(c.name, 1.0, 1.0) if next(it) else None, request_id="r", ts=0.0)

    assert run("block", [True, True, True]).fallback == "none"
    assert run("block", [False, True, True]).fallback == "partial"
    d = run("block", [False, False, False])
    assert d.fallback == "all" and d.choice == "a"  # least_requests on live signals
    row = run("least_requests", []).row("run")
    assert (row.fallback, row.asked, row.target, row.considered) == ("none", 0, None, 3)


def test_bad_policy_input_is_clear():
    with pytest.raises(ValueError, match="valid policies: round_robin"):
        make_policy("fastest")
    with pytest.raises(ValueError, match="larger than the cluster"):
        make_policy("block", power_of_k=5, num_instances=4)
    with pytest.raises(ValueError, match="k >= 1"):
        make_policy("block@0")
    with pytest.raises(ValueError, match="integer"):
        make_policy("block@two")


def test_load_signals_count_pending_work():
    from simulator.engine import EngineConfig, InstanceState, RequestState

    state = InstanceState(EngineConfig(num_blocks=100), 0.0, [
        RequestState(1, 0.0, 32, 40, 9, "running", 3, predicted_output_tokens=20),
        RequestState(2, 0.0, 64, 0, 0, "waiting", 0),
    ])
    s = LoadSignals.from_state(state, LengthPrior([50] * 3), [Request(3, 0.0, 16, 1)])
    assert (s.running, s.waiting, s.free_blocks) == (1, 2, 97)
    assert s.queued_prefill_blocks == 4 + 1
    assert s.unfinished_tokens == (32 + 9 - 40 + 11) + (64 + 50) + (16 + 50)


def test_every_policy_runs_offline_and_finishes_every_request():
    study = Study(get_preset("demo"), "synthetic", 150, Honesty(oracle_lengths=True))
    for name in POLICIES:
        result = study.run(name, 6.0, 0)
        assert len(result.records) == 150, name
        assert result.records["request_id"].is_unique


def test_offline_runs_are_deterministic_and_honest_mode_is_labelled():
    study = Study(get_preset("demo"), "synthetic", 120)
    a, b = study.run("block", 5.0, 1), study.run("block", 5.0, 1)
    assert a.records["e2e"].tolist() == b.records["e2e"].tolist()
    assert study.honesty.label == "honest"
    assert Honesty(oracle_timing=True).label == "oracle-timing"
    with pytest.raises(ValueError, match="needs length estimates"):
        study.run("block_star", 5.0, 0)


def test_audit_counterfactuals_are_exact_with_an_all_knowing_predictor_and_match_the_world():
    """With true lengths, world timing, no noise and fresh states, every audited prediction equals its
    counterfactual, the choice is the best one, and the last request (nothing arrives after it)
    finishes exactly when its counterfactual said."""
    spec = dataclasses.replace(get_preset("paper"), instances=3)
    oracle = Honesty(noise=0.0, state_interval=0.0, oracle_timing=True, oracle_lengths=True)
    result = Study(spec, "synthetic", 120, oracle, audit_every=1).run("block_star", 8.0, seed=0)
    audit = result.audit
    assert len(audit) == 3 * 120 and audit.groupby("request_id").chosen.sum().eq(1).all()
    assert (audit.predicted_e2e - audit.oracle_e2e).abs().max() < 1e-9
    assert (audit.predicted_ttft - audit.oracle_ttft).abs().max() < 1e-9
    chosen = audit[audit.chosen].set_index("request_id")
    assert (chosen.oracle_e2e <= audit.groupby("request_id").oracle_e2e.min() + 1e-9).all()
    last = result.records.sort_values("arrival").iloc[-1]
    assert chosen.loc[last.request_id, "oracle_e2e"] == pytest.approx(last.e2e, rel=1e-9)
    honest = Study(spec, "synthetic", 120, audit_every=10).run("block", 8.0, seed=0)
    assert len(honest.audit) == 3 * 12 and (honest.audit.predicted_e2e - honest.audit.oracle_e2e).abs().max() > 0.1
