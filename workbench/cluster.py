"""The cluster driver: start engines, side-cars, a scheduler and a collector, watch them, stop them.

One driver for every cluster the workbench runs: a cluster file of remote GPU hosts, or a local emulated
cluster described in code (``ClusterSpec.local``; ``workbench.local.LocalCluster`` is its blocking
view for the CLI, the autoscaler, benchmarks and tests). Hosts are reached with asyncssh (known-hosts
checking on; keys from files or an agent; no passwords in cluster files) or, for ``localhost``, with
local processes: the same interface either way. Every service is started as a supervised background
process leading its own process group, its pid recorded and its log in the host's workdir, and
``stop()`` stops exactly those process groups, never processes found by name.

An emulated instance is described by ``EngineSettings`` (its cluster-file ``flags`` are parsed into
them), and ``InstanceSpec.argv`` turns an instance into its engine's and its side-car's arguments, so
an emulator and its side-car always get the same engine flags.

A cluster file (TOML):

    [[hosts]]
    name = "gpu-a"
    address = "10.0.0.5"
    user = "me"
    key_file = "~/.ssh/id_ed25519"
    workdir = "/srv/block"
    python = "/srv/block/.venv/bin/python"
    gpus = 2

    [[instances]]                 # an emulated A30 next to ...
    name = "a0"
    host = "gpu-a"
    engine = "emulator"
    engine_port = 8100
    sidecar_port = 8200
    flags = ["--gpu", "A30", "--time-scale", "4"]

    [[instances]]                 # ... a real vLLM on the second GPU, from its own venv
    name = "a1"
    host = "gpu-a"
    engine = "vllm"
    model = "/models/llama-2-7b-chat"
    served_model_name = "llama-2-7b"
    engine_port = 8101
    sidecar_port = 8201
    env = { CUDA_VISIBLE_DEVICES = "1" }
    flags = ["--python", "/srv/vllm-venv/bin/python", "--max-num-seqs", "48"]
    predictor_model = "Llama-2-7B"
    sidecar_flags = ["--gpu", "A30"]  # and the limits it shares with the engine: see InstanceSpec.argv

    [scheduler]
    host = "gpu-a"
    port = 8000
    policy = "block"

    [collector]
    host = "gpu-a"
    port = 8300
    db = "block.duckdb"
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import socket
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from block.engines.settings import EngineSettings
from store.read import Reader

ENGINES = {"emulator": "block.engines.emulator", "vllm": "block.engines.vllm"}
# Scheduler limits that vLLM and the side-car spell alike: a vLLM instance's side-car takes them from the
# engine flags, since vLLM's /metrics reports its KV cache but not these.
SHARED_LIMITS = ("--max-num-seqs", "--max-num-batched-tokens", "--max-model-len")
LOCAL = "local"  # the host of a cluster described by ClusterSpec.local


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a service of a local cluster or a test server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class HostSpec:
    name: str
    address: str = "127.0.0.1"
    port: int = 22
    user: str | None = None
    key_file: str | None = None  # None: keys from the SSH agent
    known_hosts: str | None = None  # None: ~/.ssh/known_hosts; checking is never switched off
    workdir: str = "."
    python: str = "python3"
    gpus: int = 0

    @property
    def local(self) -> bool:
        return self.address in ("localhost", "local")


@dataclass
class InstanceSpec:
    name: str
    host: str
    engine: str = "emulator"
    engine_port: int = 8100
    sidecar_port: int = 8200
    model: str = "Llama-2-7B"  # emulator: a model spec; vllm: the model directory to serve
    served_model_name: str | None = None  # the model id clients send (default: model)
    flags: list[str] = field(default_factory=list)  # engine flags (an emulator's are EngineSettings flags)
    env: dict[str, str] = field(default_factory=dict)  # engine environment (CUDA_VISIBLE_DEVICES, VLLM_*)
    predictor_model: str | None = None  # the side-car's model spec (vllm instances; default: model)
    sidecar_flags: list[str] | None = None  # the side-car's own flags, after those it shares (see argv)

    @classmethod
    def emulated(cls, name: str, host: str, engine: EngineSettings, engine_port: int, sidecar_port: int,
                 seed: int = 0) -> InstanceSpec:
        """An emulated instance described in code: ``engine`` as its flags, and the emulator's noise seed."""
        return cls(name, host, "emulator", engine_port, sidecar_port, model=engine.model,
                   flags=[*engine.argv(), "--seed", str(seed)])

    @property
    def served(self) -> str:
        return self.served_model_name or self.model

    def settings(self) -> tuple[EngineSettings, list[str]]:
        """An emulated instance's EngineSettings (its model, then its flags), and the flags that are the
        emulator's own (``--seed``)."""
        return EngineSettings.parse(["--model", self.model, *self.flags])

    def argv(self, engine_url: str, collector_url: str, run_id: str) -> tuple[list[str], list[str]]:
        """The engine's and the side-car's arguments: the one place they are built.

        An emulator and its side-car both get the instance's EngineSettings flags, so the side-car predicts
        for the engine that is there; the side-car's ``sidecar_flags`` come last and override. A vLLM
        instance's side-car gets its ``predictor_model``, the scheduler limits it shares with the engine
        (vLLM's /metrics reports the KV cache but not these), then ``sidecar_flags`` (its GPU, say).
        """
        engine = ["--name", self.name, "--served-model-name", self.served]
        car = ["--name", self.name, "--engine-url", engine_url, "--collector-url", collector_url, "--run-id", run_id]
        own = list(self.sidecar_flags or [])
        if self.engine == "emulator":
            settings, emulator_only = self.settings()
            return [*engine, *settings.argv(), *emulator_only], [*car, *settings.argv(), *own]
        shared: list[str] = []
        for i, flag in enumerate(self.flags):
            name, eq, _ = flag.partition("=")
            if name in SHARED_LIMITS:
                shared += [flag] if eq else self.flags[i:i + 2]
        return ([*engine, "--model", self.model, *self.flags],
                [*car, "--model", self.predictor_model or self.model, *shared, *own])


