"""Prefix caching live: the emulator caches repeated prompt text, the side-car knows its cache and streams it,
the scheduler's mirror predicts the hit, and the cache-aware peers route on it."""

import httpx
from prometheus_client.parser import text_string_to_metric_families

from block.protocol import text_block_hashes
from simulator.workload import Request, segment_text
from tests.test_sidecar_scheduler import cluster, eventually, instance, mirrors_current

SHARED = segment_text([(3, 2048)])  # a 2,048-token system prompt, 128 full blocks


def ask(url, prompt, max_tokens=4):
    body = {"model": "llama", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r


def counter(metrics_text, name):
    return sum(s.value for f in text_string_to_metric_families(metrics_text) for s in f.samples if s.name == name)


def test_text_hashes_share_exactly_the_blocks_whose_bytes_are_equal():
    a, b = text_block_hashes(SHARED + "first question " * 5), text_block_hashes(SHARED + "second one, yes " * 5)
    assert len(a) == len(b) == 128 + 1 and a[:128] == b[:128] and a[128] != b[128]
    # blocks follow approx_tokens (ceil(bytes / 4)): 60 bytes are 15 tokens, 61 bytes are 16, a full block
    assert text_block_hashes("x" * 60) == () and len(text_block_hashes("x" * 61)) == 1


def test_emulator_caches_repeated_prefixes_and_the_side_car_knows_its_cache():
    with instance("p") as (_emu, car, url):
        ask(url, SHARED + " q1")
        ask(url, SHARED + " q2")
        metrics = httpx.get(car.engine_url + "/metrics").text
        queried = counter(metrics, "vllm:prefix_cache_queries_total")
        hits = counter(metrics, "vllm:prefix_cache_hits_total")
        assert hits == 128 * 16 and queried >= 2 * 2048  # the second prompt found the whole system prompt
        assert eventually(lambda: httpx.get(url + "/state?requests=0").json()["prefix_cache"]["blocks"] >= 128)
        assert httpx.get(url + "/state?requests=0").json()["prefix_cache"]["source"] == "engine /kv_cache"


def test_the_mirror_predicts_the_hit_and_block_routes_to_the_warm_instance(tmp_path):
    with cluster(tmp_path, n=2, policy="block_ttft", mirror_max_age_s=3.0) as (sched, url, _insts, _collector):
        mirrors_current(sched)
        warm = ask(url, SHARED + " q1").headers["x-block-instance"]
        cold = "i1" if warm == "i0" else "i0"
        reg = sched.registry
        assert eventually(lambda: reg[warm].mirror.cache.size >= 128, timeout=10)
        probe = Request(1, 0.0, 2048 + 4, 1, block_hashes=text_block_hashes(SHARED + " q2"))
        reg.candidates(set())
        ttft = {name: reg[name].mirror.predict(reg[name].view, probe, "ttft").ttft for name in (warm, cold)}
        assert ttft[warm] < 0.5 * ttft[cold], ttft  # 4 tokens to prefill instead of 2,052
        asked = {name: httpx.post(reg[name].url + "/predict", json={"target": "ttft", "candidates": [
            {"prompt_tokens": probe.prompt_tokens, "block_hashes": list(probe.block_hashes)}]}).json()
            for name in (warm, cold)}  # a side-car asked directly (a stale mirror's fallback) counts it too
        assert asked[warm]["predictions"][0]["ttft"] < 0.5 * asked[cold]["predictions"][0]["ttft"], asked
        too_many = {"candidates": [{"prompt_tokens": 3, "block_hashes": [1] * 5}]}
        bad = httpx.post(reg[warm].url + "/predict", json=too_many)
        assert bad.status_code == 400 and "block_hashes" in bad.json()["error"]["message"]
        assert {ask(url, SHARED + f" q{i}").headers["x-block-instance"] for i in range(2, 6)} == {warm}


def test_cache_aware_peers_route_live_on_their_published_rules(tmp_path):
    for policy in ("llmd_blend", "sglang", "dynamo"):  # approximate index, approximate tree, exact KV events
        with cluster(tmp_path / policy, n=2, policy=policy, mirror_max_age_s=3.0) as (sched, url, _, _c):
            mirrors_current(sched)
            first = ask(url, SHARED + " q1").headers["x-block-instance"]
            warm = sched.registry[first].mirror  # exact knowledge arrives with the engine's cache (polled)
            assert eventually(lambda warm=warm: warm.cache.size >= 128)
            assert {ask(url, SHARED + f" q{i}").headers["x-block-instance"] for i in range(2, 5)} == {first}, policy
