"""The cluster driver: start engines, side-cars, a scheduler and a collector, watch them, stop them.

One driver for every cluster the workbench runs: a cluster file of remote GPU hosts, or a local emulated
cluster described in code (``ClusterSpec.local``; ``workbench.local.LocalCluster`` is its blocking
view for the CLI, the autoscaler, benchmarks and tests). Hosts are reached with asyncssh (known-hosts
checking on, and a host whose ``~/.ssh/config`` turns it off is refused unless the cluster file says
``insecure_host_keys = true`` for it; keys from files or an agent; no passwords in cluster files) or, for
``localhost``, with local processes: the same interface either way. Every service is started as a
background process leading its own process group, its pid recorded and its log in ``<workdir>/logs``, and
``stop()`` stops exactly those process groups, never processes found by name.

Supervision: a started cluster watches the pids it started and restarts a crashed service with the same
arguments after a back-off that doubles per restart (``RestartPolicy``), gives up on one that keeps
crashing, and records every start, crash, restart, give-up and stop as a ``service_events`` row.
``kill()`` (failure tests) takes a service out of supervision unless asked otherwise.

Secrets: the scheduler's admin token, and the cluster token every service demands once any host is off
loopback (``store.auth``), are written to 0600 files in the hosts' workdirs through a command's stdin; the
services get the files' paths in their environment, so no secret is ever on a command line. Engines take no
token, so they listen on their host's loopback only, where their side-car reaches them.

A cluster file is checked before anything starts (``parse_cluster``): names that become file names and URL
parts, environment names that reach env(1), and ports, each error naming the file and the entry.

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
    flags = ["--first-byte-timeout", "120"]  # any further scheduler flags (timeouts, retries, in-flight cap)

    [collector]
    host = "gpu-a"
    port = 8300
    db = "block.duckdb"
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import re
import secrets
import shlex
import socket
import sys
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import orjson

from block.engines.settings import EngineSettings
from store.auth import ADMIN_TOKEN_FILE_ENV, TOKEN_FILE_ENV, cluster_token, is_loopback
from store.read import Reader
from store.schema import ServiceEventRow

log = logging.getLogger(__name__)

ENGINES = {"emulator": "block.engines.emulator", "vllm": "block.engines.vllm"}
# Scheduler limits that vLLM and the side-car spell alike: a vLLM instance's side-car takes them from the
# engine flags, since vLLM's /metrics reports its KV cache but not these.
SHARED_LIMITS = ("--max-num-seqs", "--max-num-batched-tokens", "--max-model-len")
LOCAL = "local"  # the host of a cluster described by ClusterSpec.local
# Instance and host names become log file names and URL parts: no slashes, no "..", no leading dot or dash.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # POSIX: anything else could be an option of env(1)
MAX_PENDING_EVENTS = 10_000  # service events kept while the collector is down


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a service of a local cluster or a test server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name an instance or a host, or None: it becomes a file name under the workdir."""
    if isinstance(name, str) and NAME.fullmatch(name) and ".." not in name:
        return None
    return f"name {name!r} must match {NAME.pattern} and not contain '..'"


def env_problem(env: object) -> str | None:
    """Why ``env`` cannot be a service's environment, or None: POSIX names (a key such as ``--split-string``
    would be an option of env(1), which then runs a shell command) and plain string values."""
    if not isinstance(env, dict):
        return 'env must be a table of NAME = "value"'
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key):
            return f"env key {key!r} is not a POSIX name ({ENV_NAME.pattern})"
        if not isinstance(value, str) or "\0" in value:
            return f"env {key}: the value must be a string without NUL, got {value!r:.60}"
    return None


def port_problem(port: object) -> str | None:
    if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
        return None
    return f"port {port!r} must be an integer in 1..65535"


@dataclass
class HostSpec:
    name: str
    address: str = "127.0.0.1"
    port: int = 22
    user: str | None = None
    key_file: str | None = None  # None: keys from the SSH agent
    known_hosts: str | None = None  # None: ~/.ssh/known_hosts, or UserKnownHostsFile of ~/.ssh/config
    workdir: str = "."
    python: str = "python3"
    gpus: int = 0
    insecure_host_keys: bool = False  # allow an SSH config that turns host-key checking off, loudly

    @property
    def local(self) -> bool:
        return self.address in ("localhost", "local")

    @property
    def bind_address(self) -> str:
        """The address its services listen on (and are reached at)."""
        return "127.0.0.1" if self.local else self.address


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
    flags: list[str] = field(default_factory=list)  # the service's own further flags (scheduler timeouts, ...)


