import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import simulator.engine as engine_module
from simulator.engine import Engine, EngineConfig, InstanceState, RequestState
from simulator.hardware import get_gpu, get_model
from simulator.timing import Roofline
from simulator.workload import Request

TIMING = Roofline(get_gpu("A30"), get_model("Llama-2-7B"))


def run(requests, config, *, fast, noise=0.0, seed=0):
    eng = Engine(config, TIMING, fast_path=fast, noise=noise, seed=seed)
    for r in requests:
        eng.advance(r.arrival)
        eng.add_request(r)
    eng.advance()
    return eng


def random_workload(seed, n):
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rng.choice([2.0, 8.0, 30.0]))
        out.append(Request(i, t, rng.randint(1, 700), rng.randint(1, 400)))
    return out


def random_config(seed):
    rng = random.Random(seed)
    chunked = rng.random() < 0.75
    budget = rng.choice([64, 256, 512, 2048])
    return EngineConfig(num_blocks=rng.choice([70, 150, 400, 2000]), max_num_seqs=rng.choice([2, 8, 32, 48]),
                        max_num_batched_tokens=max(budget, 48), chunked_prefill=chunked,
                        max_model_len=4096 if chunked else max(budget, 48), reserve_full_isl=rng.random() < 0.5)


def fast_and_slow(workload, config):
    """The workload (what fits the config) run with and without the fast path: every request's first
    token, finish and preemptions must agree."""
    reqs = [r for r in workload if r.prompt_tokens + r.output_tokens <= config.max_model_len
            and -(-(r.prompt_tokens + r.output_tokens) // 16) <= config.num_blocks - config.watermark_blocks]
    fast, slow = run(reqs, config, fast=True), run(reqs, config, fast=False)
    a = {s.id: (s.first_token, s.finish_time, s.preemptions) for s in fast.finished}
    b = {s.id: (s.first_token, s.finish_time, s.preemptions) for s in slow.finished}
    assert a.keys() == b.keys() == {r.id for r in reqs}
    for k in a:
        assert a[k][0] == pytest.approx(b[k][0], rel=1e-9, abs=1e-9)
        assert a[k][1] == pytest.approx(b[k][1], rel=1e-9, abs=1e-9)
        assert a[k][2] == b[k][2]
    return fast, slow


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**9), n=st.integers(1, 120))
def test_fast_path_gives_the_same_timestamps_as_stepping(seed, n):
    config = random_config(seed)
    fast, slow = fast_and_slow(random_workload(seed, n), config)
    assert fast.steps == slow.steps
    assert fast.total_preemptions == slow.total_preemptions


def test_lone_request_latency_is_the_sum_of_its_step_times():
    cfg = EngineConfig(num_blocks=1000, max_num_seqs=8, max_num_batched_tokens=512)
    eng = run([Request(0, 1.0, 1200, 50)], cfg, fast=True)
    s = eng.finished[0]
    prefill = [TIMING.step_time([(512, 0)], 0, 0), TIMING.step_time([(512, 512)], 0, 0),
               TIMING.step_time([(176, 1024)], 0, 0)]
    decode = [TIMING.step_time([], 1, 1200 + j + 1) for j in range(49)]
    assert s.first_token - s.arrival == pytest.approx(sum(prefill), rel=1e-12)
    assert s.finish_time - s.arrival == pytest.approx(sum(prefill) + sum(decode), rel=1e-9)


def test_memory_pressure_preempts_the_most_recent_request_and_everything_finishes():
    cfg = EngineConfig(num_blocks=40, max_num_seqs=8, max_num_batched_tokens=256)
    reqs = [Request(i, 0.0, 100, 200) for i in range(6)]
    eng = run(reqs, cfg, fast=True)
    assert len(eng.finished) == 6
    assert eng.total_preemptions > 0
    by_id = {s.id: s for s in eng.finished}
    assert by_id[0].preemptions == 0  # the oldest request is never the victim
    assert max(s.preemptions for s in eng.finished) > 0
    assert eng.free_blocks == cfg.num_blocks


