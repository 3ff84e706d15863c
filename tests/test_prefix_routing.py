"""Cache-aware routing: what policies see about prefixes, the peers' published rules, and Block with a cache."""

import dataclasses

import numpy as np
import pytest

from block.offline import ClusterSpec, Honesty, Scenario, SimRouter, Study
from block.policies import PEERS, Candidate, make_policy
from block.predictor.core import Prediction, Predictor
from block.prefix_index import ApproximatePrefixIndex, ExactPrefixView, prompt_hashes
from block.protocol import LoadSignals
from simulator.cluster import Cluster
from simulator.engine import CachedRun, Engine, EngineConfig, InstanceState, RequestState
from simulator.hardware import get_gpu, get_model
from simulator.timing import Roofline
from simulator.workload import (
    LengthPrior,
    Request,
    SharedPrefixShape,
    Trace,
    segment_hashes,
    shared_prefix_workload,
)

TIMING = Roofline(get_gpu("A100-80G"), get_model("Qwen2-7B"))
PRIOR = LengthPrior([50] * 3)


def sig(running=0, waiting=0, free=1000, prefill_tokens=0, prefill_blocks=0, decode_blocks=0):
    return LoadSignals(running, waiting, free, 1000, 0, 0, prefill_tokens, prefill_blocks, decode_blocks)


def cand(name, signals=None, matched=0, prompt=100, tree=0):
    return Candidate(name, signals or sig(), matched_blocks=matched, prompt_blocks=prompt, tree_blocks=tree,
                     prefix_source="approximate")


def req(prompt_tokens=1600):
    return Request(1, 0.0, prompt_tokens, 10)


# ---- the peers' arithmetic ----------------------------------------------------------------------------
def test_llmd_blend_weighs_queue_kv_and_prefix_2_2_3():
    p = make_policy("llmd_blend")
    # scores: a 2*1 + 2*0.1 + 0 = 2.2; b 2*0 + 2*0.9 + 3*1 = 4.8; c 2*0.5 + 2*0.5 + 3*0.5 = 3.5
    a = cand("a", sig(waiting=0, free=100), matched=0)
    b = cand("b", sig(waiting=4, free=900), matched=100)
    c = cand("c", sig(waiting=2, free=500), matched=50)
    assert p.choose(req(), [a, b, c]) == "b"
    # without prefixes: the emptier queue (2*1 + 2*0.5) beats the emptier cache (2*0 + 2*0.9)
    assert p.choose(req(), [cand("a", sig(waiting=0, free=500)), cand("b", sig(waiting=3, free=900))]) == "a"
    # equal queues score 1 each: the KV term decides
    assert p.choose(req(), [cand("a", sig(waiting=2, free=100)), cand("b", sig(waiting=2, free=200))]) == "b"
    # GIE's max-score picker takes one of the tied best at random, not always the first
    tied = [cand(n) for n in "abcd"]
    assert {p.choose(req(), tied) for _ in range(40)} == set("abcd")


def test_llmd_sticky_keeps_warm_instances_until_18_s_of_prefill_then_least_token_load():
    p = make_policy("llmd_sticky")
    cold = cand("cold", sig(prefill_tokens=0), matched=0)
    warm = cand("warm", sig(prefill_tokens=100_000), matched=90)  # 100k / 15,928 tok/s = 6.3 s behind
    assert p.choose(req(), [cold, warm]) == "warm"
    swamped = cand("warm", sig(prefill_tokens=300_000), matched=90)  # 18.8 s > 18 s: the filter drops
    assert p.choose(req(), [cold, swamped]) == "cold"
    # among warm ones, token load: in-flight uncached + prompt * (1 - hit)
    w1 = cand("w1", sig(prefill_tokens=1000), matched=80)  # 1000 + 1600 * 0.2 = 1320
    w2 = cand("w2", sig(prefill_tokens=1200), matched=100)  # 1200 + 0
    assert p.choose(req(), [cold, w1, w2]) == "w2"


def test_dynamo_cost_is_weighted_new_prefill_blocks_plus_decode_blocks():
    a = cand("a", sig(prefill_blocks=10, decode_blocks=500), matched=90)  # s=1: 20 + 500; s=16: 320 + 500
    b = cand("b", sig(prefill_blocks=0, decode_blocks=100), matched=0)  # s=1: 100 + 100; s=16: 1600 + 100
    assert make_policy("dynamo").choose(req(), [a, b]) == "b"
    assert make_policy("dynamo_s16").choose(req(), [a, b]) == "a"
    assert make_policy("dynamo").prefix_source == "exact"
    over = cand("c", sig(prefill_blocks=0, decode_blocks=150), matched=100)  # max(0 + 100 - 100, 0) = 0
    assert make_policy("dynamo").choose(req(), [b, over]) == "c"


