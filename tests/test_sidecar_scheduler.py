"""The live chain in one process: emulators, side-cars, scheduler and collector on loopback."""

import contextlib
import dataclasses
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from openai import OpenAI

from block.engines.emulator import EmulatedEngine
from block.engines.emulator import build_app as emulator_app
from block.events import EventSink
from block.offline import Study, get_preset
from block.predictor import Predictor, build_predictor
from block.predictor.service import InstanceTracker, SideCar
from block.predictor.service import build_app as sidecar_app
from block.prometheus import sample_value
from block.protocol import ProtocolError
from block.scheduler.app import Scheduler
from block.scheduler.app import build_app as scheduler_app
from block.scheduler.mirror import Mirror
from simulator.engine import EngineConfig
from simulator.hardware import get_gpu, get_model
from simulator.timing import Roofline
from simulator.workload import LengthPrior, Request
from store.collector import Store
from store.collector import build_app as collector_app
from store.read import Reader
from store.schema import DecisionRow
from tests.servers import serve

CFG = EngineConfig(num_blocks=1052, max_num_seqs=48, max_num_batched_tokens=512)
TIMING = Roofline(get_gpu("A30"), get_model("Llama-2-7B"))
SCALE = 20.0
TOKEN = "s3cret"


@contextlib.contextmanager
def instance(name, collector=None):
    emu = EmulatedEngine(CFG, TIMING, time_scale=SCALE, name=name)
    with serve(emulator_app(emu, "llama")) as engine_url:
        car = SideCar(name, engine_url, InstanceTracker(CFG, SCALE), build_predictor(LengthPrior.embedded(), TIMING),
                      sink=EventSink(collector, "t", interval=0.1), metrics_interval=0.05)
        with serve(sidecar_app(car)) as car_url:
            yield emu, car, car_url


@contextlib.contextmanager
def cluster(tmp_path, n=2, policy="block", budget_s=0.5, estimator=None, extra=None, **scheduler_options):
    """``extra``: more side-car URLs by instance name (fakes that hang or break); ``scheduler_options`` go
    to the Scheduler (timeouts, outlier detection, limits)."""
    with contextlib.ExitStack() as stack:
        store = Store(tmp_path / "ws.duckdb")
        collector = stack.enter_context(serve(collector_app(store)))
        insts = [stack.enter_context(instance(f"i{k}", collector)) for k in range(n)]
        urls = {f"i{k}": insts[k][2] for k in range(n)} | (extra or {})
        sched = Scheduler(urls, policy, ["llama"], 4096, predict_budget_s=budget_s, admin_token=TOKEN,
                          sink=EventSink(collector, "t", interval=0.1), poll_interval=0.05, estimator=estimator,
                          **scheduler_options)
        url = stack.enter_context(serve(scheduler_app(sched)))
        yield sched, url, insts, collector


def eventually(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def quiet_poller(sched):
    """Stop the registry's polling from changing instance states under a test: the poll in progress ends,
    and the next is an hour away."""
    sched.registry.poll_interval = 3600
    time.sleep(0.3)


def complete(url, max_tokens=8, stream=True, rid=None, words=20):
    body = {"model": "llama", "prompt": "hello " * words, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": stream}
    headers = {"x-request-id": rid} if rid else {}
    r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)
    return r


def test_sidecar_tracks_its_engine_and_predicts():
    with instance("a") as (emu, _car, url):
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(complete, url, 1500) for _ in range(6)]
            assert eventually(lambda: emu.engine.num_running == 6)
            time.sleep(0.2)  # one metrics poll
            state = httpx.get(url + "/state").json()
            running = sum(r["phase"] == "running" for r in state["state"]["requests"])
            assert running == emu.engine.num_running == 6
            pred = httpx.post(url + "/predict", json={"candidates": [{"prompt_tokens": 100}]}).json()
            p = pred["predictions"][0]
            assert 0 < p["ttft"] < p["e2e"] and pred["signals"]["running"] == 6
            assert all(f.result().status_code == 200 for f in futures)
        assert eventually(lambda: httpx.get(url + "/state").json()["state"]["requests"] == [])
        bad = httpx.post(url + "/predict", json={"candidates": [{"prompt_tokens": -3}]})
        assert bad.status_code == 400 and "prompt_tokens" in bad.json()["error"]["message"]
        assert httpx.post(url + "/predict", content=b"[").status_code == 400