def test_a_waiting_request_is_admitted_only_when_its_whole_prompt_fits():
    """vLLM's scheduler_reserve_full_isl: a 400-token prompt (25 blocks) waits while a running request holds
    most of 40 blocks, instead of taking its first 64-token chunk and then thrashing through preemptions."""
    reqs = [Request(0, 0.0, 300, 200), Request(1, 0.01, 400, 50)]
    full = run(reqs, EngineConfig(num_blocks=40, max_num_seqs=8, max_num_batched_tokens=64, watermark=0.0), fast=True)
    first, second = sorted(full.finished, key=lambda s: s.id)
    assert second.first_scheduled == pytest.approx(first.finish_time) and full.total_preemptions == 0
    chunk = run(reqs, EngineConfig(num_blocks=40, max_num_seqs=8, max_num_batched_tokens=64, watermark=0.0,
                                   reserve_full_isl=False), fast=True)
    first, second = sorted(chunk.finished, key=lambda s: s.id)
    assert second.first_scheduled < 0.1 and second.preemptions > 0 and first.preemptions == 0


def test_batch_cap_and_fcfs_order():
    cfg = EngineConfig(num_blocks=1000, max_num_seqs=2, max_num_batched_tokens=512)
    eng = run([Request(i, 0.0, 50, 20) for i in range(5)], cfg, fast=True)
    firsts = [s.first_token for s in sorted(eng.finished, key=lambda s: s.id)]
    assert firsts == sorted(firsts)
    assert firsts[2] > firsts[1]  # the third waited for a seat


def test_snapshot_restore_round_trips_exactly():
    cfg = EngineConfig(num_blocks=120, max_num_seqs=16, max_num_batched_tokens=256)
    reqs = random_workload(7, 60)
    eng = Engine(cfg, TIMING)
    for r in reqs[:40]:
        eng.advance(r.arrival)
        eng.add_request(r)
    state = eng.snapshot()
    state.validate()
    finished_before = {s.id for s in eng.finished}
    again = InstanceState.from_json(state.to_json())
    assert again == state
    targets = {s.id: s.target for s in [*eng.running.values(), *eng.waiting]}
    clone = Engine.restore(again, TIMING, targets)
    assert clone.snapshot() == state
    for e in (eng, clone):
        for r in reqs[40:]:
            e.advance(r.arrival)
            e.add_request(r)
        e.advance()
    original = {s.id: s.finish_time for s in eng.finished if s.id not in finished_before}
    cloned = {s.id: s.finish_time for s in clone.finished}
    assert cloned.keys() == original.keys() == {r.id for r in reqs} - finished_before
    for k, t in original.items():
        assert cloned[k] == pytest.approx(t, rel=1e-12)


def test_bad_requests_and_configs_are_clear_errors():
    cfg = EngineConfig(num_blocks=10, max_model_len=4096)
    eng = Engine(cfg, TIMING)
    with pytest.raises(ValueError, match="exceed the model context"):
        eng.add_request(Request(0, 0.0, 4000, 200))
    with pytest.raises(ValueError, match="can never run"):
        eng.add_request(Request(1, 0.0, 300, 10))
    with pytest.raises(ValueError, match="at least 1 token"):
        Request(2, 0.0, 10, -3)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(num_blocks=10, max_num_seqs=256, max_num_batched_tokens=128)
    with pytest.raises(ValueError, match="num_blocks"):
        EngineConfig(num_blocks=0)


def test_invalid_instance_states_are_rejected():
    cfg = EngineConfig(num_blocks=4)
    too_many = InstanceState(cfg, 0.0, [RequestState(1, 0.0, 100, 100, 1, "running", 7)])
    with pytest.raises(ValueError, match="blocks allocated"):
        too_many.validate()
    negative = InstanceState(cfg, 0.0, [RequestState(1, 0.0, 10, -1, 0, "running", 0)])
    with pytest.raises(ValueError, match="negative"):
        negative.validate()
    with pytest.raises(ValueError, match="not an InstanceState"):
        InstanceState.from_dict({"clock": 0})
    with pytest.raises(ValueError, match="phase"):
        InstanceState(cfg, 0.0, [RequestState(1, 0.0, 10, 0, 0, "done", 0)]).validate()


