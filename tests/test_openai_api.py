"""The OpenAI request bodies as pydantic models: vLLM's fields typed and kept, today's error shapes."""

import orjson
import pytest

from block.openai_api import ApiError, ChatBody, CompletionBody, parse_request

MODELS = ["llama"]


def parse(body, kind="completions", max_model_len=4096):
    return parse_request(orjson.dumps({"model": "llama", **body}), kind, MODELS, max_model_len)


def refusal(body, kind="completions"):
    with pytest.raises(ApiError) as info:
        parse(body, kind)
    err = info.value
    assert orjson.loads(err.body())["error"] == {"message": err.message, "type": err.kind, "param": err.param,
                                                 "code": err.status}
    return err.status, err.param, err.message


def test_the_fields_vllm_honours_are_typed_and_kept():
    req = parse({"prompt": "abcd" * 10, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 20,
                 "min_p": 0.05, "min_tokens": 3, "stop": ["\n"], "stop_token_ids": [2], "seed": 4,
                 "repetition_penalty": 1.1, "ignore_eos": True, "stream": True,
                 "stream_options": {"include_usage": True}, "skip_special_tokens": False, "priority": 1,
                 "logit_bias": {"50256": -100.0}, "vllm_xargs": {"k": 1}})
    assert isinstance(req.params, CompletionBody)
    p = req.params
    assert (p.top_k, p.min_p, p.min_tokens, p.stop_token_ids, p.priority) == (20, 0.05, 3, [2], 1)
    assert (req.prompt_tokens, req.max_tokens, req.stream, req.include_usage, req.ignore_eos) == (10, 7, True, True,
                                                                                                   True)
    assert req.body["vllm_xargs"] == {"k": 1} and p.model_extra == {"vllm_xargs": {"k": 1}}  # forwarded as sent


def test_chat_bodies_join_text_parts_and_prefer_max_completion_tokens():
    req = parse({"messages": [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": [{"type": "text", "text": "hi"}, {"text": "there"}]}],
                 "max_tokens": 50, "max_completion_tokens": 9, "add_generation_prompt": True}, kind="chat")
    assert isinstance(req.params, ChatBody)
    assert req.prompt_text == "system: be brief\nuser: hi there" and req.max_tokens == 9
    assert parse({"prompt": [1, 2, 3]}).prompt_tokens == 3  # token ids


@pytest.mark.parametrize(("body", "kind", "param", "says"), [
    ({"prompt": "a", "n": "1"}, "completions", "n", "'n' must be an integer, got '1'"),
    ({"prompt": "a", "stream": 1}, "completions", "stream", "'stream' must be true or false, got 1"),
    ({"prompt": "a", "max_tokens": 0}, "completions", "max_tokens", "'max_tokens' must be at least 1, got 0"),
    ({"prompt": "a", "top_p": 1.5}, "completions", "top_p", "'top_p' must be at most 1.0, got 1.5"),
    ({"prompt": "a", "min_tokens": -1}, "completions", "min_tokens", "'min_tokens' must be at least 0"),
    ({"prompt": "a", "stop_token_ids": ["x"]}, "completions", "stop_token_ids", "'stop_token_ids[0]' must be an int"),
    ({"prompt": "a", "stop": [1]}, "completions", "stop", "'stop' must be a string or a list of strings"),
    ({"prompt": "a", "stream_options": {"include_usage": "yes"}}, "completions", "stream_options",
     "'stream_options.include_usage' must be true or false"),
    ({"prompt": ""}, "completions", "prompt", "'prompt' must not be empty"),
    ({}, "completions", "prompt", "'prompt' is required"),
    ({"prompt": "a", "echo": True}, "completions", "echo", "'echo' is not supported here"),
    ({"messages": []}, "chat", "messages", "'messages' must be a non-empty list"),
    ({"messages": [{"content": "x"}]}, "chat", "messages", "'messages[0].role' is required"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "chat", "messages",
     "'messages[0].content[0].type' 'image_url' is not supported; only text parts are served"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2.5}, "chat",
     "max_completion_tokens", "'max_completion_tokens' must be an integer, got 2.5"),
])
def test_bad_bodies_are_400s_naming_the_field(body, kind, param, says):
    status, where, message = refusal(body, kind)
    assert (status, where) == (400, param) and says in message, message


def test_model_and_context_errors_keep_their_shapes():
    assert refusal({"model": "gpt-9", "prompt": "a"})[:2] == (404, "model")
    assert refusal({"model": "", "prompt": "a"}) == (400, "model", "'model' is required")
    status, param, message = refusal({"prompt": "a" * 40, "max_tokens": 4090})
    assert (status, param) == (400, "max_tokens") and "maximum context length is 4096 tokens" in message
    with pytest.raises(ApiError, match="not valid JSON"):
        parse_request(b"{nope", "completions", MODELS, None)
    with pytest.raises(ApiError, match="must be a JSON object"):
        parse_request(b"[1]", "completions", MODELS, None)
