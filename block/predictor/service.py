"""The predictor side-car: a proxy in front of one engine that knows its live state and answers what-ifs.

Every ``/v1/*`` request of the instance passes through here, so the side-car tracks each request's
prompt and generated tokens without engine changes. It reconciles that view with the engine's
``/metrics`` (how many are running, waiting, preempted; the KV cache size), turns it into an
InstanceState, and answers ``POST /predict`` with the same Predictor the offline studies use, or streams
that state and its predictor's model (``GET /state/stream``) to schedulers that predict in-process. It
knows its engine's prefix cache exactly (the emulator's ``/kv_cache``) or approximately (the prompts it
proxied) and says which in ``/state``. Its timing model starts as the roofline of its GPU and is refitted
online from the step times the engine reports (``OnlineCalibration``); ``/state`` and every prediction say
which one it is.

A caller that leaves is noticed even while the side-car still waits on its engine (a non-streaming
answer), and closing the engine connection aborts the request there. Off loopback, ``/predict``,
``/state`` and ``/v1/*`` answer only callers with the cluster token (``store.auth``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import aiohttp
import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from block import openai_api as oa
from block.events import EventSink
from block.http import (
    ClientGone,
    Relay,
    RelayResponse,
    TokenCounter,
    background,
    proxy_session,
    run_server,
    until_disconnected,
)
from block.predictor.calibration import OnlineCalibration, build_predictor
from block.predictor.core import Predictor
from block.prefix_index import ApproximatePrefixIndex, BlockSet
from block.prometheus import CONTENT_TYPE, Exposition, Histogram, Sample, parse_label, parse_metrics
from block.protocol import (
    BLOCK_REQUEST_ID_HEADER,
    PREDICTED_TOKENS_HEADER,
    LoadSignals,
    PredictRequest,
    PredictResponse,
    ProtocolError,
    cached_runs_from_list,
    model_message,
    parse_predicted_tokens,
    state_to_dict,
    text_block_hashes,
)
from block.routing import StateView
from simulator.engine import EngineConfig, InstanceState, RequestState
from simulator.timing import StepSample
from simulator.workload import LengthPrior, Request
from store.auth import TokenGuard, token_for
from store.schema import InstanceSampleRow

EXACT_CACHE = "engine /kv_cache"  # the cache source while the engine shows its cache (else: approximate)
# How long a finished request's id stays in the state stream's "done" list. A scheduler also drops its dispatch
# when the response it relays ends, so the list only bridges the moments between the side-car seeing a finish
# and the scheduler seeing the end of that response; at 2 s it held ~500 ids a message at 250 finishes/s per
# instance, encoded by the side-car and parsed by every scheduler 50 times a second.
DONE_WINDOW_S = 0.25


@dataclass
class Tracked:
    id: int
    arrival: float  # instance clock (emulated seconds)
    prompt_tokens: int
    predicted: int | None
    rid: str = ""  # the scheduler's request id (x-block-request-id), so its mirror can stop counting it
    generated: int = 0
    first_token: float | None = None


class InstanceTracker:
    """The side-car's picture of its instance, from proxied traffic plus engine metrics."""

    def __init__(self, config: EngineConfig, time_scale: float = 1.0):
        self.config = config
        self.time_scale = time_scale
        self._t0 = time.monotonic()
        self._ids = itertools.count()
        self.requests: dict[int, Tracked] = {}
        self.engine_running: int | None = None
        self.engine_waiting: int | None = None
        self.engine_preemptions = 0
        self.kv_usage: float | None = None
        self.metrics_at: float | None = None
        self.version = 0  # bumped on every change a state stream must publish
        self.done: deque[tuple[float, str]] = deque()  # (monotonic, scheduler request id) of recent finishes

    def clock(self) -> float:
        return (time.monotonic() - self._t0) * self.time_scale

    def start(self, prompt_tokens: int, predicted: int | None, rid: str = "") -> Tracked:
        t = Tracked(next(self._ids), self.clock(), prompt_tokens, predicted, rid)
        self.requests[t.id] = t
        self.version += 1
        return t

    def token(self, t: Tracked, n: int = 1) -> None:
        if t.first_token is None:
            t.first_token = self.clock()
        t.generated += n
        self.version += 1

    def finish(self, t: Tracked) -> None:
        if self.requests.pop(t.id, None) is not None:
            self.version += 1
            if t.rid:
                self.done.append((time.monotonic(), t.rid))

    def recently_done(self, window_s: float = DONE_WINDOW_S) -> list[str]:
        """Scheduler request ids finished within the window: a stream reader that skips messages (it parses
        only the newest) still learns of every finish."""
        cutoff = time.monotonic() - window_s
        while self.done and self.done[0][0] < cutoff:
            self.done.popleft()
        return [rid for _, rid in self.done]

    def reconcile(self, metrics: dict[str, float]) -> None:
        self.version += 1
        self.engine_running = int(metrics.get("vllm:num_requests_running", 0))
        self.engine_waiting = int(metrics.get("vllm:num_requests_waiting", 0))
        self.engine_preemptions = int(metrics.get("vllm:num_preemptions_total", 0))
        self.kv_usage = metrics.get("vllm:kv_cache_usage_perc", metrics.get("vllm:gpu_cache_usage_perc"))
        self.metrics_at = time.monotonic()

    def state(self) -> InstanceState:
        """Tracked requests as an InstanceState, phases corrected by the engine's own counts.

        Requests that produced tokens are decoding, unless the engine reports more waiting requests than
        we have silent ones: then the most recently admitted decoders were preempted (recompute). Silent
        requests are prefilling up to the engine's running count, the rest are queued.
        """
        cfg = self.config
        bs = cfg.block_size
        decoding = [t for t in self.requests.values() if t.generated > 0]
        silent = [t for t in self.requests.values() if t.generated == 0]
        preempted: set[int] = set()
        if self.engine_waiting is not None and self.engine_waiting > len(silent):
            extra = self.engine_waiting - len(silent)
            preempted = {t.id for t in sorted(decoding, key=lambda t: t.first_token or 0.0)[-extra:]}
        n_running_decode = len(decoding) - len(preempted)
        prefill_slots = len(silent)
        if self.engine_running is not None:
            prefill_slots = max(0, self.engine_running - n_running_decode)
        out: list[RequestState] = []
        used = running = 0
        for t in decoding:
            if t.id in preempted:
                continue
            computed = t.prompt_tokens + t.generated - 1
            blocks = -(-computed // bs)
            if used + blocks > cfg.num_blocks or running >= cfg.max_num_seqs:
                preempted.add(t.id)
                continue
            used += blocks
            running += 1
            out.append(RequestState(t.id, t.arrival, t.prompt_tokens, computed, t.generated, "running", blocks,
                                    t.predicted, t.first_token))
        waiting: list[RequestState] = [
            RequestState(t.id, t.arrival, t.prompt_tokens, 0, t.generated, "preempted", 0, t.predicted, t.first_token)
            for t in decoding if t.id in preempted]
        for i, t in enumerate(silent):
            phase = "running" if i < prefill_slots and running < cfg.max_num_seqs else "waiting"
            running += phase == "running"
            (out if phase == "running" else waiting).append(
                RequestState(t.id, t.arrival, t.prompt_tokens, 0, 0, phase, 0, t.predicted))
        return InstanceState(cfg, self.clock(), out + waiting, self.engine_preemptions)


class SideCar:
    def __init__(self, name: str, engine_url: str, tracker: InstanceTracker, predictor: Predictor, *,
                 sink: EventSink | None = None, metrics_interval: float = 0.25, stream_interval: float = 0.02):
        self.name = name
        self.engine_url = engine_url.rstrip("/")
        self.tracker = tracker
        self.predictor = predictor
        self.calibration = OnlineCalibration(predictor)
        self._steps_cursor: int | None = 0  # None once the engine showed it reports no step times
        self._cache_config_line = ""  # the engine's cache_config_info sample last adopted
        self.sink = sink or EventSink(None, "")
        self.metrics_interval = metrics_interval
        self.client: aiohttp.ClientSession | None = None
        self.engine_ok = False
        self.engine_error = "not contacted yet"
        self.predict_latency = Histogram()
        self.proxied_total = 0
        self.proxy_errors_total = 0
        self.cancelled_total = 0
        self.stream_interval = stream_interval
        self.stream_heartbeat = 0.1
        self.cache_interval = 0.1  # prefix-cache changes go out at most this often
        self.index = ApproximatePrefixIndex()  # the prompts proxied here, for an engine that shows no cache
        self.cache = BlockSet()
        self.cache_source = EXACT_CACHE  # until the engine shows it has none
        self.stream_messages_total = 0
        self.stopping = False  # set on SIGTERM: state streams end so that the server can stop

    async def poll_engine_once(self) -> None:
        assert self.client is not None
        try:
            async with self.client.get(self.engine_url + "/metrics", timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                resp.raise_for_status()
                text = await resp.text()
            metrics = parse_metrics(text)
            self.tracker.reconcile(metrics)
            self.calibration.observe_metrics(metrics)
            self._adopt_cache_config(text)
            self.engine_ok, self.engine_error = True, ""
            t = self.tracker
            self.sink.emit(InstanceSampleRow(
                ts=time.time(), instance=self.name, running=t.engine_running, waiting=t.engine_waiting,
                kv_usage=t.kv_usage, preemptions=t.engine_preemptions, tracked=len(t.requests)))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.engine_ok, self.engine_error = False, f"engine {self.engine_url} unreachable: {exc!r}"

    async def poll_steps_once(self) -> None:
        """Feed the step times the engine reports (the emulator's ``/steps``) to the online calibration.

        An engine without that endpoint (vLLM) is asked once; the calibration then fits on the iterations
        it rebuilds from the proxied token streams (``StreamSteps``), and its label says so.
        """
        assert self.client is not None
        if self._steps_cursor is None:
            return
        try:
            async with self.client.get(f"{self.engine_url}/steps?since={self._steps_cursor}",
                                       timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                if resp.status == 404:
                    self._steps_cursor = None
                    self.calibration.use_streams()
                    return
                resp.raise_for_status()
                data = orjson.loads(await resp.read())
            samples = [StepSample(tuple((int(c), int(o)) for c, o in prefill), int(n_dec), int(ctx), float(sec))
                       for prefill, n_dec, ctx, sec in data["steps"]]
            self._steps_cursor = int(data["next"])
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return  # the next poll tries again; health is judged from /metrics
        self.calibration.source = "engine /steps"
        self.calibration.add(samples)

    async def poll_kv_cache_once(self) -> None:
        """Take the engine's cached blocks (the emulator's ``/kv_cache``; what vLLM's KV events carry). An
        engine without it is asked once; from then on the side-car knows its cache approximately: the prompt
        blocks it proxied, LRU-bounded by the engine's KV blocks, as llm-d's approximate index does."""
        assert self.client is not None
        if self.cache_source != EXACT_CACHE:
            return
        try:
            async with self.client.get(self.engine_url + "/kv_cache", timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                if r.status == 404:
                    self.cache_source = (f"approximate (prompts proxied here, LRU over "
                                         f"{self.tracker.config.num_blocks} blocks)")
                    self.cache = BlockSet(self.index.members(self.name))
                    return
                r.raise_for_status()
                runs = cached_runs_from_list(orjson.loads(await r.read()).get("runs"), "kv_cache.runs")
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, ProtocolError, AttributeError):
            return  # the next poll tries again
        self.cache.replace(h for run in runs if run.refs or run.evict >= 0 for h in run.hashes)

    async def poll_engine(self) -> None:
        while True:
            await asyncio.sleep(self.metrics_interval)
            await self.poll_engine_once()
            await self.poll_steps_once()
            await self.poll_kv_cache_once()

    def _adopt_cache_config(self, metrics_text: str) -> None:
        """Take the KV cache size and block size the engine reports (vLLM's cache_config_info). Its sample
        line is cut out and parsed only when it changed: parsing it out of the whole exposition on every
        poll was half the side-car's metrics-polling time."""
        at = metrics_text.find("vllm:cache_config_info{")
        end = metrics_text.find("\n", at)
        line = "" if at < 0 else metrics_text[at:end if end >= 0 else None]
        if line == self._cache_config_line:
            return
        self._cache_config_line = line
        update = {}
        for label, key in (("num_gpu_blocks", "num_blocks"), ("block_size", "block_size")):
            value = parse_label(line, "vllm:cache_config_info", label)
            if value and value.isdigit() and int(value) != getattr(self.tracker.config, key):
                update[key] = int(value)
        if update:
            self.tracker.config = EngineConfig(**{**asdict(self.tracker.config), **update})

    async def proxy(self, request: HttpRequest) -> Response:
        assert self.client is not None
        body = await request.body()
        path = request.url.path
        kind = "chat" if path.endswith("/chat/completions") else "completions"
        try:
            peek = orjson.loads(body)
            model = peek.get("model") if isinstance(peek, dict) else None
            parsed = oa.parse_request(body, kind, [model] if isinstance(model, str) else [], None)
        except (orjson.JSONDecodeError, oa.ApiError):
            parsed = None  # let the engine answer with its own error
        predicted = parse_predicted_tokens(request.headers.get(PREDICTED_TOKENS_HEADER))
        headers = {"content-type": "application/json"}
        if predicted is not None:
            headers[PREDICTED_TOKENS_HEADER] = str(predicted)
        rid = request.headers.get(BLOCK_REQUEST_ID_HEADER, "")[:64]
        tracked = self.tracker.start(parsed.prompt_tokens, predicted, rid) if parsed is not None else None
        if parsed is not None and self.cache_source != EXACT_CACHE:
            cfg = self.tracker.config
            hashes = text_block_hashes(parsed.prompt_text, cfg.block_size)[: parsed.prompt_tokens // cfg.block_size]
            if hashes:
                self.index.record(self.name, hashes, cfg.num_blocks)
                self.cache.version += 1
        self.proxied_total += 1
        stream = parsed is not None and parsed.stream
        try:
            resp, data = await until_disconnected(request.receive, self._forward(path, body, headers, stream))
        except ClientGone:  # the caller left; closing the engine connection aborted the request there
            self.cancelled_total += 1
            if tracked:
                self.tracker.finish(tracked)
            return Response(status_code=499)
        except BaseException:
            if tracked:
                self.tracker.finish(tracked)
            raise
        if data is not None:
            if tracked:
                self.tracker.finish(tracked)
            return Response(data, status_code=resp.status, media_type=resp.headers.get("content-type"))
        counter = TokenCounter()

        def count(chunk: bytes) -> None:
            n = counter.feed(chunk)
            if n and tracked:
                self.calibration.observe_token(self.tracker.clock(), tracked.id, tracked.prompt_tokens,
                                               tracked.generated, n, tracked.arrival, self.tracker.config)
                self.tracker.token(tracked, n)

        def end(status: str, error: str) -> None:
            if status == "error":
                self.proxy_errors_total += 1
            elif status == "cancelled":
                self.cancelled_total += 1
            if tracked:
                self.tracker.finish(tracked)

        return RelayResponse(Relay(resp, resp.content.iter_any(), on_chunk=count, on_end=end, upstream="engine"))

    async def _forward(self, path: str, body: bytes, headers: dict[str, str],
                       stream: bool) -> tuple[aiohttp.ClientResponse, bytes | None]:
        """Post to the engine: the response and its whole body, or None for a body still to stream."""
        assert self.client is not None
        try:
            resp = await self.client.post(self.engine_url + path, data=body, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.proxy_errors_total += 1
            raise oa.ApiError(503, f"side-car {self.name}: engine {self.engine_url} unreachable: {exc!r}") from exc
        if stream and resp.status == 200:
            return resp, None
        try:
            return resp, await resp.read()
        except aiohttp.ClientError as exc:
            self.proxy_errors_total += 1
            raise oa.ApiError(502, f"side-car {self.name}: engine response broke: {exc!r}") from exc
        finally:
            resp.release()

    def predict(self, raw: bytes) -> dict:
        t0 = time.perf_counter()
        state = self.tracker.state()
        try:
            asked = PredictRequest.from_dict(orjson.loads(raw), state.config.max_model_len)
        except orjson.JSONDecodeError as exc:
            raise oa.ApiError(400, f"predict body is not valid JSON: {exc}") from exc
        except ProtocolError as exc:
            raise oa.ApiError(400, str(exc), exc.field) from exc
        view = StateView(state.clock, state, self.cache)
        scale = self.tracker.time_scale
        preds = [view.predict(self.predictor, self.name, Request(-1 - i, state.clock, c.prompt_tokens, 1,
                                                                 c.predicted_output_tokens,
                                                                 block_hashes=tuple(c.block_hashes)),
                              asked.target, state.clock, asked.with_impact).in_wall_seconds(scale)
                 for i, c in enumerate(asked.candidates)]
        signals = LoadSignals.from_state(state, self.predictor.prior)
        self.predict_latency.observe(time.perf_counter() - t0)
        return PredictResponse(self.name, preds, signals, self.engine_ok, self.predictor.label).to_dict()

    def state_json(self, with_requests: bool = True) -> dict:
        """The instance state; without requests (what a scheduler polls every 100 ms) it stays cheap."""
        state = self.tracker.state()
        t = self.tracker
        return {"instance": self.name, "time_scale": t.time_scale, "state": asdict(state) if with_requests else None,
                "signals": asdict(LoadSignals.from_state(state, self.predictor.prior)),
                "engine": {"running": t.engine_running, "waiting": t.engine_waiting, "kv_usage": t.kv_usage,
                           "preemptions": t.engine_preemptions, "ok": self.engine_ok, "error": self.engine_error},
                "predictor": self.calibration.status(),
                "prefix_cache": {"source": self.cache_source, "blocks": self.cache.size}}

    async def state_stream(self) -> AsyncIterator[bytes]:
        """The state stream a scheduler mirrors: the model (again after every refit), then the state after
        every change (at most every ``stream_interval``), or unchanged once a ``heartbeat`` so the mirror knows
        it is current; the prefix cache's changes ride along, at most every ``cache_interval``."""
        t = self.tracker
        label = self.predictor.label
        yield orjson.dumps(model_message(self.predictor, t.time_scale)) + b"\n"
        version, sent, seq = -1, 0.0, 0
        cache_version, cache_sent, cache_at = -1, set(), 0.0
        while not self.stopping:
            if self.predictor.label != label:
                label = self.predictor.label
                yield orjson.dumps(model_message(self.predictor, t.time_scale)) + b"\n"
            now = time.monotonic()
            if t.version != version or now - sent >= self.stream_heartbeat:
                version, sent, seq = t.version, now, seq + 1
                rids = [r.rid for r in t.requests.values() if r.rid]
                msg = {"kind": "state", "seq": seq, "state": state_to_dict(t.state()), "rids": rids,
                       "done": t.recently_done(), "engine_ok": self.engine_ok, "engine_error": self.engine_error}
                if self.cache.version != cache_version and now - cache_at >= self.cache_interval:
                    added, removed, cache_sent_next = self.cache.changes(cache_sent)
                    msg["cache"] = {"reset": cache_version < 0, "added": added, "removed": removed,
                                    "source": self.cache_source}
                    cache_version, cache_sent, cache_at = self.cache.version, cache_sent_next, now
                yield orjson.dumps(msg) + b"\n"
                self.stream_messages_total += 1
            await asyncio.sleep(self.stream_interval)

    def metric_samples(self) -> list[Sample]:
        labels = {"instance": self.name}
        state = self.tracker.state()
        running = sum(r.phase == "running" for r in state.requests)
        return [
            ("block:sidecar_tracked_running", "gauge", "Requests the side-car sees running.", labels, running),
            ("block:sidecar_tracked_waiting", "gauge", "Requests the side-car sees waiting.", labels,
             len(state.requests) - running),
            ("block:sidecar_proxied_total", "counter", "Requests proxied to the engine.", labels, self.proxied_total),
            ("block:sidecar_proxy_errors_total", "counter", "Proxy failures.", labels, self.proxy_errors_total),
            ("block:sidecar_cancelled_total", "counter", "Callers that left; each aborted its engine request.",
             labels, self.cancelled_total),
            ("block:sidecar_predict_seconds", "histogram", "Time to answer /predict.", labels, self.predict_latency),
        ]


def build_app(car: SideCar) -> Starlette:
    exposition = Exposition(car.metric_samples)  # this side-car's own Prometheus registry
    async def predict(request: HttpRequest) -> Response:
        try:
            return Response(orjson.dumps(car.predict(await request.body())), media_type="application/json")
        except ClientDisconnect:  # the scheduler's budget ran out; nobody is waiting for the answer
            return Response(status_code=499)

    async def state(request: HttpRequest) -> Response:
        brief = request.query_params.get("requests") == "0"
        return Response(orjson.dumps(car.state_json(with_requests=not brief)), media_type="application/json")

    async def state_stream(request: HttpRequest) -> Response:
        return StreamingResponse(car.state_stream(), media_type="application/x-ndjson")

    async def health(request: HttpRequest) -> Response:
        if car.engine_ok:
            return Response(status_code=200)
        return Response(orjson.dumps({"error": car.engine_error}), status_code=503, media_type="application/json")

    async def metrics(request: HttpRequest) -> Response:
        return Response(exposition.render(), media_type=CONTENT_TYPE)

    async def models(request: HttpRequest) -> Response:
        assert car.client is not None
        try:
            async with car.client.get(car.engine_url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5.0)) as r:
                return Response(await r.read(), status_code=r.status, media_type="application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise oa.ApiError(503, f"engine unreachable: {exc!r}") from exc

    async def api_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, oa.ApiError)
        return Response(exc.body(), status_code=exc.status, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        car.client = proxy_session()
        await car.sink.start()
        await car.poll_engine_once()  # know the engine's health before the first /state is served
        await car.poll_steps_once()
        await car.poll_kv_cache_once()
        async with background(car.poll_engine()):
            yield
        await car.sink.stop()
        await car.client.close()

    return Starlette(routes=[
        Route("/v1/completions", car.proxy, methods=["POST"]),
        Route("/v1/chat/completions", car.proxy, methods=["POST"]),
        Route("/v1/models", models),
        Route("/predict", predict, methods=["POST"]),
        Route("/state", state),
        Route("/state/stream", state_stream),
        Route("/health", health),
        Route("/metrics", metrics),
    ], exception_handlers={oa.ApiError: api_error}, lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    from block.engines.settings import EngineSettings

    p = argparse.ArgumentParser(description="Block predictor side-car for one engine")
    p.add_argument("--engine-url", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--name", default="instance-0")
    p.add_argument("--collector-url")
    p.add_argument("--run-id", default="live")
    p.add_argument("--graceful-timeout", type=float, default=5.0,
                   help="seconds open streams get after SIGTERM before they are cut and the samples flushed")
    EngineSettings.add_args(p)
    args = p.parse_args(argv)
    try:
        token = token_for(args.host, "side-car")
    except ValueError as exc:
        p.error(str(exc))
    settings = EngineSettings.from_args(args)
    tracker = InstanceTracker(settings.engine_config(), settings.time_scale)
    predictor = build_predictor(LengthPrior.embedded(), settings.timing())
    car = SideCar(args.name, args.engine_url, tracker, predictor, sink=EventSink(args.collector_url, args.run_id))
    app = TokenGuard(build_app(car), token, ("/predict", "/state", "/v1"))
    run_server(app, args.host, args.port, graceful_timeout_s=args.graceful_timeout,
               on_signal=lambda: setattr(car, "stopping", True))


if __name__ == "__main__":
    main()
