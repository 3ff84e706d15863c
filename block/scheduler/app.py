"""The global scheduler: an OpenAI-compatible front door that routes each request by policy.

Per request: validate, optionally estimate the response length (off the event loop), let the shared
``Router`` plan, ask only the shortlisted side-cars for predictions concurrently within a time budget, let
the policy choose, forward and stream back. The registry (``registry``) keeps the instances and their
polled signals; this module holds the routes and the per-request work.

Failures: a side-car that misses the prediction budget is skipped (the decision records a partial or
full fallback to live signals); an instance that fails before the first token is marked down and the
request is retried elsewhere; a client that disconnects cancels the upstream request. Every error names
its cause, and every ``ApiError`` becomes a response in one exception handler.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from block import openai_api as oa
from block.events import EventSink
from block.http import background, proxy_session, relay
from block.policies import Candidate, Policy, make_policy
from block.prometheus import Histogram, render
from block.protocol import (
    INSTANCE_HEADER,
    PREDICTED_TOKENS_HEADER,
    REQUEST_ID_HEADER,
    PredictRequest,
    PredictResponse,
    ProtocolError,
)
from block.routing import FALLBACKS, NoCandidates, Router, RoutingDecision
from block.scheduler.registry import Registry
from simulator.workload import Request
from store.schema import RequestRow

LengthEstimator = Callable[[str], int]


class _BrokenBeforeFirstToken(Exception):
    pass


class Scheduler:
    def __init__(self, instances: dict[str, str], policy: str, served_models: list[str], max_model_len: int,
                 *, predict_budget_s: float = 0.02, admin_token: str | None = None, sink: EventSink | None = None,
                 estimator: LengthEstimator | None = None, poll_interval: float = 0.1, seed: int = 0):
        self.registry = Registry(instances, poll_interval=poll_interval)
        self.router = Router(make_policy(policy, seed=seed))
        self.served_models = served_models
        self.max_model_len = max_model_len
        self.predict_budget_s = predict_budget_s
        self.admin_token = admin_token
        self.sink = sink or EventSink(None, "")
        self.estimator = estimator
        self.client: aiohttp.ClientSession | None = None
        self.decision_latency = Histogram()
        self.requests_total = 0
        self.errors_total = 0
        self.retries_total = 0
        self.fallbacks = dict.fromkeys(FALLBACKS, 0)
        self.predict_calls_total = 0
        self.cancelled_total = 0

    @property
    def policy(self) -> Policy:
        return self.router.policy

    @property
    def instances(self):
        return self.registry.instances

    def set_policy(self, name: str) -> None:
        self.router = Router(make_policy(name))

    # ---- routing --------------------------------------------------------------------------------
    async def _predict(self, cand: Candidate, req: Request, target: str) -> None:
        assert self.client is not None
        self.predict_calls_total += 1
        body = orjson.dumps(PredictRequest.for_request(req, target).to_dict())
        try:
            async with self.client.post(self.registry[cand.name].url + "/predict", data=body,
                                        headers={"content-type": "application/json"}) as resp:
                resp.raise_for_status()
                reply = PredictResponse.from_dict(orjson.loads(await resp.read()))
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, ProtocolError):
            return  # counted as a missing prediction
        cand.predictions[target] = reply.predictions[0]
        if reply.predictor:
            self.registry[cand.name].predictor = reply.predictor

    async def decide(self, req: Request, rid: str, excluded: set[str]) -> RoutingDecision:
        try:
            plan = self.router.plan(req, self.registry.candidates(excluded))
        except NoCandidates as exc:
            raise oa.ApiError(503, self.registry.unavailable()) from exc
        if plan.target is not None:
            tasks = [asyncio.create_task(self._predict(c, plan.request, plan.target)) for c in plan.shortlist]
            _, late = await asyncio.wait(tasks, timeout=self.predict_budget_s)
            for task in late:  # missed the budget: the policy decides without them
                task.cancel()
        decision = self.router.decide(plan, request_id=rid, ts=time.time(),
                                      predictor=self.registry.labels(plan.shortlist))
        self.fallbacks[decision.fallback] += 1
        self.decision_latency.observe(decision.decision_s)
        if self.sink.enabled:
            self.sink.emit(decision.row())
        return decision

    async def _estimate(self, parsed: oa.CompletionRequest) -> int | None:
        """The length estimate, computed in a worker thread: the encoder must not stall other requests."""
        if self.estimator is None or not self.policy.uses_length_estimates or not parsed.prompt_text.strip():
            return None
        return max(1, int(await asyncio.to_thread(self.estimator, parsed.prompt_text)))

    async def handle(self, request: HttpRequest, kind: str) -> Response:
        assert self.client is not None
        arrival = time.time()
        self.requests_total += 1
        rid = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        body = await request.body()
        parsed = oa.parse_request(body, kind, self.served_models, self.max_model_len)
        estimate = await self._estimate(parsed)
        req = Request(self.requests_total, arrival, parsed.prompt_tokens, 1, estimate)
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        headers = {"content-type": "application/json", REQUEST_ID_HEADER: rid}
        if estimate is not None:
            headers[PREDICTED_TOKENS_HEADER] = str(estimate)
        excluded: set[str] = set()
        retries = 0
        while True:
            try:
                choice = (await self.decide(req, rid, excluded)).choice
            except oa.ApiError as err:
                self._record(rid, None, arrival, None, parsed, 0, "error", err.message, retries)
                raise
            inst = self.registry[choice]
            self.registry.dispatched(choice, req)
            try:
                resp = await self.client.post(inst.url + path, data=body, headers=headers)
                if resp.status >= 500:
                    detail = (await resp.read())[:300].decode("utf-8", "replace")
                    resp.release()
                    raise _BrokenBeforeFirstToken(f"HTTP {resp.status}: {detail}")
                chunks = resp.content.iter_any()
                first = await self._first_chunk(resp, chunks, parsed.stream)
            except (aiohttp.ClientError, TimeoutError, _BrokenBeforeFirstToken) as exc:
                inst.failures += 1
                self.registry.mark_down(inst, f"failed before the first token: {exc!r}")
                excluded.add(choice)
                retries += 1
                self.retries_total += 1
                continue
            if resp.status != 200:  # a 4xx from the engine: the client's problem, pass it on
                resp.release()
                self.errors_total += 1
                self._record(rid, choice, arrival, None, parsed, 0, "error", first[:300].decode(), retries)
                return Response(first, status_code=resp.status, media_type="application/json")
            return self._stream_back(resp, chunks, first, rid, choice, arrival, parsed, retries)

    async def _first_chunk(self, resp: aiohttp.ClientResponse, chunks: AsyncIterator[bytes],
                           stream: bool) -> bytes:
        """Read until the first token (streaming) or the whole body, so a failure can still be retried."""
        if not stream or resp.status != 200:
            try:
                return await resp.read()
            except aiohttp.ClientError as exc:
                resp.release()
                raise _BrokenBeforeFirstToken(str(exc)) from exc
        buf = b""
        try:
            async for data in chunks:
                buf += data
                if b"\n\n" in buf:
                    return buf
        except aiohttp.ClientError as exc:
            resp.release()
            raise _BrokenBeforeFirstToken(str(exc)) from exc
        resp.release()
        if b"data:" not in buf:
            raise _BrokenBeforeFirstToken("upstream closed without a token")
        return buf

    def _stream_back(self, resp: aiohttp.ClientResponse, chunks: AsyncIterator[bytes], first: bytes, rid: str,
                     choice: str, arrival: float, parsed: oa.CompletionRequest, retries: int) -> Response:
        first_ts = time.time()
        if not parsed.stream:
            resp.release()
            try:
                tokens = orjson.loads(first).get("usage", {}).get("completion_tokens", 0)
            except orjson.JSONDecodeError:
                tokens = 0
            self._record(rid, choice, arrival, first_ts, parsed, tokens, "ok", "", retries)
            return Response(first, media_type="application/json", headers={INSTANCE_HEADER: choice})
        events = [first.count(b"data: {")]

        def count(data: bytes) -> None:
            events[0] += data.count(b"data: {")

        def end(status: str, error: str) -> None:
            if status == "error":
                self.errors_total += 1
            elif status == "cancelled":
                self.cancelled_total += 1
            self._record(rid, choice, arrival, first_ts, parsed, max(0, events[0] - 1), status, error, retries)

        return StreamingResponse(relay(resp, chunks, first=first, on_chunk=count, on_end=end,
                                       upstream=f"instance {choice}"),
                                 media_type="text/event-stream", headers={INSTANCE_HEADER: choice})

    # ---- events and telemetry -------------------------------------------------------------------
    def _record(self, rid: str, instance: str | None, arrival: float, first_ts: float | None,
                parsed: oa.CompletionRequest, tokens: int, status: str, error: str, retries: int) -> None:
        finish = time.time()
        self.sink.emit(RequestRow(
            request_id=rid, source="scheduler", instance=instance, policy=self.policy.name, arrival_ts=arrival,
            first_token_ts=first_ts, finish_ts=finish, prompt_tokens=parsed.prompt_tokens, output_tokens=tokens,
            ttft=(first_ts - arrival) if first_ts else None, e2e=finish - arrival, status=status,
            error=error[:500], retries=retries))

    def metrics_text(self) -> str:
        lines = [
            ("block:scheduler_requests_total", "counter", "Requests received.", "", self.requests_total),
            ("block:scheduler_errors_total", "counter", "Requests answered with an error.", "", self.errors_total),
            ("block:scheduler_retries_total", "counter", "Retries on another instance.", "", self.retries_total),
            ("block:scheduler_predict_calls_total", "counter", "Predictions requested from side-cars.", "",
             self.predict_calls_total),
            ("block:scheduler_cancelled_total", "counter", "Client disconnects.", "", self.cancelled_total),
            ("block:scheduler_decision_seconds", "histogram", "Routing decision latency.", "",
             self.decision_latency),
        ]
        for kind in ("partial", "all"):
            lines.append(("block:scheduler_prediction_fallbacks_total", "counter",
                          "Decisions where some (partial) or every (all) asked predictor did not answer in time.",
                          f'kind="{kind}"', self.fallbacks[kind]))
        for inst in self.instances.values():
            lines.append(("block:scheduler_instance_up", "gauge", "1 when routable.", f'instance="{inst.name}"',
                          int(inst.status == "up")))
        return render(lines)

    def check_admin(self, request: HttpRequest) -> None:
        if not self.admin_token:
            raise oa.ApiError(403, "admin routes are disabled: start the scheduler with --admin-token")
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.admin_token}".encode()):
            raise oa.ApiError(401, "missing or wrong bearer token for /admin")


async def _json_object(request: HttpRequest) -> dict:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise oa.ApiError(400, f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise oa.ApiError(400, "body must be a JSON object")
    return body


def build_app(sched: Scheduler) -> Starlette:
    registry = sched.registry

    async def completions(request: HttpRequest) -> Response:
        return await sched.handle(request, "completions")

    async def chat(request: HttpRequest) -> Response:
        return await sched.handle(request, "chat")

    async def models(request: HttpRequest) -> Response:
        return JSONResponse(oa.models_response(sched.served_models, sched.max_model_len, "block-scheduler"))

    async def health(request: HttpRequest) -> Response:
        up = registry.up()
        if up:
            return JSONResponse({"status": "ok", "instances_up": up})
        return JSONResponse({"status": "no instance up", "instances": registry.describe()}, status_code=503)

    async def metrics(request: HttpRequest) -> Response:
        return Response(sched.metrics_text(), media_type="text/plain; version=0.0.4")

    async def admin_instances(request: HttpRequest) -> Response:
        sched.check_admin(request)
        if request.method == "GET":
            return JSONResponse(registry.describe())
        body = await _json_object(request)
        name, url = body.get("name"), body.get("url")
        if not isinstance(name, str) or not isinstance(url, str) or not url.startswith("http"):
            raise oa.ApiError(400, "register with {\"name\": str, \"url\": \"http://host:port\"}")
        if name in registry:
            raise oa.ApiError(409, f"instance {name!r} is already registered")
        assert sched.client is not None
        await registry.poll_one(sched.client, registry.add(name, url))
        return JSONResponse(registry.describe(), status_code=201)

    async def admin_instance(request: HttpRequest) -> Response:
        sched.check_admin(request)
        name = request.path_params["name"]
        action = request.path_params.get("action")
        if name not in registry:
            raise oa.ApiError(404, f"no instance {name!r}; instances: {sorted(registry.instances)}")
        if request.method == "DELETE":
            registry.remove(name)
        elif action == "drain":
            registry[name].status = "draining"
        elif action == "undrain":
            registry[name].status = "up"
        else:
            raise oa.ApiError(404, f"unknown action {action!r}; use drain, undrain or DELETE")
        return JSONResponse(registry.describe())

    async def admin_policy(request: HttpRequest) -> Response:
        sched.check_admin(request)
        if request.method == "POST":
            try:
                sched.set_policy(str((await _json_object(request)).get("policy")))
            except ValueError as exc:
                raise oa.ApiError(400, str(exc), "policy") from exc
        return JSONResponse({"policy": sched.policy.name})

    async def api_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, oa.ApiError)
        sched.errors_total += 1
        return Response(exc.body(), status_code=exc.status, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        sched.client = proxy_session()
        await sched.sink.start()
        await registry.poll_all(sched.client)
        async with background(registry.poll_forever(sched.client)):
            yield
        await sched.sink.stop()
        await sched.client.close()

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/admin/instances", admin_instances, methods=["GET", "POST"]),
        Route("/admin/instances/{name}", admin_instance, methods=["DELETE"]),
        Route("/admin/instances/{name}/{action}", admin_instance, methods=["POST"]),
        Route("/admin/policy", admin_policy, methods=["GET", "POST"]),
    ], exception_handlers={oa.ApiError: api_error}, lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description="Block global scheduler (OpenAI-compatible)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--instance", action="append", default=[], metavar="NAME=SIDECAR_URL")
    p.add_argument("--policy", default="block")
    p.add_argument("--served-model-name", action="append", default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--predict-budget-ms", type=float, default=20.0)
    p.add_argument("--admin-token", default=os.environ.get("BLOCK_ADMIN_TOKEN"))
    p.add_argument("--collector-url")
    p.add_argument("--run-id", default="live")
    p.add_argument("--length-model", help="length estimator file (block length train); used by block_star")
    args = p.parse_args(argv)
    instances = {}
    for item in args.instance:
        name, sep, url = item.partition("=")
        if not sep:
            p.error(f"--instance takes NAME=URL, got {item!r}")
        instances[name] = url
    estimator = None
    if args.length_model:
        from block.length.estimator import LengthEstimator

        estimator = LengthEstimator.load(args.length_model)  # loaded once, serves in-process
    sched = Scheduler(instances, args.policy, args.served_model_name or ["Llama-2-7B"], args.max_model_len,
                      predict_budget_s=args.predict_budget_ms / 1e3, admin_token=args.admin_token,
                      sink=EventSink(args.collector_url, args.run_id), estimator=estimator)
    uvicorn.run(build_app(sched), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
