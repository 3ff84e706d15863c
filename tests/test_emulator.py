import time

import httpx
import pytest
from openai import OpenAI

from block.engines.emulator import EmulatedEngine, build_app
from block.prometheus import parse_metrics
from simulator.engine import EngineConfig, InstanceState
from simulator.hardware import get_gpu, get_model
from simulator.timing import Roofline
from tests.servers import serve

CFG = EngineConfig(num_blocks=1052, max_num_seqs=48, max_num_batched_tokens=512)


def emulator(scale=20.0):
    return EmulatedEngine(CFG, Roofline(get_gpu("A30"), get_model("Llama-2-7B")), time_scale=scale)


@pytest.fixture
def url():
    with serve(build_app(emulator(), "llama")) as u:
        yield u


def test_openai_client_works_unmodified(url):
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    r = client.completions.create(model="llama", prompt="x" * 400, max_tokens=12, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 100 and r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=9, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 9
    assert client.models.list().data[0].id == "llama"


def test_tokens_take_the_time_the_engine_model_says():
    timing = Roofline(get_gpu("A30"), get_model("Llama-2-7B"))
    with serve(build_app(emulator(scale=2.0), "llama")) as u:
        t0 = time.monotonic()
        httpx.post(u + "/v1/completions", json={"model": "llama", "prompt": "y" * 2048, "max_tokens": 40,
                                                 "ignore_eos": True}, timeout=30).raise_for_status()
        wall = time.monotonic() - t0
    expected = (timing.step_time([(512, 0)], 0, 0) + sum(timing.step_time([], 1, 513 + j) for j in range(39))) / 2
    assert expected * 0.8 < wall < expected * 1.5 + 0.1


def test_metrics_and_state_use_vllm_names_and_contract(url):
    httpx.post(url + "/v1/completions", json={"model": "llama", "prompt": "abc", "max_tokens": 3}, timeout=10)
    m = parse_metrics(httpx.get(url + "/metrics").text)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:time_to_first_token_seconds_count"):
        assert name in m
    assert m["vllm:request_success_total"] == 1
    state = httpx.get(url + "/state").json()
    InstanceState.from_dict(state["state"])  # validates


def test_bad_requests_get_4xx_with_a_reason(url):
    def post(body, raw=None):
        r = httpx.post(url + "/v1/completions", content=raw, json=None if raw else body, timeout=10)
        return r.status_code, r.json()["error"]["message"]

    assert post(None, b"{not json")[0] == 400
    code, msg = post({"model": "gpt-9", "prompt": "a"})
    assert code == 404 and "gpt-9" in msg
    assert post({"model": "llama"})[1] == "'prompt' is required"
    assert "at least 1" in post({"model": "llama", "prompt": "a", "max_tokens": -5})[1]
    assert "absurdly large" in post({"model": "llama", "prompt": "a", "max_tokens": 10**9})[1]
    assert "maximum context length" in post({"model": "llama", "prompt": "a", "max_tokens": 5000})[1]


def test_client_disconnect_cancels_the_request():
    emu = emulator(scale=1.0)
    with serve(build_app(emu, "llama")) as u, httpx.stream(
            "POST", u + "/v1/completions", json={"model": "llama", "prompt": "a", "max_tokens": 2000,
                                                 "ignore_eos": True, "stream": True}, timeout=10) as r:
        chunks = r.iter_raw()  # keep the iterator alive: dropping it would close the stream (a disconnect)
        while not next(chunks):
            pass
        deadline = time.monotonic() + 5
        while emu.engine.num_running != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert emu.engine.num_running == 1 and emu.aborted_total == 0
    deadline = time.monotonic() + 5
    while emu.engine.num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emu.engine.num_running == 0 and emu.aborted_total == 1
    assert emu.engine.free_blocks == CFG.num_blocks
