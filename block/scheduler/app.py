"""The global scheduler: an OpenAI-compatible front door that routes each request by policy.

Per request: admit it (at most ``max_inflight`` at once; beyond that a 429 with Retry-After sheds the load
before queues grow to seconds), validate, optionally estimate the response length (off the event loop),
let the shared ``Router`` plan, predict for the shortlisted instances, let the policy choose, forward and
stream back. Predictions are made in-process from each side-car's mirrored state and model
(``block.scheduler.mirror``) within a compute budget checked between candidates; only a side-car whose
mirror is older than its bound is asked ``/predict`` over HTTP (counted as stale), concurrently, within
the prediction budget (``--prediction-source fanout`` asks every shortlisted side-car that way). The
registry (``registry``) keeps the instances, their polled signals, mirrors and outlier ejections; this
module holds the routes and the per-request work.

Failures: a side-car that misses the prediction budget is skipped (the decision records a partial or
full fallback to live signals). Every upstream request has a connect timeout, a first-byte timeout (a
stream's first event) or, for a non-streaming answer that arrives whole, a response timeout, and an idle
timeout between chunks, so a stopped or hung instance costs a request at most that long. A failure
before the first token marks the instance down, counts towards its ejection and is retried elsewhere; a
client that disconnects cancels the upstream request, streaming or not. Every error names its cause, and
every ``ApiError`` becomes a response in one exception handler.

Records: every admitted request leaves exactly one ``RequestRow`` under the scheduler's own id (unique,
returned in ``x-block-request-id``), beside the client's ``x-request-id``; status ``ok``, ``error`` (with
what failed), ``cancelled`` (the client left) or ``rejected`` (over capacity). A stream is ``ok`` only
when it ended with ``data: [DONE]`` and carried no error event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import aiohttp
import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from block import openai_api as oa
from block.events import EventSink
from block.http import (
    ERROR_EVENT,
    ClientGone,
    Relay,
    RelayResponse,
    TokenCounter,
    background,
    error_message,
    proxy_session,
    run_server,
    until_disconnected,
)
from block.policies import Candidate, Policy, Rejected, make_policy
from block.prefix_index import ApproximatePrefixIndex, prompt_hashes
from block.prometheus import CONTENT_TYPE, Exposition, Histogram, Sample
from block.protocol import (
    BLOCK_REQUEST_ID_HEADER,
    INSTANCE_HEADER,
    PREDICTED_TOKENS_HEADER,
    REQUEST_ID_HEADER,
    PredictRequest,
    PredictResponse,
    ProtocolError,
    parse_slo_headers,
    text_block_hashes,
)
from block.routing import FALLBACKS, NoCandidates, Router, RoutingDecision, RoutingPlan
from block.scheduler.mirror import CANDIDATE_ID
from block.scheduler.registry import Instance, OutlierDetection, Registry
from simulator.workload import Request
from store.auth import ADMIN_TOKEN_ENV, ADMIN_TOKEN_FILE_ENV, admin_token, token_for
from store.schema import RequestRow

LengthEstimator = Callable[[str], int]

TIMEOUT_KINDS = ("connect", "first_byte", "response", "idle")
PREDICTION_SOURCES = ("mirror", "fanout")
BLOCK_SIZE = 16  # tokens per KV block, vLLM's default: how prompts are hashed for prefix matching


@dataclass(frozen=True)
class Timeouts:
    """How long the scheduler waits on an instance, per upstream request, in seconds.

    ``first_byte`` bounds a stream's wait for its first event (time to first token, queueing included);
    a non-streaming answer is sent whole when generation ends, so it has no first byte to wait for and
    ``response`` bounds all of it instead; ``idle`` bounds the gap between two chunks of a stream.
    """

    connect: float = 2.0
    first_byte: float = 60.0
    idle: float = 30.0
    response: float = 600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"the {f.name} timeout must be > 0 s, got {getattr(self, f.name)}")


class _Failed(Exception):
    """An attempt that failed before the first token. ``kind`` names it; ``gateway`` says whether it counts
    as a gateway failure for ejection (everything but a plain 5xx or an engine's own error); ``retry``
    says whether another instance may be tried (not after a whole response timeout)."""

    def __init__(self, kind: str, message: str, *, gateway: bool = True, retry: bool = True):
        super().__init__(message)
        self.kind = kind
        self.gateway = gateway
        self.retry = retry


@dataclass
class _Call:
    """One client request as the scheduler records it: one RequestRow, whatever happens to it."""

    rid: str
    client_rid: str | None
    arrival: float
    parsed: oa.CompletionRequest | None = None
    slo: tuple[float | None, float | None] = (None, None)  # the client's TTFT and TPOT objectives, seconds
    instance: str | None = None
    first_ts: float | None = None
    retries: int = 0
    failures: list[str] = field(default_factory=list)
    timed_out: bool = False  # the last failed attempt hit a timeout
    gave_up: bool = False
    admitted: bool = False
    released: bool = False
    streaming: bool = False
    recorded: bool = False


class Scheduler:
    def __init__(self, instances: dict[str, str], policy: str, served_models: list[str], max_model_len: int,
                 *, predict_budget_s: float = 0.02, admin_token: str | None = None, sink: EventSink | None = None,
                 estimator: LengthEstimator | None = None, poll_interval: float = 0.1, seed: int = 0,
                 timeouts: Timeouts | None = None, outliers: OutlierDetection | None = None,
                 max_inflight: int = 1024, max_retries: int = 2, retry_after_s: int = 1,
                 cluster_token: str | None = None, prediction_source: str = "mirror",
                 mirror_max_age_s: float = 0.25, mirror_budget_s: float = 0.004):
        if max_inflight < 1 or max_retries < 0 or retry_after_s < 1:
            raise ValueError(f"need max_inflight >= 1, max_retries >= 0 and retry_after_s >= 1; got "
                             f"{max_inflight}, {max_retries} and {retry_after_s}")
        if prediction_source not in PREDICTION_SOURCES:
            raise ValueError(f"unknown prediction source {prediction_source!r}; choose one of {PREDICTION_SOURCES}")
        if mirror_max_age_s <= 0 or mirror_budget_s <= 0:
            raise ValueError(f"need a mirror age bound and a compute budget > 0; got {mirror_max_age_s} s and "
                             f"{mirror_budget_s} s")
        self.registry = Registry(instances, poll_interval=poll_interval, outliers=outliers,
                                 mirror_max_age_s=mirror_max_age_s if prediction_source == "mirror" else None)
        self.prediction_source = prediction_source
        self.prefix_index = ApproximatePrefixIndex()  # what this scheduler routed where (approximate peers)
        self.mirror_budget_s = mirror_budget_s
        self.router = Router(make_policy(policy, seed=seed))
        self.served_models = served_models
        self.max_model_len = max_model_len
        self.predict_budget_s = predict_budget_s
        self.admin_token = admin_token
        self.cluster_token = cluster_token
        self.sink = sink or EventSink(None, "")
        self.estimator = estimator
        self.timeouts = timeouts or Timeouts()
        self.max_inflight = max_inflight
        self.max_retries = max_retries
        self.retry_after_s = retry_after_s
        self.client: aiohttp.ClientSession | None = None
        self.stopping = False  # set by the shutdown signal: streams cut after it are errors, not client exits
        self.inflight = 0
        self.decision_latency = Histogram()
        self.requests_total = 0
        self.errors_total = 0
        self.retries_total = 0
        self.rejected_total = 0
        self.slo_rejected_total = 0  # refused by an SLO-aware policy: no instance predicted to meet the SLO
        self.fallbacks = dict.fromkeys(FALLBACKS, 0)
        self.predict_calls_total = 0
        self.mirror_predictions_total = 0
        self.mirror_stale_total = 0  # shortlisted instances whose mirror was past its bound: asked over HTTP
        self.mirror_over_budget_total = 0  # predictions skipped because the compute budget was spent
        self.cancelled_total = 0
        self.timeouts_total = dict.fromkeys(TIMEOUT_KINDS, 0)

    @property
    def policy(self) -> Policy:
        return self.router.policy

    @property
    def instances(self) -> dict[str, Instance]:
        return self.registry.instances

    def set_policy(self, name: str) -> None:
        self.router = Router(make_policy(name))

    def session(self) -> aiohttp.ClientSession:
        """The pooled client to the side-cars, carrying the cluster token when one is configured."""
        headers = {"authorization": f"Bearer {self.cluster_token}"} if self.cluster_token else None
        return proxy_session(headers)

    # ---- routing --------------------------------------------------------------------------------
    async def _predict(self, cand: Candidate, req: Request, target: str) -> None:
        assert self.client is not None
        self.predict_calls_total += 1
        body = orjson.dumps(PredictRequest.for_request(req, target, self.policy.wants_impact).to_dict())
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

    def _predict_mirrored(self, plan: RoutingPlan) -> list[Candidate]:
        """Predict in-process for the shortlisted instances seen through a current mirror, least loaded
        first, until the compute budget is spent (the rest decide on load signals: a partial fallback, by
        construction, not by hoping the event loop is free). Returns those without a current mirror."""
        assert plan.target is not None
        deadline = plan.started + self.mirror_budget_s
        remote = []
        request = replace(plan.request, id=CANDIDATE_ID)  # once, not per instance
        for c in sorted(plan.shortlist, key=lambda c: c.signals.unfinished_tokens):
            inst = self.registry[c.name]
            if inst.view is None:
                remote.append(c)
                self.mirror_stale_total += self.prediction_source == "mirror"
            elif time.perf_counter() >= deadline:
                self.mirror_over_budget_total += 1
            else:
                c.predictions[plan.target] = inst.mirror.predict(inst.view, request, plan.target,
                                                                 self.policy.wants_impact)
                self.mirror_predictions_total += 1
        return remote

    async def decide(self, req: Request, rid: str, excluded: set[str]) -> RoutingDecision:
        started = time.perf_counter()
        prompt = prompt_hashes(req, BLOCK_SIZE)
        source = self.policy.prefix_source
        try:
            plan = self.router.plan(req, self.registry.candidates(excluded, prompt, source, self.prefix_index),
                                    started)
        except NoCandidates as exc:
            raise oa.ApiError(503, self.registry.unavailable()) from exc
        if plan.target is not None:
            remote = self._predict_mirrored(plan)
            if remote:
                tasks = [asyncio.create_task(self._predict(c, plan.request, plan.target)) for c in remote]
                _, late = await asyncio.wait(tasks, timeout=self.predict_budget_s)
                for task in late:  # missed the budget: the policy decides without them
                    task.cancel()
        try:
            decision = self.router.decide(plan, request_id=rid, ts=time.time(),
                                          predictor=self.registry.labels(plan.shortlist))
        except Rejected as exc:  # no instance is predicted to meet the request's SLO: shed it now
            self.slo_rejected_total += 1
            retry = max(1, round(exc.retry_after_s))
            raise oa.ApiError(429, f"rejected: {exc}; retry after {retry} s",
                              headers={"retry-after": str(retry)}) from None
        if source == "approximate" and prompt:
            signals = self.registry[decision.choice].signals
            self.prefix_index.record(decision.choice, prompt, signals.total_blocks if signals else 1)
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
        """Serve one request and record it once, however it ends."""
        call = _Call(uuid.uuid4().hex, request.headers.get(REQUEST_ID_HEADER), time.time())
        self.requests_total += 1
        try:
            return await self._handle(request, kind, call)
        except oa.ApiError as err:
            err.headers[BLOCK_REQUEST_ID_HEADER] = call.rid
            if err.status == 429:
                self._record(call, "rejected", err.message)
            elif call.parsed is not None:  # a body that does not parse leaves no row: there is no request
                self._record(call, "error", err.message, attempts=not call.gave_up)
            raise
        except ClientGone:
            self.cancelled_total += 1
            self._record(call, "cancelled", "client disconnected before the first token; upstream request cancelled")
            return Response(status_code=499)
        except ClientDisconnect:  # left while sending its body: nothing was parsed or sent upstream
            return Response(status_code=499)
        except asyncio.CancelledError:
            self._record(call, "error" if self.stopping else "cancelled",
                         "scheduler shut down before the answer" if self.stopping else "request task cancelled")
            raise
        finally:
            if not call.streaming:
                self._release(call)

    async def _handle(self, request: HttpRequest, kind: str, call: _Call) -> Response:
        if self.inflight >= self.max_inflight:
            self.rejected_total += 1
            raise oa.ApiError(429, f"over capacity: {self.max_inflight} requests in flight at this scheduler; "
                                   f"retry after {self.retry_after_s} s",
                              headers={"retry-after": str(self.retry_after_s)})
        self.inflight += 1
        call.admitted = True
        body = await request.body()
        call.parsed = oa.parse_request(body, kind, self.served_models, self.max_model_len)
        try:
            call.slo = parse_slo_headers(request.headers)
        except ProtocolError as exc:
            raise oa.ApiError(400, str(exc), exc.field) from exc
        return await until_disconnected(request.receive, self._route(call, kind, body))

    async def _route(self, call: _Call, kind: str, body: bytes) -> Response:
        parsed = call.parsed
        assert parsed is not None
        estimate = await self._estimate(parsed)
        hashes = text_block_hashes(parsed.prompt_text, BLOCK_SIZE)[: parsed.prompt_tokens // BLOCK_SIZE]
        req = Request(self.requests_total, call.arrival, parsed.prompt_tokens, 1, estimate, block_hashes=hashes,
                      slo_ttft_s=call.slo[0], slo_tpot_s=call.slo[1])
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        headers = {"content-type": "application/json", REQUEST_ID_HEADER: call.client_rid or call.rid,
                   BLOCK_REQUEST_ID_HEADER: call.rid}
        if estimate is not None:
            headers[PREDICTED_TOKENS_HEADER] = str(estimate)
        excluded: set[str] = set()
        while True:
            try:
                choice = (await self.decide(req, call.rid, excluded)).choice
            except oa.ApiError:
                if call.failures:
                    raise self._gave_up(call) from None
                raise
            inst = self.registry[choice]
            call.instance = choice
            self.registry.dispatched(choice, req, call.rid)
            try:
                resp, first = await self._attempt(inst, path, body, headers, parsed.stream)
            except _Failed as exc:
                self._attempt_failed(call, inst, exc)
                if not exc.retry or call.retries >= self.max_retries:
                    raise self._gave_up(call) from None
                excluded.add(choice)
                call.retries += 1
                self.retries_total += 1
                continue
            self.registry.succeeded(inst)
            return self._respond(call, inst, resp, first)

    async def _attempt(self, inst: Instance, path: str, body: bytes, headers: dict[str, str],
                       stream: bool) -> tuple[aiohttp.ClientResponse, bytes]:
        """Send the request to one instance and read its first event (streaming) or its whole answer;
        raise _Failed naming what went wrong, with the connection closed."""
        assert self.client is not None
        t = self.timeouts
        limit = t.first_byte if stream else t.response
        deadline = asyncio.timeout(limit)
        resp: aiohttp.ClientResponse | None = None
        try:
            async with deadline:
                resp = await self.client.post(inst.url + path, data=body, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=t.connect))
                if resp.status >= 500:
                    detail = (await resp.read())[:300].decode("utf-8", "replace")
                    raise _Failed("http_5xx", f"HTTP {resp.status} before the first token: {detail}",
                                  gateway=resp.status in (502, 503, 504))
                return resp, await self._first_chunk(resp, stream)
        except _Failed:
            if resp is not None:
                resp.close()
            raise
        except aiohttp.ConnectionTimeoutError:
            raise _Failed("connect_timeout", f"connect timeout: no connection to {inst.url} within {t.connect:g} s"
                          ) from None
        except TimeoutError as exc:
            if resp is not None:
                resp.close()
            if not deadline.expired():
                raise _Failed("connection", f"connection to {inst.url} failed: {exc!r}") from None
            if stream:
                raise _Failed("first_byte_timeout", f"first byte timeout: no token within {limit:g} s") from None
            raise _Failed("response_timeout", f"response timeout: no answer within {limit:g} s", retry=False
                          ) from None
        except aiohttp.ClientError as exc:
            if resp is not None:
                resp.close()
            raise _Failed("connection", f"connection to {inst.url} failed: {exc!r}") from None

    @staticmethod
    async def _first_chunk(resp: aiohttp.ClientResponse, stream: bool) -> bytes:
        """The whole body (non-streaming, or an error status), or the stream up to its first event.

        A stream whose first event is an error produced no token, so it is a failure to retry elsewhere."""
        if not stream or resp.status != 200:
            return await resp.read()
        buf = b""
        async for data in resp.content.iter_any():
            buf += data
            if b"\n\n" in buf:
                break
        if b"\n\n" not in buf:
            raise _Failed("no_token", "upstream closed the stream before its first event")
        if buf.startswith(ERROR_EVENT):
            raise _Failed("upstream_error", f"error before the first token: {error_message(buf)}", gateway=False)
        return buf

    def _attempt_failed(self, call: _Call, inst: Instance, exc: _Failed) -> None:
        kind = exc.kind.removesuffix("_timeout")
        if kind in self.timeouts_total:
            self.timeouts_total[kind] += 1
        call.failures.append(f"{inst.name}: {exc}")
        self.registry.settled(inst.name, call.rid)
        call.timed_out = exc.kind.endswith("_timeout")
        self.registry.mark_down(inst, f"failed before the first token: {exc}")
        self.registry.failed(inst, str(exc), gateway=exc.gateway)

    def _gave_up(self, call: _Call) -> oa.ApiError:
        call.gave_up = True
        return oa.ApiError(504 if call.timed_out else 502, f"no instance answered before the first token "
                                                      f"({len(call.failures)} tried): {'; '.join(call.failures)}")

    def _respond(self, call: _Call, inst: Instance, resp: aiohttp.ClientResponse, first: bytes) -> Response:
        call.first_ts = time.time()
        parsed = call.parsed
        assert parsed is not None
        headers = {INSTANCE_HEADER: inst.name, BLOCK_REQUEST_ID_HEADER: call.rid}
        if resp.status != 200:  # a 4xx from the engine: the client's problem, pass it on
            resp.release()
            self.errors_total += 1
            self._record(call, "error", first[:300].decode("utf-8", "replace"))
            return Response(first, status_code=resp.status, media_type="application/json", headers=headers)
        if not parsed.stream:
            resp.release()
            try:
                tokens = int(orjson.loads(first).get("usage", {}).get("completion_tokens", 0))
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                tokens = 0
            self._record(call, "ok", "", tokens)
            return Response(first, media_type="application/json", headers=headers)
        counter = TokenCounter()
        counter.feed(first)

        def end(status: str, error: str) -> None:
            if status == "cancelled" and self.stopping:
                status, error = "error", "scheduler shut down mid-stream"
            elif status == "cancelled":
                self.cancelled_total += 1
            if status == "error":
                self.errors_total += 1
            if relay.failure == "idle_timeout":
                self.timeouts_total["idle"] += 1
            if relay.failure is not None:
                self.registry.failed(inst, error, gateway=relay.failure != "upstream_error")
            self._record(call, status, error, counter.total)

        relay = Relay(resp, resp.content.iter_any(), first=first, on_chunk=counter.feed, on_end=end,
                      upstream=f"instance {inst.name}", idle_timeout=self.timeouts.idle)
        call.streaming = True
        return RelayResponse(relay, headers)

    # ---- events and telemetry -------------------------------------------------------------------
    def _release(self, call: _Call) -> None:
        if call.admitted and not call.released:
            call.released = True
            self.inflight -= 1

    def _record(self, call: _Call, status: str, error: str, tokens: int = 0, *, attempts: bool = True) -> None:
        """The request's one row; ``attempts`` appends the failed attempts that were retried."""
        if call.recorded:
            return
        call.recorded = True
        self._release(call)
        if call.instance:
            self.registry.settled(call.instance, call.rid)
        if attempts and call.failures:
            retried = "retried after " + "; ".join(call.failures)
            error = f"{error} ({retried})" if error else retried
        finish = time.time()
        first_ts = call.first_ts
        self.sink.emit(RequestRow(
            request_id=call.rid, client_request_id=call.client_rid, source="scheduler", instance=call.instance,
            policy=self.policy.name, arrival_ts=call.arrival, first_token_ts=first_ts, finish_ts=finish,
            prompt_tokens=call.parsed.prompt_tokens if call.parsed else 0, output_tokens=tokens,
            ttft=(first_ts - call.arrival) if first_ts else None, e2e=finish - call.arrival, status=status,
            error=error[:500], retries=call.retries))

    async def drained(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until every admitted request has recorded its row."""
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def metric_samples(self) -> list[Sample]:
        lines: list[Sample] = [
            ("block:scheduler_requests_total", "counter", "Requests received.", {}, self.requests_total),
            ("block:scheduler_errors_total", "counter", "Requests answered with an error.", {}, self.errors_total),
            ("block:scheduler_retries_total", "counter", "Retries on another instance.", {}, self.retries_total),
            ("block:scheduler_rejected_total", "counter", "Requests refused with 429: over --max-inflight.", {},
             self.rejected_total),
            ("block:scheduler_slo_rejected_total", "counter",
             "Requests refused with 429 because no instance was predicted to meet their SLO.", {},
             self.slo_rejected_total),
            ("block:scheduler_inflight", "gauge", "Requests admitted and not finished.", {}, self.inflight),
            ("block:scheduler_predict_calls_total", "counter", "Predictions requested from side-cars.", {},
             self.predict_calls_total),
            ("block:scheduler_mirror_predictions_total", "counter",
             "Predictions made in-process from a side-car's mirrored state.", {}, self.mirror_predictions_total),
            ("block:scheduler_mirror_stale_total", "counter",
             "Shortlisted instances whose mirror was older than its bound (asked over HTTP instead).", {},
             self.mirror_stale_total),
            ("block:scheduler_mirror_over_budget_total", "counter",
             "Mirror predictions skipped because the decision's compute budget was spent.", {},
             self.mirror_over_budget_total),
            ("block:scheduler_cancelled_total", "counter",
             "Client disconnects, streaming or not; each cancelled its upstream request.", {}, self.cancelled_total),
            ("block:scheduler_decision_seconds", "histogram", "Routing decision latency.", {},
             self.decision_latency),
        ]
        for kind in TIMEOUT_KINDS:
            lines.append(("block:scheduler_upstream_timeouts_total", "counter",
                          "Upstream requests that hit a timeout, by kind.", {"kind": kind},
                          self.timeouts_total[kind]))
        for kind in ("partial", "all"):
            lines.append(("block:scheduler_prediction_fallbacks_total", "counter",
                          "Decisions where some (partial) or every (all) asked predictor did not answer in time.",
                          {"kind": kind}, self.fallbacks[kind]))
        now = time.monotonic()
        for inst in self.instances.values():
            labels = {"instance": inst.name}
            lines.append(("block:scheduler_instance_up", "gauge", "1 when routable.", labels,
                          int(inst.status == "up" and not inst.ejected(now))))
            lines.append(("block:scheduler_instance_ejected", "gauge", "1 while ejected as an outlier.", labels,
                          int(inst.ejected(now))))
            lines.append(("block:scheduler_ejections_total", "counter", "Outlier ejections.", labels,
                          inst.ejections_total))
            if self.registry.mirror_max_age_s is not None and inst.mirror.messages_total:
                lines.append(("block:scheduler_mirror_age_seconds", "gauge",
                              "Age of the instance's newest mirrored state.", labels, inst.mirror.age()))
        return lines

    def check_admin(self, request: HttpRequest) -> None:
        if not self.admin_token:
            raise oa.ApiError(403, f"admin routes are disabled: start the scheduler with {ADMIN_TOKEN_ENV} or "
                                   f"{ADMIN_TOKEN_FILE_ENV} set")
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.admin_token}".encode()):
            raise oa.ApiError(401, "missing or wrong bearer token for /admin")


async def _json_object(request: HttpRequest) -> dict:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise oa.ApiError(400, f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise oa.ApiError(400, f"body must be a JSON object, got {type(body).__name__}")
    return body


def build_app(sched: Scheduler) -> Starlette:
    registry = sched.registry
    exposition = Exposition(sched.metric_samples)  # this scheduler's own Prometheus registry

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
        return Response(exposition.render(), media_type=CONTENT_TYPE)

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
            name = (await _json_object(request)).get("policy")
            if not isinstance(name, str):
                raise oa.ApiError(400, f"'policy' must be a string naming a policy, got {name!r}", "policy")
            try:
                sched.set_policy(name)
            except ValueError as exc:
                raise oa.ApiError(400, str(exc), "policy") from exc
        return JSONResponse({"policy": sched.policy.name})

    async def api_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, oa.ApiError)
        sched.errors_total += 1
        return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        sched.client = sched.session()
        await sched.sink.start()
        await registry.poll_all(sched.client)
        tasks = [registry.poll_forever(sched.client)]
        if registry.mirror_max_age_s is not None:
            tasks.append(registry.follow_forever(sched.client))
        async with background(*tasks):
            yield
        await sched.drained(2.0)  # requests cut by the shutdown record their rows before the last flush
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
    p = argparse.ArgumentParser(
        description="Block global scheduler (OpenAI-compatible). The admin API needs a token from "
                    f"{ADMIN_TOKEN_ENV} or {ADMIN_TOKEN_FILE_ENV}; off loopback a cluster token is required too.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--instance", action="append", default=[], metavar="NAME=SIDECAR_URL")
    p.add_argument("--policy", default="block")
    p.add_argument("--served-model-name", action="append", default=None)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--predict-budget-ms", type=float, default=20.0,
                   help="wait at most this long for side-cars asked /predict over HTTP (stale mirrors, fanout)")
    p.add_argument("--prediction-source", choices=PREDICTION_SOURCES, default="mirror",
                   help="mirror: predict in-process from the side-cars' streamed states; fanout: ask each side-car")
    p.add_argument("--mirror-max-age-ms", type=float, default=250.0,
                   help="a mirror older than this is not used; that side-car is asked over HTTP (counted)")
    p.add_argument("--mirror-budget-ms", type=float, default=4.0,
                   help="in-process prediction time per decision; candidates beyond it fall back to load signals")
    p.add_argument("--collector-url")
    p.add_argument("--run-id", default="live")
    p.add_argument("--journal", help="folder where request and decision rows are journalled before they are "
                                     "sent, so a scheduler killed with SIGKILL loses none (sent on restart)")
    p.add_argument("--length-model", help="length estimator file (block length train); used by block_star")
    t = Timeouts()
    p.add_argument("--connect-timeout", type=float, default=t.connect, help="seconds to connect to a side-car")
    p.add_argument("--first-byte-timeout", type=float, default=t.first_byte,
                   help="seconds a stream may wait for its first event (time to first token)")
    p.add_argument("--idle-timeout", type=float, default=t.idle, help="seconds between two chunks of a stream")
    p.add_argument("--response-timeout", type=float, default=t.response,
                   help="seconds for a whole non-streaming answer")
    p.add_argument("--max-retries", type=int, default=2, help="other instances tried after a pre-token failure")
    p.add_argument("--max-inflight", type=int, default=1024, help="requests at once; beyond it 429 + Retry-After")
    od = OutlierDetection()
    p.add_argument("--eject-consecutive-5xx", type=int, default=od.consecutive_5xx,
                   help="consecutive failures of any kind that eject an instance")
    p.add_argument("--eject-consecutive-gateway", type=int, default=od.consecutive_gateway_failure,
                   help="consecutive 502/503/504, connection errors or timeouts that eject an instance")
    p.add_argument("--eject-base-s", type=float, default=od.base_ejection_s,
                   help="ejection time, multiplied by the number of times the instance was ejected")
    p.add_argument("--eject-max-s", type=float, default=od.max_ejection_s, help="longest ejection")
    p.add_argument("--eject-max-percent", type=float, default=od.max_ejection_percent,
                   help="most instances ejected at once, in percent (one always may be)")
    p.add_argument("--graceful-timeout", type=float, default=5.0,
                   help="seconds open responses get after SIGTERM before they are cut and the rows flushed")
    args = p.parse_args(argv)
    instances = {}
    for item in args.instance:
        name, sep, url = item.partition("=")
        if not sep:
            p.error(f"--instance takes NAME=URL, got {item!r}")
        instances[name] = url
    try:
        admin = admin_token()
        cluster_token = token_for(args.host, "scheduler")
        timeouts = Timeouts(args.connect_timeout, args.first_byte_timeout, args.idle_timeout, args.response_timeout)
        outliers = OutlierDetection(args.eject_consecutive_5xx, args.eject_consecutive_gateway, args.eject_base_s,
                                    args.eject_max_s, args.eject_max_percent)
    except ValueError as exc:
        p.error(str(exc))
    estimator = None
    if args.length_model:
        from block.length.estimator import LengthEstimator

        estimator = LengthEstimator.load(args.length_model)  # loaded once, serves in-process
    try:
        sched = Scheduler(instances, args.policy, args.served_model_name or ["Llama-2-7B"], args.max_model_len,
                          predict_budget_s=args.predict_budget_ms / 1e3, admin_token=admin,
                          sink=EventSink(args.collector_url, args.run_id, journal=args.journal), estimator=estimator,
                          timeouts=timeouts, outliers=outliers, max_inflight=args.max_inflight,
                          max_retries=args.max_retries, cluster_token=cluster_token,
                          prediction_source=args.prediction_source, mirror_max_age_s=args.mirror_max_age_ms / 1e3,
                          mirror_budget_s=args.mirror_budget_ms / 1e3)
    except ValueError as exc:
        p.error(str(exc))

    def stopping() -> None:
        sched.stopping = True

    run_server(build_app(sched), args.host, args.port, graceful_timeout_s=args.graceful_timeout, on_signal=stopping)


if __name__ == "__main__":
    main()
