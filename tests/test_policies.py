import dataclasses
from dataclasses import dataclass, field

import pytest

from block.offline import Honesty, Study, get_preset
from block.policies import POLICIES, Block, LoadSignals, PowerOfK, make_policy
from block.predictor import Prediction
from simulator.workload import LengthPrior, Request


def _pred(name, ttft, e2e):
    return Prediction(name, ttft, e2e, 0.0, float("nan"), 0.0, 0, 0.0, False)


@dataclass
class FakeCandidate:
    """A Candidate with fixed numbers, for checking each policy's arithmetic."""

    name: str
    signals: LoadSignals
    ttft: float = 1.0
    e2e: float = 10.0
    answers: bool = True
    asked: list = field(default_factory=list)

    @property
    def dispatched(self) -> int:
        return 0

    def prediction(self, request, target):
        self.asked.append(target)
        return _pred(self.name, self.ttft, self.e2e) if self.answers else None


def sig(running=0, waiting=0, free=100, tokens=0, queued=0):
    return LoadSignals(running, waiting, free, 100, tokens, queued)


REQ = Request(1, 0.0, 100, 50)


def test_heuristics_pick_the_least_loaded():
    a = FakeCandidate("a", sig(running=5, waiting=2, free=10, tokens=900, queued=5))
    b = FakeCandidate("b", sig(running=4, waiting=0, free=60, tokens=100, queued=0))
    for name in ("least_requests", "least_tokens", "llumnix", "infaas"):
        assert make_policy(name).choose(REQ, [a, b]) == "b", name


def test_llumnix_counts_queued_prefills_but_infaas_does_not():
    a = FakeCandidate("a", sig(running=1, free=50, queued=45))
    b = FakeCandidate("b", sig(running=1, free=30, queued=0))
    assert make_policy("llumnix").choose(REQ, [a, b]) == "b"
    assert make_policy("infaas").choose(REQ, [a, b]) == "a"


def test_block_minimises_the_chosen_target_and_falls_back_without_answers():
    a = FakeCandidate("a", sig(running=9), ttft=0.5, e2e=20.0)
    b = FakeCandidate("b", sig(running=1), ttft=2.0, e2e=12.0)
    assert make_policy("block").choose(REQ, [a, b]) == "b"
    assert make_policy("block_ttft").choose(REQ, [a, b]) == "a"
    silent = [FakeCandidate("a", sig(running=9), answers=False), FakeCandidate("b", sig(running=1), answers=False)]
    policy = make_policy("block")
    assert policy.choose(REQ, silent) == "b" and policy.fallbacks == 1
    partly = [FakeCandidate("a", sig(), e2e=5.0, answers=False), FakeCandidate("b", sig(), e2e=50.0)]
    assert make_policy("block").choose(REQ, partly) == "b"  # the silent one is skipped


def test_block_without_estimates_hides_the_estimate():
    seen = []

    class Spy(FakeCandidate):
        def prediction(self, request, target):
            seen.append(request.predicted_output_tokens)
            return _pred(self.name, 1.0, 1.0)

    req = Request(1, 0.0, 100, 50, predicted_output_tokens=77)
    Block("e2e", use_length_estimates=False).choose(req, [Spy("a", sig())])
    Block("e2e", use_length_estimates=True).choose(req, [Spy("a", sig())])
    assert seen == [None, 77]


def test_round_robin_cycles_and_power_of_k_asks_only_k():
    cands = [FakeCandidate(n, sig()) for n in "abcd"]
    rr = make_policy("round_robin")
    assert [rr.choose(REQ, cands) for _ in range(5)] == ["a", "b", "c", "d", "a"]
    p = make_policy("block", power_of_k=2, seed=3)
    assert isinstance(p, PowerOfK) and p.name == "block@2"
    for _ in range(10):
        p.choose(REQ, cands)
    assert sum(len(c.asked) for c in cands) == 20


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
