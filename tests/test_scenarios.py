"""The scenario suite: its capacity search, its screen of alternatives, its verdicts, and a tiny suite run twice
on a real DuckDB file (the second run replays every search from the stored cells and runs nothing)."""

import math

import pandas as pd
import pytest

from store.collector import Store
from workbench.scenarios import (
    SuiteScenario,
    _confirmed,
    best_alternative,
    capacity_of,
    kind,
    next_rates,
    policies_for,
    round_rate,
    run_suite,
    suite,
    verdicts,
)


def search(capacity: float, guess: float, rel_tol: float) -> tuple[float, int]:
    """Run next_rates against a world whose capacity is known: (what the search found, rates it tried)."""
    tried: dict[float, bool] = {}
    rates = next_rates(tried, guess, rel_tol)
    while rates:
        tried.update((q, q <= capacity) for q in rates)
        rates = next_rates(tried, guess, rel_tol)
    return capacity_of(tried), len(tried)


@pytest.mark.parametrize("capacity", [3.0, 9.9, 10.0, 10.1, 14.0, 31.0, 77.0])
def test_the_search_brackets_the_capacity_within_its_tolerance_from_any_guess(capacity):
    found, tried = search(capacity, guess=10.0, rel_tol=0.05)
    assert found <= capacity < found * 1.05 * 1.001
    assert tried <= 12


def test_the_search_gives_up_widening_and_says_zero_when_even_its_lowest_rate_fails():
    found, tried = search(0.001, guess=10.0, rel_tol=0.05)
    assert found == 0.0 and tried == 8  # three first rates, then five halvings of sqrt(2)
    found, _ = search(1e9, guess=10.0, rel_tol=0.05)
    assert found == pytest.approx(10.0 * math.sqrt(2) ** 6, rel=1e-3)  # the widening's ceiling, not infinity


def test_a_capacity_is_the_highest_pass_below_the_lowest_failure():
    assert capacity_of({4.0: True, 5.0: False, 6.0: True}) == 4.0  # a lucky pass above a failure is not capacity
    assert capacity_of({4.0: False}) == 0.0
    assert round_rate(10.000001) == round_rate(9.9999999) == 10.0


def caps(rows: list[tuple[str, str, str, int, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"scenario": s, "policy": p, "mode": m, "seed": seed, "kind": kind(p, m),
                          "capacity_qps": c} for s, p, m, seed, c in rows])


def test_the_best_alternative_is_judged_on_the_seeds_every_confirmed_one_ran():
    frame = caps([("a", "least_requests", "honest", 0, 10.0), ("a", "least_requests", "honest", 1, 8.0),
                  ("a", "sglang", "honest", 0, 9.5),  # screened out after seed 0: one seed is not a mean
                  ("a", "block", "honest", 0, 12.0), ("a", "block", "honest", 1, 11.0),
                  ("a", "block_star", "oracle-lengths", 0, 20.0), ("a", "block_star", "oracle-lengths", 1, 20.0)])
    assert best_alternative(frame) == ("least_requests", 9.0)
    v = verdicts(frame, pd.DataFrame(columns=["scenario", "policy", "mode", "goodput"]))
    row = v.loc["a"]
    assert row.best_block == "block" and row.gain_pct == pytest.approx((11.5 / 9.0 - 1) * 100)
    assert row.gain_min_pct == pytest.approx(20.0) and row.gain_max_pct == pytest.approx(37.5)
    assert row.oracle_lengths_gain_pct == pytest.approx((20 / 9.0 - 1) * 100)  # reported, never Block's verdict


def test_the_screen_keeps_every_block_row_and_the_leading_alternatives():
    rows = [("least_requests", "honest"), ("sglang", "honest"), ("dynamo", "honest"), ("block", "honest"),
            ("block_star", "oracle-lengths")]
    frame = caps([("a", "least_requests", "honest", 0, 5.0), ("a", "sglang", "honest", 0, 7.0),
                  ("a", "dynamo", "honest", 0, 6.0), ("a", "block", "honest", 0, 1.0),
                  ("a", "block_star", "oracle-lengths", 0, 1.0)])
    assert _confirmed("a", rows, frame, 2) == [("sglang", "honest"), ("dynamo", "honest"), ("block", "honest"),
                                               ("block_star", "oracle-lengths")]
    assert _confirmed("a", rows, frame, None) == rows
    tied = frame.assign(capacity_qps=frame.capacity_qps.where(frame.policy != "least_requests", 6.0))
    assert ("least_requests", "honest") in _confirmed("a", rows, tied, 2)  # tied with the second: it goes on too


def test_the_full_matrix_has_every_policy_family_and_an_oracle_row_per_scenario(monkeypatch):
    monkeypatch.delenv("BLOCK_DATA_DIR", raising=False)
    scenarios, left_out = suite(quick=False)
    assert [s.name for s in scenarios] == ["null_alpaca", "hetero", "shared_prefix", "multi_turn"]
    assert left_out == ["bursty_code, long_prompts, mooncake: their traces need BLOCK_DATA_DIR"]
    for s in scenarios:
        kinds = {kind(p, m) for p, m in policies_for(s, quick=False)}
        assert {"heuristic", "peer", "tuned peer", "block", "block (oracle lengths)"} <= kinds, s.name
        assert ("capacity-normalised" in kinds) == s.heterogeneous


def test_a_suite_resumes_from_its_store_and_runs_nothing_it_holds(tmp_path):
    tiny = SuiteScenario("tiny", "a smoke test", "demo", "synthetic", slo_ttft=1.0, guess=20.0, duration_s=3.0,
                         instances=2)
    rows = {"tiny": [("least_requests", "honest"), ("random", "honest"), ("block", "honest")]}
    logged: list[str] = []
    store = Store(tmp_path / "block.duckdb")
    try:
        first = run_suite([tiny], rows, (0, 1), store, "t", rel_tol=0.2, confirm_top=1, workers=2,
                          log=logged.append)
        assert sum(r.ran for r in first.reports) == first.cells > 0
        again = run_suite([tiny], rows, (0, 1), store, "t", rel_tol=0.2, confirm_top=1, workers=2,
                          log=logged.append)
    finally:
        store.close()
    assert sum(r.ran for r in again.reports) == 0
    pd.testing.assert_frame_equal(first.capacities, again.capacities)
    seeds = first.capacities.groupby("policy")["seed"].nunique()
    seed0 = first.capacities[first.capacities.seed == 0].set_index("policy")["capacity_qps"]
    assert seeds["block"] == 2 and seed0["random"] < seed0["least_requests"]
    assert (seeds["least_requests"], seeds["random"]) == (2, 1)  # the screen kept the leader only
    assert (first.capacities.capacity_qps > 0).all()
    best = first.capacities[first.capacities.policy != "block"].groupby("policy")["capacity_qps"].agg(
        ["mean", "count"])
    peer = best[best["count"] == 2]["mean"].idxmax()
    assert set(first.goodput.policy) == {peer, "block"}  # the verdict's two rows (no oracle row was asked for)
    assert (first.goodput.qps == round_rate(1.25 * best.loc[peer, "mean"])).all()
