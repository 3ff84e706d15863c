"""The cluster driver refuses unsafe set-ups before anything starts, restarts what crashes, and keeps secrets
off command lines: cluster-file checks, SSH configs that turn host-key checking off (a real SSH server on
loopback and a temporary HOME), a crashed engine and collector restarted with back-off and recorded in
DuckDB, and the token files (real processes on loopback)."""

import asyncio
import dataclasses
import logging
import os
import signal
import stat
import sys

import aiohttp
import psutil
import pytest

from block.engines.settings import EngineSettings
from simulator.workload import Request
from store.auth import TOKEN_FILE_ENV
from workbench.cluster import (
    ADMIN_TOKEN_FILE_ENV,
    LOCAL,
    Cluster,
    ClusterSpec,
    Host,
    HostSpec,
    InstanceSpec,
    RestartPolicy,
    load_cluster,
    parse_cluster,
)
from workbench.loadgen import run_load
from workbench.sshserver import start_loopback_ssh

BASE = {"hosts": [{"name": "a"}], "scheduler": {"host": "a", "port": 8000}, "collector": {"host": "a", "port": 8300}}


def with_instance(**fields) -> dict:
    return {**BASE, "instances": [{"name": "x", "host": "a", **fields}]}


@pytest.mark.parametrize(("data", "message"), [
    (with_instance(env={"--split-string": "sh -c 'touch /tmp/pwned'"}),
     r"instance x: env key '--split-string' is not a POSIX name"),
    (with_instance(env={"CUDA_VISIBLE_DEVICES": 1}),
     r"instance x: env CUDA_VISIBLE_DEVICES: the value must be a string"),
    (with_instance(env={"A=B": "c"}), r"instance x: env key 'A=B' is not a POSIX name"),
    ({**BASE, "instances": [{"name": "../../x", "host": "a"}]}, r"instances\[0\]: name '\.\./\.\./x' must match"),
    ({**BASE, "instances": [{"name": "a..b", "host": "a"}]}, r"instances\[0\]: name 'a\.\.b' .* not contain '\.\.'"),
    ({**BASE, "instances": [{"name": "x" * 65, "host": "a"}]}, r"instances\[0\]: name 'x{65}' must match"),
    ({**BASE, "hosts": [{"name": "gpu/a"}]}, r"hosts\[0\]: name 'gpu/a' must match"),
    ({**BASE, "hosts": [{"name": "a"}, {"name": "a"}]}, r"hosts\[1\]: host 'a' is defined twice"),
    ({**BASE, "instances": [{"name": "x", "host": "a"}, {"name": "x", "host": "a", "engine_port": 1,
                                                         "sidecar_port": 2}]},
     r"instances\[1\]: instance 'x' is defined twice"),
    (with_instance(engine_port=0), r"instance x engine_port: port 0 must be an integer in 1\.\.65535"),
    (with_instance(sidecar_port=70000), r"instance x sidecar_port: port 70000 must be an integer"),
    (with_instance(engine_port="8100"), r"instance x engine_port: port '8100' must be an integer"),
    ({**BASE, "scheduler": {"host": "a", "port": True}}, r"scheduler port: port True must be an integer"),
    ({**BASE, "hosts": [{"name": "a", "port": 0}]}, r"hosts\[0\] \(a\): port 0 must be an integer"),
    (with_instance(sidecar_port=8300), r"collector port: port 8300 on 127\.0\.0\.1 is already the instance x "
                                       r"sidecar_port"),
    (with_instance(engine_port=8200), r"instance x sidecar_port: port 8200 on 127\.0\.0\.1 is already the "
                                      r"instance x engine_port"),
    ({**BASE, "hosts": [{"name": "a", "address": "localhost"}, {"name": "b"}],
      "collector": {"host": "b", "port": 8000}}, r"collector port: port 8000 on 127\.0\.0\.1 is already the scheduler"),
    (with_instance(flags="--gpu A30"), r"instance x: flags must be a list of strings"),
    ({**BASE, "hosts": [{"name": "a", "insecure_host_keys": "yes"}]},
     r"hosts\[0\] \(a\): insecure_host_keys must be true or false"),
    ({**BASE, "collector": {"host": "zz", "port": 8300}}, r"collector is on unknown host 'zz'"),
])
def test_unsafe_cluster_files_are_refused_naming_the_entry(data, message):
    with pytest.raises(ValueError, match=f"^cluster: {message}"):
        parse_cluster(data)