def test_sglang_balances_skewed_load_then_follows_a_match_above_0_3_then_the_smallest_tree():
    p = make_policy("sglang")
    busy = cand("busy", sig(running=100), matched=100, tree=9000)
    idle = cand("idle", sig(running=10), matched=0, tree=10)
    assert p.choose(req(), [busy, idle]) == "idle"  # 100 - 10 > 64 and 100 > 1.5 * 10
    warm = cand("warm", sig(running=60), matched=40, tree=9000)  # 60 - 10 <= 64: balanced enough
    assert p.choose(req(), [idle, warm]) == "warm"  # match 0.4 > 0.3
    lukewarm = cand("lukewarm", sig(running=60), matched=30, tree=9000)
    assert p.choose(req(), [lukewarm, idle]) == "idle"  # 0.3 is not > 0.3: the smallest tree


def test_aibrix_takes_the_best_match_not_above_mean_plus_std_running():
    p = make_policy("aibrix")
    assert p.choose(req(), [cand("a", sig(running=20), matched=100), cand("b", sig(running=5))]) == "b"
    # running 6, 4, 5: mean 5, std 0.82, limit 5.82; the best match runs 6, the next best 4
    best = cand("best", sig(running=6), matched=90)
    next_ = cand("next", sig(running=4), matched=50)
    none = cand("none", sig(running=5), matched=0)
    assert p.choose(req(), [best, next_, none]) == "next"
    assert p.choose(req(), [cand("a", sig(running=6, waiting=3)), cand("b", sig(running=5, waiting=1))]) == "b"


def test_preble_exploits_a_long_match_and_otherwise_explores_by_cost():
    p = make_policy("preble")
    long_busy = cand("long_busy", sig(running=9), matched=80)
    long_idle = cand("long_idle", sig(running=3), matched=80)
    short = cand("short", sig(running=0), matched=10)
    assert p.choose(req(), [long_busy, short, long_idle]) == "long_idle"  # 0.8 > 0.5: longest, least loaded
    # below 0.5: prefill cost (tokens x 0.301 ms) + 6.75 s per request in flight
    a = cand("a", sig(running=1, prefill_tokens=0), matched=40)  # 960 * 0.301 ms + 6.75 = 7.04
    b = cand("b", sig(running=0, prefill_tokens=20_000), matched=0)  # 21,600 * 0.301 ms = 6.51
    assert p.choose(req(), [a, b]) == "b"


def test_every_peer_names_its_source_and_prefix_knowledge():
    for name in PEERS:
        policy = make_policy(name)
        assert policy.prefix_source in ("exact", "approximate"), name
        assert "Source:" in type(policy).__doc__, name
    assert make_policy("llmd_sticky", power_of_k=2).prefix_source == "approximate"
    assert make_policy("block").prefix_source is None


# ---- what a router knows about prefixes ----------------------------------------------------------------
def test_the_approximate_index_is_lru_bounded_per_instance():
    index = ApproximatePrefixIndex()
    a, b = tuple(range(10)), tuple(range(100, 110))
    index.record("x", a, capacity=15)
    assert index.match("x", a) == 10 and index.match("y", a) == 0 and index.size("x") == 10
    index.record("x", b, capacity=15)  # 20 blocks > 15: a's five deepest blocks go first
    assert index.size("x") == 15 and index.match("x", b) == 10 and index.match("x", a) == 5
    index.record("x", a[:3], capacity=15)  # routing a's head again refreshes it; a's old tail is the oldest
    index.record("x", (200, 201), capacity=15)
    assert index.match("x", a) == 3 and index.match("x", b) == 10
    assert index.match("x", (0, 1, 999)) == 2
    with pytest.raises(ValueError, match="capacity"):
        index.record("x", a, capacity=0)


def test_routers_see_only_the_prompts_blocks_never_the_answers():
    hashes = segment_hashes([(1, 64), (2, 32)])  # 64-token prompt, then a 32-token answer
    r = Request(1, 0.0, 64, 32, block_hashes=hashes)
    assert prompt_hashes(r, 16) == hashes[:4] and len(hashes) == 6


def _two_instance_run(policy: str, num_blocks: int, reqs: list[Request]) -> tuple[SimRouter, Cluster]:
    cfg = EngineConfig(num_blocks=num_blocks, max_num_seqs=16, max_num_batched_tokens=2048, max_model_len=32768)
    router = SimRouter(make_policy(policy), Predictor(TIMING, PRIOR, label="test"), state_interval=0.0)
    cluster = Cluster([Engine(cfg, TIMING, name=f"i{k}") for k in range(2)], router)
    cluster.run(reqs)
    return router, cluster