@dataclass
class ServiceSpec:
    host: str
    port: int
    policy: str = "block"
    db: str = "block.duckdb"


@dataclass
class ClusterSpec:
    hosts: dict[str, HostSpec]
    instances: list[InstanceSpec]
    scheduler: ServiceSpec
    collector: ServiceSpec
    engine: EngineSettings = field(default_factory=EngineSettings)  # what new_instance() starts
    created: int = 0  # instances new_instance() made, so a removed instance's name is never reused

    @classmethod
    def local(cls, instances: int = 4, engine: EngineSettings | None = None, policy: str = "block",
              workdir: str | Path = "workspace") -> ClusterSpec:
        """An emulated cluster on this machine, described in code instead of a cluster file: every
        service on a free 127.0.0.1 port, run by this Python, its log and the DuckDB file in ``workdir``."""
        wd = Path(workdir).resolve()
        host = HostSpec(LOCAL, "localhost", workdir=str(wd), python=sys.executable)
        spec = cls({LOCAL: host}, [], ServiceSpec(LOCAL, free_port(), policy),
                   ServiceSpec(LOCAL, free_port(), db=str(wd / "block.duckdb")), engine or EngineSettings())
        spec.instances = [spec.new_instance() for _ in range(instances)]
        return spec

    def new_instance(self) -> InstanceSpec:
        """One more emulated instance of ``engine`` (``instance-<k>``, seed k + 1) on this machine's host."""
        host = next((h.name for h in self.hosts.values() if h.local), None)
        if host is None:
            raise ValueError("a new instance without an InstanceSpec needs a localhost host; pass an InstanceSpec")
        self.created += 1
        return InstanceSpec.emulated(f"instance-{self.created - 1}", host, self.engine, free_port(), free_port(),
                                     seed=self.created)

    def host(self, name: str) -> HostSpec:
        if name not in self.hosts:
            raise ValueError(f"unknown host {name!r}; hosts: {sorted(self.hosts)}")
        return self.hosts[name]


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read and check a cluster file, naming the file and the entry that is wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read cluster file: {exc}") from exc
    return parse_cluster(data, str(path))


