"""Sweeps: cells and their keys, a local pool and a real local Ray instance, streaming into a real DuckDB file,
resuming after Ctrl-C and after a kill -9 of the sweep's process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from block.offline import Scenario
from simulator.workload import LengthPrior, SharedPrefixShape, Trace, shared_prefix_workload
from store.collector import Store
from store.read import Reader
from workbench.cli import main as block_cli
from workbench.experiments import open_run, run_folders
from workbench.sweep import Cell, Grid, run_cell, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"requests": 120, "seeds": (0,)}


def tiny_shared_prefix() -> Scenario:
    """A scenario factory at module level, so pool workers can import it by name."""
    shape = SharedPrefixShape(groups=3, system_tokens=1500, questions_per_group=2, question_tokens=200,
                              output_tokens=40)
    other = shared_prefix_workload(shape, 200, 2.0, 99)
    return Scenario("tiny_shared_prefix", lambda qps, seed: shared_prefix_workload(shape, 60, qps, seed),
                    LengthPrior([r.output_tokens for r in other]),
                    Trace(np.array([r.prompt_tokens for r in other]), np.array([r.output_tokens for r in other]),
                          source="tiny-calibration"))


def test_a_grid_is_the_product_of_its_axes_less_the_cells_a_mode_cannot_change():
    grid = Grid(["least_requests", "block_star"], [4, 8.0], (0, 1), max_num_seqs=(32, 64),
                modes=("honest", "oracle-lengths"), length_estimator=lambda reqs: [100] * len(reqs),
                estimator_label="const100")
    cells = grid.cells()
    # least_requests: honest only (oracle lengths change nothing it reads); block_star: honest and oracle
    assert len(cells) == 2 * 2 * 2 + 2 * 2 * 2 * 2
    assert {c.estimator for c in cells if c.policy == "block_star" and c.mode == "honest"} == {"const100"}
    assert {c.estimator for c in cells if c.mode == "oracle-lengths"} == {""}
    assert len({c.key for c in cells}) == len(cells)
    assert Cell("block", 4, 0).key == Cell("block", 4.0, 0).key != Cell("block", 4.0, 1).key
    assert Cell("block", 4, 0, max_num_seqs=32).spec().max_num_seqs == 32
    fleet = Grid(["least_requests"], [8.0], presets=("hetero", "2xA100-80G,2xA30"), max_num_seqs=(32,)).cells()
    assert [c.preset for c in fleet] == ["hetero", "2xA100-80G,2xA30"]
    assert {g.max_num_seqs for c in fleet for g in c.spec().groups} == {32}


@pytest.mark.parametrize(("grid", "message"), [
    (Grid(["no_such_policy"], [4.0]), "unknown policy 'no_such_policy'"),
    (Grid(["block_star"], [4.0]), "policy 'block_star' needs length estimates"),
    (Grid(["block"], [4.0], modes=("psychic",)), "unknown mode 'psychic'"),
    (Grid(["block"], [4.0], presets=("nope",)), "unknown cluster 'nope'"),
    (Grid(["block"], [4.0], max_num_seqs=(0,)), "max_num_seqs must be an integer >= 1"),
    (Grid(["block"], [0.0]), "every QPS must be positive"),
    (Grid(["block"], []), "qps is empty"),
])
def test_a_bad_grid_fails_before_any_cell_runs(grid, message):
    with pytest.raises(ValueError, match=message):
        grid.cells()


def test_a_local_sweep_streams_cells_into_duckdb_and_run_folders_and_a_rerun_skips_them(tmp_path):
    grid = Grid(["round_robin", "block"], [4.0, 8.0], slo_ttft=1.0, **SMALL)
    store = Store(tmp_path / "block.duckdb")
    try:
        first = run_sweep(grid, store, "s1", workers=2, progress=False)
        assert (first.ran, first.skipped, first.failed, first.interrupted) == (4, 0, [], False)
        again = run_sweep(grid, store, "s1", workers=2, progress=False)
        assert (again.ran, again.skipped) == (0, 4)
        grown = Grid(["round_robin", "block"], [4.0, 8.0, 12.0], slo_ttft=1.0, **SMALL)
        more = run_sweep(grown, store, "s1", workers=2, progress=False)
        assert (more.ran, more.skipped) == (2, 4)
    finally:
        store.close()
    cells = Reader(db_path=tmp_path / "block.duckdb").sweep_cells("s1")
    assert len(cells) == 6 and cells["cell"].is_unique
    assert (cells["completed"] == 120).all() and cells["goodput"].notna().all()
    runs = Reader(db_path=tmp_path / "block.duckdb").runs()
    assert runs.loc[runs["run_id"] == "s1", "label"].tolist() == ["sweep"]
    # the run folder of every cell holds its requests and the numbers its row has
    for row in cells.itertuples():
        run = open_run(row.folder)
        assert run.config["cell"] == row.cell and run.config["policy"] == row.policy
        assert len(run.requests) == 120
        assert run.summary["p99_ttft"] == pytest.approx(row.p99_ttft)
        assert run.requests["ttft"].quantile(0.99) == pytest.approx(row.p99_ttft)
    listed = run_folders(tmp_path / "runs" / "s1")
    assert len(listed) == 6 and set(listed["cell"]) == set(cells["cell"])
    # the same cell run directly gives the same result: the sweep adds nothing to the simulation
    direct = run_cell(Cell("block", 8.0, 0, requests=120, slo_ttft=1.0))
    stored = cells[(cells["policy"] == "block") & (cells["qps"] == 8.0)].iloc[0]
    assert direct.summary["p99_ttft"] == pytest.approx(stored["p99_ttft"])


def test_a_rerun_after_the_code_changed_runs_every_cell_again(tmp_path, monkeypatch):
    """A cell's key covers the code that decides its result: results of two codes never mix in one sweep."""
    from workbench import sweep

    grid = Grid(["round_robin"], [4.0], **SMALL)
    store = Store(tmp_path / "block.duckdb")
    try:
        assert run_sweep(grid, store, "s", workers=1, progress=False).ran == 1
        assert run_sweep(grid, store, "s", workers=1, progress=False).skipped == 1
        before = Cell("round_robin", 4.0, 0, requests=120).key
        monkeypatch.setattr(sweep, "code_version", lambda: "a-changed-simulator")
        assert Cell("round_robin", 4.0, 0, requests=120).key != before
        again = run_sweep(grid, store, "s", workers=1, progress=False)
        assert (again.ran, again.skipped) == (1, 0)
    finally:
        store.close()


