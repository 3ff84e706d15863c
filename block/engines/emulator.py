"""An OpenAI-compatible engine whose token timing comes from ``simulator.engine`` stepping in real time.

It stands in for vLLM on machines without a GPU: the same scheduler model the predictor uses decides
when every token is produced, each iteration's duration comes from the world timing model (with noise),
and ``time_scale`` > 1 runs the emulated GPU faster than real time so tests finish quickly. Responses,
streaming chunks and ``/metrics`` names follow vLLM's, so any OpenAI client and the side-car work
against it unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import random
import time
import uuid
from dataclasses import dataclass, field

import orjson
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from block import openai_api as oa
from block.engines.settings import EngineSettings
from block.http import ClientGone, background, until_disconnected
from block.prometheus import (
    CONTENT_TYPE,
    REQUEST_LATENCY_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    Exposition,
    Histogram,
    Sample,
)
from block.protocol import cached_runs_to_list, text_block_hashes
from simulator.engine import Engine, EngineConfig, Seq
from simulator.timing import TimingModel
from simulator.workload import LengthPrior, Request

WORDS = ("the", " model", " emulates", " a", " GPU", " serving", " tokens", " at", " a", " steady", " pace", ".")


@dataclass
class _Stream:
    seq: Seq
    created: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    emitted: int = 0
    done: bool = False
    first_at: float = 0.0  # monotonic times of its first and latest tokens (ITL and TPOT histograms)
    last_at: float = 0.0


class EmulatedEngine:
    """Drives an Engine in real time and hands out tokens as iterations complete."""

    def __init__(self, config: EngineConfig, timing: TimingModel, *, time_scale: float = 1.0, noise: float = 0.0,
                 seed: int = 0, name: str = "emulator", lengths: LengthPrior | None = None):
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.engine = Engine(config, timing, noise=noise, seed=seed, fast_path=False, name=name)
        self.engine.step_log = []  # what a side-car calibrates its timing model on (see steps_since)
        self.steps_dropped = 0  # step-log entries trimmed away; a cursor counts from the first step ever
        self.time_scale = time_scale
        self.lengths = lengths or LengthPrior.embedded()
        self._rng = random.Random(seed)
        self._t0 = time.monotonic()
        self._ids = itertools.count()
        self._streams: dict[int, _Stream] = {}
        self._wake = asyncio.Event()
        self.ttft = Histogram(TTFT_BUCKETS)  # vLLM's buckets, so dashboards read these as a real engine's
        self.itl = Histogram(TPOT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success_total = 0
        self.aborted_total = 0

    def sim_now(self) -> float:
        return (time.monotonic() - self._t0) * self.time_scale

    def natural_length(self) -> int:
        """How long the 'model' wants to answer when EOS is not ignored: a draw from the length prior."""
        return self.lengths.sample(self._rng)

    def submit(self, prompt_tokens: int, output_tokens: int, predicted: int | None = None,
               block_hashes: tuple[int, ...] = ()) -> _Stream:
        rid = next(self._ids)
        req = Request(rid, self.sim_now(), prompt_tokens, output_tokens, predicted, block_hashes=block_hashes)
        seq = self.engine.add_request(req)
        stream = _Stream(seq, time.monotonic())
        self._streams[rid] = stream
        self.prompt_tokens_total += prompt_tokens
        self._wake.set()
        return stream

    def cancel(self, stream: _Stream) -> None:
        if self._streams.pop(stream.seq.id, None) is not None and self.engine.abort(stream.seq):
            self.aborted_total += 1

    async def run(self) -> None:
        eng = self.engine
        while True:
            if not (eng.running or eng.waiting):
                self._wake.clear()
                await self._wake.wait()
                continue
            eng.step()
            delay = self._t0 + eng.now / self.time_scale - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._emit()

    STEP_LOG_KEEP = 4096

    def steps_since(self, cursor: int) -> tuple[int, list]:
        """Iterations logged from ``cursor`` on (as [[prefill (chunk, offset)...], decodes, context, seconds]),
        and the cursor to ask with next time. Only the last STEP_LOG_KEEP are kept."""
        log = self.engine.step_log
        assert log is not None
        start = max(0, cursor - self.steps_dropped)
        return self.steps_dropped + len(log), [list(step) for step in log[start:]]

    def _emit(self) -> None:
        eng = self.engine
        log = eng.step_log
        if log is not None and len(log) > 2 * self.STEP_LOG_KEEP:  # bounded whether or not anyone reads it
            drop = len(log) - self.STEP_LOG_KEEP
            del log[:drop]
            self.steps_dropped += drop
        now = time.monotonic()
        for rid, stream in list(self._streams.items()):
            seq = stream.seq
            g = eng.generated_of(seq)
            if g > stream.emitted:
                if stream.emitted == 0:
                    self.ttft.observe(now - stream.created)
                    stream.first_at = now
                else:
                    self.itl.observe(now - stream.last_at)
                stream.last_at = now
                stream.queue.put_nowait(g - stream.emitted)
                self.generation_tokens_total += g - stream.emitted
                stream.emitted = g
            if seq.finish_time is not None:
                stream.done = True
                stream.queue.put_nowait(None)
                self.e2e.observe(now - stream.created)
                if stream.emitted > 1:
                    self.tpot.observe((stream.last_at - stream.first_at) / (stream.emitted - 1))
                self.success_total += 1
                del self._streams[rid]
        eng.finished.clear()

    def metric_samples(self, model: str) -> list[Sample]:
        """vLLM's names, types, labels and buckets (one engine: ``engine="0"``)."""
        eng = self.engine
        cfg = eng.config
        labels = {"model_name": model, "engine": "0"}
        usage = 1.0 - eng.free_blocks / cfg.num_blocks
        info = {"block_size": str(cfg.block_size), "num_gpu_blocks": str(cfg.num_blocks),
                "max_num_seqs": str(cfg.max_num_seqs), "max_num_batched_tokens": str(cfg.max_num_batched_tokens),
                "engine": "0"}
        return [
            ("vllm:num_requests_running", "gauge", "Requests in the running batch.", labels, len(eng.running)),
            ("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", labels, len(eng.waiting)),
            ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage, 1 means full.", labels, usage),
            ("vllm:gpu_cache_usage_perc", "gauge", "KV-cache usage (pre-V1 name).", labels, usage),
            ("vllm:num_preemptions_total", "counter", "Preemptions.", labels, eng.total_preemptions),
            ("vllm:prompt_tokens_total", "counter", "Prefill tokens.", labels, self.prompt_tokens_total),
            ("vllm:generation_tokens_total", "counter", "Generated tokens.", labels, self.generation_tokens_total),
            ("vllm:request_success_total", "counter", "Finished requests.", labels, self.success_total),
            ("vllm:prefix_cache_queries", "counter", "Prefix cache queries, in terms of number of queried tokens.",
             labels, eng.prefix_query_tokens),
            ("vllm:prefix_cache_hits", "counter", "Prefix cache hits, in terms of number of cached tokens.",
             labels, eng.prefix_hit_tokens),
            ("vllm:time_to_first_token_seconds", "histogram", "Histogram of time to first token in seconds.",
             labels, self.ttft),
            ("vllm:inter_token_latency_seconds", "histogram", "Histogram of inter-token latency in seconds.",
             labels, self.itl),
            ("vllm:time_per_output_token_seconds", "histogram",
             "Histogram of time per output token in seconds (vLLM's older name for the inter-token latency).",
             labels, self.itl),
            ("vllm:request_time_per_output_token_seconds", "histogram",
             "Histogram of time_per_output_token_seconds per request.", labels, self.tpot),
            ("vllm:e2e_request_latency_seconds", "histogram", "Histogram of e2e request latency in seconds.",
             labels, self.e2e),
            ("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig", info, 1),
        ]