def test_exact_and_approximate_matches_agree_until_the_instance_evicts_what_the_router_remembers():
    shape = SharedPrefixShape(groups=3, system_tokens=1600, questions_per_group=2, question_tokens=160,
                              output_tokens=200)
    reqs = shared_prefix_workload(shape, 30, 2.0, 0)
    probe = prompt_hashes(reqs[0], 16)
    roomy_router, roomy = _two_instance_run("llmd_blend", 4000, reqs)
    for inst in roomy.instances:
        exact = ExactPrefixView(inst.engine.snapshot())
        for r in reqs:
            assert exact.match(prompt_hashes(r, 16)) == roomy_router.index.match(inst.name, prompt_hashes(r, 16))
    assert max(roomy_router.index.match(i.name, probe) for i in roomy.instances) == len(probe)
    # 400 blocks also hold the running requests' own blocks: the instance evicts prompts the router still lists
    many = shared_prefix_workload(dataclasses.replace(shape, groups=8), 40, 2.0, 0)
    tight_router, tight = _two_instance_run("llmd_blend", 400, many)
    gaps = [tight_router.index.match(i.name, prompt_hashes(r, 16)) - ExactPrefixView(i.engine.snapshot()).match(
        prompt_hashes(r, 16)) for i in tight.instances for r in many]
    assert max(gaps) > 0


def test_load_signals_count_cache_hits_and_held_blocks_once():
    cfg = EngineConfig(num_blocks=1000, max_num_seqs=8, max_num_batched_tokens=2048, max_model_len=32768)
    eng = Engine(cfg, TIMING)
    shared = tuple(range(50))  # 800 tokens
    eng.add_request(Request(0, 0.0, 808, 100, block_hashes=shared))
    eng.advance(0.5)  # prefilled, decoding: holds 51 blocks
    eng.add_request(Request(1, 0.5, 808, 100, block_hashes=shared))
    eng.advance(0.6)  # shares the 50 blocks, its own last block
    state = eng.snapshot()
    pending = [Request(2, 0.6, 808 + 160, 10, block_hashes=(*shared, 77, 78))]
    s = LoadSignals.from_state(state, PRIOR, pending)
    own = [r.allocated_blocks - r.cached_blocks for r in state.requests]
    assert [r.cached_blocks for r in state.requests] == [50, 50] and min(own) >= 1
    assert s.decode_blocks == 50 + sum(own) and s.free_blocks == 1000 - s.decode_blocks
    assert s.cached_blocks == 50 and (s.running, s.waiting) == (2, 1)
    assert s.prefill_tokens == 968 - 50 * 16 and s.prefill_blocks == 11
    assert LoadSignals.from_dict({k: v for k, v in dataclasses.asdict(s).items()
                                  if k not in ("prefill_tokens", "prefill_blocks", "decode_blocks",
                                               "cached_blocks")}).prefill_tokens == 0  # an older side-car


def test_a_state_whose_cache_disagrees_with_its_requests_is_rejected():
    cfg = EngineConfig(num_blocks=100)
    held = RequestState(1, 0.0, 64, 64, 0, "running", 4, block_hashes=(1, 2, 3, 4), cached_blocks=4)
    good = InstanceState(cfg, 0.0, [held], cached=[CachedRun(None, (1, 2, 3, 4), refs=1)])
    good.validate()
    assert ExactPrefixView(good).match((1, 2, 9)) == 2
    with pytest.raises(ValueError, match="requests hold it"):
        InstanceState(cfg, 0.0, [held], cached=[CachedRun(None, (1, 2, 3, 4), refs=2)]).validate()
    with pytest.raises(ValueError, match="whole runs"):
        InstanceState(cfg, 0.0, [held], cached=[CachedRun(None, (1, 2, 3, 4, 5), refs=1)]).validate()
    with pytest.raises(ValueError, match="held run cannot also be evictable"):
        InstanceState(cfg, 0.0, [], cached=[CachedRun(None, (1, 2), refs=1, evict=0)]).validate()
    evicted = InstanceState(cfg, 0.0, [], cached=[CachedRun(None, (1, 2)), CachedRun(1, (3, 4), evict=0)])
    evicted.validate()
    assert ExactPrefixView(evicted).match((1, 2, 3, 4)) == 0 and ExactPrefixView(evicted).size == 2