def parse_cluster(data: dict, where: str = "cluster") -> ClusterSpec:
    def build(cls, entry: dict, what: str):
        if "password" in entry:
            raise ValueError(f"{where}: {what} has a password; use key files or an SSH agent, never passwords")
        try:
            return cls(**entry)
        except TypeError as exc:
            raise ValueError(f"{where}: bad {what}: {exc}") from exc

    hosts = {}
    for i, h in enumerate(data.get("hosts", [])):
        spec = build(HostSpec, h, f"hosts[{i}]")
        hosts[spec.name] = spec
    if not hosts:
        raise ValueError(f"{where}: no [[hosts]]")
    instances = [build(InstanceSpec, x, f"instances[{i}]") for i, x in enumerate(data.get("instances", []))]
    for inst in instances:
        if inst.host not in hosts:
            raise ValueError(f"{where}: instance {inst.name} is on unknown host {inst.host!r}")
        if inst.engine not in ENGINES:
            raise ValueError(f"{where}: instance {inst.name}: engine must be one of {sorted(ENGINES)}")
        if not isinstance(inst.env, dict):
            raise ValueError(f"{where}: instance {inst.name}: env must be a table of NAME = \"value\"")
        if inst.engine == "emulator":
            try:  # a bad flag or an impossible engine fails here, not later in a service log
                inst.settings()[0].engine_config()
            except ValueError as exc:
                raise ValueError(f"{where}: instance {inst.name}: {exc}") from exc
    if "scheduler" not in data or "collector" not in data:
        raise ValueError(f"{where}: needs a [scheduler] and a [collector] table")
    spec = ClusterSpec(hosts, instances, build(ServiceSpec, data["scheduler"], "scheduler"),
                       build(ServiceSpec, data["collector"], "collector"))
    for svc in (spec.scheduler, spec.collector):
        spec.host(svc.host)
    return spec


class Host:
    """Runs commands on one host and supervises the background processes it started there."""

    def __init__(self, spec: HostSpec):
        self.spec = spec
        self._conn = None

    async def connect(self) -> None:
        if self.spec.local or self._conn is not None:
            return
        import asyncssh

        keys = [str(Path(self.spec.key_file).expanduser())] if self.spec.key_file else ()
        known = str(Path(self.spec.known_hosts).expanduser()) if self.spec.known_hosts else ()
        try:
            self._conn = await asyncssh.connect(self.spec.address, self.spec.port, username=self.spec.user,
                                                client_keys=keys or None, known_hosts=known or (),
                                                password=None)
        except (OSError, asyncssh.Error) as exc:
            raise ConnectionError(f"host {self.spec.name} ({self.spec.address}:{self.spec.port}): {exc}") from exc

    async def run(self, command: str, check: bool = True) -> str:
        if self.spec.local:
            proc = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.PIPE,
                                                         stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate()
            text, status = out.decode(errors="replace"), proc.returncode
        else:
            assert self._conn is not None, "connect() first"
            result = await self._conn.run(command, check=False)
            text, status = str(result.stdout or "") + str(result.stderr or ""), result.exit_status
        if check and status != 0:
            raise RuntimeError(f"host {self.spec.name}: `{command}` exited {status}: {text.strip()[-500:]}")
        return text

    async def spawn(self, args: list[str], log: str, env: dict[str, str] | None = None) -> int:
        """Start a detached process in the host's workdir, its output in ``log``; return its pid.

        setsid makes the service lead its own process group, so ``stop`` can also reach the children it
        leaves behind (vLLM's engine core and workers). setsid, nohup and env(1) each exec the next
        program, so the recorded pid is the service's own.
        """
        settings = [f"{k}={v}" for k, v in (env or {}).items()]
        cmd = " ".join(shlex.quote(a) for a in ["setsid", *(["env", *settings] if settings else []), *args])
        wd = shlex.quote(self.spec.workdir)
        out = await self.run(f"mkdir -p {wd}/logs && cd {wd} && (nohup {cmd} > {shlex.quote(log)} 2>&1 < /dev/null "
                             "& echo $!)")
        return int(out.strip().splitlines()[-1])

    async def alive(self, pid: int) -> bool:
        return (await self.run(f"kill -0 {pid} 2>/dev/null && echo yes || echo no", check=False)).strip() == "yes"

    async def stop(self, pid: int, timeout: float = 10.0) -> None:
        """SIGTERM the service and give it ``timeout`` to shut down its own children; then SIGKILL what is
        left of its process group (the service, or children it failed to stop)."""
        await self.run(f"kill -TERM {pid} 2>/dev/null || true", check=False)
        for _ in range(int(timeout / 0.2)):
            if not await self.alive(pid):
                break
            await asyncio.sleep(0.2)
        await self.run(f"kill -KILL -{pid} 2>/dev/null || true", check=False)  # dash has no `--`

    async def kill(self, pid: int, timeout: float = 10.0) -> None:
        """SIGKILL the service alone (a crash, for failure tests) and wait until it is gone; its process
        group is left for ``stop``."""
        await self.run(f"kill -KILL {pid} 2>/dev/null || true", check=False)
        for _ in range(int(timeout / 0.05)):
            if not await self.alive(pid):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"host {self.spec.name}: pid {pid} still there {timeout:.0f} s after SIGKILL")

    async def tail(self, log: str, lines: int = 100) -> str:
        wd = shlex.quote(self.spec.workdir)
        return await self.run(f"cd {wd} && tail -n {lines} {shlex.quote(log)}", check=False)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
            self._conn = None


