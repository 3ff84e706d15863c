"""The slice of the OpenAI API every service here speaks: parsing, validation, errors, response shapes.

One parser for the emulator, the side-car and the scheduler, so a request is judged the same way at
every hop and a bad one is refused at the front door with a message that says what was wrong. The bodies
are pydantic models of the fields vLLM honours; pydantic's first error becomes an OpenAI-shaped 400 that
names the field (``param``) and the value sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

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
    body: dict[str, Any]  # as sent: forwarded unchanged, so the engine sees every field the client set
    params: CompletionBody | ChatBody  # the same body, validated


# The request bodies, with the fields vLLM's CompletionRequest and ChatCompletionRequest honour
# (vllm/entrypoints/openai/protocol.py) and their types and ranges. Strict: a "1" is not an integer and a
# 1 is not a boolean. Other fields are allowed and forwarded, as vLLM's OpenAIBaseModel does.
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(_Body):
    type: Literal["text"] = "text"
    text: str


def _content_parts(value: Any) -> Any:
    """A message's content as text parts: a string is one part, null none. Only text parts are served: an
    image or audio part would be dropped on the way to a text-only engine, and the answer would silently
    ignore it."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise PydanticCustomError("content_type", "must be a string or a list of text parts")
    return value


class ChatMessage(_Body):
    role: Annotated[str, Field(min_length=1)]
    content: Annotated[list[TextPart], BeforeValidator(_content_parts)] = []

    def text(self) -> str:
        return f"{self.role}: " + " ".join(part.text for part in self.content)


def _stop(value: Any) -> Any:
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        return value
    raise PydanticCustomError("stop_type", "must be a string or a list of strings")


class _Sampling(_Body):
    """What both endpoints share: sampling, stopping and streaming (vLLM's ranges)."""

    model: Annotated[str, Field(min_length=1)]
    n: Annotated[int, Field(ge=1)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    length_penalty: float | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: Annotated[Any, AfterValidator(_stop)] = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    logit_bias: dict[str, float] | None = None
    add_special_tokens: bool | None = None
    priority: int | None = None
    request_id: str | None = None
    user: str | None = None


class CompletionBody(_Sampling):
    prompt: Any = None  # a string, a list of one string, or token ids: judged by _prompt


class ChatBody(_Sampling):
    messages: list[ChatMessage] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


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

_TYPES = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
          "string_type": "a string", "dict_type": "an object", "model_type": "an object", "list_type": "a list",
          "model_attributes_type": "an object"}


def _where(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as the request spells it: ``messages[0].content[1].text``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _refusal(error: ErrorDetails) -> ApiError:
    """The first validation error as today's ApiError: 400, a message naming the field and the value sent,
    and the top-level field in ``param``."""
    loc, kind, got = error["loc"], error["type"], error.get("input")
    where = f"'{_where(loc)}'"
    ctx = error.get("ctx") or {}
    if kind == "missing":
        message = f"{where} is required"
    elif kind in _TYPES:
        message = f"{where} must be {_TYPES[kind]}, got {got!r}"
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {"greater_than_equal": ("at least", "ge"), "greater_than": ("above", "gt"),
                 "less_than_equal": ("at most", "le"), "less_than": ("below", "lt")}[kind]
        message = f"{where} must be {bound[0]} {ctx[bound[1]]}, got {got!r}"
    elif kind == "string_too_short":
        message = f"{where} must not be empty"
    elif kind == "literal_error" and loc[-1] == "type":
        message = f"{where} {got!r} is not supported; only text parts are served"
    else:
        message = f"{where} {error['msg']}, got {got!r}"
    return ApiError(400, message, str(loc[0]) if loc else None)


def _validated(body: dict[str, Any], kind: str) -> CompletionBody | ChatBody:
    try:
        return (ChatBody if kind == "chat" else CompletionBody).model_validate(body)
    except ValidationError as exc:
        raise _refusal(exc.errors(include_url=False)[0]) from None


def _check_unsupported(body: dict[str, Any]) -> None:
    for name, off in _UNSUPPORTED.items():
        value = body.get(name)
        if value is None or any(type(value) is type(o) and value == o for o in off):
            continue
        raise ApiError(400, f"'{name}' is not supported here (got {value!r}): every hop serves one choice of plain "
                            "text, without log-probabilities, echo, tools or structured output", name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt(prompt: Any) -> tuple[str, int]:
    """A completions prompt's text and token count: one string, a list of one string, or token ids."""
    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt")
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return "", len(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0], approx_tokens(prompt[0])
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "'prompt' must not be empty", "prompt")
        return prompt, approx_tokens(prompt)
    raise ApiError(400, "'prompt' must be a string, a list of one string, or a list of token ids", "prompt")


def parse_request(raw: bytes, kind: str, served_models: list[str], max_model_len: int | None) -> CompletionRequest:
    """Parse and validate a completions or chat-completions body; raise ApiError naming the problem."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, "'model' is required", "model")
    params = _validated(body, kind)
    _check_unsupported(body)
    if params.model not in served_models:
        raise ApiError(404, f"The model `{params.model}` does not exist. Served models: {', '.join(served_models)}",
                       "model", "NotFoundError")
    if isinstance(params, ChatBody):
        if not params.messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        text = "\n".join(m.text() for m in params.messages)
        n_prompt = approx_tokens(text)
        key = "max_completion_tokens" if params.max_completion_tokens is not None else "max_tokens"
        max_tokens = params.max_completion_tokens if params.max_completion_tokens is not None else params.max_tokens
    else:
        text, n_prompt = _prompt(params.prompt)
        key, max_tokens = "max_tokens", params.max_tokens
    if max_tokens is not None and max_tokens > MAX_TOKENS_LIMIT:
        raise ApiError(400, f"'{key}' of {max_tokens} is absurdly large (limit {MAX_TOKENS_LIMIT})", key)
    if max_model_len is not None:
        total = n_prompt + (max_tokens or 1)
        if n_prompt >= max_model_len or total > max_model_len:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                                f"requested {total} tokens ({n_prompt} in the prompt, {max_tokens or 1} for the "
                                "completion). Please reduce the length of the prompt or completion.", key)
    include_usage = params.stream_options is not None and params.stream_options.include_usage
    return CompletionRequest(kind, params.model, text, n_prompt, max_tokens, params.stream is True, include_usage,
                             params.ignore_eos is True, body, params)


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
