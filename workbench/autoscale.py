"""The provisioning controller driving a live cluster (``block up --autoscale``).

It builds the same ``Observation`` the offline simulator builds, from live sources: each side-car's
InstanceState and the scheduler's decisions and request records in the store. Everything is converted
to emulated-GPU seconds (wall seconds x time scale), the unit the predictor and the SLO are in. Actions
go through the cluster driver: a new engine + side-car, registered when healthy; a drain, and removal
once the instance has no work left. A failed start is logged, stored, and retried with back-off; it
never turns into a loop of starts.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Protocol

import httpx

from block.provisioner import InstanceView, Observation, Provisioner
from simulator.engine import InstanceState
from store.read import Reader
from store.schema import ProvisioningRow
from workbench.cluster import ClusterSpec, InstanceSpec

log = logging.getLogger(__name__)


class Driver(Protocol):
    """What the controller needs of the cluster driver, blocking (``workbench.local.LocalCluster``)."""

    spec: ClusterSpec  # spec.engine: what an added instance is, and so the time scale
    run_id: str
    collector_url: str

    def reader(self) -> Reader: ...
    def instance_names(self) -> list[str]: ...
    def sidecar_url(self, name: str) -> str: ...
    def add_instance(self, inst: InstanceSpec | None = None, timeout: float | None = None) -> str: ...
    def drain_instance(self, name: str) -> None: ...
    def remove_instance(self, name: str) -> None: ...


class LiveAutoscaler:
    def __init__(self, cluster: Driver, provisioner: Provisioner):
        self.cluster = cluster
        self.provisioner = provisioner
        self.scale = cluster.spec.engine.time_scale
        self.draining: set[str] = set()
        self.failures = 0
        self.retry_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.time()

    def emu(self, wall: float) -> float:
        """Wall-clock seconds to emulated seconds since the controller started."""
        return (wall - self._t0) * self.scale

    def _state(self, url: str, now: float) -> InstanceState | None:
        try:
            data = httpx.get(url + "/state", timeout=2.0).json()
        except (httpx.HTTPError, ValueError):
            return None
        state = InstanceState.from_dict(data["state"])
        shift = now - state.clock  # side-cars count from their own start; move onto the controller's clock
        reqs = [dataclasses.replace(r, arrival=r.arrival + shift) for r in state.requests]
        return dataclasses.replace(state, clock=now, requests=reqs)

    def observe(self) -> Observation:
        wall = time.time()
        now = self.emu(wall)
        window_wall = self.provisioner.config.window * 4 / self.scale
        reader = self.cluster.reader()
        arrivals = reader.decision_times_since(wall - window_wall)["ts"]
        firsts = reader.first_tokens_since(wall - window_wall)
        instances = []
        for name in self.cluster.instance_names():
            state = self._state(self.cluster.sidecar_url(name), now)
            instances.append(InstanceView(name, state, state is not None, name in self.draining))
        return Observation(now, instances, [self.emu(t) for t in arrivals],
                           [(self.emu(t), v * self.scale) for t, v in zip(firsts["first_token_ts"], firsts["ttft"],
                                                                          strict=True)])

    def _store(self, decision, status: str) -> None:
        row = ProvisioningRow(run_id=self.cluster.run_id, ts=time.time(), action=decision.action,
                              instance=decision.instance, reason=decision.reason, signal=decision.signal,
                              value=decision.value, threshold=decision.threshold, status=status,
                              instances=decision.instances)
        try:
            resp = httpx.post(self.cluster.collector_url + "/events", json={"provisioning": [row.to_dict()]},
                              timeout=5.0)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("could not store provisioning event: %s", exc)

    def step(self) -> None:
        self._reap_drained()
        obs = self.observe()
        for d in self.provisioner.decide(obs):
            if d.action == "add":
                if time.time() < self.retry_at:
                    self._store(d, "skipped: backing off after a failed start")
                    continue
                try:
                    d.instance = self.cluster.add_instance(timeout=30.0)
                    self.failures = 0
                    self._store(d, "ok")
                except (RuntimeError, TimeoutError) as exc:
                    self.failures += 1
                    self.retry_at = time.time() + min(300.0, 5.0 * 2 ** self.failures)
                    log.error("scale-out failed (%s); retrying in %.0f s", exc, self.retry_at - time.time())
                    self._store(d, f"failed: {exc}"[:500])
            elif d.action == "drain" and d.instance:
                self.cluster.drain_instance(d.instance)
                self.draining.add(d.instance)
                self._store(d, "ok")

    def _reap_drained(self) -> None:
        """Remove drained instances once their side-car shows no request left: nothing in flight dies."""
        for name in list(self.draining):
            state = self._state(self.cluster.sidecar_url(name), 0.0)
            if state is not None and not state.requests:
                self.cluster.remove_instance(name)
                self.draining.discard(name)

    def start(self) -> None:
        def loop() -> None:
            period = self.provisioner.period / self.scale
            while not self._stop.wait(period):
                try:
                    self.step()
                except Exception:  # keep the controller alive; the error is in the log
                    log.exception("autoscaler step failed")

        self._thread = threading.Thread(target=loop, name="autoscaler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