@dataclass
class ClusterSpec:
    hosts: dict[str, HostSpec]
    instances: list[InstanceSpec]
    scheduler: ServiceSpec
    collector: ServiceSpec
    engine: EngineSettings = field(default_factory=EngineSettings)  # what new_instance() starts
    created: int = 0  # instances new_instance() made, so a removed instance's name is never reused

    @classmethod
    def local(cls, instances: int | Sequence[EngineSettings] = 4, engine: EngineSettings | None = None,
              policy: str = "block", workdir: str | Path = "workspace") -> ClusterSpec:
        """An emulated cluster on this machine, described in code instead of a cluster file: every
        service on a free 127.0.0.1 port, run by this Python, its log and the DuckDB file in ``workdir``.
        ``instances``: how many of ``engine``, or one EngineSettings per instance (a heterogeneous cluster;
        each side-car then predicts with its own instance's GPU)."""
        default = engine or EngineSettings()
        each = [default] * instances if isinstance(instances, int) else list(instances)
        wd = Path(workdir).resolve()
        host = HostSpec(LOCAL, "localhost", workdir=str(wd), python=sys.executable)
        spec = cls({LOCAL: host}, [], ServiceSpec(LOCAL, free_port(), policy),
                   ServiceSpec(LOCAL, free_port(), db=str(wd / "block.duckdb")), engine or (each or [default])[0])
        spec.instances = [spec.new_instance(settings) for settings in each]
        return spec

    def new_instance(self, engine: EngineSettings | None = None) -> InstanceSpec:
        """One more emulated instance of ``engine`` (default: the spec's) named ``instance-<k>``, seed k + 1,
        on this machine's host."""
        host = next((h.name for h in self.hosts.values() if h.local), None)
        if host is None:
            raise ValueError("a new instance without an InstanceSpec needs a localhost host; pass an InstanceSpec")
        self.created += 1
        return InstanceSpec.emulated(f"instance-{self.created - 1}", host, engine or self.engine, free_port(),
                                     free_port(), seed=self.created)

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
    """Build a ClusterSpec from a parsed cluster file and check everything that would otherwise fail late
    or unsafely: one error naming ``where`` and the entry, raised before anything starts."""
    def build(cls, entry: dict, what: str):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: {what} must be a table")
        if "password" in entry:
            raise ValueError(f"{where}: {what} has a password; use key files or an SSH agent, never passwords")
        try:
            return cls(**entry)
        except TypeError as exc:
            raise ValueError(f"{where}: bad {what}: {exc}") from exc

    def refuse(what: str, problem: str | None) -> None:
        if problem:
            raise ValueError(f"{where}: {what}: {problem}")

    hosts: dict[str, HostSpec] = {}
    for i, h in enumerate(data.get("hosts", [])):
        spec = build(HostSpec, h, f"hosts[{i}]")
        refuse(f"hosts[{i}]", name_problem(spec.name))
        refuse(f"hosts[{i}] ({spec.name})", port_problem(spec.port))
        if spec.name in hosts:
            raise ValueError(f"{where}: hosts[{i}]: host {spec.name!r} is defined twice")
        if not isinstance(spec.insecure_host_keys, bool):
            raise ValueError(f"{where}: hosts[{i}] ({spec.name}): insecure_host_keys must be true or false")
        hosts[spec.name] = spec
    if not hosts:
        raise ValueError(f"{where}: no [[hosts]]")
    instances = [build(InstanceSpec, x, f"instances[{i}]") for i, x in enumerate(data.get("instances", []))]
    names: set[str] = set()
    for i, inst in enumerate(instances):
        refuse(f"instances[{i}]", name_problem(inst.name))
        what = f"instance {inst.name}"
        if inst.name in names:
            raise ValueError(f"{where}: instances[{i}]: instance {inst.name!r} is defined twice")
        names.add(inst.name)
        if inst.host not in hosts:
            raise ValueError(f"{where}: {what} is on unknown host {inst.host!r}")
        if inst.engine not in ENGINES:
            raise ValueError(f"{where}: {what}: engine must be one of {sorted(ENGINES)}")
        refuse(what, env_problem(inst.env))
        for key in ("flags", "sidecar_flags"):
            value = getattr(inst, key)
            if value is not None and not (isinstance(value, list) and all(isinstance(f, str) for f in value)):
                raise ValueError(f"{where}: {what}: {key} must be a list of strings")
        if inst.engine == "emulator":
            try:  # a bad flag or an impossible engine fails here, not later in a service log
                inst.settings()[0].engine_config()
            except ValueError as exc:
                raise ValueError(f"{where}: {what}: {exc}") from exc
    if "scheduler" not in data or "collector" not in data:
        raise ValueError(f"{where}: needs a [scheduler] and a [collector] table")
    spec = ClusterSpec(hosts, instances, build(ServiceSpec, data["scheduler"], "scheduler"),
                       build(ServiceSpec, data["collector"], "collector"))
    for what, svc in (("scheduler", spec.scheduler), ("collector", spec.collector)):
        if svc.host not in hosts:
            raise ValueError(f"{where}: {what} is on unknown host {svc.host!r}; hosts: {sorted(hosts)}")
        if not (isinstance(svc.flags, list) and all(isinstance(f, str) for f in svc.flags)):
            raise ValueError(f"{where}: {what}: flags must be a list of strings")
    _check_ports(spec, where)
    return spec


