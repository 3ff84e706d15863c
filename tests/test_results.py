"""Run folders (what every offline run writes) and the results dashboard over them and over sweep tables."""

import shutil
from pathlib import Path

import holoviews as hv
import panel as pn
import pytest

from block.offline import Honesty, Study, get_preset
from store.collector import Store
from store.read import Reader
from tests.test_dashboards import ARTIFACTS, CHROMIUM, browser, panel_serve
from workbench.cli import main as block_cli
from workbench.experiments import open_run, run_folder_name, run_folders, save_offline_run, study_config
from workbench.sweep import Grid, run_sweep


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A workspace with one saved offline run and one small sweep, as a user's would hold them."""
    ws = tmp_path_factory.mktemp("ws")
    store = Store(ws / "block.duckdb")
    try:
        study = Study(get_preset("demo"), "synthetic", 100, Honesty())
        result = study.run("block", 6.0, 0)
        save_offline_run(store, "block-6", "block", result.records, result.decisions,
                         config=study_config(study, "block", 6.0, 0))
        run_sweep(Grid(["round_robin", "block"], [4.0, 8.0], requests=100, slo_ttft=0.5), store, "small",
                  workers=2, progress=False)
    finally:
        store.close()
    return ws


def test_every_saved_offline_run_is_a_folder_a_notebook_can_open(workspace):
    run = open_run(workspace / "runs" / "block-6")
    assert run.config["policy"] == "block" and run.config["spec"]["instances"] == 4
    assert run.config["mode"] == "honest" and run.config["qps"] == 6.0
    assert len(run.requests) == 100 and {"ttft", "e2e", "instance"} <= set(run.requests.columns)
    assert run.decisions is not None and len(run.decisions) == 100
    assert run.summary["p99_ttft"] == pytest.approx(run.requests["ttft"].quantile(0.99))
    stored = Reader(db_path=workspace / "block.duckdb").requests("block-6", source="sim")
    assert sorted(stored["request_id"]) == sorted(run.requests["request_id"].astype(str))
    listed = run_folders(workspace / "runs")
    assert len(listed) == 1 + 4  # the offline run and the sweep's four cells
    assert set(listed.loc[listed["policy"] == "block", "qps"]) == {6.0, 4.0, 8.0}


def test_a_run_folder_that_is_not_finished_or_not_there_says_so(tmp_path, workspace):
    half = tmp_path / "half"
    shutil.copytree(workspace / "runs" / "block-6", half)
    (half / "summary.json").unlink()
    with pytest.raises(ValueError, match=r"half is not a finished run folder: it lacks summary.json"):
        open_run(half)
    assert run_folders(tmp_path).empty  # an unfinished folder is not listed
    with pytest.raises(FileNotFoundError, match="no run folder at"):
        open_run(tmp_path / "missing")
    (half / "summary.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"summary.json: expected a JSON object, got list"):
        open_run(half)


def test_run_folder_names_are_safe_and_distinct():
    assert run_folder_name("block-6.0_s1") == "block-6.0_s1"
    hostile = run_folder_name("../../etc/passwd")
    assert "/" not in hostile and not hostile.startswith(".")
    assert run_folder_name("a/b") != run_folder_name("a_b")
    assert run_folder_name("o'brien'); DROP TABLE requests; --").startswith("o_brien_DROP_TABLE_requests_--")


def test_the_results_page_shows_sweeps_and_run_folders_with_full_width_cdfs(workspace, tmp_path):
    from dashboards import results

    cli = ["--preset", "demo", "--requests", "40", "--policies", "round_robin,least_requests", "--seeds", "0"]
    capacity = tmp_path / "capacity.csv"
    assert block_cli(["capacity", *cli, "--slo", "3", "--lo", "1", "--hi", "8", "--csv", str(capacity)]) == 0
    page = results.build(Reader(db_path=workspace / "block.duckdb"), str(capacity), None, str(workspace / "runs"))
    objects = page.main.objects
    assert not [o for o in objects if isinstance(o, pn.pane.Alert)]
    assert any(isinstance(o, pn.pane.HoloViews) and isinstance(o.object, hv.Bars) for o in objects)
    picks = [o for o in objects if isinstance(o, pn.widgets.Select)]
    assert [p.options for p in picks] == [["small"]]
    assert not [o for o in objects if isinstance(o, pn.Row)]  # no live runs: no empty CDFs of them
    sweep = results.sweep_section(Reader(db_path=workspace / "block.duckdb"))[-1]()
    curves = [o.object for o in sweep.objects if isinstance(o, pn.pane.HoloViews)]
    assert len(curves) == 2  # P99 TTFT and goodput (the sweep had an SLO) against QPS
    assert sorted(c.label for c in curves[0]) == ["block", "round_robin"]
    assert all(len(c.data) == 2 for c in curves[0])  # two QPS points each
    runs = results.runs_section(workspace / "runs")
    assert "Run folders (5" in runs[0].object
    cdfs = runs[-1]()
    assert len(cdfs.objects) == 2  # TTFT and E2E CDFs of the picked runs
    for pane in cdfs.objects:  # they take the page's width (they were 200 px figures)
        assert pane.sizing_mode == "stretch_width" and pane.object.opts.get().kwargs["responsive"]
        assert len(pane.object) == 5  # one curve per run folder
    empty = results.runs_section(tmp_path)
    assert "no finished run folders" in empty[0].object


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (apt-get install chromium)")
def test_the_results_page_renders_sweeps_and_run_folders_in_chromium(workspace, tmp_path):
    db = tmp_path / "copy.duckdb"
    shutil.copy(workspace / "block.duckdb", db)
    with panel_serve("dashboards/results.py", ["--db", str(db), "--runs", str(workspace / "runs")]) as url:
        pw, b = browser()
        try:
            page = b.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(url)
            page.wait_for_selector("canvas", timeout=30000)
            figures = page.locator(".bk-Figure")  # sweep P99 TTFT and goodput, CDFs of the run folders
            assert page.locator("text=Sweeps (1)").count() == 1
            assert page.locator("text=Run folders (5").count() == 1
            for _ in range(60):
                if figures.count() >= 4:
                    break
                page.wait_for_timeout(500)
            assert figures.count() == 4
            widths = [figures.nth(i).bounding_box()["width"] for i in range(figures.count())]
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "results_sweeps_and_runs.png"), full_page=True)
            assert min(widths) > 500, f"figures are not stretched to the page: {widths}"
        finally:
            b.close()
            pw.stop()
