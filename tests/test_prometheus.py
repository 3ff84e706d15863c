"""Every service's /metrics through prometheus_client: written by it, read back with its parser."""

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from block.prometheus import (
    REQUEST_LATENCY_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    Exposition,
    Histogram,
    families,
    parse_label,
    parse_metrics,
    sample_value,
)
from tests.test_sidecar_scheduler import cluster, complete, eventually


def scrape(url):
    """Families by name from a /metrics text, through prometheus_client's strict parser."""
    resp = httpx.get(url + "/metrics", timeout=5)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(resp.text)}, resp.text


def test_one_help_and_type_per_family_whatever_its_label_sets():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    text = Exposition(lambda: [
        ("block:x_total", "counter", "X.", {"instance": "a"}, 1),
        ("block:x_total", "counter", "X.", {"instance": "b"}, 2),
        ("block:lat_seconds", "histogram", "Latency.", {"instance": "a"}, h),
    ]).render().decode()
    assert text.count("# TYPE block:x_total counter") == 1 and text.count("# HELP block:x_total") == 1
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["block:x"].type == "counter" and fams["block:lat_seconds"].type == "histogram"
    buckets = {s.labels["le"]: s.value for s in fams["block:lat_seconds"].samples if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 2.0, "1.0": 3.0, "+Inf": 4.0}  # le is inclusive, counts are cumulative
    assert sample_value(text, "block:lat_seconds_sum") == pytest.approx(3.65)
    assert sample_value(text, "block:x_total", {"instance": "b"}) == 2


def test_a_metric_described_two_ways_is_refused():
    with pytest.raises(ValueError, match="block:x"):
        families([("block:x", "gauge", "X.", {}, 1), ("block:x", "counter", "X.", {}, 1)])
    with pytest.raises(ValueError, match="increasing"):
        Histogram((1.0, 0.5))


def test_parser_sums_counters_but_never_gauges_and_reads_timestamps():
    text = """# HELP vllm:num_requests_running Running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3 1700000000000
vllm:num_requests_running{engine="1",model_name="m"} 5 1700000000000
# HELP vllm:kv_cache_usage_perc KV usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.6
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7
# HELP vllm:num_preemptions_total Preemptions.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 2 1700000000000
vllm:num_preemptions_total{engine="1",model_name="m"} 4 1700000000000
# HELP vllm:cache_config_info Cache config.
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="2048"} 1
"""
    m = parse_metrics(text)
    assert m["vllm:num_requests_running"] == 5  # the busiest engine, not 8 and not the timestamp
    assert m["vllm:kv_cache_usage_perc"] == 0.7  # never 1.3
    assert m["vllm:num_preemptions_total"] == 6  # counters add up across engines
    assert parse_label(text, "vllm:cache_config_info", "num_gpu_blocks") == "2048"
    with pytest.raises(ValueError):
        parse_metrics("vllm:x{unclosed 1\n")


def test_every_service_exports_through_its_own_registry(tmp_path):
    with cluster(tmp_path, n=1) as (_sched, url, insts, collector):
        assert complete(url, max_tokens=12).status_code == 200
        assert complete(url, max_tokens=12).status_code == 200
        _emu, car, car_url = insts[0]
        engine_url = car.engine_url

        fams, text = scrape(engine_url)
        for name, buckets in (("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
                              ("vllm:inter_token_latency_seconds", TPOT_BUCKETS),
                              ("vllm:time_per_output_token_seconds", TPOT_BUCKETS),
                              ("vllm:request_time_per_output_token_seconds", TPOT_BUCKETS),
                              ("vllm:e2e_request_latency_seconds", REQUEST_LATENCY_BUCKETS)):
            assert fams[name].type == "histogram", name
            edges = [s.labels["le"] for s in fams[name].samples if s.name.endswith("_bucket")]
            assert edges == [*(repr(float(b)) for b in buckets), "+Inf"], name  # vLLM's boundaries
            assert {s.labels["model_name"] for s in fams[name].samples} == {"llama"}
        labels = {"model_name": "llama", "engine": "0"}
        assert sample_value(text, "vllm:time_to_first_token_seconds_count", labels) == 2
        assert sample_value(text, "vllm:request_time_per_output_token_seconds_count", labels) == 2
        assert sample_value(text, "vllm:inter_token_latency_seconds_count", labels) == 2 * 11  # 11 gaps each
        assert sample_value(text, "vllm:request_success_total", labels) == 2
        assert fams["vllm:num_requests_running"].type == "gauge"

        fams, text = scrape(car_url)
        assert sample_value(text, "block:sidecar_proxied_total", {"instance": "i0"}) == 2
        assert fams["block:sidecar_predict_seconds"].type == "histogram"

        fams, text = scrape(url)
        assert sample_value(text, "block:scheduler_requests_total") == 2
        assert sample_value(text, "block:scheduler_instance_up", {"instance": "i0"}) == 1
        assert fams["block:scheduler_decision_seconds"].type == "histogram"

        def rows_counted():
            _, text = scrape(collector)
            return (sample_value(text, "block:collector_rows_inserted_total", {"table": "requests"}) or 0) >= 2

        eventually(rows_counted)
        _, text = scrape(collector)
        assert sample_value(text, "block:collector_requests_total", {"route": "/events", "status": "200"}) >= 1
