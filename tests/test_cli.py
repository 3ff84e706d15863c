import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from block.engines.emulator import EmulatedEngine, build_app
from simulator.engine import EngineConfig
from simulator.hardware import get_gpu, get_model
from simulator.timing import Roofline
from tests.servers import serve
from workbench.cli import build_parser, main
from workbench.cluster import free_port


def test_simulate_prints_a_summary(capsys):
    assert main(["simulate", "--requests", "200", "--qps", "4", "--policy", "least_requests"]) == 0
    out = capsys.readouterr().out
    assert "completed 200 requests" in out and "ttft" in out and "instance-3" in out


def test_simulate_writes_records(tmp_path, capsys):
    path = tmp_path / "out" / "records.csv"
    assert main(["simulate", "--requests", "50", "--policy", "block", "--csv", str(path)]) == 0
    assert path.read_text().count("\n") == 51


def test_bad_input_is_a_clear_error(capsys):
    assert main(["simulate", "--policy", "nope", "--requests", "5"]) == 2
    assert "valid policies" in capsys.readouterr().err
    assert main(["simulate", "--gpu", "Z100", "--requests", "5"]) == 2
    assert "known: " in capsys.readouterr().err
    assert main(["simulate", "--policy", "block@9", "--requests", "5"]) == 2
    assert "larger than the cluster" in capsys.readouterr().err


