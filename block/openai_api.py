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

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or {400: "BadRequestError", 404: "NotFoundError", 401: "AuthenticationError",
                             503: "ServiceUnavailableError", 504: "TimeoutError"}.get(status, "APIError")

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
        if not isinstance(m, dict) or "role" not in m:
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", "messages")
        content = m.get("content", "")
        if isinstance(content, list):  # content parts: keep the text ones
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", "messages")
        parts.append(f"{m['role']}: {content}")
    return "\n".join(parts)


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
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
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
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
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
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    return CompletionRequest(kind, model, text, n_prompt, max_tokens, stream, bool(opts.get("include_usage")),
                             bool(body.get("ignore_eos", False)), body)


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
