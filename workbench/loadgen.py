"""Open-loop load generator speaking the OpenAI API with streaming, measured from the client side.

Arrivals are fired at their scheduled times no matter how the server is doing (open loop), and the
schedule is drift-compensated: each request sleeps until its absolute start time, so slow iterations do
not accumulate into a lower rate. TTFT, ITL, TPOT and E2E are measured at the client, so routing and
proxy overheads are included. Summary names follow ``vllm bench serve``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import orjson

from block.events import EventSink
from simulator.workload import Request
from store.schema import RequestRow


@dataclass
class ClientRecord:
    request_id: str
    arrival_ts: float
    prompt_tokens: int
    max_tokens: int
    first_token_ts: float | None = None
    finish_ts: float | None = None
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list, repr=False)
    status: str = "pending"
    error: str = ""
    instance: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_ts is None else self.first_token_ts - self.arrival_ts

    @property
    def e2e(self) -> float | None:
        return None if self.finish_ts is None else self.finish_ts - self.arrival_ts

    @property
    def tpot(self) -> float | None:
        if self.finish_ts is None or self.first_token_ts is None or self.output_tokens < 2:
            return None
        return (self.finish_ts - self.first_token_ts) / (self.output_tokens - 1)

    def row(self, policy: str | None) -> RequestRow:
        """This request as the client saw it; the sink fills in the run."""
        return RequestRow(request_id=self.request_id, source="client", instance=self.instance, policy=policy,
                          arrival_ts=self.arrival_ts, first_token_ts=self.first_token_ts, finish_ts=self.finish_ts,
                          prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens, ttft=self.ttft,
                          e2e=self.e2e, tpot=self.tpot,
                          itl_mean=float(np.mean(self.itls)) if self.itls else None,
                          itl_max=float(np.max(self.itls)) if self.itls else None,
                          status=self.status, error=self.error[:500], retries=0)


def prompt_of(tokens: int) -> str:
    """A prompt the services count as exactly ``tokens`` tokens (4 characters each)."""
    return ("lore" * tokens)[: 4 * tokens]


def request_body(url: str, model: str, req: Request) -> dict:
    """A streamed completions body, or a chat body when ``url`` is a chat-completions endpoint. The prompt is
    the request's own text when it has one (shared-prefix and multi-turn workloads repeat prefixes byte for
    byte, so every hop's block hashes see the sharing), else filler of the right length."""
    body: dict = {"model": model, "max_tokens": req.output_tokens, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}}
    text = req.prompt if req.prompt is not None else prompt_of(req.prompt_tokens)
    if url.rstrip("/").endswith("chat/completions"):
        return body | {"messages": [{"role": "user", "content": text}]}
    return body | {"prompt": text}


async def _one(client: aiohttp.ClientSession, url: str, model: str, req: Request, rec: ClientRecord) -> None:
    body = request_body(url, model, req)
    last = None
    counted = None
    try:
        async with client.post(url, data=orjson.dumps(body),
                               headers={"content-type": "application/json", "x-request-id": rec.request_id}) as resp:
            rec.instance = resp.headers.get("x-block-instance")
            if resp.status != 200:
                rec.status, rec.error = "error", f"HTTP {resp.status}: {(await resp.read())[:300]!r}"
                rec.finish_ts = time.time()
                return
            buf = b""
            done = False
            async for data in resp.content.iter_any():
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if event == b"data: [DONE]":
                        done = True
                    if not event.startswith(b"data: ") or done:
                        continue
                    obj = orjson.loads(event[6:])
                    if "error" in obj:
                        rec.status, rec.error = "error", str(obj["error"].get("message"))
                        continue
                    usage = obj.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        counted = usage["completion_tokens"]  # tokens that decode to no text count too
                    for choice in obj.get("choices") or ():
                        text = choice.get("text") or (choice.get("delta") or {}).get("content")
                        if text:
                            now = time.time()
                            if rec.first_token_ts is None:
                                rec.first_token_ts = now
                            elif last is not None:
                                rec.itls.append(now - last)
                            last = now
                            rec.output_tokens += 1
        rec.finish_ts = time.time()
        if counted is not None:
            rec.output_tokens = counted
        if rec.status == "pending":  # a stream that stops without [DONE] was cut, however cleanly it closed
            rec.status, rec.error = ("ok", "") if done else ("error", "stream ended without [DONE]")
    except (aiohttp.ClientError, TimeoutError) as exc:
        rec.status, rec.error, rec.finish_ts = "error", f"{type(exc).__name__}: {exc}", time.time()