@dataclass
class Started:
    name: str
    host: str
    pid: int
    port: int
    log: str

    @property
    def kind(self) -> str:
        """collector, scheduler, engine or sidecar (instance services are named <instance>-<kind>)."""
        return self.name.rsplit("-", 1)[-1]


STOP_ORDER = ("scheduler", "sidecar", "engine", "collector")  # clients first; the collector takes the last events


class Cluster:
    """Start, watch and stop a cluster described by a ClusterSpec (async, for notebooks; the blocking view of
    a local one is ``workbench.local.LocalCluster``)."""

    def __init__(self, spec: ClusterSpec, *, run_id: str = "workbench", admin_token: str | None = None,
                 ready_timeout: float = 600.0):
        """``ready_timeout`` bounds a service that neither becomes healthy nor exits: a real vLLM loading a
        large model takes minutes, and one that crashes is noticed at once by its pid."""
        self.spec = spec
        self.ready_timeout = ready_timeout
        self.run_id = run_id
        self.admin_token = admin_token or secrets.token_hex(16)
        self.hosts = {name: Host(h) for name, h in spec.hosts.items()}
        self.started: dict[str, Started] = {}

    def url(self, host: str, port: int) -> str:
        return f"http://{self._bind(host)}:{port}"

    @property
    def scheduler_url(self) -> str:
        return self.url(self.spec.scheduler.host, self.spec.scheduler.port)

    @property
    def collector_url(self) -> str:
        return self.url(self.spec.collector.host, self.spec.collector.port)

    def _bind(self, host: str) -> str:
        address = self.spec.host(host).address
        return "127.0.0.1" if address in ("localhost", "local") else address

    def instance(self, name: str) -> InstanceSpec:
        for inst in self.spec.instances:
            if inst.name == name:
                return inst
        raise KeyError(f"no instance {name!r}; instances: {self.instance_names()}")

    def instance_names(self) -> list[str]:
        return [i.name for i in self.spec.instances]

    def sidecar_url(self, name: str) -> str:
        inst = self.instance(name)
        return self.url(inst.host, inst.sidecar_port)

    def urls(self) -> dict[str, str]:
        """Every started service's base URL, by service name (``collector``, ``a0-engine``, ...)."""
        return {name: self.url(svc.host, svc.port) for name, svc in self.started.items()}

    def pids(self) -> list[int]:
        return [svc.pid for svc in self.started.values()]

    def reader(self) -> Reader:
        return Reader(collector_url=self.collector_url)

    async def _start(self, name: str, host: str, port: int, module: str, args: list[str],
                     env: dict[str, str] | None = None) -> Started:
        h = self.hosts[host]
        log = f"logs/{name}.log"
        argv = [h.spec.python, "-m", module, "--host", self._bind(host), "--port", str(port), *args]
        pid = await h.spawn(argv, log, {"PYTHONUNBUFFERED": "1", **(env or {})})  # logs readable while it runs
        svc = Started(name, host, pid, port, log)
        self.started[name] = svc
        return svc

    async def _wait_ready(self, services: list[Started], timeout: float | None = None) -> None:
        timeout = self.ready_timeout if timeout is None else timeout
        async with aiohttp.ClientSession() as http:
            for svc in services:
                url = self.url(svc.host, svc.port) + "/health"
                deadline = asyncio.get_running_loop().time() + timeout
                while True:
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                            if r.status == 200:
                                break
                    if not await self.hosts[svc.host].alive(svc.pid):
                        tail = await self.hosts[svc.host].tail(svc.log, 20)
                        raise RuntimeError(f"{svc.name} on {svc.host} exited while starting:\n{tail}")
                    if asyncio.get_running_loop().time() > deadline:
                        raise TimeoutError(f"{svc.name} on {svc.host} not healthy after {timeout:.0f} s; "
                                           f"log {svc.log} in {self.spec.host(svc.host).workdir}")
                    await asyncio.sleep(0.1)

    async def _start_instance(self, inst: InstanceSpec) -> list[Started]:
        engine_argv, car_argv = inst.argv(self.url(inst.host, inst.engine_port), self.collector_url, self.run_id)
        engine = await self._start(f"{inst.name}-engine", inst.host, inst.engine_port, ENGINES[inst.engine],
                                   engine_argv, inst.env)
        car = await self._start(f"{inst.name}-sidecar", inst.host, inst.sidecar_port, "block.predictor.service",
                                car_argv)
        return [engine, car]

    async def start(self) -> None:
        try:
            await asyncio.gather(*(h.connect() for h in self.hosts.values()))
            c = self.spec.collector
            collector = await self._start("collector", c.host, c.port, "store.collector", ["--db", c.db])
            services = [collector]
            for inst in self.spec.instances:
                services += await self._start_instance(inst)
            await self._wait_ready(services)
            s = self.spec.scheduler
            args = ["--policy", s.policy, "--admin-token", self.admin_token, "--collector-url", self.collector_url,
                    "--run-id", self.run_id]
            models = sorted({i.served for i in self.spec.instances})
            for m in models:
                args += ["--served-model-name", m]
            for inst in self.spec.instances:
                args += ["--instance", f"{inst.name}={self.url(inst.host, inst.sidecar_port)}"]
            await self._wait_ready([await self._start("scheduler", s.host, s.port, "block.scheduler.app", args)])
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop exactly the process groups this Cluster started: the scheduler, then side-cars, then
        engines (each tier at once), the collector last so the final event batches land."""
        for kind in STOP_ORDER:
            tier = [svc for svc in self.started.values() if svc.kind == kind]
            await asyncio.gather(*(self.hosts[svc.host].stop(svc.pid) for svc in tier))
        self.started.clear()
        for h in self.hosts.values():
            await h.close()

    async def kill(self, service: str) -> None:
        """SIGKILL one service (failure tests); it stays listed, so ``stop`` still ends its process group."""
        if service not in self.started:
            raise KeyError(f"no service {service!r}; services: {sorted(self.started)}")
        svc = self.started[service]
        await self.hosts[svc.host].kill(svc.pid)

    async def status(self) -> dict[str, dict]:
        out = {}
        for name, svc in self.started.items():
            out[name] = {"host": svc.host, "pid": svc.pid, "port": svc.port,
                         "alive": await self.hosts[svc.host].alive(svc.pid)}
        return out

    async def logs(self, service: str, lines: int = 100) -> str:
        if service not in self.started:
            service = f"{service}-engine"
        if service not in self.started:
            raise KeyError(f"no service {service!r}; services: {sorted(self.started)}")
        svc = self.started[service]
        return await self.hosts[svc.host].tail(svc.log, lines)

    async def admin(self, method: str, path: str, body: dict | None = None) -> Any:
        """Call the scheduler's admin API with this cluster's token; the decoded JSON reply (None if empty)."""
        async with aiohttp.ClientSession() as http, http.request(
                method, self.scheduler_url + path, json=body,
                headers={"authorization": f"Bearer {self.admin_token}"}) as r:
            text = await r.text()
            if r.status >= 400:
                raise RuntimeError(f"scheduler {method} {path}: {r.status} {text[:300]}")
            return orjson.loads(text) if text else None

    async def set_policy(self, policy: str) -> None:
        await self.admin("POST", "/admin/policy", {"policy": policy})

    async def add_instance(self, inst: InstanceSpec | None = None, timeout: float | None = None) -> str:
        """Start an instance (default: ``spec.new_instance()``, one more emulated one on this machine),
        register it with the scheduler once healthy, and return its name."""
        inst = inst or self.spec.new_instance()
        self.spec.host(inst.host)
        if inst.name in self.instance_names():
            raise ValueError(f"instance {inst.name} already exists")
        services = await self._start_instance(inst)
        try:
            await self._wait_ready(services, timeout)
        except BaseException:
            for svc in services:
                await self.hosts[svc.host].stop(self.started.pop(svc.name).pid)
            raise
        await self.admin("POST", "/admin/instances", {"name": inst.name, "url": self.url(inst.host, inst.sidecar_port)})
        self.spec.instances.append(inst)
        return inst.name

    async def drain_instance(self, name: str) -> None:
        """Stop routing new requests to ``name``; those in flight finish there."""
        await self.admin("POST", f"/admin/instances/{name}/drain")

    async def remove_instance(self, name: str) -> None:
        await self.admin("DELETE", f"/admin/instances/{name}")
        for kind in ("sidecar", "engine"):
            svc = self.started.pop(f"{name}-{kind}", None)
            if svc is not None:
                await self.hosts[svc.host].stop(svc.pid)
        self.spec.instances = [i for i in self.spec.instances if i.name != name]