def test_noise_is_seeded_and_averages_out():
    cfg = EngineConfig(num_blocks=2000, max_num_seqs=32, max_num_batched_tokens=512)
    reqs = random_workload(3, 80)
    clean = run(reqs, cfg, fast=True)
    a = run(reqs, cfg, fast=True, noise=0.1, seed=5)
    b = run(reqs, cfg, fast=True, noise=0.1, seed=5)
    assert [s.finish_time for s in a.finished] == [s.finish_time for s in b.finished]
    ratio = sum(s.finish_time - s.arrival for s in a.finished) / sum(s.finish_time - s.arrival for s in clean.finished)
    assert 0.95 < ratio < 1.05


def test_compiled_core_is_not_older_than_its_source():
    """A stale mypyc build would silently run old code; `make` rebuilds when sources change."""
    compiled = Path(engine_module.__file__)
    if compiled.suffix != ".so":
        pytest.skip("simulator core runs as plain Python here")
    source = compiled.with_name("engine.py")
    assert os.path.getmtime(compiled) >= os.path.getmtime(source), "run `make` to rebuild the core"


# ---- prefix caching ---------------------------------------------------------------------------------
def prefix_workload(seed, n, groups=4):
    """Requests sharing system prompts: group g's first blocks hash alike, the rest is each request's own."""
    rng = random.Random(seed)
    shared = [rng.randint(1, 40) for _ in range(groups)]  # shared full blocks per group
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rng.choice([2.0, 8.0, 30.0]))
        g = rng.randrange(groups)
        own = rng.randint(0, 20)
        tail = rng.randint(1, 15)
        prompt = (shared[g] + own) * 16 + tail
        hashes = tuple([g * 1000 + k for k in range(shared[g])] + [10**6 + i * 100 + k for k in range(own)])
        out.append(Request(i, t, prompt, rng.randint(1, 300), block_hashes=hashes))
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**9), n=st.integers(1, 120))
def test_fast_path_is_exact_with_shared_prefixes(seed, n):
    config = random_config(seed)
    fast, slow = fast_and_slow(prefix_workload(seed, n), config)
    assert (fast.steps, fast.prefix_hit_tokens) == (slow.steps, slow.prefix_hit_tokens)
    for eng in (fast, slow):  # every block is back: free, or cached and evictable
        assert eng.free_blocks == config.num_blocks and len(eng._lru) <= eng.free_blocks and not eng._refs


def test_a_repeated_prompt_reuses_its_cached_blocks_except_the_last_token():
    cfg = EngineConfig(num_blocks=1000, max_num_seqs=8, max_num_batched_tokens=512)
    hashes = tuple(range(75))  # 1200 tokens = 75 full blocks
    eng = run([Request(0, 0.0, 1200, 5, block_hashes=hashes), Request(1, 10.0, 1200, 5, block_hashes=hashes)],
              cfg, fast=True)
    first, second = sorted(eng.finished, key=lambda s: s.id)
    assert eng.prefix_query_tokens == 2400 and eng.prefix_hit_tokens == 74 * 16  # the last block is recomputed
    assert second.first_token - second.arrival == pytest.approx(TIMING.step_time([(16, 1184)], 0, 0), rel=1e-12)
    assert first.first_token - first.arrival > 5 * (second.first_token - second.arrival)
    off = run([Request(0, 0.0, 1200, 5, block_hashes=hashes), Request(1, 10.0, 1200, 5, block_hashes=hashes)],
              EngineConfig(num_blocks=1000, max_num_seqs=8, max_num_batched_tokens=512, prefix_caching=False),
              fast=True)
    assert off.prefix_hit_tokens == 0
    assert {s.id: s.finish_time - s.arrival for s in off.finished}[1] == pytest.approx(
        first.finish_time - first.arrival, rel=1e-12)