def _check_ports(spec: ClusterSpec, where: str) -> None:
    """Every service port in 1..65535 and used once per machine (hosts at one address are one machine)."""
    taken: dict[tuple[str, int], str] = {}
    claims = [(i.host, port, f"instance {i.name} {kind}") for i in spec.instances
              for kind, port in (("engine_port", i.engine_port), ("sidecar_port", i.sidecar_port))]
    claims += [(spec.scheduler.host, spec.scheduler.port, "scheduler port"),
               (spec.collector.host, spec.collector.port, "collector port")]
    for host, port, what in claims:
        if problem := port_problem(port):
            raise ValueError(f"{where}: {what}: {problem}")
        key = (spec.hosts[host].bind_address, port)
        if key in taken:
            raise ValueError(f"{where}: {what}: port {port} on {key[0]} is already the {taken[key]}")
        taken[key] = what


def ssh_config_disables_host_keys(spec: HostSpec) -> list[str]:
    """The settings of the SSH client configuration (``~/.ssh/config``, which asyncssh obeys) that turn off
    host-key checking for this host, as ``Option value`` strings.

    ``UserKnownHostsFile none`` makes asyncssh accept any host key; ``/dev/null`` (and ``StrictHostKeyChecking
    no|off``, which asyncssh ignores but OpenSSH obeys) say the same intent, so they are refused too rather
    than half-honoured. A ``known_hosts`` file named in the cluster file replaces UserKnownHostsFile, as it
    does for asyncssh. asyncssh's own parser reads the file, so Host/Match blocks and Include apply exactly
    as they will when it connects; the subclass only adds the option asyncssh does not read.
    """
    from asyncssh.config import ConfigParseError, SSHClientConfig

    path = Path("~", ".ssh", "config").expanduser()
    if not os.access(path, os.R_OK):
        return []

    class Reading(SSHClientConfig):
        _handlers: ClassVar[dict] = {**SSHClientConfig._handlers,
                                     "stricthostkeychecking": ("StrictHostKeyChecking", SSHClientConfig._set_string)}

    try:
        options = Reading.load(None, [path], False, False, False, getpass.getuser(), spec.user or (), spec.address,
                               spec.port)
    except ConfigParseError as exc:
        raise ValueError(f"host {spec.name}: cannot read the SSH config: {exc}") from exc
    found = []
    strict = str(options.get("StrictHostKeyChecking", "")).lower()
    if strict in ("no", "off"):
        found.append(f"StrictHostKeyChecking {strict}")
    files = options.get("UserKnownHostsFile")
    if spec.known_hosts is None and isinstance(files, list):
        if not files:
            found.append("UserKnownHostsFile none")
        elif all(os.path.expanduser(f) == os.devnull for f in files):
            found.append(f"UserKnownHostsFile {os.devnull}")
    return found