def test_the_same_port_on_two_machines_is_fine_and_errors_name_the_file(tmp_path):
    spec = parse_cluster({"hosts": [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}],
                          "scheduler": {"host": "a", "port": 8000}, "collector": {"host": "b", "port": 8000},
                          "instances": [{"name": "gpu-0.a_1", "host": "a", "env": {"_X1": "1"}}]})
    assert spec.instances[0].name == "gpu-0.a_1"
    path = tmp_path / "cluster.toml"
    path.write_text('[[hosts]]\nname = "a"\n[[instances]]\nname = "../../x"\nhost = "a"\n'
                    '[scheduler]\nhost = "a"\nport = 8000\n[collector]\nhost = "a"\nport = 8300\n')
    with pytest.raises(ValueError, match=f"^{path}: instances\\[0\\]: name '../../x'"):
        load_cluster(path)


def test_names_and_env_built_in_code_are_checked_before_anything_runs(tmp_path):
    """Specs built in code skip parse_cluster; the driver checks again where a name becomes a log path and
    where env reaches env(1)."""
    async def go():
        host = Host(HostSpec("l", "localhost", workdir=str(tmp_path / "wd")))
        with pytest.raises(ValueError, match="host l: env key '--split-string' is not a POSIX name"):
            await host.spawn(["true"], "logs/x.log", {"--split-string": f"touch {tmp_path / 'pwned'}"})
        cluster = Cluster(ClusterSpec.local(0, workdir=tmp_path / "wd"), restart=False)
        bad = InstanceSpec.emulated("../../escaped", LOCAL, EngineSettings(), 1, 2)
        with pytest.raises(ValueError, match=r"instance: name '\.\./\.\./escaped' must match"):
            await cluster.add_instance(bad)

    asyncio.run(go())
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "escaped.log").exists()
    assert not (tmp_path / "wd").exists()


def ssh_config(home, text: str) -> None:
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    (home / ".ssh" / "config").write_text(text)


def test_an_ssh_config_that_turns_host_key_checking_off_is_refused(tmp_path, monkeypatch, caplog):
    """asyncssh obeys ~/.ssh/config: with ``UserKnownHostsFile none`` it would accept any host key (here the
    loopback server's key is in no known_hosts file at all). The driver refuses such a host, before anything
    starts, unless the cluster file says ``insecure_host_keys = true`` for it, and then says so loudly."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))

    async def go():
        ssh = await start_loopback_ssh(tmp_path / "ssh")
        try:
            pinned = ssh.host("a", str(tmp_path / "wd"), sys.executable)
            unpinned = dataclasses.replace(pinned, known_hosts=None)
            ssh_config(home, "Host other.example\n    UserKnownHostsFile none\n")  # another host's business
            with pytest.raises(ConnectionError, match="Host key is not trusted"):
                await Host(unpinned).connect()

            ssh_config(home, "Host 127.0.0.1\n    UserKnownHostsFile none\n")
            with pytest.raises(ValueError, match=r"host a \(127\.0\.0\.1:\d+\): ~/\.ssh/config turns host-key "
                                                 r"checking off \(UserKnownHostsFile none\); refusing to connect"):
                await Host(unpinned).connect()
            cluster = Cluster(parse_cluster({**BASE, "hosts": [dataclasses.asdict(unpinned)]}))
            with pytest.raises(ValueError, match="insecure_host_keys = true"):
                await cluster.start()
            assert not (tmp_path / "wd").exists()  # refused before anything was started or written

            with caplog.at_level(logging.WARNING, logger="workbench.cluster"):
                host = Host(dataclasses.replace(unpinned, insecure_host_keys=True))
                await host.connect()
                assert (await host.run("echo hello")).strip() == "hello"
                await host.close()
            assert "HOST-KEY CHECKING IS OFF (UserKnownHostsFile none" in caplog.text

            ssh_config(home, "Host *\n    UserKnownHostsFile /dev/null\n")
            with pytest.raises(ValueError, match="UserKnownHostsFile /dev/null"):
                await Host(unpinned).connect()
            pinned_host = Host(pinned)  # the cluster file's known_hosts replaces UserKnownHostsFile
            await pinned_host.connect()
            await pinned_host.close()

            ssh_config(home, "Match host 127.0.0.1\n    StrictHostKeyChecking=no\n")
            with pytest.raises(ValueError, match=r"\(StrictHostKeyChecking no\)"):
                await Host(pinned).connect()
            allowed = Host(dataclasses.replace(pinned, insecure_host_keys=True))
            await allowed.connect()  # allowed; asyncssh still checks the pinned key
            await allowed.close()
        finally:
            await ssh.close()

    asyncio.run(go())


def test_whether_services_get_a_cluster_token():
    remote = parse_cluster({**BASE, "hosts": [{"name": "a", "address": "10.0.0.5"}]})
    assert Cluster(remote).token_required
    assert not Cluster(parse_cluster(BASE)).token_required
    assert not Cluster(ClusterSpec.local(0)).token_required
    assert Cluster(ClusterSpec.local(0), require_token=True).token_required


def test_engines_listen_on_loopback_where_only_their_sidecar_reaches_them(monkeypatch):
    """Engines take no cluster token, so on a host reached over the network they listen on its loopback;
    the side-car (same host) gets that URL and listens on the host's address, with the token file."""
    spawned = {}

    async def spawn(self, args, log, env=None, append=False, nice=0):
        spawned[log] = (args, env)
        return len(spawned)

    monkeypatch.setattr(Host, "spawn", spawn)
    spec = parse_cluster({**BASE, "hosts": [{"name": "a", "address": "10.0.0.5"}],
                          "instances": [{"name": "x", "host": "a", "engine_port": 8100, "sidecar_port": 8200}]})
    cluster = Cluster(spec)
    cluster._token_files = {"a": "/srv/block/secrets/cluster-token"}
    asyncio.run(cluster._start_instance(spec.instances[0]))
    (engine, engine_env), (car, car_env) = spawned["logs/x-engine.log"], spawned["logs/x-sidecar.log"]
    assert engine[engine.index("--host") + 1] == "127.0.0.1" and car[car.index("--host") + 1] == "10.0.0.5"
    assert car[car.index("--engine-url") + 1] == "http://127.0.0.1:8100"
    assert engine_env[TOKEN_FILE_ENV] == car_env[TOKEN_FILE_ENV] == "/srv/block/secrets/cluster-token"
    assert cluster._health_url(cluster.started["x-engine"]) == "http://10.0.0.5:8200/health"
    assert cluster.urls() == {"x-engine": "http://127.0.0.1:8100", "x-sidecar": "http://10.0.0.5:8200"}


