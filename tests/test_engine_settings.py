"""EngineSettings: the engine flags declared once, with one set of defaults."""

import argparse

import pytest

from block.engines.settings import EngineSettings


def test_defaults_are_vllm_on_an_a30_in_real_time():
    s = EngineSettings()
    cfg = s.engine_config()
    assert (s.gpu, s.model, s.time_scale, s.noise) == ("A30", "Llama-2-7B", 1.0, 0.05)
    assert (cfg.num_blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len) == (1052, 48, 512, 4096)


def test_flags_round_trip_and_the_rest_is_left_alone():
    s = EngineSettings(gpu="L4", num_blocks=900, max_num_seqs=8, max_model_len=2048, time_scale=7.5, noise=0.0)
    assert EngineSettings.parse([*s.argv(), "--seed", "3"]) == (s, ["--seed", "3"])
    assert EngineSettings.parse(EngineSettings().argv()) == (EngineSettings(), [])
    assert "--num-blocks" not in EngineSettings().argv()  # sized from memory where it starts, not here


def test_help_shows_the_defaults():
    parser = argparse.ArgumentParser()
    EngineSettings.add_args(parser)
    text = " ".join(parser.format_help().split())
    assert "(default: 48)" in text and "(default: 1.0)" in text and "sized from GPU memory" in text
    assert EngineSettings.from_args(parser.parse_args([])) == EngineSettings()


def test_zero_is_refused_not_taken_as_the_default():
    assert EngineSettings(max_model_len=512).engine_config().max_model_len == 512
    for field in ("max_model_len", "num_blocks"):
        with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
            EngineSettings(**{field: 0}).engine_config()


def test_bad_values_name_what_is_wrong():
    with pytest.raises(ValueError, match="time_scale must be > 0, got 0"):
        EngineSettings(time_scale=0)
    with pytest.raises(ValueError, match="bad engine flag: argument --max-num-seqs: invalid int value: 'many'"):
        EngineSettings.parse(["--max-num-seqs", "many"])
    with pytest.raises(ValueError, match="unknown GPU 'Z80'"):
        EngineSettings(gpu="Z80").engine_config()
    with pytest.raises(ValueError, match=r"max_model_len must be >= 2 \(a prompt token and a generated one\), got 1"):
        EngineSettings(max_model_len=1).engine_config()
    with pytest.raises(ValueError, match=r"max_model_len 8192 is longer than Llama-2-7B's context \(4096 tokens\)"):
        EngineSettings(max_model_len=8192).engine_config()