def test_concurrent_requests_share_prefix_blocks_and_eviction_is_lru():
    cfg = EngineConfig(num_blocks=100, max_num_seqs=8, max_num_batched_tokens=2048, watermark=0.0)
    eng = Engine(cfg, TIMING)
    shared = tuple(range(40))
    eng.add_request(Request(0, 0.0, 40 * 16 + 8, 50, block_hashes=shared))
    eng.advance(1e-6)  # A prefills and registers its 40 prompt blocks
    eng.add_request(Request(1, 1e-6, 40 * 16 + 8, 50, block_hashes=shared))
    eng.advance(0.5)
    state = eng.snapshot()
    state.validate()
    assert [r.cached_blocks for r in state.requests] == [40, 40]
    assert eng.prefix_hit_tokens == 40 * 16  # B reused all of A's prompt blocks
    own = sum(r.allocated_blocks - 40 for r in state.requests)
    assert state.used_blocks() == 40 + own == cfg.num_blocks - eng.free_blocks  # the prefix is held once
    eng.advance()
    assert eng.free_blocks == 100 and list(eng._lru) == list(range(39, -1, -1))  # tail blocks go first
    for i in range(2):  # two unrelated 31-block requests: the second needs one cached block evicted
        eng.add_request(Request(2 + i, eng.now + 1, 30 * 16 + 8, 1,
                                block_hashes=tuple(range(500 + 30 * i, 530 + 30 * i))))
        eng.advance()
    assert 39 not in eng._lru and next(iter(eng._lru)) == 38 and len(eng._lru) == 99
    eng.add_request(Request(9, eng.now + 1, 40 * 16 + 8, 1, block_hashes=shared))
    eng.advance()
    assert eng.prefix_hit_tokens == 40 * 16 + 39 * 16  # the evicted tail block breaks the chain there


def test_snapshot_restore_and_fork_carry_the_prefix_cache():
    cfg = EngineConfig(num_blocks=300, max_num_seqs=16, max_num_batched_tokens=256)
    reqs = prefix_workload(3, 80)
    eng = Engine(cfg, TIMING)
    for r in reqs[:50]:
        eng.advance(r.arrival)
        eng.add_request(r)
    state = eng.snapshot()
    state.validate()
    assert state.cached or any(r.cached_blocks for r in state.requests)
    again = InstanceState.from_json(state.to_json())
    assert again == state
    clone = Engine.restore(again, TIMING, {s.id: s.target for s in [*eng.running.values(), *eng.waiting]})
    assert clone.snapshot() == state
    fork = eng.fork()
    finished_before = {s.id for s in eng.finished}
    for e in (eng, clone, fork):
        for r in reqs[50:]:
            e.advance(r.arrival)
            e.add_request(r)
        e.advance()
    original = {s.id: s.finish_time for s in eng.finished if s.id not in finished_before}
    for other in (clone, fork):
        got = {s.id: s.finish_time for s in other.finished}
        assert got.keys() == original.keys()
        assert all(got[k] == pytest.approx(t, rel=1e-12) for k, t in original.items())


def test_more_block_hashes_than_blocks_is_a_clear_error():
    eng = Engine(EngineConfig(num_blocks=100), TIMING)
    with pytest.raises(ValueError, match="fill only 2 blocks"):
        eng.add_request(Request(0, 0.0, 20, 20, block_hashes=(1, 2, 3)))


def test_estimated_requests_run_to_their_estimate_or_the_default_never_their_truth():
    cfg = EngineConfig(num_blocks=1052, max_num_seqs=48, max_num_batched_tokens=512, max_model_len=4096)
    eng = Engine(cfg, TIMING)
    answer_known = tuple(range(40))  # 20 prompt blocks, then the answer's: a predictor may not hash those
    unknown = eng.add_estimated(Request(0, 0.0, 320, 300, block_hashes=answer_known), 50, 1.0)
    estimated = eng.add_estimated(Request(1, 0.0, 320, 300, 30), 50, 1.0)
    too_long = eng.add_estimated(Request(2, 0.0, 4000, 90, 500), 50, 1.0)
    assert (unknown.target, estimated.target, too_long.target) == (50, 30, 96)
    assert unknown.hashes == answer_known[:20] and unknown.arrival == 1.0
    batch = Engine(cfg, TIMING)
    batch.add_all_estimated([Request(0, 0.0, 320, 300), Request(1, 0.0, 320, 300, 30)], 50, 2.0)
    assert [(s.id, s.target, s.arrival) for s in batch.waiting] == [(0, 50, 2.0), (1, 30, 2.0)]