async def run_load(base_url: str | Sequence[str], requests: Sequence[Request], model: str, *,
                   sink: EventSink | None = None, policy: str | None = None,
                   progress: Callable[[int], None] | None = None, timeout_s: float = 600.0,
                   endpoint: str = "/v1/completions", max_concurrency: int | None = None) -> list[ClientRecord]:
    """Replay ``requests`` (arrival times in seconds from now) against an OpenAI-compatible server, or
    round-robin over several (to measure engines directly, without a router).

    ``max_concurrency`` caps requests in flight as ``vllm bench serve`` does: a request that arrives while
    the cap is reached waits for a slot, and its latencies count from when it is sent.
    """
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    bases = [base_url] if isinstance(base_url, str) else list(base_url)
    urls = [b.rstrip("/") + "/" + endpoint.lstrip("/") for b in bases]
    records: list[ClientRecord] = []
    slots = asyncio.Semaphore(max_concurrency or max(1, len(requests)))
    done = 0

    async def fire(req: Request, start: float) -> None:
        nonlocal done
        delay = start + req.arrival - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        async with slots:
            rec = ClientRecord(uuid.uuid4().hex, time.time(), req.prompt_tokens, req.output_tokens)
            records.append(rec)
            await _one(client, urls[req.id % len(urls)], model, req, rec)
        if sink is not None:
            sink.emit(rec.row(policy))
        done += 1
        if progress is not None:
            progress(done)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=5.0)) as client:
        start = time.monotonic() + 0.05
        first = min((r.arrival for r in requests), default=0.0)
        await asyncio.gather(*(fire(Request(r.id, r.arrival - first, r.prompt_tokens, r.output_tokens), start)
                               for r in requests))
    return records


def first_failure(records: Sequence[ClientRecord]) -> ClientRecord | None:
    """The earliest-sent failed request: its error is the cause to report, later ones usually repeat it."""
    failed = [r for r in records if r.status != "ok"]
    return min(failed, key=lambda r: r.arrival_ts) if failed else None


GOODPUT_METRICS = ("ttft", "tpot", "e2el")
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")


def _values(records: Sequence[ClientRecord], metric: str) -> list[float]:
    if metric == "itl":
        return [x for r in records for x in r.itls]
    attr = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2e"}[metric]
    return [v for r in records if (v := getattr(r, attr)) is not None]


def _meets(rec: ClientRecord, slos_ms: dict[str, float]) -> bool:
    """Whether a finished request met every goodput SLO (milliseconds); a metric it lacks (the TPOT of a
    one-token answer) does not count against it, as in vLLM."""
    for metric, limit in slos_ms.items():
        value = {"ttft": rec.ttft, "tpot": rec.tpot, "e2el": rec.e2e}[metric]
        if value is not None and value * 1e3 > limit:
            return False
    return True


def summarize(records: Sequence[ClientRecord], metrics: Sequence[str] = PERCENTILE_METRICS,
              percentiles: Sequence[float] = (99,), goodput_ms: dict[str, float] | None = None) -> dict:
    """The numbers ``vllm bench serve`` prints, from client-side measurements: mean, median and the
    ``percentiles`` of each of ``metrics`` in milliseconds, and the rate of requests that met every
    ``goodput_ms`` SLO when one is given."""
    if unknown := sorted(set(metrics) - set(PERCENTILE_METRICS)):
        raise ValueError(f"unknown percentile metric(s) {', '.join(unknown)}; known: {', '.join(PERCENTILE_METRICS)}")
    if unknown := sorted(set(goodput_ms or ()) - set(GOODPUT_METRICS)):
        raise ValueError(f"unknown goodput metric(s) {', '.join(unknown)}; known: {', '.join(GOODPUT_METRICS)}")
    ok = [r for r in records if r.status == "ok"]
    if not ok:
        return {"completed": 0, "failed": len(records)}
    start = min(r.arrival_ts for r in records)
    end = max(r.finish_ts or r.arrival_ts for r in records)
    duration = max(end - start, 1e-9)
    out = {"completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
           "request_throughput": len(ok) / duration,
           "output_throughput": sum(r.output_tokens for r in ok) / duration}
    if goodput_ms:
        out["request_goodput"] = sum(_meets(r, goodput_ms) for r in ok) / duration
    for name in metrics:
        arr = np.asarray(_values(ok, name), dtype=float) * 1e3
        if not arr.size:
            continue
        out |= {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr))}
        out |= {f"p{p:g}_{name}_ms": float(np.percentile(arr, p)) for p in percentiles}
    return out