def test_sidecar_reports_a_dead_engine():
    car = SideCar("x", "http://127.0.0.1:9", InstanceTracker(CFG), Predictor(TIMING, LengthPrior.embedded()),
                  metrics_interval=0.05)
    with serve(sidecar_app(car)) as url:
        time.sleep(0.3)
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and "unreachable" in r.json()["error"]
        r = complete(url)
        assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"]


def test_scheduler_routes_streams_and_records_every_request_once(tmp_path):
    with cluster(tmp_path) as (_sched, url, _insts, collector):
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        out = client.completions.create(model="llama", prompt="hi", max_tokens=5, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda i: complete(url, 20, rid=f"r{i}"), range(30)))
        assert all(r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") for r in results)
        assert {r.headers["x-block-instance"] for r in results} == {"i0", "i1"}
        time.sleep(0.6)
        reader = Reader(collector_url=collector)
        rows = reader.sql("SELECT request_id, count(*) AS n FROM requests WHERE source='scheduler' GROUP BY 1")
        assert len(rows) == 31 and rows["n"].max() == 1
        decisions = reader.sql("SELECT * FROM decisions")
        assert len(decisions) == 31
        missed = decisions[decisions["predicted_e2e"].isna()]  # a predictor over budget on a loaded machine
        assert len(missed) <= 3 and missed["fallback"].all()
        assert len(reader.sql("SELECT * FROM instance_samples")) > 0


def test_front_door_rejects_bad_input_with_reasons(tmp_path):
    with cluster(tmp_path, n=1, policy="least_requests") as (_sched, url, _insts, _collector):
        def err(body=None, raw=None, path="/v1/completions"):
            r = httpx.post(url + path, content=raw, json=body, timeout=10)
            return r.status_code, r.json()["error"]["message"]

        assert err(raw=b'{"model": ')[0] == 400
        assert err({"model": "nope", "prompt": "a"}) == (404, "The model `nope` does not exist. Served models: llama")
        assert err({"model": "llama"})[1] == "'prompt' is required"
        assert err({"model": "llama", "prompt": "a", "max_tokens": -1})[0] == 400
        assert "absurdly large" in err({"model": "llama", "prompt": "a", "max_tokens": 10**12})[1]
        assert "messages" in err({"model": "llama", "messages": []}, path="/v1/chat/completions")[1]


def test_admin_needs_the_token_and_manages_instances(tmp_path):
    with cluster(tmp_path) as (_sched, url, _insts, _collector):
        assert httpx.get(url + "/admin/instances").status_code == 401
        auth = {"authorization": f"Bearer {TOKEN}"}
        listed = httpx.get(url + "/admin/instances", headers=auth).json()
        assert [i["name"] for i in listed] == ["i0", "i1"]
        httpx.post(url + "/admin/instances/i0/drain", headers=auth).raise_for_status()
        assert {complete(url).headers["x-block-instance"] for _ in range(4)} == {"i1"}
        assert httpx.post(url + "/admin/instances/zz/drain", headers=auth).status_code == 404
        httpx.delete(url + "/admin/instances/i0", headers=auth).raise_for_status()
        with instance("i9") as (_, _, car_url):
            r = httpx.post(url + "/admin/instances", json={"name": "i9", "url": car_url}, headers=auth)
            assert r.status_code == 201
            assert httpx.post(url + "/admin/instances", json={"name": "i9", "url": car_url},
                              headers=auth).status_code == 409
        bad = httpx.post(url + "/admin/policy", json={"policy": "magic"}, headers=auth)
        assert bad.status_code == 400 and "valid policies" in bad.json()["error"]["message"]


def mirrors_current(sched):
    """Wait until every instance's state stream is mirrored (the first decisions otherwise ask over HTTP)."""
    reg = sched.registry
    assert eventually(lambda: all(reg.mirrored(i) for i in reg.instances.values())), reg.describe()


def test_predictor_missing_its_budget_falls_back_to_live_signals(tmp_path):
    with cluster(tmp_path, budget_s=1e-6, prediction_source="fanout") as (sched, url, _insts, _collector):
        assert all(complete(url).status_code == 200 for _ in range(5))
        assert sched.fallbacks["all"] == 5
    with cluster(tmp_path / "m", mirror_budget_s=1e-9) as (sched, url, _insts, _collector):
        mirrors_current(sched)
        assert all(complete(url).status_code == 200 for _ in range(5))
        assert sched.fallbacks["all"] == 5 and sched.mirror_over_budget_total == 10
        assert sched.mirror_predictions_total == 0 and sched.predict_calls_total == 0


def test_mirror_predicts_in_process_what_the_side_car_predicts(tmp_path):
    with cluster(tmp_path, n=1) as (sched, url, insts, _collector):
        mirrors_current(sched)
        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(complete, url, 400) for _ in range(4)]
            inst = sched.registry["i0"]
            assert eventually(lambda: len(inst.mirror.state().state.requests) == 4)
            quiet = time.monotonic() + 1.0  # the instance keeps decoding: compare both within one state change
            while time.monotonic() < quiet:
                sched.registry.candidates(set())
                req = Request(7, 0.0, 300, 1)
                mirrored = inst.mirror.predict(inst.view, req, "e2e")
                asked = httpx.post(insts[0][2] + "/predict", json={"candidates": [{"prompt_tokens": 300}]}).json()
                side_car = asked["predictions"][0]
                if abs(mirrored.e2e - side_car["e2e"]) <= 0.05 * side_car["e2e"]:
                    break
            else:
                raise AssertionError(f"mirror {mirrored.e2e:.3f} s vs side-car {side_car['e2e']:.3f} s")
            label = lambda: httpx.get(insts[0][2] + "/state?requests=0").json()["predictor"]["label"]  # noqa: E731
            assert eventually(lambda: inst.mirror.model.predictor.label == label())  # refits reach the mirror
            assert all(f.result().status_code == 200 for f in running)


