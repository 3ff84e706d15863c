"""The instances a scheduler routes to, and what it knows of each: polled side-car status plus its own
dispatches that the side-car cannot show yet.

Stateless across processes: each scheduler keeps only its own not-yet-visible dispatches, and the side-cars
hold the truth, so several schedulers can serve one cluster. A poll survives any reply: a side-car that
answers garbage is marked down with the reason, never stops the loop.

With mirrors on (``mirror_max_age_s``), each instance's side-car also streams its state to a ``Mirror``;
an instance whose mirror is current is seen through it (fresher than the poll, and with what a prediction
needs), and this scheduler's dispatches stop counting exactly when the side-car reports them.

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
from dataclasses import asdict, dataclass, field, replace

import aiohttp
import orjson

from block.policies import Candidate
from block.prefix_index import ApproximatePrefixIndex
from block.protocol import LoadSignals, ProtocolError, SideCarStatus
from block.routing import StateView
from block.scheduler.mirror import DISPATCH_IDS, Mirror
from simulator.workload import LengthPrior, Request

PENDING_TTL_S = 10.0  # a dispatch no state ever showed (lost before the side-car saw it) stops counting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutlierDetection:
    """Envoy's outlier-detection knobs, with its defaults: ``consecutive_5xx`` counts every failure (an
    upstream 5xx and a local failure alike), ``consecutive_gateway_failure`` counts 502/503/504 and local
    failures (connect errors, timeouts, broken streams); reaching either ejects the instance for
    ``base_ejection_s`` times the number of times it was ejected, at most ``max_ejection_s``. That
    multiplier drops by one for every ``base_ejection_s`` the instance then stays healthy. At most
    ``max_ejection_percent`` of the instances are ejected at once, but one always may be (Envoy's rule)."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: float = 10.0

    def __post_init__(self) -> None:
        if self.consecutive_5xx < 1 or self.consecutive_gateway_failure < 1:
            raise ValueError("outlier detection: consecutive failure thresholds must be at least 1")
        if self.base_ejection_s <= 0 or self.max_ejection_s < self.base_ejection_s:
            raise ValueError(f"outlier detection: need 0 < base ejection ({self.base_ejection_s} s) <= max "
                             f"ejection ({self.max_ejection_s} s)")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"outlier detection: max ejection percent must be in [0, 100], got "
                             f"{self.max_ejection_percent}")


@dataclass
class Dispatch:
    """A request this scheduler sent to an instance, counted until the instance's state shows it."""

    at: float  # time.monotonic()
    rid: str  # the scheduler's request id, which the side-car reports back in its state stream
    request: Request  # numbered below -1 (``DISPATCH_IDS``), so a fork can hold it beside the instance's own


@dataclass
class Instance:
    name: str
    url: str  # the side-car's base URL
    status: str = "up"  # up | draining | down
    reason: str = ""
    signals: LoadSignals | None = None
    predictor: str = ""  # the side-car's honesty label
    pending: list[Dispatch] = field(default_factory=list)
    mirror: Mirror = field(init=False)
    view: StateView | None = None  # the mirrored state behind this decision's candidate; None: polled signals
    dispatched_total: int = 0
    failures: int = 0
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejections: int = 0  # Envoy's ejection multiplier: decays while the instance stays healthy
    ejections_total: int = 0
    ejected_until: float = 0.0  # time.monotonic(); 0 when not ejected
    ejected_reason: str = ""
    returned_at: float = 0.0  # when the last ejection ended (the multiplier decays from there)

    def __post_init__(self) -> None:
        self.mirror = Mirror(self.name)

    def ejected(self, now: float | None = None) -> bool:
        return self.ejected_until > (time.monotonic() if now is None else now)

    def describe(self) -> dict:
        left = max(0.0, self.ejected_until - time.monotonic())
        return {"name": self.name, "url": self.url, "status": self.status, "reason": self.reason,
                "dispatched_total": self.dispatched_total, "failures": self.failures, "predictor": self.predictor,
                "ejected": left > 0, "ejected_for_s": round(left, 3),
                "ejected_reason": self.ejected_reason if left > 0 else "", "ejections_total": self.ejections_total,
                "consecutive_5xx": self.consecutive_5xx, "consecutive_gateway_failures": self.consecutive_gateway,
                "signals": asdict(self.signals) if self.signals else None, "mirror": self.mirror.describe()}


