import itertools

import numpy as np
import pytest

from block.protocol import approx_tokens
from simulator.workload import (
    ChatShape,
    SharedPrefixShape,
    chat_workload,
    gamma_arrivals,
    load_named_trace,
    poisson_arrivals,
    read_azure_csv,
    read_mooncake_jsonl,
    read_splitwise_csv,
    read_trace,
    shared_prefix_workload,
    synthetic_lengths,
)


def test_splitwise_conv_trace_reads_and_scales(data_dir):
    tr = load_named_trace("splitwise_conv")
    assert len(tr) == 19366
    assert 4.0 < tr.qps < 7.0  # ~5.5 req/s over an hour
    fast = tr.scaled_to_qps(10)
    assert fast.qps == pytest.approx(10, rel=1e-9)
    assert np.all(np.diff(fast.arrivals) >= 0)


def test_every_named_trace_reads(data_dir):
    for name in ("splitwise_code", "arxiv", "azure_conv", "mooncake", "alpaca"):
        tr = load_named_trace(name)
        assert len(tr) > 500 and tr.prompt_tokens.min() >= 1 and tr.output_tokens.min() >= 1
    assert load_named_trace("arxiv").arrivals is None
    assert load_named_trace("azure_conv").arrivals[-1] == pytest.approx(3600, rel=0.05)


def test_mooncake_is_long_and_clips_to_context(data_dir):
    tr = load_named_trace("mooncake")
    assert tr.prompt_tokens.mean() > 8000
    clipped = tr.clipped(4096)
    assert (clipped.prompt_tokens + clipped.output_tokens).max() <= 4096


def test_bad_rows_name_file_and_line(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n1.0,abc,5\n")
    with pytest.raises(ValueError, match=r"t.csv:3"):
        read_splitwise_csv(p)
    p.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n1.0,10,-5\n")
    with pytest.raises(ValueError, match=r"t.csv:3: output must have at least 1 token"):
        read_splitwise_csv(p)
    p.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n")
    with pytest.raises(ValueError, match="empty"):
        read_splitwise_csv(p)
    p.write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="unrecognised trace header"):
        read_trace(p)
    j = tmp_path / "m.jsonl"
    j.write_text('{"timestamp": 0, "input_length": 5, "output_length": 3}\n{"timestamp": 1, "input_len\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        read_mooncake_jsonl(j)
    a = tmp_path / "a.csv"
    a.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\nyesterday,1,1\n")
    with pytest.raises(ValueError, match=r"a.csv:3"):
        read_azure_csv(a)
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="unknown trace"):
        load_named_trace("nope")


def test_azure_timestamps_become_seconds(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,374,44\n"
                 "2023-11-16 18:15:48.0,396,109\n")
    tr = read_azure_csv(a)
    assert tr.arrivals.tolist() == pytest.approx([0.0, 1.5])


def test_arrival_processes_have_the_asked_rate_and_burstiness():
    rng = np.random.default_rng(0)
    p = poisson_arrivals(20000, 8.0, rng)
    assert (len(p) - 1) / p[-1] == pytest.approx(8.0, rel=0.03)
    gaps = np.diff(gamma_arrivals(20000, 8.0, 3.0, rng))
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="QPS"):
        poisson_arrivals(10, 0.0, rng)


def test_embedded_lengths_need_no_data():
    tr = synthetic_lengths(5000, np.random.default_rng(0))
    assert 280 < np.median(tr.output_tokens) < 350
    reqs = tr.requests(poisson_arrivals(len(tr), 2.0, np.random.default_rng(1)))
    assert len(reqs) == 5000
    with pytest.raises(ValueError, match="no arrival times"):
        tr.requests()


def test_rate_arrivals_follow_the_rate_and_refuse_a_rate_above_the_bound():
    from simulator.workload import rate_arrivals

    t = rate_arrivals(lambda x: 2.0 if x < 500 else 8.0, 1000.0, 10.0, np.random.default_rng(0))
    assert np.count_nonzero(t < 500) / 500 == pytest.approx(2.0, rel=0.1)
    assert np.count_nonzero(t >= 500) / 500 == pytest.approx(8.0, rel=0.1)
    with pytest.raises(ValueError, match="max_rate"):
        rate_arrivals(lambda x: 20.0, 10.0, 10.0, np.random.default_rng(0))