def test_two_scheduler_replicas_route_consistently_from_their_mirrors(tmp_path):
    budget = {"mirror_budget_s": 0.5, "mirror_max_age_s": 3.0}  # correctness, not speed: a shared box
    with cluster(tmp_path, n=3, **budget) as (sched, url, insts, collector):
        twin = Scheduler({f"i{k}": insts[k][2] for k in range(3)}, "block", ["llama"], 4096, poll_interval=0.05,
                         sink=EventSink(collector, "t", interval=0.1), **budget)
        with serve(scheduler_app(twin)) as twin_url:
            mirrors_current(sched)
            mirrors_current(twin)
            with ThreadPoolExecutor(12) as pool:
                results = list(pool.map(lambda i: complete((url, twin_url)[i % 2], 30), range(48)))
            assert all(r.status_code == 200 for r in results)
            for s in (sched, twin):  # every decision predicted in-process, none fell back
                assert s.fallbacks["partial"] == s.fallbacks["all"] == 0 and s.predict_calls_total == 0
                assert s.mirror_predictions_total == 3 * 24
            def all_seen():  # a decision's candidates drop the dispatches the side-cars' states show
                return all(not c.dispatched for s in (sched, twin) for c in s.registry.candidates(set()))

            assert eventually(all_seen)
            time.sleep(0.3)  # idle: both mirrors show the same states
            probe = Request(1, 0.0, 500, 1)
            choices = [s.router.route(probe, s.registry.candidates(set()), lambda c, r, t, s=s: s.registry[
                c.name].mirror.predict(s.registry[c.name].view, r, t), request_id="p", ts=0.0).choice
                for s in (sched, twin)]
            assert choices[0] == choices[1]
            spread = Counter(r.headers["x-block-instance"] for r in results)
            assert len(spread) == 3  # both replicas spread the load, neither herds onto one instance


def test_a_stale_mirror_is_never_used_silently(tmp_path):
    with cluster(tmp_path, n=2) as (sched, url, _insts, _collector):
        mirrors_current(sched)
        sched.registry.mirror_max_age_s = 1e-9  # every mirror is now past its bound
        assert all(complete(url).status_code == 200 for _ in range(3))
        assert sched.mirror_stale_total == 6 and sched.predict_calls_total == 6  # asked over HTTP instead
        assert sched.mirror_predictions_total == 0 and sched.fallbacks["none"] == 3
        metrics = httpx.get(url + "/metrics").text
        assert sample_value(metrics, "block:scheduler_mirror_stale_total") == 6


def test_a_dispatch_stops_counting_once_its_response_ends(tmp_path):
    """Before any state shows it: the scheduler saw it finish, and a fork must not simulate it again."""
    with cluster(tmp_path, n=2, policy="least_requests") as (sched, url, _insts, _collector):
        quiet_poller(sched)
        sched.registry.mirror_max_age_s = 1e-9  # nor may a state stream prune it
        instances = sched.registry.instances.values()
        for stream in (True, False):
            assert complete(url, stream=stream).status_code == 200
            assert eventually(lambda: not any(i.pending for i in instances)), [i.pending for i in instances]
        assert sum(i.dispatched_total for i in instances) == 2


