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


async def _one(client: aiohttp.ClientSession, url: str, model: str, req: Request, rec: ClientRecord) -> None:
    body = {"model": model, "prompt": prompt_of(req.prompt_tokens), "max_tokens": req.output_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
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
                   progress: Callable[[int], None] | None = None, timeout_s: float = 600.0) -> list[ClientRecord]:
    """Replay ``requests`` (arrival times in seconds from now) against an OpenAI-compatible server, or
    round-robin over several (to measure engines directly, without a router)."""
    bases = [base_url] if isinstance(base_url, str) else list(base_url)
    urls = [b.rstrip("/") + "/v1/completions" for b in bases]
    records: list[ClientRecord] = []
    done = 0

    async def fire(req: Request, start: float) -> None:
        nonlocal done
        delay = start + req.arrival - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
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


def summarize(records: Sequence[ClientRecord]) -> dict:
    """The numbers ``vllm bench serve`` prints, from client-side measurements."""
    ok = [r for r in records if r.status == "ok"]
    if not ok:
        return {"completed": 0, "failed": len(records)}
    start = min(r.arrival_ts for r in records)
    end = max(r.finish_ts or r.arrival_ts for r in records)
    duration = max(end - start, 1e-9)

    def stats(name: str, values: list[float]) -> dict:
        arr = np.asarray([v for v in values if v is not None], dtype=float) * 1e3
        if not arr.size:
            return {}
        return {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
                f"p99_{name}_ms": float(np.percentile(arr, 99))}

    out = {"completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
           "request_throughput": len(ok) / duration,
           "output_throughput": sum(r.output_tokens for r in ok) / duration}
    out |= stats("ttft", [r.ttft for r in ok])
    out |= stats("tpot", [r.tpot for r in ok])
    out |= stats("itl", [x for r in ok for x in r.itls])
    out |= stats("e2el", [r.e2e for r in ok])
    return out
