"""The demo's scenes and verdicts: what `make demo` prints must say who won, and say it when block did not."""

import pandas as pd
import pytest

from simulator.fleet import FLEETS
from workbench.demo import DEMO_FLEET, fleet_engines, knee_verdict, light_verdict


def frame(rows):
    return pd.DataFrame([{"run_id": p, "policy": p, "completed": 10, "failed": 0, "p50_ttft_ms": t,
                          "p99_ttft_ms": t99, "p50_e2e_ms": e, "p99_e2e_ms": e * 2, "p50_tpot_ms": 20.0}
                         for p, t, t99, e in rows])


def test_light_verdict_compares_block_with_the_best_heuristic():
    ok = light_verdict(frame([("round_robin", 30.0, 90, 2000), ("least_requests", 26.0, 80, 1990),
                              ("block", 27.5, 85, 1995)]))
    assert "block P50 TTFT 27.5 ms vs least_requests 26.0 ms (+5.8%, within 10%)" in ok
    slow = light_verdict(frame([("least_requests", 26.0, 80, 1990), ("block", 70.0, 270, 2090)]))
    assert "NOT within 10%" in slow and "more than a heuristic" in slow


def test_knee_verdict_names_the_winner_and_says_when_block_lost():
    won = knee_verdict(frame([("least_requests", 90.0, 3000, 9000), ("block", 60.0, 1500, 7000),
                              ("block_impact", 70.0, 1600, 6900)]))
    ttft, e2e = won.splitlines()
    assert ttft == "near the knee, p99_ttft_ms: block won (1500 ms, 50.0% under least_requests's 3000 ms)"
    assert e2e.startswith("near the knee, p50_e2e_ms: block_impact won (6900 ms, 23.3% under least_requests")
    lost = knee_verdict(frame([("least_tokens_cap", 50.0, 1200, 7000), ("block_impact", 60.0, 1500, 7600)]))
    assert "least_tokens_cap won (1200 ms, 20.0% under block_impact's 1500 ms); block did not win here" in lost


def test_fleet_engines_give_each_instance_its_own_gpu_and_refuse_tensor_parallel_live():
    engines = fleet_engines(DEMO_FLEET, 2.0)
    assert [e.gpu for e in engines] == ["A100-80G", "A30", "A30", "A30"]
    assert engines[1].num_blocks == 1052 and engines[0].max_num_seqs == 128 and engines[0].time_scale == 2.0
    with pytest.raises(ValueError, match="tensor parallel 2"):
        fleet_engines(FLEETS["mixed_tp"], 1.0)