def test_a_sweep_runs_scenario_factories_in_its_workers(tmp_path):
    grid = Grid(["least_requests", "block"], [6.0], workloads=("tiny",), scenarios={"tiny": tiny_shared_prefix},
                requests=60)
    store = Store(tmp_path / "block.duckdb")
    try:
        report = run_sweep(grid, store, "scen", workers=2, progress=False)
    finally:
        store.close()
    assert (report.ran, report.failed) == (2, [])
    cells = Reader(db_path=tmp_path / "block.duckdb").sweep_cells("scen")
    assert set(cells["workload"]) == {"tiny"} and (cells["completed"] == 60).all()
    assert all(0 < open_run(f).summary["prefix_hit_rate"] < 1 for f in cells["folder"])


def _sweep_process(workspace: Path, name: str) -> subprocess.Popen:
    """`block sweep` in its own process group, as a terminal runs it (Ctrl-C reaches every process of it)."""
    cmd = [sys.executable, "-m", "workbench.cli", "sweep", "--name", name, "--workspace", str(workspace),
           "--policies", "round_robin,least_requests,block", "--qps", "4,6,8", "--requests", "250",
           "--workers", "1", "--no-progress"]
    # SIGINT as a terminal leaves it: a runner started in the background (`cmd &`) ignores SIGINT, its children
    # inherit that, and a Python started with SIGINT ignored never raises KeyboardInterrupt
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_folders(root: Path, n: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(list(root.rglob("summary.json"))) < n:
        assert proc.poll() is None, f"the sweep ended before {n} cells: {proc.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline, f"fewer than {n} cells finished in {timeout} s"
        time.sleep(0.1)


def _done(workspace: Path, name: str) -> pd.DataFrame:
    return Reader(db_path=workspace / "block.duckdb").sweep_cells(name)


def test_a_sweep_interrupted_by_ctrl_c_and_killed_midway_resumes_where_it_stopped(tmp_path):
    ws, name = tmp_path / "ws", "resume"
    root = ws / "runs" / name
    proc = _sweep_process(ws, name)
    try:
        _wait_for_folders(root, 2, proc)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the sweep stops, keeping what finished
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out
    assert "interrupted (rerun to resume)" in out
    after_ctrl_c = _done(ws, name)
    assert 2 <= len(after_ctrl_c) < 9

    proc = _sweep_process(ws, name)
    try:
        _wait_for_folders(root, len(after_ctrl_c) + 2, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no chance to clean up
        proc.wait()
    after_kill = _done(ws, name)
    assert len(after_kill) > len(after_ctrl_c)
    assert set(after_ctrl_c["cell"]) <= set(after_kill["cell"])

    assert block_cli(["sweep", "--name", name, "--workspace", str(ws), "--policies", "round_robin,least_requests,block",
                      "--qps", "4,6,8", "--requests", "250", "--workers", "2", "--no-progress"]) == 0
    final = _done(ws, name)
    assert len(final) == 9 and final["cell"].is_unique
    kept = final.set_index("cell").loc[after_kill["cell"], "finished_at"]
    assert (kept.to_numpy() == after_kill["finished_at"].to_numpy()).all(), "a finished cell was run again"
    assert len(run_folders(root)) == 9


def test_a_sweep_on_a_real_local_ray_instance_gives_the_local_pool_s_results(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'block-workbench[ray]')")
    grid = Grid(["least_requests", "block"], [4.0, 8.0], **SMALL)
    local_store = Store(tmp_path / "local.duckdb")
    try:
        assert run_sweep(grid, local_store, "cmp", workers=2, progress=False).ran == 4
    finally:
        local_store.close()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    store = Store(tmp_path / "ray.duckdb")
    try:
        report = run_sweep(grid, store, "cmp", ray_address="auto", progress=False)
        assert (report.ran, report.failed) == (4, [])
        assert report.backend == "ray (auto)"
        assert run_sweep(grid, store, "cmp", ray_address="auto", progress=False).skipped == 4
    finally:
        store.close()
        ray.shutdown()
    local = Reader(db_path=tmp_path / "local.duckdb").sweep_cells("cmp").set_index("cell").sort_index()
    on_ray = Reader(db_path=tmp_path / "ray.duckdb").sweep_cells("cmp").set_index("cell").sort_index()
    assert list(on_ray.index) == list(local.index)
    for metric in ("p50_ttft", "p99_ttft", "p99_e2e", "completed"):
        assert on_ray[metric].to_numpy() == pytest.approx(local[metric].to_numpy()), metric


def test_a_cell_certain_to_miss_its_bound_gives_up_and_is_recorded_as_such(tmp_path):
    grid = Grid(["round_robin"], [40.0], requests=400, give_up_ttft=0.001)
    store = Store(tmp_path / "block.duckdb")
    try:
        assert run_sweep(grid, store, "doomed", workers=1, progress=False).ran == 1
    finally:
        store.close()
    (row,) = Reader(db_path=tmp_path / "block.duckdb").sweep_cells("doomed").itertuples()
    assert row.gave_up and row.p99_ttft == float("inf") and row.completed < 400
    assert open_run(row.folder).summary["gave_up"] is True


def test_the_cli_names_scenario_factories_as_module_and_function(tmp_path):
    ws = tmp_path / "ws"
    args = ["sweep", "--name", "cli", "--workspace", str(ws), "--policies", "least_requests", "--qps", "6",
            "--requests", "60", "--workers", "1", "--no-progress"]
    assert block_cli([*args, "--workloads", "tests.test_sweep:tiny_shared_prefix"]) == 0
    cells = _done(ws, "cli")
    assert cells["workload"].tolist() == ["tests.test_sweep:tiny_shared_prefix"] and cells["completed"].item() == 60
    assert block_cli([*args, "--workloads", "tests.test_sweep:no_such_factory"]) == 2
    assert block_cli([*args, "--policies", "block_star"]) == 2
