"""The instances a scheduler routes to, and what it knows of each: polled side-car status plus its own
dispatches that the side-car cannot show yet.

Stateless across processes: each scheduler keeps only its own not-yet-visible dispatches, and the side-cars
hold the truth, so several schedulers can serve one cluster. A poll survives any reply: a side-car that
answers garbage is marked down with the reason, never stops the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import aiohttp
import orjson

from block.policies import Candidate
from block.protocol import LoadSignals, ProtocolError, SideCarStatus
from simulator.workload import LengthPrior, Request

log = logging.getLogger(__name__)


@dataclass
class Instance:
    name: str
    url: str  # the side-car's base URL
    status: str = "up"  # up | draining | down
    reason: str = ""
    signals: LoadSignals | None = None
    predictor: str = ""  # the side-car's honesty label
    pending: list[tuple[float, Request]] = field(default_factory=list)
    dispatched_total: int = 0
    failures: int = 0

    def describe(self) -> dict:
        return {"name": self.name, "url": self.url, "status": self.status, "reason": self.reason,
                "dispatched_total": self.dispatched_total, "failures": self.failures, "predictor": self.predictor,
                "signals": asdict(self.signals) if self.signals else None}


class Registry:
    def __init__(self, instances: dict[str, str], *, poll_interval: float = 0.1, poll_timeout: float = 1.0):
        self.instances = {name: Instance(name, url.rstrip("/")) for name, url in instances.items()}
        self.poll_interval = poll_interval
        self.poll_timeout = poll_timeout
        self.prior = LengthPrior.embedded()

    def __getitem__(self, name: str) -> Instance:
        return self.instances[name]

    def __contains__(self, name: str) -> bool:
        return name in self.instances

    def add(self, name: str, url: str) -> Instance:
        inst = Instance(name, url.rstrip("/"), status="down", reason="waiting for first poll")
        self.instances[name] = inst
        return inst

    def remove(self, name: str) -> None:
        del self.instances[name]

    def up(self) -> list[str]:
        return [i.name for i in self.instances.values() if i.status == "up"]

    def describe(self) -> list[dict]:
        return [i.describe() for i in self.instances.values()]

    def unavailable(self) -> str:
        """Why no instance can take a request, instance by instance."""
        reasons = "; ".join(f"{i.name}: {i.status} {i.reason}".strip() for i in self.instances.values())
        return f"no instance available to serve the request ({reasons or 'none registered'})"

    @staticmethod
    def mark_down(inst: Instance, reason: str) -> None:
        if inst.status != "draining":
            inst.status = "down"
        inst.reason = reason

    async def poll_one(self, client: aiohttp.ClientSession, inst: Instance) -> None:
        started = time.monotonic()
        try:
            async with client.get(inst.url + "/state?requests=0",
                                  timeout=aiohttp.ClientTimeout(total=self.poll_timeout)) as resp:
                resp.raise_for_status()
                status = SideCarStatus.from_dict(orjson.loads(await resp.read()))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.mark_down(inst, f"side-car {inst.url} unreachable: {exc!r}")
            return
        except (orjson.JSONDecodeError, ProtocolError) as exc:
            log.warning("instance %s: side-car %s sent a malformed /state reply: %s", inst.name, inst.url, exc)
            self.mark_down(inst, f"side-car {inst.url} sent a malformed /state reply: {exc}")
            return
        inst.signals = status.signals
        inst.predictor = status.predictor
        inst.pending = [(t, r) for t, r in inst.pending if t >= started]
        if not status.engine_ok:
            self.mark_down(inst, status.engine_error or "engine down")
        elif inst.status == "down":
            inst.status, inst.reason = "up", ""

    async def poll_all(self, client: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self.poll_one(client, i) for i in list(self.instances.values())))

    async def poll_forever(self, client: aiohttp.ClientSession) -> None:
        while True:
            await self.poll_all(client)
            await asyncio.sleep(self.poll_interval)

    def candidates(self, excluded: set[str]) -> list[Candidate]:
        """Routable instances, each with its polled signals plus this scheduler's unseen dispatches."""
        out = []
        for inst in self.instances.values():
            if inst.status != "up" or inst.name in excluded or inst.signals is None:
                continue
            pending = [r for _, r in inst.pending]
            out.append(Candidate(inst.name, inst.signals.plus(pending, self.prior), len(pending)))
        return out

    def dispatched(self, name: str, request: Request) -> None:
        inst = self.instances[name]
        inst.pending.append((time.monotonic(), request))
        inst.dispatched_total += 1

    def labels(self, candidates: Sequence[Candidate]) -> str:
        """The honesty labels of these candidates' predictors, one when they agree."""
        found = sorted({self.instances[c.name].predictor for c in candidates if c.name in self.instances} - {""})
        return "; ".join(found)
