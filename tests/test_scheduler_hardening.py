"""The scheduler when things go wrong: hung or stopped instances, clients that leave, overload, engines
that die mid-stream, malformed bodies, tokens, and a SIGTERM during traffic. Real servers on 127.0.0.1;
where a process must be stopped or killed, a real process."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pytest
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from block.engines.emulator import EmulatedEngine
from block.engines.emulator import build_app as emulator_app
from block.events import EventSink
from block.http import ClientGone, until_disconnected
from block.predictor import build_predictor
from block.predictor.service import InstanceTracker, SideCar
from block.predictor.service import build_app as sidecar_app
from block.prometheus import sample_value
from block.scheduler import app as scheduler_module
from block.scheduler.app import Scheduler, Timeouts
from block.scheduler.app import build_app as scheduler_app
from block.scheduler.registry import OutlierDetection, Registry
from simulator.workload import LengthPrior
from store.auth import TokenGuard, admin_token
from store.collector import Store
from store.collector import build_app as collector_app
from store.read import Reader
from tests.servers import serve
from tests.test_sidecar_scheduler import CFG, SCALE, TIMING, TOKEN, cluster, complete, eventually
from workbench.cluster import free_port

STATE = {"instance": "fake", "engine": {"ok": True}, "predictor": {"label": "fake"},
         "signals": {"running": 0, "waiting": 0, "free_blocks": 1000, "total_blocks": 1000, "unfinished_tokens": 0,
                     "queued_prefill_blocks": 0}}
LONG = {"model": "llama", "prompt": "hello " * 20, "max_tokens": 3000, "ignore_eos": True, "stream": True}
AUTH = {"authorization": f"Bearer {TOKEN}"}


def fake(completions) -> Starlette:
    """A side-car or engine look-alike: healthy ``/state`` and ``/metrics``, ``completions`` for requests."""
    async def state(request: HttpRequest) -> Response:
        return JSONResponse(STATE)

    async def metrics(request: HttpRequest) -> Response:
        return Response("", media_type="text/plain")

    return Starlette(routes=[Route("/state", state), Route("/metrics", metrics), Route("/health", metrics),
                             Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", completions, methods=["POST"])])


async def hang(request: HttpRequest) -> Response:
    """Never answers, like a stopped process, until the caller gives up (so the test server can stop)."""
    await request.body()
    with contextlib.suppress(ClientGone):
        await until_disconnected(request.receive, asyncio.Event().wait())
    return Response(status_code=499)


def event(text: str) -> bytes:
    return b'data: {"id":"x","object":"text_completion","choices":[{"index":0,"text":"' + text.encode() + b'"}]}\n\n'


async def stall_after_one_token(request: HttpRequest) -> Response:
    async def events():
        yield event("one")
        await asyncio.Event().wait()

    return StreamingResponse(events(), media_type="text/event-stream")


async def error_then_done(request: HttpRequest) -> Response:
    """What vLLM sends when generation fails mid-stream: an error event, then [DONE] as usual."""
    async def events():
        yield event("one")
        yield event("two")
        yield b'data: {"error": {"message": "CUDA error: an illegal memory access", "code": 500}}\n\n'
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def rows(collector: str, where: str = "TRUE"):
    time.sleep(0.6)  # several flushes of the tests' sinks (every 0.1 s)
    return Reader(collector_url=collector).sql(f"SELECT * FROM requests WHERE source = 'scheduler' AND {where}")


def events_of(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e]


# ---- timeouts and outlier ejection ---------------------------------------------------------------

def test_a_hung_side_car_costs_a_request_at_most_the_timeout_then_is_ejected(tmp_path):
    with serve(fake(hang)) as hung_url, cluster(
            tmp_path, n=1, policy="round_robin", extra={"hung": hung_url}, timeouts=Timeouts(first_byte=0.5),
            outliers=OutlierDetection(consecutive_5xx=3, consecutive_gateway_failure=3)) as (sched, url, _, collector):
        hung = sched.instances["hung"]
        for _ in range(40):
            t0 = time.monotonic()
            r = complete(url)
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
            assert time.monotonic() - t0 < 0.5 + 1.5  # the timeout, then a healthy instance
            if hung.ejected():
                break
        assert hung.ejected() and hung.failures == 3 and hung.ejections_total == 1
        assert sched.timeouts_total["first_byte"] == 3
        assert all(complete(url).headers["x-block-instance"] == "i0" for _ in range(6))
        assert hung.failures == 3  # nothing was sent to it while ejected
        listed = {i["name"]: i for i in httpx.get(url + "/admin/instances", headers=AUTH).json()}
        assert listed["hung"]["ejected"] and 25 < listed["hung"]["ejected_for_s"] <= 30
        assert "first byte timeout" in listed["hung"]["ejected_reason"] and not listed["i0"]["ejected"]
        metrics = httpx.get(url + "/metrics").text
        assert sample_value(metrics, "block:scheduler_ejections_total", {"instance": "hung"}) == 1
        assert sample_value(metrics, "block:scheduler_upstream_timeouts_total", {"kind": "first_byte"}) == 3
        retried = rows(collector, "retries = 1")
        assert len(retried) == 3 and set(retried["status"]) == {"ok"}
        assert retried["error"].str.contains("hung: first byte timeout: no token within 0.5 s").all()


def test_a_stream_that_goes_idle_ends_with_an_error_event_and_an_error_row(tmp_path):
    with serve(fake(stall_after_one_token)) as stall_url, cluster(
            tmp_path, n=0, policy="round_robin", extra={"stall": stall_url},
            timeouts=Timeouts(idle=0.3)) as (sched, url, _, collector):
        t0 = time.monotonic()
        r = complete(url)
        assert time.monotonic() - t0 < 2.0
        last = events_of(r.text)[-1]
        assert last.startswith('data: {"error"') and "idle timeout" in last
        assert sched.timeouts_total["idle"] == 1
        row = rows(collector).iloc[0]
        assert row["status"] == "error" and "idle timeout: instance stall sent nothing for 0.3 s" in row["error"]


def test_a_stopped_side_car_process_costs_a_request_at_most_the_timeout(tmp_path):
    """SIGSTOP: the kernel still accepts connections, nothing answers. Requests sent before the poller
    notices pay at most the first-byte timeout, then are served elsewhere."""
    with contextlib.ExitStack() as stack:
        cars = [stack.enter_context(instance_processes(f"p{k}")) for k in range(2)]
        store = Store(tmp_path / "ws.duckdb")
        collector = stack.enter_context(serve(collector_app(store)))
        sched = Scheduler({f"p{k}": cars[k][1] for k in range(2)}, "least_requests", ["llama"], 4096,
                          sink=EventSink(collector, "t", interval=0.1), poll_interval=0.05,
                          timeouts=Timeouts(first_byte=1.0))
        url = stack.enter_context(serve(scheduler_app(sched)))
        assert eventually(lambda: len(sched.registry.up()) == 2)
        stopped = cars[0][0]
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(6) as pool:
                def timed(_):
                    t0 = time.monotonic()
                    r = complete(url, 20)
                    return r, time.monotonic() - t0

                results = list(pool.map(timed, range(6)))
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        assert all(r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") for r, _ in results)
        assert {r.headers["x-block-instance"] for r, _ in results} == {"p1"}
        assert max(t for _, t in results) < 1.0 + 2.0
        assert sched.timeouts_total["first_byte"] >= 1 and sched.instances["p0"].failures >= 1


def test_registry_ejects_like_envoy_and_never_the_last_instance():
    od = OutlierDetection(consecutive_5xx=3, consecutive_gateway_failure=2, base_ejection_s=10, max_ejection_s=25)
    reg = Registry({"a": "http://a", "b": "http://b"}, outliers=od)
    a, b = reg["a"], reg["b"]
    assert not reg.failed(a, "HTTP 500", gateway=False) and not reg.failed(a, "HTTP 500", gateway=False)
    reg.succeeded(a)  # a success restarts the streaks
    assert not reg.failed(a, "HTTP 500", gateway=False) and not reg.failed(a, "timeout", gateway=True)
    assert reg.failed(a, "HTTP 503", gateway=True)  # the second gateway failure in a row
    assert a.ejected() and 9 < a.ejected_until - time.monotonic() <= 10 and reg.up() == ["b"]
    assert [c.name for c in reg.candidates(set())] == []  # b has no polled signals yet; a is out regardless
    for _ in range(3):  # b is now the last routable instance: never ejected
        reg.failed(b, "connection refused", gateway=True)
    assert not b.ejected() and reg.up() == ["b"]
    a.ejected_until = time.monotonic() - 1  # the ejection ran out: a returns
    a.returned_at = time.monotonic()
    assert reg.up() == ["a", "b"]
    reg.failed(a, "x", gateway=True)
    assert reg.failed(a, "x", gateway=True)
    assert 19 < a.ejected_until - time.monotonic() <= 20  # second ejection: twice the base
    a.ejected_until, a.returned_at = time.monotonic() - 1, time.monotonic()
    reg.failed(a, "x", gateway=True)
    reg.failed(a, "x", gateway=True)
    assert 24 < a.ejected_until - time.monotonic() <= 25  # three times the base, capped at the maximum
    a.ejected_until, a.returned_at = time.monotonic() - 1, time.monotonic() - 25  # healthy for 2.5 bases
    reg.failed(a, "x", gateway=True)
    reg.failed(a, "x", gateway=True)
    assert 19 < a.ejected_until - time.monotonic() <= 20 and a.ejections_total == 4  # 3 - 2 decayed, + 1
    with pytest.raises(ValueError, match="base ejection"):
        OutlierDetection(base_ejection_s=30, max_ejection_s=10)
    with pytest.raises(ValueError, match="max ejection percent"):
        OutlierDetection(max_ejection_percent=150)


def test_at_most_max_ejection_percent_of_the_instances_are_ejected_at_once():
    reg = Registry({n: f"http://{n}" for n in "abcdef"}, outliers=OutlierDetection(consecutive_gateway_failure=1,
                                                                                    max_ejection_percent=34))
    for name in "abc":
        reg.failed(reg[name], "connection refused", gateway=True)
    assert [n for n in "abcdef" if reg[n].ejected()] == ["a", "b"]  # a third would be 50% > 34%
    lone = Registry({n: f"http://{n}" for n in "abcd"}, outliers=OutlierDetection(consecutive_gateway_failure=1))
    for name in "ab":
        lone.failed(lone[name], "connection refused", gateway=True)
    assert lone["a"].ejected() and not lone["b"].ejected()  # Envoy's 10% default: one always may be


# ---- clients that leave, overload, request ids ---------------------------------------------------

def test_a_client_leaving_a_non_streaming_request_aborts_it_in_the_engine(tmp_path):
    with cluster(tmp_path, n=1, policy="least_requests") as (sched, url, insts, collector):
        emu, car, _ = insts[0]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={**LONG, "stream": False}, timeout=0.5)
        assert eventually(lambda: emu.aborted_total == 1)
        assert emu.engine.num_running == 0 and car.cancelled_total == 1
        assert sched.cancelled_total == 1 and sched.inflight == 0
        assert sample_value(httpx.get(url + "/metrics").text, "block:scheduler_cancelled_total") == 1
        row = rows(collector).iloc[0]
        assert row["status"] == "cancelled" and "upstream request cancelled" in row["error"]


def test_overload_is_refused_with_429_and_retry_after_and_recorded(tmp_path):
    with cluster(tmp_path, n=1, policy="least_requests", max_inflight=2) as (sched, url, _, collector):
        with httpx.Client(timeout=30) as client, client.stream("POST", url + "/v1/completions", json=LONG), \
                client.stream("POST", url + "/v1/completions", json=LONG):
            assert eventually(lambda: sched.inflight == 2)
            r = complete(url)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "RateLimitError" and "over capacity" in r.json()["error"]["message"]
            rejected_id = r.headers["x-block-request-id"]
        assert eventually(lambda: sched.inflight == 0)
        assert complete(url).status_code == 200
        assert sched.rejected_total == 1
        assert sample_value(httpx.get(url + "/metrics").text, "block:scheduler_rejected_total") == 1
        recorded = rows(collector).set_index("request_id")
        assert recorded.loc[rejected_id, "status"] == "rejected" and pd.isna(recorded.loc[rejected_id, "instance"])
        assert sorted(recorded["status"]) == ["cancelled", "cancelled", "ok", "rejected"]


def test_one_client_id_used_five_times_gives_five_rows(tmp_path):
    with cluster(tmp_path, n=2, policy="least_requests") as (_sched, url, _, collector):
        answers = [complete(url, rid="same") for _ in range(5)]
        ids = {r.headers["x-block-request-id"] for r in answers}
        assert all(r.status_code == 200 for r in answers) and len(ids) == 5
        recorded = rows(collector)
        assert set(recorded["request_id"]) == ids and set(recorded["client_request_id"]) == {"same"}
        decisions = Reader(collector_url=collector).sql("SELECT request_id FROM decisions")
        assert set(decisions["request_id"]) == ids


# ---- broken streams ------------------------------------------------------------------------------

def test_an_engine_dying_mid_stream_is_an_error_row_and_a_final_error_event(tmp_path):
    port = free_port()
    engine = spawn("block.engines.emulator", "--port", str(port), "--served-model-name", "llama", "--time-scale", "1")
    try:
        engine_url = wait_healthy(engine, port)
        car = SideCar("e0", engine_url, InstanceTracker(CFG), build_predictor(LengthPrior.embedded(), TIMING),
                      metrics_interval=0.05)
        with serve(sidecar_app(car)) as car_url, cluster(tmp_path, n=0, policy="round_robin",
                                                         extra={"e0": car_url}) as (sched, url, _, collector):
            with httpx.stream("POST", url + "/v1/completions", json=LONG, timeout=30) as r:
                body = b""
                for chunk in r.iter_raw():
                    body += chunk
                    if body.count(b"\n\n") >= 3 and engine.poll() is None:
                        engine.kill()
            last = events_of(body.decode())[-1]
            assert last.startswith('data: {"error"') and "engine broke mid-stream" in last
            row = rows(collector).iloc[0]
            assert row["status"] == "error" and "instance e0 sent an error: engine broke mid-stream" in row["error"]
            assert row["output_tokens"] >= 2 and sched.errors_total == 1 and car.proxy_errors_total == 1
    finally:
        stop(engine)


def test_an_error_event_from_the_engine_fails_the_request_even_with_done(tmp_path):
    with serve(fake(error_then_done)) as engine_url:
        car = SideCar("v0", engine_url, InstanceTracker(CFG), build_predictor(LengthPrior.embedded(), TIMING),
                      metrics_interval=0.05)
        with serve(sidecar_app(car)) as car_url, cluster(tmp_path, n=0, policy="round_robin",
                                                         extra={"v0": car_url}) as (sched, url, _, collector):
            r = complete(url)
            assert "CUDA error" in events_of(r.text)[-2]  # the engine's own error event reached the client
            row = rows(collector).iloc[0]
            assert row["status"] == "error" and row["output_tokens"] == 2
            assert "instance v0 sent an error: CUDA error: an illegal memory access" in row["error"]
            assert sched.instances["v0"].consecutive_5xx == 1 and sched.instances["v0"].consecutive_gateway == 0


# ---- bad input -----------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
BAD = [
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type"),
    (CHAT, {"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]"),
    (CHAT, {"messages": [{"content": "hi"}]}, "messages[0]"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "'logprobs'"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "'top_logprobs'"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "'tools'"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}, "'tool_choice'"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     "'response_format'"),
    ("/v1/completions", {"prompt": "a", "ignore_eos": "no"}, "'ignore_eos'"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "'stream'"),
    ("/v1/completions", {"prompt": "a", "n": 2}, "'n'"),
    ("/v1/completions", {"prompt": "a", "n": "1"}, "'n'"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, "'best_of'"),
    ("/v1/completions", {"prompt": "a", "logprobs": 0}, "'logprobs'"),
    ("/v1/completions", {"prompt": "a", "echo": True}, "'echo'"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, "'temperature'"),
    ("/v1/completions", {"prompt": "a", "stop": 5}, "'stop'"),
    ("/v1/completions", {"prompt": "a", "seed": 1.5}, "'seed'"),
    ("/v1/completions", {"prompt": [True]}, "'prompt'"),
    ("/v1/completions", {"prompt": "a", "stream": True, "stream_options": {"include_usage": "yes"}},
     "'stream_options.include_usage'"),
]


def test_every_malformed_body_is_a_400_naming_the_field(tmp_path):
    with cluster(tmp_path, n=1, policy="least_requests") as (_sched, url, insts, collector):
        for path, body, field in BAD:
            r = httpx.post(url + path, json={"model": "llama", **body}, timeout=10)
            assert r.status_code == 400 and field in r.json()["error"]["message"], (body, r.text)
        chat = {"model": "llama", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "max_tokens": 3, "n": 1, "logprobs": False, "top_logprobs": None, "tools": None}
        assert httpx.post(url + CHAT, json=chat, timeout=10).status_code == 200
        ok = {"model": "llama", "prompt": "a", "max_tokens": 3, "logprobs": None, "echo": False, "temperature": 0.7}
        assert httpx.post(url + "/v1/completions", json=ok, timeout=10).status_code == 200
        part = {"model": "llama", "messages": [{"role": "user", "content": [{"text": 5}]}]}
        _emu, _car, car_url = insts[0]
        for hop in (car_url, url):  # the side-car passes it to the engine, which refuses it the same way
            r = httpx.post(hop + CHAT, json=part, timeout=10)
            assert r.status_code == 400 and "messages[0].content[0].text" in r.json()["error"]["message"]
        assert len(rows(collector)) == 2  # malformed bodies are not requests: no rows


def test_admin_bodies_that_are_not_objects_are_400s(tmp_path):
    with cluster(tmp_path, n=1) as (_sched, url, _, _collector):
        for raw in (b"[1]", b'"i9"', b"{nope", b"null"):
            for path in ("/admin/instances", "/admin/policy"):
                r = httpx.post(url + path, content=raw, headers=AUTH)
                assert r.status_code == 400 and "body" in r.json()["error"]["message"], (path, raw, r.text)
        r = httpx.post(url + "/admin/policy", json={"policy": 5}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "policy"


# ---- tokens --------------------------------------------------------------------------------------

def test_side_cars_behind_the_cluster_token_serve_a_scheduler_that_has_it(tmp_path):
    emu = EmulatedEngine(CFG, TIMING, time_scale=SCALE)
    with serve(emulator_app(emu, "llama")) as engine_url:
        car = SideCar("g0", engine_url, InstanceTracker(CFG, SCALE), build_predictor(LengthPrior.embedded(), TIMING),
                      metrics_interval=0.05)
        with serve(TokenGuard(sidecar_app(car), "c-token", ("/predict", "/state", "/v1"))) as guarded:
            assert httpx.get(guarded + "/state").status_code == 401
            assert httpx.get(guarded + "/state/stream").status_code == 401
            assert httpx.post(guarded + "/predict", json={"candidates": [{"prompt_tokens": 5}]}).status_code == 401
            assert httpx.post(guarded + "/v1/completions", json={"model": "llama", "prompt": "a"}).status_code == 401
            with cluster(tmp_path / "with", n=0, extra={"g0": guarded}, cluster_token="c-token") as (sched, url, _, _c):
                assert complete(url).status_code == 200  # predicted from the (token-guarded) stream or /predict
                assert sched.mirror_predictions_total + sched.predict_calls_total == 1
            with cluster(tmp_path / "without", n=0, extra={"g0": guarded}) as (_sched, url, _, _c):
                r = complete(url)
                assert r.status_code == 503 and "401" in r.json()["error"]["message"]


def test_services_refuse_to_listen_off_loopback_without_a_cluster_token(monkeypatch, capsys):
    from block.predictor import service

    monkeypatch.delenv("BLOCK_CLUSTER_TOKEN", raising=False)
    monkeypatch.delenv("BLOCK_CLUSTER_TOKEN_FILE", raising=False)
    for main, args in ((scheduler_module.main, []), (service.main, ["--engine-url", "http://127.0.0.1:9"])):
        with pytest.raises(SystemExit):
            main(["--host", "0.0.0.0", *args])
        assert "refusing to listen on 0.0.0.0 without a cluster token" in capsys.readouterr().err


def test_the_admin_token_comes_from_the_environment_or_a_file_never_argv(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("BLOCK_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("BLOCK_ADMIN_TOKEN_FILE", raising=False)
    assert admin_token() is None
    (tmp_path / "admin").write_text("from-file\n")
    monkeypatch.setenv("BLOCK_ADMIN_TOKEN_FILE", str(tmp_path / "admin"))
    assert admin_token() == "from-file"
    monkeypatch.setenv("BLOCK_ADMIN_TOKEN", "from-env")
    assert admin_token() == "from-env"
    monkeypatch.delenv("BLOCK_ADMIN_TOKEN")
    (tmp_path / "admin").write_text("")
    with pytest.raises(ValueError, match="empty"):
        admin_token()
    with pytest.raises(SystemExit):
        scheduler_module.main(["--admin-token", "visible-in-ps"])
    assert "unrecognized arguments: --admin-token" in capsys.readouterr().err


# ---- SIGTERM -------------------------------------------------------------------------------------

def test_sigterm_during_traffic_flushes_every_row(tmp_path):
    """A real scheduler process with open streams: SIGTERM gives them the graceful timeout, cuts them,
    records each as an error and flushes every row to a real collector before exiting."""
    procs = []
    try:
        cport = free_port()
        procs.append(spawn("store.collector", "--db", str(tmp_path / "ws.duckdb"), "--port", str(cport)))
        collector = wait_healthy(procs[-1], cport)
        with instance_processes("s0", collector, scale=2.0) as (_car, car_url):
            sport = free_port()
            sched = spawn("block.scheduler.app", "--port", str(sport), "--instance", f"s0={car_url}",
                          "--served-model-name", "llama", "--policy", "least_requests", "--collector-url", collector,
                          "--run-id", "sigterm", "--graceful-timeout", "1")
            procs.append(sched)
            url = wait_healthy(sched, sport)
            done = [complete(url, 5) for _ in range(4)]
            assert all(r.status_code == 200 for r in done)
            with ThreadPoolExecutor(6) as pool:
                def long_stream(_):
                    with contextlib.suppress(httpx.HTTPError), httpx.stream(
                            "POST", url + "/v1/completions", json={**LONG, "max_tokens": 2000}, timeout=30) as r:
                        for _chunk in r.iter_raw():
                            pass

                cut = [pool.submit(long_stream, i) for i in range(6)]
                time.sleep(1.0)  # every stream is open and generating
                t0 = time.monotonic()
                sched.send_signal(signal.SIGTERM)
                sched.wait(timeout=10)
                assert time.monotonic() - t0 < 5.0
                for f in cut:
                    f.result(timeout=10)
            recorded = Reader(collector_url=collector).sql(
                "SELECT status, error FROM requests WHERE source = 'scheduler' AND run_id = 'sigterm'")
            assert len(recorded) == 10
            assert sorted(recorded["status"]) == ["error"] * 6 + ["ok"] * 4
            assert (recorded[recorded["status"] == "error"]["error"] == "scheduler shut down mid-stream").all()
    finally:
        for p in reversed(procs):
            stop(p)


# ---- real processes ------------------------------------------------------------------------------

def spawn(module: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 30.0) -> str:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited: {proc.stderr.read().decode()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url
        time.sleep(0.1)
    raise TimeoutError(f"{proc.args} not healthy after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


@contextlib.contextmanager
def instance_processes(name: str, collector: str | None = None, scale: float = SCALE):
    """An emulator and its side-car as real processes; yields (side-car process, side-car URL)."""
    engine_port, car_port = free_port(), free_port()
    flags = ["--time-scale", str(scale), "--num-blocks", str(CFG.num_blocks)]
    engine = spawn("block.engines.emulator", "--port", str(engine_port), "--served-model-name", "llama", *flags)
    car = None
    try:
        engine_url = wait_healthy(engine, engine_port)
        sink = ["--collector-url", collector, "--run-id", "sigterm"] if collector else []
        car = spawn("block.predictor.service", "--port", str(car_port), "--engine-url", engine_url, "--name", name,
                    *sink, *flags)
        yield car, wait_healthy(car, car_port)
    finally:
        for p in (car, engine):
            if p is not None:
                stop(p)
