"""Event loop over many engines with a routing callback and an optional provisioner.

The simulator knows nothing of policies: ``router(request, instances, now)`` returns the name of the
instance to send a request to (block.policies adapts its policies to that), or None to reject it (early
rejection: it is counted in ``ClusterResult.rejected`` and never served). Engines may differ from one
instance to the next (a heterogeneous fleet: each its own configuration and timing model). A provisioner,
if given, is called every ``provisioner.period`` seconds with a :class:`ClusterView` and answers with actions.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from simulator.engine import Engine
from simulator.workload import Request


@dataclass
class Instance:
    """An engine plus the cluster's bookkeeping about it."""

    engine: Engine
    started_at: float = 0.0
    ready_at: float = 0.0
    draining: bool = False
    stopped_at: float | None = None

    @property
    def name(self) -> str:
        return self.engine.name

    def is_ready(self, now: float) -> bool:
        return self.ready_at <= now and self.stopped_at is None


Router = Callable[[Request, Sequence[Instance], float], "str | None"]


@dataclass
class ScaleAction:
    kind: Literal["add", "drain"]
    instance: str | None = None  # drain: which one; add: ignored (the factory names it)
    reason: str = ""


@dataclass
class ProvisioningEvent:
    time: float
    kind: str
    instance: str
    reason: str


class Provisioner(Protocol):
    period: float

    def decide(self, now: float, view: ClusterView) -> list[ScaleAction]: ...


@dataclass
class ClusterView:
    """What a provisioner may look at: instances and the requests measured so far."""

    now: float
    instances: list[Instance]
    finished: list[tuple[str, object]]
    pending: int  # instances started but not ready yet
    arrivals: list[float]  # arrival times of every request routed so far


@dataclass
class ClusterResult:
    finished: list[tuple[str, object]] = field(default_factory=list)  # (instance name, engine.Seq)
    provisioning: list[ProvisioningEvent] = field(default_factory=list)
    rejected: list[Request] = field(default_factory=list)  # requests the router refused
    instance_seconds: float = 0.0
    end_time: float = 0.0


class Cluster:
    def __init__(
        self,
        engines: Iterable[Engine],
        router: Router,
        *,
        provisioner: Provisioner | None = None,
        engine_factory: Callable[[str], Engine] | None = None,
        cold_start: float = 60.0,
        dispatch_delay: float = 0.0,
    ):
        self.instances = [Instance(e) for e in engines]
        if not self.instances and provisioner is None:
            raise ValueError("a cluster needs at least one engine")
        self._by_name = {i.name: i for i in self.instances}
        if len(self._by_name) != len(self.instances):
            raise ValueError(f"instance names must be unique, got {[i.name for i in self.instances]}")
        self.router = router
        self.provisioner = provisioner
        self.engine_factory = engine_factory
        self.cold_start = cold_start
        self.dispatch_delay = dispatch_delay
        self.result = ClusterResult()
        self.arrivals: list[float] = []
        if provisioner is not None and engine_factory is None:
            raise ValueError("a provisioner needs an engine_factory to create instances")

    def by_name(self, name: str) -> Instance:
        inst = self._by_name.get(name)
        if inst is None:
            raise KeyError(f"no instance {name!r}; instances: {[i.name for i in self.instances]}")
        return inst

    def _advance_all(self, t: float) -> None:
        finished = self.result.finished
        for inst in self.instances:
            eng = inst.engine
            if eng.running or eng.waiting:
                eng.advance(t)
            if eng.finished:
                name = inst.name
                finished.extend([(name, s) for s in eng.finished])
                eng.finished.clear()
            if inst.draining and inst.stopped_at is None and not (eng.running or eng.waiting):
                inst.stopped_at = max(t, eng.now) if t != math.inf else eng.now
                self._event(inst.stopped_at, "stop", inst.name, "drained")

    def _event(self, time: float, kind: str, name: str, reason: str) -> None:
        self.result.provisioning.append(ProvisioningEvent(time, kind, name, reason))

    def _tick(self, now: float) -> None:
        assert self.provisioner is not None and self.engine_factory is not None
        live = [i for i in self.instances if i.stopped_at is None]
        view = ClusterView(now, live, self.result.finished, sum(not i.is_ready(now) for i in live), self.arrivals)
        for action in self.provisioner.decide(now, view):
            if action.kind == "add":
                eng = self.engine_factory(f"instance-{len(self.instances)}")
                eng.now = now + self.cold_start
                self.instances.append(Instance(eng, started_at=now, ready_at=now + self.cold_start))
                self._by_name[eng.name] = self.instances[-1]
                self._event(now, "add", eng.name, action.reason)
            elif action.kind == "drain":
                inst = self.by_name(action.instance or "")
                if not inst.draining:
                    inst.draining = True
                    self._event(now, "drain", inst.name, action.reason)
            else:
                raise ValueError(f"unknown provisioning action {action.kind!r}")

    def run(self, requests: Sequence[Request], progress: Callable[[int], None] | None = None) -> ClusterResult:
        """Route every request and run the cluster until all of them have finished."""
        arrivals = sorted(requests, key=lambda r: r.arrival)
        # without a provisioner, instances ready by the first arrival are the candidates for every request
        first = arrivals[0].arrival + self.dispatch_delay if arrivals else 0.0
        static = self.provisioner is None and all(
            i.is_ready(first) and not i.draining for i in self.instances)
        ticks: list[float] = []
        if self.provisioner is not None:
            heapq.heappush(ticks, arrivals[0].arrival if arrivals else 0.0)
        for i, req in enumerate(arrivals):
            t = req.arrival + self.dispatch_delay
            while ticks and ticks[0] <= t:
                tick = heapq.heappop(ticks)
                self._advance_all(tick)
                self._tick(tick)
                heapq.heappush(ticks, tick + self.provisioner.period)
            self._advance_all(t)
            candidates = self.instances if static else [
                inst for inst in self.instances if inst.is_ready(t) and not inst.draining]
            if not candidates:
                raise RuntimeError(f"no ready instance at t={t:.3f}s for request {req.id}")
            self.arrivals.append(req.arrival)
            choice = self.router(req, candidates, t)
            if choice is None:
                self.result.rejected.append(req)
            else:
                self.by_name(choice).engine.add_request(req)
            if progress is not None and i % 256 == 0:
                progress(i)
        while ticks and any(inst.engine.running or inst.engine.waiting for inst in self.instances):
            tick = heapq.heappop(ticks)
            self._advance_all(tick)
            self._tick(tick)
            heapq.heappush(ticks, tick + self.provisioner.period)
        self._advance_all(math.inf)
        end = max((inst.engine.now for inst in self.instances), default=0.0)
        self.result.end_time = end
        self.result.instance_seconds = sum(
            (inst.stopped_at if inst.stopped_at is not None else end) - inst.started_at for inst in self.instances
        )
        return self.result
