"""Drive a cluster of hosts from a notebook: start engines, side-cars, a scheduler and a collector.

Hosts are reached with asyncssh (known-hosts checking on; keys from files or an agent; no passwords in
cluster files) or, for ``localhost``, with local processes: the same interface either way. Every service
is started as a supervised background process whose pid is recorded, and ``stop()`` stops exactly those
pids, never processes found by name.

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
    sidecar_flags = ["--gpu", "A30"]  # and the limits it shares with the engine: see sidecar_args

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
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ENGINES = {"emulator": "block.engines.emulator", "vllm": "block.engines.vllm"}
# Scheduler limits that vLLM and the side-car spell alike: a vLLM instance's side-car takes them from the
# engine flags, since vLLM's /metrics reports its KV cache but not these.
SHARED_LIMITS = ("--max-num-seqs", "--max-num-batched-tokens", "--max-model-len")


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
    flags: list[str] = field(default_factory=list)  # engine flags (also the side-car's, for the emulator)
    env: dict[str, str] = field(default_factory=dict)  # engine environment (CUDA_VISIBLE_DEVICES, VLLM_*)
    predictor_model: str | None = None  # the side-car's model spec (vllm instances; default: model)
    sidecar_flags: list[str] | None = None  # the side-car's own flags (see sidecar_args)

    @property
    def served(self) -> str:
        return self.served_model_name or self.model

    def sidecar_args(self) -> list[str]:
        """The side-car's flags: an emulator's own flags (unless sidecar_flags); for vLLM, the limits it
        shares with the engine, then sidecar_flags (a later flag wins, so those can override)."""
        if self.engine == "emulator":
            return list(self.flags if self.sidecar_flags is None else self.sidecar_flags)
        shared: list[str] = []
        for i, flag in enumerate(self.flags):
            name, eq, _ = flag.partition("=")
            if name in SHARED_LIMITS:
                shared += [flag] if eq else self.flags[i:i + 2]
        return shared + list(self.sidecar_flags or [])


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
        out = await self.run(f"cd {wd} && mkdir -p logs && (nohup {cmd} > {shlex.quote(log)} 2>&1 < /dev/null & "
                             "echo $!)")
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


class Cluster:
    """Start, watch and stop a cluster described by a ClusterSpec, from a notebook (async API)."""

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
        address = self.spec.host(host).address
        return f"http://{'127.0.0.1' if address in ('localhost', 'local') else address}:{port}"

    @property
    def scheduler_url(self) -> str:
        return self.url(self.spec.scheduler.host, self.spec.scheduler.port)

    @property
    def collector_url(self) -> str:
        return self.url(self.spec.collector.host, self.spec.collector.port)

    def _bind(self, host: str) -> str:
        address = self.spec.host(host).address
        return "127.0.0.1" if address in ("localhost", "local") else address

    async def _start(self, name: str, host: str, port: int, module: str, args: list[str],
                     env: dict[str, str] | None = None) -> Started:
        h = self.hosts[host]
        log = f"logs/{name}.log"
        pid = await h.spawn([h.spec.python, "-m", module, "--host", self._bind(host), "--port", str(port), *args], log,
                            env)
        svc = Started(name, host, pid, port, log)
        self.started[name] = svc
        return svc

    async def _wait_ready(self, services: list[Started]) -> None:
        timeout = self.ready_timeout
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
                        raise TimeoutError(f"{svc.name} on {svc.host} not healthy after {timeout:.0f} s")
                    await asyncio.sleep(0.2)

    async def _start_instance(self, inst: InstanceSpec) -> list[Started]:
        engine = await self._start(f"{inst.name}-engine", inst.host, inst.engine_port, ENGINES[inst.engine],
                                   ["--name", inst.name, "--model", inst.model, "--served-model-name", inst.served,
                                    *inst.flags], inst.env)
        car = await self._start(f"{inst.name}-sidecar", inst.host, inst.sidecar_port, "block.predictor.service",
                                ["--name", inst.name, "--engine-url", self.url(inst.host, inst.engine_port),
                                 "--collector-url", self.collector_url, "--run-id", self.run_id,
                                 "--model", inst.predictor_model or inst.model, *inst.sidecar_args()])
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
        """Stop exactly the processes this Cluster started, scheduler first and collector last."""
        order = sorted(self.started.values(), key=lambda s: (s.name != "scheduler", s.name == "collector"))
        for svc in order:
            await self.hosts[svc.host].stop(svc.pid)
        self.started.clear()
        for h in self.hosts.values():
            await h.close()

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

    async def _admin(self, method: str, path: str, body: dict | None = None) -> None:
        async with aiohttp.ClientSession() as http, http.request(
                method, self.scheduler_url + path, json=body,
                headers={"authorization": f"Bearer {self.admin_token}"}) as r:
            if r.status >= 400:
                raise RuntimeError(f"scheduler {method} {path}: {r.status} {await r.text()}")

    async def add_instance(self, inst: InstanceSpec) -> None:
        self.spec.host(inst.host)
        services = await self._start_instance(inst)
        await self._wait_ready(services)
        await self._admin("POST", "/admin/instances",
                          {"name": inst.name, "url": self.url(inst.host, inst.sidecar_port)})
        self.spec.instances.append(inst)

    async def remove_instance(self, name: str) -> None:
        await self._admin("DELETE", f"/admin/instances/{name}")
        for kind in ("sidecar", "engine"):
            svc = self.started.pop(f"{name}-{kind}", None)
            if svc is not None:
                await self.hosts[svc.host].stop(svc.pid)
        self.spec.instances = [i for i in self.spec.instances if i.name != name]