def test_compare_and_capacity_in_ci_size(tmp_path, capsys):
    out = tmp_path / "compare.csv"
    assert main(["compare", "--preset", "demo", "--requests", "150", "--qps", "6,10", "--seeds", "0,1",
                 "--policies", "least_requests,block", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "least_requests" in text and "block" in text and out.read_text().count("\n") == 1 + 2 * 2 * 2
    assert main(["capacity", "--preset", "demo", "--requests", "150", "--slo", "3", "--seeds", "0",
                 "--policies", "round_robin,block", "--lo", "4", "--hi", "40"]) == 0
    table = capsys.readouterr().out
    assert "capacity_qps" in table and "honest" in table


# ---- the command line a new user meets: version, help, vllm bench serve's options, one-line errors ----

ROOT = Path(__file__).resolve().parents[1]


def parsers(parser):
    """Every parser of the CLI: the top one and each (sub)command's."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_version_and_every_option_says_what_it_does_and_its_default(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("block 0.")
    for parser in parsers(build_parser()):
        if parser.prog.endswith("sweep"):
            continue  # workbench.sweep's own parser
        for action in parser._actions:
            if not action.option_strings or "-h" in action.option_strings or action.default == argparse.SUPPRESS:
                continue
            shown = " ".join(parser._get_formatter()._format_action(action).split())
            assert action.help, f"{parser.prog} {action.option_strings[0]} has no help"
            if action.default is not None and action.default is not False:
                assert "default" in shown, (parser.prog, shown)


@pytest.fixture(scope="module")
def engine_url():
    emu = EmulatedEngine(EngineConfig(num_blocks=1052, max_num_seqs=48, max_num_batched_tokens=512),
                         Roofline(get_gpu("A30"), get_model("Llama-2-7B")), time_scale=50.0)
    with serve(build_app(emu, "llama")) as url:
        yield url


def test_bench_takes_vllm_bench_serve_options_and_saves_its_result(engine_url, tmp_path, capsys):
    argv = ["bench", "--base-url", engine_url, "--model", "llama", "--num-prompts", "6", "--request-rate", "40",
            "--burstiness", "0.5", "--max-concurrency", "2", "--max-output", "8", "--percentile-metrics", "ttft,itl",
            "--metric-percentiles", "50,90", "--goodput", "ttft:60000", "tpot:60000", "--save-result",
            "--result-dir", str(tmp_path), "--result-filename", "r.json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "p90_ttft_ms" in out and "p50_itl_ms" in out and "request_goodput" in out and "tpot" not in out
    saved = orjson.loads((tmp_path / "r.json").read_bytes())
    assert saved["completed"] == 6 and saved["max_concurrency"] == 2 and saved["burstiness"] == 0.5
    assert len(saved["ttfts"]) == 6 and saved["errors"] == [""] * 6
    # the older names still work, and the chat endpoint
    assert main(["bench", "--url", engine_url, "--model", "llama", "--requests", "3", "--qps", "inf",
                 "--lengths", "synthetic", "--max-output", "4", "--endpoint", "/v1/chat/completions"]) == 0
    assert "completed" in capsys.readouterr().out


def test_bench_that_cannot_succeed_exits_nonzero_naming_the_cause(engine_url, capsys):
    def run(*argv):
        code = main(["bench", "--num-prompts", "3", "--max-output", "4", *argv])
        return code, capsys.readouterr().err.strip()

    code, err = run("--base-url", f"http://127.0.0.1:{free_port()}", "--model", "llama")
    assert code == 1 and "cannot reach" in err and "Connection refused" in err
    code, err = run("--base-url", engine_url + "/v1", "--model", "llama")
    assert code == 2 and "ends in /v1" in err and engine_url in err
    code, err = run("--base-url", engine_url.removeprefix("http://"), "--model", "llama")
    assert code == 2 and "needs an http:// or https:// scheme" in err
    code, err = run("--base-url", engine_url, "--model", "gpt-9")
    assert code == 2 and "'gpt-9' is not served" in err and "llama" in err
    code, err = run("--base-url", engine_url, "--model", "llama", "--endpoint", "/v1/nope")
    assert code == 1 and "3 of 3 requests failed; the first: HTTP 404" in err
    assert "Traceback" not in err


@pytest.fixture
def short_trace(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n0.5,12,6\n1.0,9,4\n")
    return str(path)


BAD = [  # argv (WS: a workspace that must not appear), what the one-line error says
    (["simulate", "--requests", "0"], "argument --requests/--num-prompts: must be >= 1, got 0"),
    (["simulate", "--qps", "-1"], "must be > 0, got -1"),
    (["simulate", "--lengths", "TMP"], "is a folder; give a trace file"),
    (["simulate", "--replay", "--lengths", "TRACE", "--requests", "50"], "has 3 requests, fewer than the 50 asked"),
    (["capacity", "--lo", "5", "--hi", "2"], "--lo 5 must be below --hi 2"),
    (["bench", "--num-prompts", "0"], "must be >= 1"),
    (["bench", "--goodput", "ttfx:5"], "KEY one of ttft, tpot, e2el"),
    (["bench", "--replay", "--dataset-path", "TRACE", "--num-prompts", "50", "--base-url", "http://127.0.0.1:9"],
     "has 3 requests, fewer than the 50 asked"),
    (["up", "--workspace", "WS", "--policy", "nope"], "unknown policy 'nope'"),
    (["up", "--workspace", "WS", "--instances", "0"], "argument --instances: must be >= 1, got 0"),
    (["up", "--workspace", "WS", "--port", "70000"], "--port 70000 must be in 1..65535"),
    (["up", "--workspace", "WS", "--host", "10.1.2.3"], "loopback"),
    (["up", "--workspace", "WS", "--gpu", "Z100"], "known: "),
    (["up", "--workspace", "WS", "--max-model-len", "1"], "max_model_len must be >= 2"),
    (["up", "--workspace", "WS", "--autoscale", "reactive", "--instances", "9"], "must lie in"),
    (["demo", "--workspace", "WS", "--policies", "block,nope"], "unknown policy 'nope'"),
    (["up", "--workspace", "WS", "--cluster", "2xZ100"], "known: "),
    (["up", "--workspace", "WS", "--cluster", "0xA30"], "count must be an integer >= 1"),
    (["up", "--workspace", "WS", "--cluster", "mixed_tp"], "tensor parallel 2"),
    (["up", "--workspace", "WS", "--cluster", "1xA30", "--policy", "block@2"], "larger than the cluster"),
]


@pytest.mark.parametrize(("argv", "says"), BAD)
def test_bad_values_are_one_line_errors_before_anything_starts(argv, says, tmp_path, short_trace, capsys):
    ws = tmp_path / "ws"
    argv = [{"WS": str(ws), "TMP": str(tmp_path), "TRACE": short_trace}.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and err[-1].startswith("block "), err
    assert not any("Traceback" in line for line in err)
    assert not ws.exists()  # nothing was started


def test_capacity_says_when_the_search_ended_on_its_bound(capsys):
    assert main(["capacity", "--requests", "100", "--slo", "30", "--seeds", "0", "--policies", "round_robin",
                 "--lo", "0.5", "--hi", "1"]) == 0
    out = capsys.readouterr().out
    assert "met the SLO at the search's upper bound in 1 of 1 seeds: capacity >= --hi 1 QPS" in out


def test_up_listens_where_asked_and_its_services_log_to_files(tmp_path):
    port, ws = free_port(), tmp_path / "ws"
    with socket_held(port) as busy:
        assert main(["up", "--workspace", str(ws), "--port", str(busy)]) == 2 and not ws.exists()
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "up", "--workspace", str(ws), "--instances", "1",
                             "--port", str(port), "--time-scale", "50"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        logs = {p.name: p.read_text() for p in (ws / "logs").glob("*.log")}
        assert set(logs) == {"collector.log", "scheduler.log", "instance-0-engine.log", "instance-0-sidecar.log"}
        assert all("Uvicorn running on" in text for text in logs.values()), logs
        assert f":{port}" in logs["scheduler.log"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0 and "stopped all services" in out and "Traceback" not in out


@contextlib.contextmanager
def socket_held(port):
    """``port`` taken by a listening socket while the block runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield port
