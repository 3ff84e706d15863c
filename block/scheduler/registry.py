"""The instances a scheduler routes to, and what it knows of each: polled side-car status plus its own
dispatches that the side-car cannot show yet.

Stateless across processes: each scheduler keeps only its own not-yet-visible dispatches, and the side-cars
hold the truth, so several schedulers can serve one cluster. A poll survives any reply: a side-car that
answers garbage is marked down with the reason, never stops the loop.

Polling alone misses an instance that answers ``/state`` but not requests (a hung engine behind a live
side-car, a side-car stuck on one route). Outlier detection, as Envoy does it, catches that from the
requests themselves: consecutive 5xx answers or consecutive gateway failures (connection errors,
timeouts, broken streams) eject the instance for a time that grows with each ejection; the last
routable instance is never ejected, since refusing every request is worse than trying a bad instance.
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


@dataclass(frozen=True)
class OutlierDetection:
    """Envoy's outlier-detection knobs, with its defaults: ``consecutive_5xx`` counts every failure (an
    upstream 5xx and a local failure alike), ``consecutive_gateway_failure`` counts 502/503/504 and local
    failures (connect errors, timeouts, broken streams); reaching either ejects the instance for
    ``base_ejection_s`` times the number of times it was ejected, at most ``max_ejection_s``. That
    multiplier drops by one for every ``base_ejection_s`` the instance then stays healthy."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0

    def __post_init__(self) -> None:
        if self.consecutive_5xx < 1 or self.consecutive_gateway_failure < 1:
            raise ValueError("outlier detection: consecutive failure thresholds must be at least 1")
        if self.base_ejection_s <= 0 or self.max_ejection_s < self.base_ejection_s:
            raise ValueError(f"outlier detection: need 0 < base ejection ({self.base_ejection_s} s) <= max "
                             f"ejection ({self.max_ejection_s} s)")


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
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejections: int = 0  # Envoy's ejection multiplier: decays while the instance stays healthy
    ejections_total: int = 0
    ejected_until: float = 0.0  # time.monotonic(); 0 when not ejected
    ejected_reason: str = ""
    returned_at: float = 0.0  # when the last ejection ended (the multiplier decays from there)

    def ejected(self, now: float | None = None) -> bool:
        return self.ejected_until > (time.monotonic() if now is None else now)

    def describe(self) -> dict:
        left = max(0.0, self.ejected_until - time.monotonic())
        return {"name": self.name, "url": self.url, "status": self.status, "reason": self.reason,
                "dispatched_total": self.dispatched_total, "failures": self.failures, "predictor": self.predictor,
                "ejected": left > 0, "ejected_for_s": round(left, 3),
                "ejected_reason": self.ejected_reason if left > 0 else "", "ejections_total": self.ejections_total,
                "consecutive_5xx": self.consecutive_5xx, "consecutive_gateway_failures": self.consecutive_gateway,
                "signals": asdict(self.signals) if self.signals else None}


class Registry:
    def __init__(self, instances: dict[str, str], *, poll_interval: float = 0.1, poll_timeout: float = 1.0,
                 outliers: OutlierDetection | None = None):
        self.instances = {name: Instance(name, url.rstrip("/")) for name, url in instances.items()}
        self.poll_interval = poll_interval
        self.poll_timeout = poll_timeout
        self.outliers = outliers or OutlierDetection()
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
        """Routable instances: up by their last poll and not ejected."""
        now = time.monotonic()
        return [i.name for i in self.instances.values() if i.status == "up" and not i.ejected(now)]

    def describe(self) -> list[dict]:
        return [i.describe() for i in self.instances.values()]

    def unavailable(self) -> str:
        """Why no instance can take a request, instance by instance."""
        now = time.monotonic()
        reasons = "; ".join(
            f"{i.name}: ejected for {i.ejected_until - now:.1f} s ({i.ejected_reason})" if i.ejected(now)
            else f"{i.name}: {i.status} {i.reason}".strip() for i in self.instances.values())
        return f"no instance available to serve the request ({reasons or 'none registered'})"

    # ---- outlier detection ------------------------------------------------------------------------
    def succeeded(self, inst: Instance) -> None:
        """An answer that was not a server failure (a 4xx is the client's): the failure streaks restart."""
        inst.consecutive_5xx = inst.consecutive_gateway = 0

    def failed(self, inst: Instance, reason: str, *, gateway: bool) -> bool:
        """Count one server failure of ``inst`` (``gateway``: a 502/503/504 or a local failure); eject it
        when a streak reaches its threshold. True when this failure ejected it."""
        inst.failures += 1
        inst.consecutive_5xx += 1
        inst.consecutive_gateway = inst.consecutive_gateway + 1 if gateway else 0
        od = self.outliers
        if inst.consecutive_5xx >= od.consecutive_5xx:
            return self._eject(inst, f"{inst.consecutive_5xx} consecutive failures, the last: {reason}")
        if inst.consecutive_gateway >= od.consecutive_gateway_failure:
            return self._eject(inst, f"{inst.consecutive_gateway} consecutive gateway failures, the last: {reason}")
        return False

    def _eject(self, inst: Instance, reason: str) -> bool:
        now = time.monotonic()
        if inst.ejected(now):
            return False
        others = [i for i in self.instances.values() if i is not inst and i.status == "up" and not i.ejected(now)]
        if not others:
            log.warning("instance %s not ejected: it is the last routable instance (%s)", inst.name, reason)
            return False
        od = self.outliers
        if inst.ejections and inst.returned_at:
            inst.ejections = max(0, inst.ejections - int((now - inst.returned_at) // od.base_ejection_s))
        inst.ejections += 1
        inst.ejections_total += 1
        duration = min(od.base_ejection_s * inst.ejections, od.max_ejection_s)
        inst.ejected_until = now + duration
        inst.returned_at = inst.ejected_until
        inst.ejected_reason = reason
        inst.consecutive_5xx = inst.consecutive_gateway = 0
        log.warning("instance %s ejected for %.0f s: %s", inst.name, duration, reason)
        return True

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
        now = time.monotonic()
        for inst in self.instances.values():
            if inst.status != "up" or inst.name in excluded or inst.signals is None or inst.ejected(now):
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
