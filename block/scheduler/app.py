"""The global scheduler: an OpenAI-compatible front door that routes each request by policy.

Per request: validate, optionally estimate the response length, ask the candidates' side-cars for
predictions concurrently within a time budget, let the policy choose, forward and stream back.
Stateless across processes: each scheduler keeps only its own not-yet-visible dispatches, and the
side-cars hold the truth, so several schedulers can serve one cluster.

Failures: a side-car that misses the prediction budget is skipped (the policy falls back to live
signals); an instance that fails before the first token is marked down and the request is retried
elsewhere; a client that disconnects cancels the upstream request. Every error names its cause.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

import aiohttp
import orjson
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from block import openai_api as oa
from block.events import EventSink
from block.http import background, proxy_session
from block.policies import LoadSignals, Policy, make_policy
from block.predictor.core import LengthPrior, Prediction
from block.predictor.service import PREDICTED_HEADER
from block.prometheus import Histogram, render
from simulator.workload import Request

LengthEstimator = Callable[[str], int]


@dataclass
class Instance:
    name: str
    url: str  # the side-car's base URL
    status: str = "up"  # up | draining | down
    reason: str = ""
    signals: LoadSignals | None = None
    pending: list[tuple[float, Request]] = field(default_factory=list)
    dispatched_total: int = 0
    failures: int = 0


@dataclass
class LiveCandidate:
    name: str
    signals: LoadSignals
    dispatched: int
    predictions: dict[str, Prediction | None] = field(default_factory=dict)

    def prediction(self, request: Request, target: str) -> Prediction | None:
        return self.predictions.get(target)


class Scheduler:
    def __init__(self, instances: dict[str, str], policy: str, served_models: list[str], max_model_len: int,
                 *, predict_budget_s: float = 0.02, admin_token: str | None = None, sink: EventSink | None = None,
                 estimator: LengthEstimator | None = None, poll_interval: float = 0.1, seed: int = 0):
        self.instances = {name: Instance(name, url.rstrip("/")) for name, url in instances.items()}
        self.policy: Policy = make_policy(policy, seed=seed)
        self.served_models = served_models
        self.max_model_len = max_model_len
        self.predict_budget_s = predict_budget_s
        self.admin_token = admin_token
        self.sink = sink or EventSink(None, "")
        self.estimator = estimator
        self.poll_interval = poll_interval
        self.prior = LengthPrior.embedded()
        self.client: aiohttp.ClientSession | None = None
        self.decision_latency = Histogram()
        self.requests_total = 0
        self.errors_total = 0
        self.retries_total = 0
        self.fallbacks_total = 0
        self.cancelled_total = 0

    # ---- live signals -------------------------------------------------------------------------------
    async def _poll_one(self, inst: Instance) -> None:
        assert self.client is not None
        started = time.monotonic()
        try:
            async with self.client.get(inst.url + "/state?requests=0",
                                       timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                resp.raise_for_status()
                data = orjson.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            self._mark_down(inst, f"side-car {inst.url} unreachable: {exc!r}")
            return
        inst.signals = LoadSignals(**data["signals"])
        inst.pending = [(t, r) for t, r in inst.pending if t >= started]
        engine = data.get("engine") or {}
        if engine.get("ok") is False:
            self._mark_down(inst, engine.get("error") or "engine down")
        elif inst.status == "down":
            inst.status, inst.reason = "up", ""

    def _mark_down(self, inst: Instance, reason: str) -> None:
        if inst.status != "draining":
            inst.status = "down"
        inst.reason = reason

    async def poll_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._poll_one(i) for i in list(self.instances.values())))
            await asyncio.sleep(self.poll_interval)

    # ---- routing --------------------------------------------------------------------------------
    def _candidates(self, excluded: set[str]) -> list[LiveCandidate]:
        out = []
        for inst in self.instances.values():
            if inst.status != "up" or inst.name in excluded or inst.signals is None:
                continue
            pending = [r for _, r in inst.pending]
            out.append(LiveCandidate(inst.name, inst.signals.plus(pending, self.prior), len(pending)))
        return out

    async def _predict(self, cand: LiveCandidate, req: Request, target: str) -> None:
        assert self.client is not None
        body = {"target": target, "candidates": [{"prompt_tokens": req.prompt_tokens,
                                                   "predicted_output_tokens": req.predicted_output_tokens}]}
        try:
            async with self.client.post(self.instances[cand.name].url + "/predict", data=orjson.dumps(body),
                                        headers={"content-type": "application/json"}) as resp:
                resp.raise_for_status()
                d = orjson.loads(await resp.read())["predictions"][0]
            cand.predictions[target] = Prediction(**d)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, KeyError, TypeError):
            cand.predictions[target] = None

    async def decide(self, req: Request, excluded: set[str]) -> tuple[str, list[LiveCandidate], float]:
        t0 = time.perf_counter()
        cands = self._candidates(excluded)
        if not cands:
            reasons = "; ".join(f"{i.name}: {i.status} {i.reason}".strip() for i in self.instances.values())
            raise oa.ApiError(503, f"no instance available to serve the request ({reasons or 'none registered'})")
        target = self.policy.prediction_target
        if target is not None:
            probe = req if self.policy.uses_length_estimates else Request(
                req.id, req.arrival, req.prompt_tokens, 1, None)
            tasks = [asyncio.create_task(self._predict(c, probe, target)) for c in cands]
            _, late = await asyncio.wait(tasks, timeout=self.predict_budget_s)
            for task in late:  # missed the budget: skipped, the policy uses live signals for them
                task.cancel()
            if late or any(c.predictions.get(target) is None for c in cands):
                self.fallbacks_total += 1
        choice = self.policy.choose(req, cands)
        elapsed = time.perf_counter() - t0
        self.decision_latency.observe(elapsed)
        return choice, cands, elapsed

    async def handle(self, request: HttpRequest, kind: str) -> Response:
        assert self.client is not None
        arrival = time.time()
        self.requests_total += 1
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            parsed = oa.parse_request(await request.body(), kind, self.served_models, self.max_model_len)
        except oa.ApiError as err:
            self.errors_total += 1
            return Response(err.body(), status_code=err.status, media_type="application/json")
        estimate = None
        if self.estimator is not None and self.policy.uses_length_estimates and parsed.prompt_text.strip():
            estimate = max(1, int(self.estimator(parsed.prompt_text)))
        req = Request(self.requests_total, arrival, parsed.prompt_tokens, 1, estimate)
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        headers = {"content-type": "application/json", "x-request-id": rid}
        if estimate is not None:
            headers[PREDICTED_HEADER] = str(estimate)
        excluded: set[str] = set()
        retries = 0
        while True:
            try:
                choice, cands, decision_s = await self.decide(req, excluded)
            except oa.ApiError as err:
                self.errors_total += 1
                self._record(rid, None, arrival, None, parsed, 0, "error", err.message, retries)
                return Response(err.body(), status_code=err.status, media_type="application/json")
            inst = self.instances[choice]
            inst.pending.append((time.monotonic(), req))
            inst.dispatched_total += 1
            self._decision(rid, choice, cands, decision_s)
            try:
                resp = await self.client.post(inst.url + path, data=await request.body(), headers=headers)
                if resp.status >= 500:
                    detail = (await resp.read())[:300].decode("utf-8", "replace")
                    resp.release()
                    raise _BrokenBeforeFirstToken(f"HTTP {resp.status}: {detail}")
                chunks = resp.content.iter_any()
                first = await self._first_chunk(resp, chunks, parsed.stream)
            except (aiohttp.ClientError, TimeoutError, _BrokenBeforeFirstToken) as exc:
                inst.failures += 1
                self._mark_down(inst, f"failed before the first token: {exc!r}")
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
        if not parsed.stream:
            resp.release()
            first_ts = time.time()
            try:
                tokens = orjson.loads(first).get("usage", {}).get("completion_tokens", 0)
            except orjson.JSONDecodeError:
                tokens = 0
            self._record(rid, choice, arrival, first_ts, parsed, tokens, "ok", "", retries)
            return Response(first, media_type="application/json", headers={"x-block-instance": choice})
        first_ts = time.time()

        async def relay():
            status, error, tokens = "cancelled", "client disconnected", first.count(b"data: {")
            try:
                yield first
                async for data in chunks:
                    tokens += data.count(b"data: {")
                    yield data
                status, error = "ok", ""
            except aiohttp.ClientError as exc:
                status, error = "error", f"instance {choice} broke mid-stream: {exc!r}"
                self.errors_total += 1
                yield oa.sse({"error": {"message": error, "type": "APIError", "code": 502}})
            finally:
                if status == "ok":
                    resp.release()
                else:  # do not reuse a connection whose response was not read to the end
                    resp.close()
                if status == "cancelled":
                    self.cancelled_total += 1
                self._record(rid, choice, arrival, first_ts, parsed, max(0, tokens - 1), status, error, retries)

        return StreamingResponse(relay(), media_type="text/event-stream", headers={"x-block-instance": choice})

    # ---- events ---------------------------------------------------------------------------------
    def _decision(self, rid: str, choice: str, cands: list[LiveCandidate], decision_s: float) -> None:
        if not self.sink.enabled:
            return
        rows = []
        chosen: Prediction | None = None
        for c in cands:
            p = next((v for v in c.predictions.values() if v is not None), None)
            if c.name == choice:
                chosen = p
            rows.append({"instance": c.name, "running": c.signals.running, "waiting": c.signals.waiting,
                         "free_blocks": c.signals.free_blocks, "predicted_ttft": p.ttft if p else None,
                         "predicted_e2e": p.e2e if p else None})
        self.sink.emit("decisions", {
            "request_id": rid, "ts": time.time(), "policy": self.policy.name, "chosen": choice,
            "decision_ms": decision_s * 1e3, "fallback": any(not c.predictions or None in c.predictions.values()
                                                             for c in cands) and self.policy.uses_predictions,
            "predicted_ttft": chosen.ttft if chosen else None, "predicted_e2e": chosen.e2e if chosen else None,
            "candidates": orjson.dumps(rows).decode()})

    def _record(self, rid: str, instance: str | None, arrival: float, first_ts: float | None,
                parsed: oa.CompletionRequest, tokens: int, status: str, error: str, retries: int) -> None:
        finish = time.time()
        self.sink.emit("requests", {
            "request_id": rid, "source": "scheduler", "instance": instance, "policy": self.policy.name,
            "arrival_ts": arrival, "first_token_ts": first_ts, "finish_ts": finish,
            "prompt_tokens": parsed.prompt_tokens, "output_tokens": tokens,
            "ttft": (first_ts - arrival) if first_ts else None, "e2e": finish - arrival,
            "status": status, "error": error[:500], "retries": retries})

    def metrics_text(self) -> str:
        lines = [
            ("block:scheduler_requests_total", "counter", "Requests received.", "", self.requests_total),
            ("block:scheduler_errors_total", "counter", "Requests answered with an error.", "", self.errors_total),
            ("block:scheduler_retries_total", "counter", "Retries on another instance.", "", self.retries_total),
            ("block:scheduler_prediction_fallbacks_total", "counter",
             "Decisions where a predictor missed its budget.", "", self.fallbacks_total),
            ("block:scheduler_cancelled_total", "counter", "Client disconnects.", "", self.cancelled_total),
            ("block:scheduler_decision_seconds", "histogram", "Routing decision latency.", "",
             self.decision_latency),
        ]
        for inst in self.instances.values():
            lines.append(("block:scheduler_instance_up", "gauge", "1 when routable.", f'instance="{inst.name}"',
                          int(inst.status == "up")))
        return render(lines)

    # ---- admin ----------------------------------------------------------------------------------
    def check_admin(self, request: HttpRequest) -> None:
        if not self.admin_token:
            raise oa.ApiError(403, "admin routes are disabled: start the scheduler with --admin-token")
        if request.headers.get("authorization") != f"Bearer {self.admin_token}":
            raise oa.ApiError(401, "missing or wrong bearer token for /admin")

    def instances_json(self) -> list[dict]:
        return [{"name": i.name, "url": i.url, "status": i.status, "reason": i.reason,
                 "dispatched_total": i.dispatched_total, "failures": i.failures,
                 "signals": asdict(i.signals) if i.signals else None} for i in self.instances.values()]


class _BrokenBeforeFirstToken(Exception):
    pass


def build_app(sched: Scheduler) -> Starlette:
    async def completions(request: HttpRequest) -> Response:
        return await sched.handle(request, "completions")

    async def chat(request: HttpRequest) -> Response:
        return await sched.handle(request, "chat")

    async def models(request: HttpRequest) -> Response:
        return JSONResponse(oa.models_response(sched.served_models, sched.max_model_len, "block-scheduler"))

    async def health(request: HttpRequest) -> Response:
        up = [i.name for i in sched.instances.values() if i.status == "up"]
        if up:
            return JSONResponse({"status": "ok", "instances_up": up})
        return JSONResponse({"status": "no instance up", "instances": sched.instances_json()}, status_code=503)

    async def metrics(request: HttpRequest) -> Response:
        return Response(sched.metrics_text(), media_type="text/plain; version=0.0.4")

    async def admin_instances(request: HttpRequest) -> Response:
        try:
            sched.check_admin(request)
            if request.method == "GET":
                return JSONResponse(sched.instances_json())
            try:
                body = orjson.loads(await request.body())
            except orjson.JSONDecodeError as exc:
                raise oa.ApiError(400, f"body is not valid JSON: {exc}") from exc
            name, url = body.get("name"), body.get("url")
            if not isinstance(name, str) or not isinstance(url, str) or not url.startswith("http"):
                raise oa.ApiError(400, "register with {\"name\": str, \"url\": \"http://host:port\"}")
            if name in sched.instances:
                raise oa.ApiError(409, f"instance {name!r} is already registered")
            sched.instances[name] = Instance(name, url.rstrip("/"), status="down", reason="waiting for first poll")
            await sched._poll_one(sched.instances[name])
            return JSONResponse(sched.instances_json(), status_code=201)
        except oa.ApiError as err:
            return Response(err.body(), status_code=err.status, media_type="application/json")

    async def admin_instance(request: HttpRequest) -> Response:
        try:
            sched.check_admin(request)
            name = request.path_params["name"]
            action = request.path_params.get("action")
            if name not in sched.instances:
                raise oa.ApiError(404, f"no instance {name!r}; instances: {sorted(sched.instances)}")
            if request.method == "DELETE":
                del sched.instances[name]
            elif action == "drain":
                sched.instances[name].status = "draining"
            elif action == "undrain":
                sched.instances[name].status = "up"
            else:
                raise oa.ApiError(404, f"unknown action {action!r}; use drain, undrain or DELETE")
            return JSONResponse(sched.instances_json())
        except oa.ApiError as err:
            return Response(err.body(), status_code=err.status, media_type="application/json")

    async def admin_policy(request: HttpRequest) -> Response:
        try:
            sched.check_admin(request)
            if request.method == "POST":
                body = orjson.loads(await request.body())
                try:
                    sched.policy = make_policy(str(body.get("policy")))
                except ValueError as exc:
                    raise oa.ApiError(400, str(exc), "policy") from exc
            return JSONResponse({"policy": sched.policy.name})
        except orjson.JSONDecodeError as exc:
            return Response(oa.ApiError(400, f"body is not valid JSON: {exc}").body(), status_code=400,
                            media_type="application/json")
        except oa.ApiError as err:
            return Response(err.body(), status_code=err.status, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        sched.client = proxy_session()
        await sched.sink.start()
        await asyncio.gather(*(sched._poll_one(i) for i in list(sched.instances.values())))
        async with background(sched.poll_forever()):
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
    ], lifespan=lifespan)


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
