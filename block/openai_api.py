"""The slice of the OpenAI API every service here speaks: parsing, validation, errors, response shapes.

One parser for the emulator, the side-car and the scheduler, so a request is judged the same way at
every hop and a bad one is refused at the front door with a message that says what was wrong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from block.protocol import approx_tokens

MAX_TOKENS_LIMIT = 1 << 20


class ApiError(Exception):
    """An error to send back as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or {400: "BadRequestError", 404: "NotFoundError", 401: "AuthenticationError",
                             429: "RateLimitError", 503: "ServiceUnavailableError",
                             504: "TimeoutError"}.get(status, "APIError")
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.status}})


@dataclass
class CompletionRequest:
    kind: str  # "completions" or "chat"
    model: str
    prompt_text: str
    prompt_tokens: int
    max_tokens: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool
    body: dict[str, Any]


def _prompt_from_chat(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
        content = m.get("content", "")
        if isinstance(content, list):
            content = " ".join(_text_part(part, f"messages[{i}].content[{j}]") for j, part in enumerate(content))
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        parts.append(f"{m['role']}: {content}")
    return "\n".join(parts)


def _text_part(part: Any, where: str) -> str:
    """A content part's text. Only text parts are served: an image or audio part would be dropped on the
    way to a text-only engine, and the answer would silently ignore it."""
    if not isinstance(part, dict):
        raise ApiError(400, f"{where} must be an object {{type: text, text: string}}", "messages")
    if part.get("type", "text") != "text":
        raise ApiError(400, f"{where}.type {part.get('type')!r} is not supported; only text parts are served",
                       "messages")
    text = part.get("text")
    if not isinstance(text, str):
        raise ApiError(400, f"{where}.text must be a string, got {text!r}", "messages")
    return text


# Parameters that change what a response contains. No hop implements them end to end (the emulator, the
# side-car's token counting and the scheduler's predictions all assume one choice of plain text), so a
# request that sets one is refused instead of silently answered without it. Each maps to the values that
# mean "off", which are accepted (compared with their type: a completions ``logprobs`` of 0 asks for the
# sampled token's log-probability, while a chat ``logprobs`` of false asks for none).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "prompt_logprobs": (), "use_beam_search": (False,),
}

_NUMBERS: dict[str, tuple[float, float]] = {  # sampling parameters passed through to the engine: type and range
    "temperature": (0.0, float("inf")), "top_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0), "repetition_penalty": (0.0, float("inf")),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_options(body: dict[str, Any]) -> None:
    """Refuse parameters no hop serves and parameters of the wrong type, naming the parameter."""
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and (not _is_int(value) or value < 1):
            raise ApiError(400, f"'{name}' must be a positive integer, got {value!r}", name)
    for name, off in _UNSUPPORTED.items():
        value = body.get(name)
        if value is None or any(type(value) is type(o) and value == o for o in off):
            continue
        raise ApiError(400, f"'{name}' is not supported here (got {value!r}): every hop serves one choice of plain "
                            "text, without log-probabilities, echo, tools or structured output", name)
    for name, (low, high) in _NUMBERS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ApiError(400, f"'{name}' must be a number in [{low}, {high}], got {value!r}", name)
    for name in ("stream", "ignore_eos"):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise ApiError(400, f"'{name}' must be true or false, got {value!r}", name)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of strings, got {stop!r}", "stop")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, f"'user' must be a string, got {user!r}", "user")


def parse_request(raw: bytes, kind: str, served_models: list[str], max_model_len: int | None) -> CompletionRequest:
    """Parse and validate a completions or chat-completions body; raise ApiError naming the problem."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required", "model")
    _check_options(body)
    if model not in served_models:
        raise ApiError(404, f"The model `{model}` does not exist. Served models: {', '.join(served_models)}",
                       "model", "NotFoundError")
    if kind == "chat":
        text = _prompt_from_chat(body.get("messages"))
        n_prompt = approx_tokens(text)
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise ApiError(400, "'prompt' is required", "prompt")
        if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
            text, n_prompt = "", len(prompt)
        elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            text = prompt[0]
            n_prompt = approx_tokens(text)
        elif isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "'prompt' must not be empty", "prompt")
            text, n_prompt = prompt, approx_tokens(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string, a list of one string, or a list of token ids", "prompt")
    key = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None:
        if not _is_int(max_tokens):
            raise ApiError(400, f"'{key}' must be an integer, got {max_tokens!r}", key)
        if max_tokens < 1:
            raise ApiError(400, f"'{key}' must be at least 1, got {max_tokens}", key)
        if max_tokens > MAX_TOKENS_LIMIT:
            raise ApiError(400, f"'{key}' of {max_tokens} is absurdly large (limit {MAX_TOKENS_LIMIT})", key)
    if max_model_len is not None:
        total = n_prompt + (max_tokens or 1)
        if n_prompt >= max_model_len or total > max_model_len:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                                f"requested {total} tokens ({n_prompt} in the prompt, {max_tokens or 1} for the "
                                "completion). Please reduce the length of the prompt or completion.", key)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    include_usage = opts.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, f"'stream_options.include_usage' must be true or false, got {include_usage!r}",
                       "stream_options")
    return CompletionRequest(kind, model, text, n_prompt, max_tokens, body.get("stream") is True, include_usage,
                             body.get("ignore_eos") is True, body)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(req: CompletionRequest, rid: str, created: int, text: str, finish: str | None,
          first: bool = False) -> dict:
    """One streamed chunk in the shape of the request's endpoint."""
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        if finish is not None and not text:
            delta = {}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def full_response(req: CompletionRequest, rid: str, text: str, finish: str, completion_tokens: int) -> dict:
    created = int(time.time())
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice],
            "usage": usage(req.prompt_tokens, completion_tokens)}


def sse(data: dict | str) -> bytes:
    payload = data.encode() if isinstance(data, str) else orjson.dumps(data)
    return b"data: " + payload + b"\n\n"


def models_response(models: list[str], max_model_len: int | None, owner: str) -> dict:
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": owner, "root": m, "max_model_len": max_model_len}
        for m in models]}