async def wait_for(predicate, timeout: float = 90.0, what: str = "condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s")
        await asyncio.sleep(0.1)


def test_crashed_services_are_restarted_with_back_off_and_recorded(tmp_path):
    """An engine SIGKILLed from outside (not via Cluster.kill) comes back with the same arguments, after
    0.2 s, then 0.4 s; the third crash in the window is given up on. A crashed collector comes back first and
    its own crash lands in DuckDB after. Cluster.kill leaves a service down. Every step is a service_events
    row in DuckDB."""
    policy = RestartPolicy(first_delay=0.2, max_delay=5.0, max_restarts=2, window=300.0, poll_interval=0.1)
    spec = ClusterSpec.local(1, EngineSettings(time_scale=20.0), "round_robin", tmp_path / "ws")
    cluster = Cluster(spec, run_id="restart", ready_timeout=60.0, restart_policy=policy)

    async def crash(service: str, restarts: int) -> None:
        svc = cluster.started[service]
        argv = psutil.Process(svc.pid).cmdline()
        os.kill(svc.pid, signal.SIGKILL)

        async def back() -> bool:
            status = (await cluster.status())[service]
            return status["restarts"] == restarts and status["alive"] and not status["restarting"]
        await wait_for(back, what=f"restart {restarts} of {service}")
        assert cluster.started[service].pid != svc.pid
        assert psutil.Process(cluster.started[service].pid).cmdline() == argv

    async def events(service: str) -> list[tuple[str, str]]:
        sql = "SELECT event, detail FROM service_events WHERE run_id = ? AND service = ? ORDER BY ts"
        rows = await asyncio.to_thread(cluster.reader().sql, sql, ["restart", service])
        return list(rows.itertuples(index=False, name=None))

    async def go():
        await cluster.start()
        try:
            await crash("instance-0-engine", 1)
            await wait_for(lambda: _routable(cluster), what="the scheduler to see the engine again")
            records = await run_load(cluster.scheduler_url, [Request(i, 0.05 * i, 30, 8) for i in range(5)],
                                     "Llama-2-7B")
            assert [r.status for r in records] == ["ok"] * 5
            await crash("instance-0-engine", 2)
            os.kill(cluster.started["instance-0-engine"].pid, signal.SIGKILL)
            await wait_for(lambda: _gave_up(cluster, "instance-0-engine"), what="give-up")

            await crash("collector", 1)
            await cluster.kill("instance-0-sidecar")
            await asyncio.sleep(1.0)
            status = await cluster.status()
            assert status["instance-0-sidecar"] == {**status["instance-0-sidecar"], "alive": False, "restarts": 0,
                                                    "supervised": False}
            assert status["instance-0-engine"]["gave_up"] and status["collector"]["restarts"] == 1

            engine = await events("instance-0-engine")
            assert [e for e, _ in engine] == ["started", "crashed", "restarted", "crashed", "restarted", "crashed",
                                              "gave_up"]
            assert "after 0.2 s back-off (restart 1)" in engine[2][1]
            assert "after 0.4 s back-off (restart 2)" in engine[4][1]
            assert engine[6][1].startswith("2 restarts in 300 s; left down")
            assert [e for e, _ in await events("collector")] == ["started", "crashed", "restarted"]
            await wait_for(lambda: _landed(events, "instance-0-sidecar", "stopped"), 10, "the kill's event")
        finally:
            await cluster.stop()

    asyncio.run(go())