def test_mooncake_hash_ids_become_16_token_blocks_with_a_unique_partial_tail(tmp_path, data_dir):
    tr = load_named_trace("mooncake")
    first = tr.block_hashes[0]
    assert len(first) == tr.prompt_tokens[0] // 16  # 40160 tokens: 2510 full blocks
    same = tmp_path / "two.jsonl"
    same.write_text('{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [4, 9, 7]}\n'
                    '{"timestamp": 5, "input_length": 1100, "output_length": 5, "hash_ids": [4, 9, 7]}\n'
                    '{"timestamp": 9, "input_length": 600, "output_length": 5, "hash_ids": [4, 8]}\n')
    a, b, c = read_mooncake_jsonl(same).block_hashes
    assert len(a) == 1100 // 16 and a[:64] == b[:64] and a[64:] != b[64:]  # equal ids share, partial tails do not
    assert c[:32] == a[:32] and c[32] != a[32]
    assert read_mooncake_jsonl(same).clipped(700).block_hashes[0] == a[: 699 // 16]


@pytest.mark.parametrize("ids,message", [('"x"', "must be a list"), ('[1, "2"]', "must be a list"),
                                         ("[1, 2, 3, 4]", "fills only 3 blocks"), ("[-1]", "non-negative")])
def test_bad_mooncake_hash_ids_name_file_and_line(tmp_path, ids, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [1, 2, 3]}\n'
                    f'{{"timestamp": 1, "input_length": 1100, "output_length": 5, "hash_ids": {ids}}}\n')
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
        read_mooncake_jsonl(path)


def test_shared_prefix_groups_share_exactly_their_system_prompt():
    shape = SharedPrefixShape(groups=3, system_tokens=100, questions_per_group=2, question_tokens=40,
                              output_tokens=7)
    reqs = shared_prefix_workload(shape, 200, 10.0, 0, with_text=True)
    assert all(r.prompt_tokens == 140 and r.output_tokens == 7 and len(r.block_hashes) == 140 // 16 for r in reqs)
    by_text = {}
    for r in reqs:
        by_text.setdefault(r.prompt, r.block_hashes)
        assert by_text[r.prompt] == r.block_hashes and approx_tokens(r.prompt) == 140
    assert len(by_text) == 6  # 3 groups x 2 questions
    firsts = {r.block_hashes[:6] for r in reqs}  # 100 system tokens: 6 full blocks of the group's alone
    assert len(firsts) == 3
    with pytest.raises(ValueError, match="groups must be >= 1"):
        SharedPrefixShape(groups=0)


def test_chat_sessions_grow_their_history_and_reuse_the_previous_answer():
    reqs = chat_workload(ChatShape(turns=4, think_time_s=5.0), 20, 1.0, 0, max_context=4096)
    assert [r.id for r in reqs] == list(range(len(reqs))) and np.all(np.diff([r.arrival for r in reqs]) >= 0)
    sessions: dict[tuple, list] = {}
    for r in reqs:
        sessions.setdefault(r.block_hashes[:13], []).append(r)  # 12 system-prompt blocks, then its own
    for turns in sessions.values():
        for prev, nxt in itertools.pairwise(turns):
            assert nxt.prompt_tokens > prev.prompt_tokens + prev.output_tokens
            full = (prev.prompt_tokens + prev.output_tokens) // 16
            assert nxt.block_hashes[:full] == prev.block_hashes[:full]  # the answer's blocks are cached
    assert max(len(t) for t in sessions.values()) == 4
    long = chat_workload(ChatShape(turns=50, output_tokens=400), 3, 1.0, 0, max_context=2048)
    assert max(r.prompt_tokens + r.output_tokens for r in long) <= 2048