# ---- policies offline, and Block with a cache ------------------------------------------------------------
def _small_shared_prefix_study() -> Study:
    shape = SharedPrefixShape(groups=4, system_tokens=2000, questions_per_group=2, question_tokens=300,
                              output_tokens=60)
    other = shared_prefix_workload(shape, 200, 2.0, 99)
    scenario = Scenario("tiny_shared_prefix", lambda qps, seed: shared_prefix_workload(shape, 80, qps, seed),
                        LengthPrior([r.output_tokens for r in other]),
                        Trace(np.array([r.prompt_tokens for r in other]), np.array([r.output_tokens for r in other]),
                              source="tiny-calibration"))
    return Study(ClusterSpec("A100-40G", "Qwen2-7B", 3, 32, 2048, num_blocks=3000), scenario=scenario,
                 honesty=Honesty())


def test_every_cache_aware_policy_runs_offline_and_finishes_every_request():
    study = _small_shared_prefix_study()
    for name in (*PEERS, "block", "block_ttft", "block_prefix", "least_tokens"):
        result = study.run(name, 6.0, 0)
        assert len(result.records) == 80 and result.records["request_id"].is_unique, name
        assert 0.0 < result.summary["prefix_hit_rate"] < 1.0, name


def test_block_predicts_a_warm_instance_faster_than_a_cold_one_for_a_long_shared_prompt():
    cfg = EngineConfig(num_blocks=20_000, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=32768)
    system = [(1, 8000)]
    warm = Engine(cfg, TIMING)
    warm.add_request(Request(0, 0.0, 8100, 20, block_hashes=segment_hashes([*system, (2, 100)])))
    warm.advance()
    cold = Engine(cfg, TIMING)
    cold.now = warm.now
    candidate = Request(1, warm.now, 8200, 50, block_hashes=segment_hashes([*system, (3, 200)]))
    predictor = Predictor(TIMING, PRIOR, label="test")
    hot = predictor.predict(warm.snapshot(), candidate, target="ttft")
    fresh = predictor.predict(cold.snapshot(), candidate, target="ttft")
    assert hot.ttft < fresh.ttft / 5  # 200 uncached tokens instead of 8,200


def test_a_prediction_counts_the_hit_the_candidate_will_find_when_it_is_scheduled():
    """The prefix of a request dispatched ahead (not yet in the state, nothing cached) is a hit for the
    candidate once computed; the exact view of the state cannot show it, the fork does."""
    cfg = EngineConfig(num_blocks=20_000, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=32768)
    system = [(1, 8000)]
    state = Engine(cfg, TIMING).snapshot()
    ahead = Request(0, 0.0, 8100, 20, block_hashes=segment_hashes([*system, (2, 100)]))
    candidate = Request(1, 0.0, 8200, 50, block_hashes=segment_hashes([*system, (3, 200)]))
    predictor = Predictor(TIMING, PRIOR, label="test")
    alone = predictor.predict(state, candidate, target="ttft")
    behind = predictor.predict(state, candidate, target="ttft", extra=[ahead])
    assert ExactPrefixView(state).match(prompt_hashes(candidate, 16)) == 0
    assert alone.hit_tokens == 0
    # admitted with the 2,048-token budget left by the request ahead's last chunk: it finds the three chunks
    # that request computed before, as vLLM would (blocks count once computed, not once queued)
    assert behind.hit_tokens == 3 * 2048
    assert behind.ttft < alone.ttft + (behind.queueing - alone.queueing)  # the hit shortens its own prefill


def _ttft_prediction(name, ttft, queueing, hit_tokens):
    return Prediction(name, ttft, float("nan"), queueing, float("nan"), 0.0, 0, 0.0, False, hit_tokens=hit_tokens)


def test_block_prefix_charges_a_move_the_prefill_it_recomputes():
    policy = make_policy("block_prefix")
    request = Request(1, 0.0, 7200, 100)

    def choose(warm_ttft, cold_ttft=0.55, warm_hit=6000, cold_hit=0):
        cands = [cand("warm"), cand("cold")]
        cands[0].predictions["ttft"] = _ttft_prediction("warm", warm_ttft, warm_ttft - 0.1, warm_hit)
        cands[1].predictions["ttft"] = _ttft_prediction("cold", cold_ttft, 0.0, cold_hit)
        return policy.choose(request, cands), make_policy("block_ttft").choose(request, cands)

    # cold is 50 ms faster for the newcomer, but recomputes 6,000 cached tokens: 0.55 + 6000/7200 * 0.55 s
    assert choose(0.6) == ("warm", "cold")
    assert choose(1.2) == ("cold", "cold")  # a queue longer than the recompute costs: move
    assert choose(0.6, warm_hit=0) == ("cold", "cold")  # nobody hits: plain least predicted TTFT
    nobody = [cand("a", sig(running=3)), cand("b", sig(running=1))]
    assert policy.choose(request, nobody) == "b"  # no prediction answered: least_requests
