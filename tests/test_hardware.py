import pytest

from simulator.hardware import GIB, get_gpu, get_model, num_kv_blocks


def test_paper_setting_has_1052_blocks():
    assert num_kv_blocks(get_gpu("A30"), get_model("Llama-2-7B")) == 1052


def test_kv_bytes_per_token_matches_llama_shapes():
    assert get_model("Llama-2-7B").kv_bytes_per_token == 2 * 32 * 4096 * 2
    # GQA: 8 KV heads of 128 dims
    assert get_model("Llama-3-8B").kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_param_count_is_about_right():
    assert get_model("Llama-2-7B").num_params == pytest.approx(6.74e9, rel=0.01)
    assert get_model("Llama-2-70B").num_params == pytest.approx(69e9, rel=0.02)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="A30"):
        get_gpu("Z100")
    with pytest.raises(ValueError, match="Llama-2-7B"):
        get_model("gpt-5")


def test_aliases_resolve():
    assert get_gpu("a100").name == "A100-80G"
    assert get_model("llama-2-7b-chat-hf").name == "Llama-2-7B"


def test_model_that_does_not_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="no KV block fits"):
        num_kv_blocks(get_gpu("L4"), get_model("Llama-2-70B"))
    # tensor parallelism makes it fit
    assert num_kv_blocks(get_gpu("H100"), get_model("Llama-2-70B"), tensor_parallel=4) > 0


def test_more_memory_means_more_blocks():
    m = get_model("Llama-2-7B")
    assert num_kv_blocks(get_gpu("H200"), m) > num_kv_blocks(get_gpu("H100"), m)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        num_kv_blocks(get_gpu("H100"), m, gpu_memory_utilization=1.5)
    assert GIB == 2**30