class Host:
    """Runs commands on one host and the background processes it starts there."""

    def __init__(self, spec: HostSpec):
        self.spec = spec
        self._conn = None

    async def connect(self) -> None:
        """Open the SSH connection (nothing for localhost), refusing a host whose SSH config turns host-key
        checking off unless its spec says ``insecure_host_keys``."""
        if self.spec.local or self._conn is not None:
            return
        import asyncssh

        where = f"host {self.spec.name} ({self.spec.address}:{self.spec.port})"
        insecure = ssh_config_disables_host_keys(self.spec)
        if insecure and not self.spec.insecure_host_keys:
            raise ValueError(f"{where}: ~/.ssh/config turns host-key checking off ({', '.join(insecure)}); "
                             "refusing to connect: fix the SSH config, or set insecure_host_keys = true for this "
                             "host in the cluster file")
        if insecure:
            log.warning("%s: HOST-KEY CHECKING IS OFF (%s in ~/.ssh/config, allowed by insecure_host_keys = true): "
                        "anyone on the network path can impersonate this host and read the cluster token",
                        where, ", ".join(insecure))
        keys = [str(Path(self.spec.key_file).expanduser())] if self.spec.key_file else ()
        known = str(Path(self.spec.known_hosts).expanduser()) if self.spec.known_hosts else ()
        try:
            self._conn = await asyncssh.connect(self.spec.address, self.spec.port, username=self.spec.user,
                                                client_keys=keys or None, known_hosts=known or (),
                                                password=None)
        except (OSError, asyncssh.Error) as exc:
            raise ConnectionError(f"{where}: {exc}") from exc

    async def run(self, command: str, check: bool = True, input: str | None = None) -> str:
        """Run a shell command; ``input`` is its stdin (a secret goes there, never into ``command``). Without
        input stdin is empty, so a command that reads it ends instead of waiting."""
        if self.spec.local:
            proc = await asyncio.create_subprocess_shell(
                command, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate(input.encode() if input is not None else None)
            text, status = out.decode(errors="replace"), proc.returncode
        else:
            import asyncssh

            assert self._conn is not None, "connect() first"
            stdin = {"input": input} if input is not None else {"stdin": asyncssh.DEVNULL}
            result = await self._conn.run(command, check=False, **stdin)
            text, status = str(result.stdout or "") + str(result.stderr or ""), result.exit_status
        if check and status != 0:
            raise RuntimeError(f"host {self.spec.name}: `{command}` exited {status}: {text.strip()[-500:]}")
        return text

    async def spawn(self, args: list[str], log: str, env: dict[str, str] | None = None, append: bool = False,
                    nice: int = 0) -> int:
        """Start a detached process in the host's workdir, its output in ``log`` (appended to with ``append``,
        so a restart keeps the crash that caused it); return its pid.

        setsid makes the service lead its own process group, so ``stop`` can also reach the children it
        leaves behind (vLLM's engine core and workers). setsid, sh, nice, nohup and env(1) each exec the
        next program, so the recorded pid is the service's own. Environment names are checked here as well
        as in cluster files: whatever builds ``env``, none can become an option of env(1).

        ``nice`` (0-19) lowers the service's CPU priority, its children's included. Where the kernel groups
        each session for fair CPU shares (autogroup, on by default in most distributions), a process's own
        nice only ranks it within its session, so the new session's group gets the same nice too (Linux's
        ``/proc/self/autogroup``; lowering needs no privilege, but without CAP_SYS_ADMIN the kernel takes one
        such change per 0.1 s machine-wide, so a refused write is retried for half a second; elsewhere
        nice(1) alone does it).
        """
        if problem := env_problem(env or {}):
            raise ValueError(f"host {self.spec.name}: {problem}")
        if not 0 <= nice <= 19:
            raise ValueError(f"host {self.spec.name}: nice must be 0-19 (a lower priority), got {nice}")
        settings = [f"{k}={v}" for k, v in (env or {}).items()]
        group = (f"[ -e /proc/self/autogroup ] && for _ in 1 2 3 4 5; do {{ echo {nice} > /proc/self/autogroup; }} "
                 "2>/dev/null && break; sleep 0.1; done")
        lower = ["sh", "-c", f'{group}; exec "$@"', "sh", "nice", "-n", str(nice)] if nice else []
        cmd = " ".join(shlex.quote(a) for a in ["setsid", *lower, *(["env", *settings] if settings else []), *args])
        wd = shlex.quote(self.spec.workdir)
        out = await self.run(f"mkdir -p {wd}/logs && cd {wd} && (nohup {cmd} {'>>' if append else '>'} "
                             f"{shlex.quote(log)} 2>&1 < /dev/null & echo $!)")
        return int(out.strip().splitlines()[-1])

    async def write_secret(self, name: str, secret: str) -> str:
        """Write ``secret`` to ``<workdir>/secrets/<name>``, readable by this user only (0600 in a 0700
        folder, created under umask 077 so it is never readable by others, even briefly), passed on stdin so
        it is on no command line; return the file's absolute path."""
        wd, file = shlex.quote(self.spec.workdir), shlex.quote(name)
        out = await self.run(f"mkdir -p {wd} && cd {wd} && umask 077 && mkdir -p secrets && cd secrets && "
                             f"chmod 700 . && rm -f {file} && cat > {file} && chmod 600 {file} && "
                             f"echo \"$PWD\"/{file}", input=secret)
        return out.strip().splitlines()[-1]

    async def remove_secrets(self, names: Iterable[str]) -> None:
        files = " ".join(shlex.quote(f"{self.spec.workdir}/secrets/{n}") for n in names)
        await self.run(f"rm -f {files}", check=False)

    async def living(self, pids: Iterable[int]) -> set[int]:
        """The pids among ``pids`` that are running: one command for all of them (one SSH round trip). A
        zombie (dead, waiting for its reaper) is not running."""
        listed = " ".join(str(int(p)) for p in pids)
        if not listed:
            return set()
        out = await self.run(f"for p in {listed}; do kill -0 $p 2>/dev/null && "
                             "! grep -qs '^State:[[:space:]]*Z' /proc/$p/status && echo $p; done", check=False)
        return {int(x) for x in out.split() if x.isdigit()}

    async def alive(self, pid: int) -> bool:
        return pid in await self.living([pid])

    async def _exists(self, pid: int) -> bool:
        """Whether ``pid`` is still in the process table, a zombie included: ``stop`` and ``kill`` wait until
        it is reaped, so their callers find no trace of it."""
        return (await self.run(f"kill -0 {pid} 2>/dev/null && echo yes || echo no", check=False)).strip() == "yes"

    async def stop(self, pid: int, timeout: float = 10.0) -> None:
        """SIGTERM the service and give it ``timeout`` to shut down its own children; then SIGKILL what is
        left of its process group (the service, or children it failed to stop)."""
        await self.run(f"kill -TERM {pid} 2>/dev/null || true", check=False)
        for _ in range(int(timeout / 0.2)):
            if not await self._exists(pid):
                break
            await asyncio.sleep(0.2)
        await self.run(f"kill -KILL -{pid} 2>/dev/null || true", check=False)  # dash has no `--`

    async def kill(self, pid: int, timeout: float = 10.0) -> None:
        """SIGKILL the service alone (a crash, for failure tests) and wait until it is gone; its process
        group is left for ``stop``."""
        await self.run(f"kill -KILL {pid} 2>/dev/null || true", check=False)
        for _ in range(int(timeout / 0.05)):
            if not await self._exists(pid):
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
    """A service this driver started, and what it takes to start it again the same way."""

    name: str
    host: str
    pid: int
    port: int
    log: str
    module: str = ""
    args: list[str] = field(default_factory=list)  # after --host and --port
    env: dict[str, str] = field(default_factory=dict)  # besides PYTHONUNBUFFERED and the cluster token file

    @property
    def kind(self) -> str:
        """collector, scheduler, engine or sidecar (instance services are named <instance>-<kind>)."""
        return self.name.rsplit("-", 1)[-1]


@dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor restarts a crashed service: ``first_delay`` seconds after the crash, doubling with
    each restart in the last ``window`` seconds up to ``max_delay``; after ``max_restarts`` restarts in
    ``window`` it gives up and leaves the service down (a crash loop needs a person, not more restarts).
    Liveness is checked every ``poll_interval`` seconds."""

    first_delay: float = 1.0
    max_delay: float = 60.0
    max_restarts: int = 5
    window: float = 600.0
    poll_interval: float = 1.0


# Each kind of service's CPU priority on a shared host (nice: higher is lower). The scheduler is the one hop
# every request crosses, so it gets a core first; the collector writes in the background. On 2 cores with 8
# instances at 150 req/s and all equal, a quarter of the routing decisions were preempted mid-way (decision
# P99 6-9 ms against 0.7 ms P50, client TTFT P99 ~200 ms); with these, 2-3.5 ms and 70-85 ms (diagnostic runs).
SERVICE_NICE = {"scheduler": 0, "sidecar": 5, "engine": 5, "collector": 10}
STOP_ORDER = ("scheduler", "sidecar", "engine", "collector")  # clients first; the collector takes the last events
SECRETS = ("cluster-token", "admin-token")  # file names under <workdir>/secrets


class Cluster:
    """Start, supervise and stop a cluster described by a ClusterSpec (async, for notebooks; the blocking view
    of a local one is ``workbench.local.LocalCluster``)."""

    def __init__(self, spec: ClusterSpec, *, run_id: str = "workbench", admin_token: str | None = None,
                 ready_timeout: float = 600.0, restart: bool = True, restart_policy: RestartPolicy | None = None,
                 require_token: bool | None = None):
        """``ready_timeout`` bounds a service that neither becomes healthy nor exits: a real vLLM loading a
        large model takes minutes, and one that crashes is noticed at once by its pid. ``restart`` supervises
        the started services (``restart_policy``). ``require_token`` None gives the services a cluster token
        when any host is off loopback, where they refuse to run without one; True gives them one on loopback
        too (a machine shared with other users)."""
        self.spec = spec
        self.ready_timeout = ready_timeout
        self.run_id = run_id
        self.admin_token = admin_token or secrets.token_hex(16)
        self.restart = restart
        self.restart_policy = restart_policy or RestartPolicy()
        self.require_token = require_token
        self.hosts = {name: Host(h) for name, h in spec.hosts.items()}
        self.started: dict[str, Started] = {}
        self.restarts: dict[str, int] = {}  # restarts the supervisor made, by service
        self.cluster_token: str | None = None
        self.admin_token_file: str | None = None  # on the scheduler's host, once started
        self._token_files: dict[str, str] = {}  # host -> the cluster token file there
        self._secret_hosts: set[str] = set()  # hosts holding secret files to remove at stop
        self._watched: set[str] = set()  # services the supervisor restarts when they crash
        self._gave_up: set[str] = set()
        # what the scheduler was told at run time, told again to a restarted one (it keeps no state)
        self._policy: str | None = None
        self._drained: set[str] = set()
        self._restart_times: dict[str, list[float]] = {}
        self._recovering: dict[str, asyncio.Task] = {}
        self._spawning: set[asyncio.Task] = set()
        self._supervisor: asyncio.Task | None = None
        self._events: list[ServiceEventRow] = []  # recorded, not yet posted to the collector

    def url(self, host: str, port: int) -> str:
        return f"http://{self._bind(host)}:{port}"

    @property
    def scheduler_url(self) -> str:
        return self.url(self.spec.scheduler.host, self.spec.scheduler.port)

    @property
    def collector_url(self) -> str:
        return self.url(self.spec.collector.host, self.spec.collector.port)

    @property
    def token_required(self) -> bool:
        """Whether services get a cluster token: off loopback they refuse to listen without one."""
        if self.require_token is not None:
            return self.require_token
        return any(not is_loopback(h.bind_address) for h in self.spec.hosts.values())

    def _bind(self, host: str) -> str:
        return self.spec.host(host).bind_address

    def _listen(self, svc: Started) -> str:
        """Where a service listens: an engine on its host's loopback, where only its side-car (on the same
        host) talks to it, since engines take no cluster token; every other service on its host's address."""
        return "127.0.0.1" if svc.kind == "engine" else self._bind(svc.host)

    def _health_url(self, svc: Started) -> str:
        """What says a service is up: its /health, or for an engine on another machine (its loopback is out of
        reach from here) its side-car's /health, which answers 200 only while the side-car reaches it."""
        if svc.kind == "engine" and not is_loopback(self._bind(svc.host)):
            car = self.started[svc.name.removesuffix("engine") + "sidecar"]
            return self.url(car.host, car.port) + "/health"
        return f"http://{self._listen(svc)}:{svc.port}/health"

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
        return {name: f"http://{self._listen(svc)}:{svc.port}" for name, svc in self.started.items()}

    def pids(self) -> list[int]:
        return [svc.pid for svc in self.started.values()]

    def reader(self) -> Reader:
        return Reader(collector_url=self.collector_url, token=self.cluster_token)

    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.cluster_token}"} if self.cluster_token else {}

    async def _start(self, name: str, host: str, port: int, module: str, args: list[str],
                     env: dict[str, str] | None = None, append: bool = False) -> Started:
        h = self.hosts[host]
        svc = Started(name, host, 0, port, f"logs/{name}.log", module, args, dict(env or {}))
        argv = [h.spec.python, "-m", module, "--host", self._listen(svc), "--port", str(port), *args]
        token = {TOKEN_FILE_ENV: self._token_files[host]} if host in self._token_files else {}
        # PYTHONUNBUFFERED: logs readable while it runs
        svc.pid = await h.spawn(argv, svc.log, {"PYTHONUNBUFFERED": "1", **svc.env, **token}, append,
                                nice=SERVICE_NICE[svc.kind])
        self.started[name] = svc
        return svc

    async def _wait_ready(self, services: list[Started], timeout: float | None = None) -> None:
        timeout = self.ready_timeout if timeout is None else timeout
        async with aiohttp.ClientSession() as http:
            for svc in services:
                url = self._health_url(svc)
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
        if problem := name_problem(inst.name):
            raise ValueError(f"instance: {problem}")
        if problem := env_problem(inst.env):
            raise ValueError(f"instance {inst.name}: {problem}")
        engine_url = f"http://127.0.0.1:{inst.engine_port}"  # on the side-car's own host: see _listen
        engine_argv, car_argv = inst.argv(engine_url, self.collector_url, self.run_id)
        engine = await self._start(f"{inst.name}-engine", inst.host, inst.engine_port, ENGINES[inst.engine],
                                   engine_argv, inst.env)
        car = await self._start(f"{inst.name}-sidecar", inst.host, inst.sidecar_port, "block.predictor.service",
                                car_argv)
        return [engine, car]

    def _scheduler_args(self) -> list[str]:
        """The scheduler's arguments for the instances of the spec now (a restarted scheduler gets those
        added since, not the ones it first started with). Its admin token is in a file, not here. Its rows
        are journalled in the workdir, so a restart after a crash sends those the crash left unsent."""
        s = self.spec.scheduler
        args = ["--policy", s.policy, "--collector-url", self.collector_url, "--run-id", self.run_id,
                "--journal", "journal/scheduler", *s.flags]
        for m in sorted({i.served for i in self.spec.instances}):
            args += ["--served-model-name", m]
        for inst in self.spec.instances:
            args += ["--instance", f"{inst.name}={self.url(inst.host, inst.sidecar_port)}"]
        return args

    async def _write_secrets(self) -> str:
        """The cluster token (when required) in every host's workdir and the admin token on the scheduler's
        host, each in a 0600 file; services get the paths, never the secrets, in their environment. The
        cluster token is this process's ``BLOCK_CLUSTER_TOKEN`` (or its file) when set, else a new one.
        Returns the admin token file."""
        if self.token_required:
            self.cluster_token = cluster_token() or secrets.token_urlsafe(32)
            for name, h in self.hosts.items():  # one at a time: hosts may share a workdir
                self._secret_hosts.add(name)
                self._token_files[name] = await h.write_secret(SECRETS[0], self.cluster_token)
        self._secret_hosts.add(self.spec.scheduler.host)
        path = await self.hosts[self.spec.scheduler.host].write_secret(SECRETS[1], self.admin_token)
        self.admin_token_file = path
        return path

    async def start(self) -> None:
        try:
            await asyncio.gather(*(h.connect() for h in self.hosts.values()))
            admin_token_file = await self._write_secrets()
            c = self.spec.collector
            services = [await self._start("collector", c.host, c.port, "store.collector", ["--db", c.db, *c.flags])]
            for inst in self.spec.instances:
                services += await self._start_instance(inst)
            await self._wait_ready(services)
            s = self.spec.scheduler
            services.append(await self._start("scheduler", s.host, s.port, "block.scheduler.app",
                                              self._scheduler_args(), {ADMIN_TOKEN_FILE_ENV: admin_token_file}))
            await self._wait_ready(services[-1:])
            await self._watch(services)
        except BaseException:
            await self.stop()
            raise
        if self.restart:
            self._supervisor = asyncio.create_task(self._supervise())

    async def stop(self) -> None:
        """Stop supervising, then stop exactly the process groups this Cluster started: the scheduler, then
        side-cars, then engines (each tier at once), the collector last so the final event batches land;
        remove the secret files."""
        await self._stop_supervision()
        for kind in STOP_ORDER:
            tier = [svc for svc in self.started.values() if svc.kind == kind]
            if kind == "collector":
                for svc in tier:
                    self._record(svc, "stopped")
                await self._flush()
            await asyncio.gather(*(self.hosts[svc.host].stop(svc.pid) for svc in tier))
            if kind != "collector":
                for svc in tier:
                    self._record(svc, "stopped")
        self.started.clear()
        self._watched.clear()
        for name in sorted(self._secret_hosts):
            await self.hosts[name].remove_secrets(SECRETS)
        self._secret_hosts.clear()
        for h in self.hosts.values():
            await h.close()

    async def kill(self, service: str, restart: bool = False) -> None:
        """SIGKILL one service (failure tests); it stays listed, so ``stop`` still ends its process group. It
        is taken out of supervision and stays dead, unless ``restart`` lets the supervisor restart it."""
        if service not in self.started:
            raise KeyError(f"no service {service!r}; services: {sorted(self.started)}")
        svc = self.started[service]
        if not restart:
            self._forget(service)
        await self.hosts[svc.host].kill(svc.pid)
        if not restart:
            self._record(svc, "stopped", f"pid {svc.pid} SIGKILLed by Cluster.kill; not restarted")

    async def status(self) -> dict[str, dict]:
        """Every started service: where, its pid and port, whether it runs, how often the supervisor
        restarted it, whether it is supervised, is being restarted now, or was given up on."""
        living: dict[str, set[int]] = {}
        for host in {svc.host for svc in self.started.values()}:
            living[host] = await self.hosts[host].living(s.pid for s in self.started.values() if s.host == host)
        return {name: {"host": svc.host, "pid": svc.pid, "port": svc.port, "alive": svc.pid in living[svc.host],
                       "restarts": self.restarts.get(name, 0), "supervised": name in self._watched and self.restart,
                       "restarting": name in self._recovering, "gave_up": name in self._gave_up}
                for name, svc in self.started.items()}

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
        self._policy = policy

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
        await self._watch(services)
        return inst.name

    async def drain_instance(self, name: str) -> None:
        """Stop routing new requests to ``name``; those in flight finish there."""
        await self.admin("POST", f"/admin/instances/{name}/drain")
        self._drained.add(name)

    async def remove_instance(self, name: str) -> None:
        await self.admin("DELETE", f"/admin/instances/{name}")
        self._drained.discard(name)
        for kind in ("sidecar", "engine"):
            self._forget(f"{name}-{kind}")
            svc = self.started.pop(f"{name}-{kind}", None)
            if svc is not None:
                await self.hosts[svc.host].stop(svc.pid)
                self._record(svc, "stopped", "instance removed")
        self.spec.instances = [i for i in self.spec.instances if i.name != name]
        await self._flush()

    # Supervision: services are watched once healthy; a crash is restarted by its own task, so one service's
    # back-off never delays another's restart.

    async def _watch(self, services: list[Started]) -> None:
        for svc in services:
            self._record(svc, "started", f"pid {svc.pid}")
            if self.restart:
                self._watched.add(svc.name)
        await self._flush()

    def _forget(self, service: str) -> None:
        """Take a service out of supervision, cancelling a restart under way."""
        self._watched.discard(service)
        task = self._recovering.pop(service, None)
        if task is not None:
            task.cancel()

    async def _supervise(self) -> None:
        """Every ``poll_interval``: find the watched services whose pid is gone (one liveness command per
        host), start each one's recovery, collector first, and post the events recorded so far."""
        while True:
            await asyncio.sleep(self.restart_policy.poll_interval)
            try:
                for host in {self.started[n].host for n in self._watched}:
                    watched = [self.started[n] for n in self._watched - set(self._recovering)
                               if self.started[n].host == host]
                    living = await self.hosts[host].living(svc.pid for svc in watched)
                    for svc in sorted(watched, key=lambda s: s.kind != "collector"):
                        current = svc.name in self._watched and self.started.get(svc.name) is svc
                        if svc.pid not in living and current and svc.name not in self._recovering:
                            self._recovering[svc.name] = asyncio.create_task(self._recover(svc))
                await self._flush()
            except Exception:  # a host that cannot be reached now is tried again at the next poll
                log.exception("cluster supervisor: this round failed; trying again in %s s",
                              self.restart_policy.poll_interval)

    async def _recover(self, svc: Started) -> None:
        """Restart a crashed service with the same arguments after the policy's back-off (other services
        wait for a crashed collector to be back first), or give up on it and say so."""
        policy = self.restart_policy
        loop = asyncio.get_running_loop()
        history = self._restart_times.setdefault(svc.name, [])
        host = self.hosts[svc.host]
        try:
            tail = (await host.tail(svc.log, 1)).strip()[-300:]
            self._record(svc, "crashed", f"pid {svc.pid} is gone" + (f"; last log line: {tail}" if tail else ""))
            while True:
                history[:] = [t for t in history if loop.time() - t < policy.window]
                if len(history) >= policy.max_restarts:
                    self._watched.discard(svc.name)
                    self._gave_up.add(svc.name)
                    self._record(svc, "gave_up", f"{len(history)} restarts in {policy.window:g} s; left down, "
                                                 f"see {svc.log} in {self.spec.host(svc.host).workdir}")
                    return
                delay = min(policy.first_delay * 2 ** len(history), policy.max_delay)
                await asyncio.sleep(delay)
                collector = self._recovering.get("collector")
                if svc.kind != "collector" and collector is not None:
                    await asyncio.wait({collector})
                history.append(loop.time())
                attempt = self.restarts[svc.name] = self.restarts.get(svc.name, 0) + 1
                new = await self._respawn(svc)
                try:
                    await self._wait_ready([new])
                except (RuntimeError, TimeoutError) as exc:  # exited again, or never became healthy
                    await host.stop(new.pid)
                    self._record(new, "crashed", f"restart {attempt} failed: {exc}"[:500])
                    continue
                self._record(new, "restarted", f"pid {svc.pid} -> {new.pid} after {delay:g} s back-off "
                                               f"(restart {attempt})")
                if svc.kind == "scheduler":
                    await self._retell_scheduler()
                return
        except Exception:  # the host cannot be reached: the next poll finds the service down again
            log.exception("cluster supervisor: restarting %s on %s failed", svc.name, svc.host)
        finally:
            if self._recovering.get(svc.name) is asyncio.current_task():
                del self._recovering[svc.name]

    async def _retell_scheduler(self) -> None:
        """A restarted scheduler starts from its flags: tell it the policy and the drains it was told since."""
        if self._policy is not None:
            await self.admin("POST", "/admin/policy", {"policy": self._policy})
        for name in sorted(self._drained):
            await self.admin("POST", f"/admin/instances/{name}/drain")

    async def _respawn(self, svc: Started) -> Started:
        """Start ``svc`` again the same way (a scheduler with the instances of now), its log appended to.
        Shielded, so a stop() that cancels the recovery still finds the new pid in ``started``."""
        args = self._scheduler_args() if svc.kind == "scheduler" else svc.args
        task = asyncio.ensure_future(self._start(svc.name, svc.host, svc.port, svc.module, args, svc.env, True))
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)
        return await asyncio.shield(task)

    async def _stop_supervision(self) -> None:
        tasks = [t for t in (self._supervisor, *self._recovering.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._spawning, return_exceptions=True)
        self._supervisor = None
        self._recovering.clear()

    def _record(self, svc: Started, event: str, detail: str = "") -> None:
        """Keep a service event for the collector (posted by ``_flush``) and log it."""
        self._events.append(ServiceEventRow(run_id=self.run_id, ts=time.time(), service=svc.name, host=svc.host,
                                            event=event, detail=detail))
        level = {"crashed": logging.WARNING, "gave_up": logging.ERROR}.get(event, logging.INFO)
        log.log(level, "%s on %s %s%s", svc.name, svc.host, event, f": {detail}" if detail else "")

    async def _flush(self) -> None:
        """Post the recorded service events to the collector's /events; while it is down (or restarting)
        they are kept, the newest ``MAX_PENDING_EVENTS``, for the next try. Rows carry their own event ids,
        so a batch that did land before a timeout is not written twice."""
        if not self._events or "collector" not in self.started or "collector" in self._recovering:
            return
        rows, self._events = self._events, []
        body = orjson.dumps({"service_events": [r.to_dict() for r in rows]})
        try:
            async with aiohttp.ClientSession() as http, http.post(
                    self.collector_url + "/events", data=body, timeout=aiohttp.ClientTimeout(total=5),
                    headers={"content-type": "application/json", **self._auth()}) as r:
                if r.status == 400:  # the rows themselves are wrong: sending them again cannot help
                    log.error("collector refused %d service events: %s", len(rows), (await r.text())[:300])
                    return
                r.raise_for_status()
        except (TimeoutError, aiohttp.ClientError):
            self._events = (rows + self._events)[-MAX_PENDING_EVENTS:]