def build_app(emu: EmulatedEngine, served_model: str) -> Starlette:
    cfg = emu.engine.config
    models = [served_model]

    async def completions(request: HttpRequest, kind: str) -> Response:
        try:
            req = oa.parse_request(await request.body(), kind, models, cfg.max_model_len)
        except oa.ApiError as err:
            return Response(err.body(), status_code=err.status, media_type="application/json")
        cap = req.max_tokens or (cfg.max_model_len - req.prompt_tokens)
        wanted = cap if req.ignore_eos else min(cap, emu.natural_length())
        finish = "length" if wanted >= cap else "stop"
        header = request.headers.get("x-block-predicted-tokens")
        predicted = int(header) if header and header.isdigit() else None
        try:
            hashes = text_block_hashes(req.prompt_text, cfg.block_size)[: req.prompt_tokens // cfg.block_size]
            stream = emu.submit(req.prompt_tokens, wanted, predicted, hashes)
        except ValueError as exc:
            return Response(oa.ApiError(400, str(exc)).body(), status_code=400, media_type="application/json")
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if not req.stream:
            async def collect() -> list[str]:
                pieces: list[str] = []
                while (k := await stream.queue.get()) is not None:
                    pieces.extend(WORDS[(len(pieces) + j) % len(WORDS)] for j in range(k))
                return pieces

            try:  # like vLLM, abort the request when its client disconnects before the answer
                pieces = await until_disconnected(request.receive, collect())
            except ClientGone:
                emu.cancel(stream)
                return Response(status_code=499)
            except asyncio.CancelledError:
                emu.cancel(stream)
                raise
            return Response(orjson.dumps(oa.full_response(req, rid, "".join(pieces), finish, len(pieces))),
                            media_type="application/json")

        async def events():
            n = 0
            try:
                while (k := await stream.queue.get()) is not None:
                    for _ in range(k):
                        yield oa.sse(oa.chunk(req, rid, created, WORDS[n % len(WORDS)], None, first=n == 0))
                        n += 1
                yield oa.sse(oa.chunk(req, rid, created, "", finish))
                if req.include_usage:
                    yield oa.sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                                  "created": created, "model": req.model, "choices": [],
                                  "usage": oa.usage(req.prompt_tokens, n)})
                yield b"data: [DONE]\n\n"
            finally:
                if not stream.done:
                    emu.cancel(stream)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def v1_completions(request: HttpRequest) -> Response:
        return await completions(request, "completions")

    async def v1_chat(request: HttpRequest) -> Response:
        return await completions(request, "chat")

    async def v1_models(request: HttpRequest) -> Response:
        return JSONResponse(oa.models_response(models, cfg.max_model_len, "block-emulator"))

    async def health(request: HttpRequest) -> Response:
        return Response(status_code=200)

    exposition = Exposition(lambda: emu.metric_samples(served_model))

    async def metrics(request: HttpRequest) -> Response:
        return Response(exposition.render(), media_type=CONTENT_TYPE)

    async def state(request: HttpRequest) -> Response:
        snap = emu.engine.snapshot()
        snap.clock = max(snap.clock, emu.sim_now())
        return Response(orjson.dumps({"instance": emu.engine.name, "time_scale": emu.time_scale,
                                      "state": dataclasses.asdict(snap)}), media_type="application/json")

    async def kv_cache(request: HttpRequest) -> Response:
        """The prefix cache's blocks as runs of its tree, what vLLM's KV events let a side-car mirror."""
        return Response(orjson.dumps({"runs": cached_runs_to_list(emu.engine.snapshot().cached)}),
                        media_type="application/json")

    async def steps(request: HttpRequest) -> Response:
        try:
            cursor = int(request.query_params.get("since", "0"))
        except ValueError:
            return Response(oa.ApiError(400, "'since' must be an integer step cursor", "since").body(),
                            status_code=400, media_type="application/json")
        cursor, log = emu.steps_since(max(0, cursor))
        return Response(orjson.dumps({"next": cursor, "steps": log}), media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with background(emu.run()):
            yield

    return Starlette(routes=[
        Route("/v1/completions", v1_completions, methods=["POST"]),
        Route("/v1/chat/completions", v1_chat, methods=["POST"]),
        Route("/v1/models", v1_models),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/state", state),
        Route("/steps", steps),
        Route("/kv_cache", kv_cache),
    ], lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="Block engine emulator (OpenAI-compatible, vLLM metrics)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--name", default="emulator")
    p.add_argument("--served-model-name", help="model id clients use (default: the --model spec name)")
    p.add_argument("--seed", type=int, default=0)
    EngineSettings.add_args(p)
    args = p.parse_args(argv)
    settings = EngineSettings.from_args(args)
    emu = EmulatedEngine(settings.engine_config(), settings.timing(), time_scale=settings.time_scale,
                         noise=settings.noise, seed=args.seed, name=args.name)
    app = build_app(emu, args.served_model_name or settings.model)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