def test_a_restarted_scheduler_is_told_the_policy_and_drains_again(tmp_path):
    policy = RestartPolicy(first_delay=0.2, max_delay=5.0, max_restarts=3, window=300.0, poll_interval=0.1)
    spec = ClusterSpec.local(2, EngineSettings(time_scale=20.0), "round_robin", tmp_path / "ws")
    cluster = Cluster(spec, run_id="retell", ready_timeout=60.0, restart_policy=policy)

    async def go():
        await cluster.start()
        try:
            await cluster.set_policy("least_requests")
            await cluster.drain_instance("instance-0")
            os.kill(cluster.started["scheduler"].pid, signal.SIGKILL)

            async def back() -> bool:
                status = (await cluster.status())["scheduler"]
                return status["restarts"] == 1 and status["alive"] and not status["restarting"]
            await wait_for(back, what="the scheduler's restart")
            assert (await cluster.admin("GET", "/admin/policy"))["policy"] == "least_requests"
            listed = {i["name"]: i["status"] for i in await cluster.admin("GET", "/admin/instances")}
            assert listed["instance-0"] == "draining"
        finally:
            await cluster.stop()

    asyncio.run(go())


async def _routable(cluster: Cluster) -> bool:
    async with aiohttp.ClientSession() as http, http.get(cluster.scheduler_url + "/health") as r:
        return r.status == 200


async def _gave_up(cluster: Cluster, service: str) -> bool:
    return (await cluster.status())[service]["gave_up"]


async def _landed(events, service: str, event: str) -> bool:
    return event in [e for e, _ in await events(service)]


def test_secrets_go_through_0600_files_never_argv(tmp_path, monkeypatch):
    """The admin token and the cluster token are in 0600 files in the workdir; services get the files' paths
    in their environment and no process's command line holds either secret. The driver's own
    BLOCK_CLUSTER_TOKEN_FILE is the token it hands on; the files are gone after stop."""
    given = tmp_path / "my-token"
    given.write_text("cluster-token-from-the-driver-environment\n")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(given))
    spec = ClusterSpec.local(1, EngineSettings(time_scale=20.0), "round_robin", tmp_path / "ws")
    cluster = Cluster(spec, run_id="secrets", ready_timeout=60.0, restart=False, require_token=True)

    async def go():
        await cluster.start()
        try:
            secrets_dir = tmp_path / "ws" / "secrets"
            token_file, admin_file = secrets_dir / "cluster-token", secrets_dir / "admin-token"
            assert cluster.admin_token_file == str(admin_file)
            assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
            for path in (token_file, admin_file):
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert token_file.read_text() == cluster.cluster_token == "cluster-token-from-the-driver-environment"
            assert admin_file.read_text() == cluster.admin_token
            secrets = (cluster.admin_token, cluster.cluster_token)
            for proc in psutil.process_iter(["cmdline"]):
                assert not any(s in " ".join(proc.info["cmdline"] or ()) for s in secrets), proc.info["cmdline"]
            for name, svc in cluster.started.items():
                env = psutil.Process(svc.pid).environ()
                assert env[TOKEN_FILE_ENV] == str(token_file), name
                assert (env.get(ADMIN_TOKEN_FILE_ENV) == str(admin_file)) == (name == "scheduler")
                assert not any(s in value for value in env.values() for s in secrets), name
            assert [i["name"] for i in await cluster.admin("GET", "/admin/instances")] == ["instance-0"]
        finally:
            await cluster.stop()
        assert not token_file.exists() and not admin_file.exists()

    asyncio.run(go())