class Registry:
    def __init__(self, instances: dict[str, str], *, poll_interval: float = 0.1, poll_timeout: float = 1.0,
                 outliers: OutlierDetection | None = None, mirror_max_age_s: float | None = None):
        self.instances = {name: Instance(name, url.rstrip("/")) for name, url in instances.items()}
        self.poll_interval = poll_interval
        self.poll_timeout = poll_timeout
        self.outliers = outliers or OutlierDetection()
        self.prior = LengthPrior.embedded()
        self.mirror_max_age_s = mirror_max_age_s  # None: mirrors off, side-cars are asked over HTTP

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
        ejected = sum(i.ejected(now) for i in self.instances.values())
        if ejected and 100.0 * (ejected + 1) / len(self.instances) > od.max_ejection_percent:
            log.warning("instance %s not ejected: %d of %d already are (max %.0f%%; %s)", inst.name, ejected,
                        len(self.instances), od.max_ejection_percent, reason)
            return False
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
        if inst.status == "up" and self.mirrored(inst) and inst.mirror.engine_ok:
            return  # a current state stream says all a poll would, and fresher
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
        if not self.mirrored(inst):  # a current mirror prunes dispatches by id, exactly
            inst.pending = [d for d in inst.pending if d.at >= started]
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

    async def follow_forever(self, client: aiohttp.ClientSession) -> None:
        """One state stream per instance, for instances added and removed at run time too."""
        tasks: dict[str, tuple[Instance, asyncio.Task]] = {}
        try:
            while True:
                for name, (inst, task) in list(tasks.items()):
                    if self.instances.get(name) is not inst:
                        task.cancel()
                        del tasks[name]
                for name, inst in self.instances.items():
                    if name not in tasks:
                        tasks[name] = (inst, asyncio.create_task(inst.mirror.follow(client, inst.url)))
                await asyncio.sleep(self.poll_interval)
        finally:
            for _, task in tasks.values():
                task.cancel()

    def mirrored(self, inst: Instance) -> bool:
        """Whether decisions see this instance through its mirror (mirrors on and the mirror current)."""
        return self.mirror_max_age_s is not None and inst.mirror.usable(self.mirror_max_age_s)

    def _mirrored_view(self, inst: Instance, now: float) -> StateView | None:
        """The instance's mirrored state with this scheduler's dispatches it does not show yet, or None when
        its mirror is not current (or its newest message does not parse)."""
        if not self.mirrored(inst):
            return None
        try:
            state = inst.mirror.state()
        except ProtocolError as exc:
            log.warning("instance %s: %s", inst.name, exc)
            return None
        if not state.engine_ok:
            return None
        seen = state.seen
        inst.pending = [d for d in inst.pending if d.rid not in seen and now - d.at < PENDING_TTL_S]
        assert inst.mirror.model is not None
        inst.predictor = inst.mirror.model.predictor.label
        return inst.mirror.view([d.request for d in inst.pending])

    def candidates(self, excluded: set[str], prompt: tuple[int, ...] = (), source: str | None = None,
                   index: ApproximatePrefixIndex | None = None) -> list[Candidate]:
        """Routable instances as the policy sees them: through a current mirror (its state, prefix cache and
        this scheduler's unseen dispatches), else from polled signals plus those dispatches. Each instance's
        ``view`` says which, for the predictions that follow. ``prompt``: the request's block hashes;
        ``source``: the prefix knowledge the policy reads (exact: the mirrored cache; approximate: ``index``,
        what this scheduler routed where)."""
        out = []
        now = time.monotonic()
        for inst in self.instances.values():
            inst.view = None
            if inst.status != "up" or inst.name in excluded or inst.signals is None or inst.ejected(now):
                continue
            inst.view = self._mirrored_view(inst, now)
            if inst.view is not None:
                cand = inst.view.candidate(inst.name, prompt, self.prior, source, index)
                cand.capacity = inst.mirror.capacity(inst.view.state.config)
                out.append(cand)
                continue
            pending = [d.request for d in inst.pending]
            cand = Candidate(inst.name, inst.signals.plus(pending, self.prior), len(pending))
            cand.capacity = inst.mirror.known_capacity or cand.capacity
            if source == "approximate" and index is not None:  # the router's own knowledge needs no mirror
                cand.matched_blocks, cand.tree_blocks = index.match(inst.name, prompt), index.size(inst.name)
                cand.prompt_blocks, cand.prefix_source = len(prompt), source
            out.append(cand)
        return out

    def dispatched(self, name: str, request: Request, rid: str) -> None:
        inst = self.instances[name]
        inst.pending.append(Dispatch(time.monotonic(), rid, replace(request, id=next(DISPATCH_IDS))))
        inst.dispatched_total += 1

    def settled(self, name: str, rid: str) -> None:
        """The dispatch failed before the instance took it, or its response ended: stop counting it there.
        A request that ends before the instance's state shows it is no load there any more, and a
        prediction that still queued it would simulate work already done."""
        inst = self.instances.get(name)
        if inst is not None:
            inst.pending = [d for d in inst.pending if d.rid != rid]

    def labels(self, candidates: Sequence[Candidate]) -> str:
        """The honesty labels of these candidates' predictors, one when they agree."""
        found = sorted({self.instances[c.name].predictor for c in candidates if c.name in self.instances} - {""})
        return "; ".join(found)
