"""A cluster of real service processes on this machine: collector, emulators, side-cars, scheduler.

Each service is its own Python process bound to 127.0.0.1 on a free port, with its log in the
workspace. ``stop()`` stops exactly the processes this object started, by pid, collector last so the
final event batches land.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from store.read import Reader


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    kind: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class EngineFlags:
    gpu: str = "A30"
    model: str = "Llama-2-7B"
    num_blocks: int | None = 1052
    max_num_seqs: int = 48
    max_num_batched_tokens: int = 512
    time_scale: float = 10.0
    noise: float = 0.05

    def args(self) -> list[str]:
        out = ["--gpu", self.gpu, "--model", self.model, "--max-num-seqs", str(self.max_num_seqs),
               "--max-num-batched-tokens", str(self.max_num_batched_tokens), "--time-scale", str(self.time_scale)]
        if self.num_blocks:
            out += ["--num-blocks", str(self.num_blocks)]
        return out


@dataclass
class LocalCluster:
    workspace: Path
    instances: int = 4
    policy: str = "block"
    engine: EngineFlags = field(default_factory=EngineFlags)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    predict_budget_ms: float = 20.0
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workspace = Path(self.workspace)
        (self.workspace / "logs").mkdir(parents=True, exist_ok=True)
        self._next_instance = 0

    # ---- processes ------------------------------------------------------------------------------
    def _spawn(self, name: str, kind: str, module: str, args: list[str], port: int | None = None) -> Service:
        port = port or free_port()
        log = self.workspace / "logs" / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("ab") as fh:
            proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args], stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        svc = Service(name, kind, port, proc, log)
        self.services[name] = svc
        return svc

    def _wait_healthy(self, services: list[Service], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(services)
        while pending:
            for svc in list(pending):
                if not svc.alive():
                    raise RuntimeError(f"{svc.name} exited with {svc.proc.returncode} while starting; log "
                                       f"{svc.log}:\n{svc.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(svc.url + "/health", timeout=1.0).status_code == 200:
                        pending.remove(svc)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise TimeoutError(f"{names} not healthy after {timeout:.0f} s; see {self.workspace / 'logs'}")
            if pending:
                time.sleep(0.1)

    def _start_instance(self) -> tuple[str, Service, Service]:
        name = f"instance-{self._next_instance}"
        self._next_instance += 1
        flags = self.engine.args()
        engine = self._spawn(f"{name}-engine", "engine", "block.engines.emulator",
                             ["--name", name, "--noise", str(self.engine.noise), "--seed", str(self._next_instance),
                              *flags])
        car = self._spawn(f"{name}-sidecar", "sidecar", "block.predictor.service",
                          ["--name", name, "--engine-url", engine.url, "--collector-url", self.collector_url,
                           "--run-id", self.run_id, *flags])
        return name, engine, car

    def start(self, timeout: float = 90.0) -> LocalCluster:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        collector = self._spawn("collector", "collector", "store.collector",
                                ["--db", str(self.workspace / "block.duckdb")])
        started = [self._start_instance() for _ in range(self.instances)]
        self._wait_healthy([collector, *(s for _, e, c in started for s in (e, c))], timeout)
        args = ["--policy", self.policy, "--served-model-name", self.engine.model,
                "--predict-budget-ms", str(self.predict_budget_ms), "--admin-token", self.admin_token,
                "--collector-url", self.collector_url, "--run-id", self.run_id]
        for name, _, car in started:
            args += ["--instance", f"{name}={car.url}"]
        self._wait_healthy([self._spawn("scheduler", "scheduler", "block.scheduler.app", args)], timeout)

    def stop(self, timeout: float = 10.0) -> None:
        order = {"scheduler": 0, "sidecar": 1, "engine": 2, "collector": 3}
        for svc in sorted(self.services.values(), key=lambda s: order[s.kind]):
            self._stop(svc, timeout)
        self.services.clear()

    @staticmethod
    def _stop(svc: Service, timeout: float) -> None:
        if svc.alive():
            svc.proc.send_signal(signal.SIGTERM)
            try:
                svc.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait(timeout)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- operations -----------------------------------------------------------------------------
    @property
    def scheduler_url(self) -> str:
        return self.services["scheduler"].url

    @property
    def collector_url(self) -> str:
        return self.services["collector"].url

    def _admin(self, method: str, path: str, json: dict | None = None) -> httpx.Response:
        resp = httpx.request(method, self.scheduler_url + path, json=json, timeout=10.0,
                             headers={"authorization": f"Bearer {self.admin_token}"})
        if resp.status_code >= 400:
            raise RuntimeError(f"scheduler {method} {path} failed: {resp.status_code} {resp.text[:300]}")
        return resp

    def set_policy(self, policy: str) -> None:
        self._admin("POST", "/admin/policy", {"policy": policy})

    def add_instance(self, timeout: float = 60.0) -> str:
        name, engine, car = self._start_instance()
        self._wait_healthy([engine, car], timeout)
        self._admin("POST", "/admin/instances", {"name": name, "url": car.url})
        return name

    def drain_instance(self, name: str) -> None:
        self._admin("POST", f"/admin/instances/{name}/drain")

    def remove_instance(self, name: str) -> None:
        self._admin("DELETE", f"/admin/instances/{name}")
        for kind in ("sidecar", "engine"):
            svc = self.services.pop(f"{name}-{kind}", None)
            if svc is not None:
                self._stop(svc, 10.0)

    def instance_names(self) -> list[str]:
        return sorted({s.name.rsplit("-", 1)[0] for s in self.services.values() if s.kind == "engine"})

    def kill(self, service: str) -> None:
        """SIGKILL one service (failure tests); it stays listed so stop() reaps it."""
        self.services[service].proc.kill()
        self.services[service].proc.wait(10)

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.services.values()]

    def reader(self) -> Reader:
        return Reader(collector_url=self.collector_url)