def test_a_malformed_state_stream_is_refused_with_the_reason():
    m = Mirror("x")
    for line, reason in ((b"{", "not JSON"), (b'{"kind": "gossip"}', "unknown message kind"),
                         (b'{"kind": "model", "prior": {}}', "prior"),
                         (b'{"kind": "state", "seq": 1, "state": {"clock": 1}}', "not an instance state")):
        try:
            m.feed(line)
            m.state()
        except ProtocolError as exc:
            assert reason in str(exc)
        else:
            raise AssertionError(f"{line!r} was accepted")
    assert not m.usable(1.0)


def test_dead_instance_before_first_token_is_retried_elsewhere(tmp_path):
    with cluster(tmp_path, policy="round_robin") as (sched, url, _insts, _collector):
        quiet_poller(sched)  # keep the poller from noticing first
        sched.instances["i0"].url = "http://127.0.0.1:9"  # its side-car vanished
        results = [complete(url) for _ in range(4)]
        assert all(r.status_code == 200 for r in results)
        assert sched.retries_total >= 1 and sched.instances["i0"].failures >= 1
        assert sched.instances["i0"].status == "down"


def test_no_instance_left_is_a_clear_503(tmp_path):
    with cluster(tmp_path, n=1) as (sched, url, _insts, _collector):
        quiet_poller(sched)
        sched.instances["i0"].status = "down"
        sched.instances["i0"].reason = "engine gone"
        r = complete(url)
        assert r.status_code == 503 and "engine gone" in r.json()["error"]["message"]


def test_power_of_k_asks_exactly_k_side_cars_per_request(tmp_path):
    with cluster(tmp_path, n=3, policy="block@2", prediction_source="fanout") as (sched, url, insts, _collector):
        before = sum(car.predict_latency.count for _, car, _ in insts)
        assert all(complete(url).status_code == 200 for _ in range(6))
        answered = sum(car.predict_latency.count for _, car, _ in insts) - before
        assert sched.predict_calls_total == 12 and answered == 12
    with cluster(tmp_path / "m", n=3, policy="block@2") as (sched, url, insts, _collector):
        mirrors_current(sched)
        assert all(complete(url).status_code == 200 for _ in range(6))
        assert sched.mirror_predictions_total == 12 and sched.predict_calls_total == 0


def test_offline_and_live_decisions_write_the_same_row(tmp_path):
    """Both bodies produce DecisionRow through the one Router: same columns, same columns filled."""
    columns = [f.name for f in dataclasses.fields(DecisionRow)]
    offline = Study(get_preset("demo"), "synthetic", 40).run("block", 4.0, 0).decisions
    with cluster(tmp_path, policy="block") as (_sched, url, _, collector):
        assert all(complete(url).status_code == 200 for _ in range(4))
        time.sleep(0.6)
        live = Reader(collector_url=collector).sql("SELECT * FROM decisions")
    assert list(offline.columns) == columns and list(live.columns) == columns and len(live) == 4
    filled = lambda df: {c for c in columns if df[c].notna().all()}  # noqa: E731
    assert filled(live) - {"run_id"} == filled(offline) - {"run_id"}
    assert set(live["fallback"]) | set(offline["fallback"]) <= {"none", "partial", "all"}
    assert offline["predictor"].str.startswith("timing=calibrated").all()
    assert live["predictor"].str.contains("timing=").all() and (live["asked"] == 2).all()


def test_sidecar_calibrates_its_timing_online_from_the_engine_steps():
    with instance("c") as (_emu, car, url):
        assert httpx.get(url + "/state?requests=0").json()["predictor"]["fits"] == 0
        # prompts of eight lengths: the fit waits for prefill iterations that identify its prefill terms (four
        # equal prompts once left them to chance: a 57% holdout error on a loaded machine)
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda w: complete(url, 200, words=w), (20, 60, 150, 250, 400, 600, 900, 1200)))
        assert all(r.status_code == 200 for r in replies)
        assert eventually(lambda: httpx.get(url + "/state?requests=0").json()["predictor"]["fits"] >= 1)
        status = httpx.get(url + "/state?requests=0").json()["predictor"]
        assert status["label"].startswith("timing=calibrated(") and status["source"] == "engine /steps"
        assert status["fit_error_pct"] < 15  # the emulator's +-5% noise around the roofline
        assert car.predictor.label == status["label"]
