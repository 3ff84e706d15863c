"""The cluster driver over a real SSH server on loopback, and on localhost without SSH."""

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import asyncssh
import pytest

from block.engines.settings import EngineSettings
from workbench.check import check
from workbench.cluster import Cluster, ClusterSpec, Host, free_port, load_cluster, parse_cluster
from workbench.sshserver import start_loopback_ssh

ARGV = ("http://e", "http://c", "run")  # engine URL, collector URL, run id for InstanceSpec.argv

TOML = """
[[hosts]]
name = "a"
address = "localhost"
workdir = "{wd}"
python = "{py}"

[[instances]]
name = "a0"
host = "a"
engine_port = {e}
sidecar_port = {s}
flags = ["--gpu", "A30", "--num-blocks", "1052", "--time-scale", "20"]

[scheduler]
host = "a"
port = {sched}

[collector]
host = "a"
port = {coll}
db = "{wd}/block.duckdb"
"""


def test_cluster_files_are_checked():
    base = {"hosts": [{"name": "a"}], "scheduler": {"host": "a", "port": 1}, "collector": {"host": "a", "port": 2}}
    assert parse_cluster(base).host("a").address == "127.0.0.1"
    with pytest.raises(ValueError, match="never passwords"):
        parse_cluster({**base, "hosts": [{"name": "a", "password": "hunter2"}]})
    with pytest.raises(ValueError, match="unknown host 'b'"):
        parse_cluster({**base, "instances": [{"name": "x", "host": "b"}]})
    with pytest.raises(ValueError, match="engine must be one of"):
        parse_cluster({**base, "instances": [{"name": "x", "host": "a", "engine": "tgi"}]})
    with pytest.raises(ValueError, match="needs a \\[scheduler\\]"):
        parse_cluster({"hosts": [{"name": "a"}]})
    with pytest.raises(ValueError, match="env must be a table"):
        parse_cluster({**base, "instances": [{"name": "x", "host": "a", "env": "CUDA_VISIBLE_DEVICES=1"}]})
    with pytest.raises(ValueError, match="bad hosts\\[0\\]"):
        parse_cluster({**base, "hosts": [{"name": "a", "colour": "red"}]})
    with pytest.raises(ValueError, match="instance x: bad engine flag: argument --time-scale: invalid float"):
        parse_cluster({**base, "instances": [{"name": "x", "host": "a", "flags": ["--time-scale", "fast"]}]})
    with pytest.raises(ValueError, match=r"instance x: EngineConfig\.num_blocks must be >= 1, got 0"):
        parse_cluster({**base, "instances": [{"name": "x", "host": "a", "flags": ["--num-blocks", "0"]}]})


def test_the_documented_cluster_file_parses():
    import textwrap
    import tomllib

    import workbench.cluster

    example = textwrap.dedent(workbench.cluster.__doc__.split("A cluster file (TOML):\n", 1)[1])
    spec = parse_cluster(tomllib.loads(example))
    emulated, vllm = spec.instances
    assert (vllm.engine, vllm.served, vllm.env) == ("vllm", "llama-2-7b", {"CUDA_VISIBLE_DEVICES": "1"})
    assert vllm.argv(*ARGV)[1][-6:] == ["--model", "Llama-2-7B", "--max-num-seqs", "48", "--gpu", "A30"]
    settings = EngineSettings(gpu="A30", time_scale=4.0)
    assert emulated.settings() == (settings, [])
    engine, car = emulated.argv(*ARGV)
    assert engine[-len(settings.argv()):] == car[-len(settings.argv()):] == settings.argv()


def test_a_vllm_sidecar_shares_the_engine_limits_and_nothing_else():
    inst = parse_cluster({
        "hosts": [{"name": "a"}], "scheduler": {"host": "a", "port": 1}, "collector": {"host": "a", "port": 2},
        "instances": [{"name": "v", "host": "a", "engine": "vllm", "model": "/m", "sidecar_flags": ["--gpu", "L4"],
                       "flags": ["--python", "/v/bin/python", "--max-num-seqs", "8", "--dtype", "half",
                                 "--max-num-batched-tokens=1024", "--max-model-len", "2048"]}]}).instances[0]
    engine, car = inst.argv(*ARGV)
    assert engine[-9:] == inst.flags
    assert car[car.index("--model"):] == ["--model", "/m", "--max-num-seqs", "8", "--max-num-batched-tokens=1024",
                                          "--max-model-len", "2048", "--gpu", "L4"]


def test_an_emulated_engine_and_its_sidecar_get_the_same_engine_settings(monkeypatch):
    """One EngineSettings reaches both services of an emulated instance, through their own argument parsers:
    the side-car predicts for the engine that is there."""
    import uvicorn

    from block.engines import emulator
    from block.predictor import service

    settings = EngineSettings(gpu="L4", num_blocks=900, max_num_seqs=8, max_model_len=2048, time_scale=7.5,
                              noise=0.1)
    engine, car = ClusterSpec.local(2, settings, "block", "ws").instances[1].argv(*ARGV)
    assert engine[:4] == ["--name", "instance-1", "--served-model-name", "Llama-2-7B"]
    assert car[:8] == ["--name", "instance-1", "--engine-url", "http://e", "--collector-url", "http://c", "--run-id",
                       "run"]
    assert engine[-2:] == ["--seed", "2"]  # the emulator's own flag, which the side-car does not take
    seen = []
    parse = EngineSettings.from_args.__func__

    def recording(cls, args):
        seen.append(parse(cls, args))
        return seen[-1]

    monkeypatch.setattr(EngineSettings, "from_args", classmethod(recording))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    monkeypatch.setattr(service, "run_server", lambda *a, **kw: None)
    emulator.main(engine)
    service.main(car)
    assert seen == [settings, settings]


def test_a_local_spec_picks_free_ports_and_never_reuses_a_name(tmp_path):
    spec = ClusterSpec.local(3, EngineSettings(time_scale=10.0), "round_robin", tmp_path)
    ports = [p for i in spec.instances for p in (i.engine_port, i.sidecar_port)]
    ports += [spec.scheduler.port, spec.collector.port]
    assert len(set(ports)) == len(ports)
    assert spec.host("local").local and spec.host("local").workdir == str(tmp_path.resolve())
    assert (spec.scheduler.policy, spec.collector.db) == ("round_robin", str(tmp_path.resolve() / "block.duckdb"))
    assert [i.name for i in spec.instances] == ["instance-0", "instance-1", "instance-2"]
    spec.instances.pop()
    assert spec.new_instance().name == "instance-3"


def test_the_local_cluster_facade_is_gone_or_small():
    local = Path(__file__).resolve().parents[1] / "workbench" / "local.py"
    assert not local.exists() or len(local.read_text().splitlines()) < 60


def test_two_hosts_over_ssh_start_serve_and_stop_cleanly(tmp_path):
    result = asyncio.run(check(tmp_path))
    assert result == {"ssh_cluster_ok": True, "requests_ok": 50, "leftover_processes": 0}


def test_host_keys_are_verified(tmp_path):
    async def go():
        ssh = await start_loopback_ssh(tmp_path / "ssh")
        try:
            spec = ssh.host("x", str(tmp_path), sys.executable)
            host = Host(spec)
            await host.connect()
            assert (await host.run("echo hello")).strip() == "hello"
            with pytest.raises(RuntimeError, match="exited 3"):
                await host.run("exit 3")
            await host.close()
            impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
            (tmp_path / "other_known_hosts").write_text(f"[127.0.0.1]:{ssh.port} {impostor}\n")
            spec.known_hosts = str(tmp_path / "other_known_hosts")
            with pytest.raises(ConnectionError, match=r"127\.0\.0\.1"):
                await Host(spec).connect()
        finally:
            await ssh.close()

    asyncio.run(go())


def test_localhost_uses_the_same_interface_without_ssh(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text(TOML.format(wd=tmp_path, py=sys.executable, e=free_port(), s=free_port(), sched=free_port(),
                                coll=free_port()))
    spec = load_cluster(path)

    async def go():
        cluster = Cluster(spec)
        await cluster.start()
        try:
            status = await cluster.status()
            assert set(status) == {"collector", "a0-engine", "a0-sidecar", "scheduler"}
            assert all(s["alive"] for s in status.values())
            with pytest.raises(KeyError, match="no service 'zz-engine'"):
                await cluster.logs("zz")
            pids = [s["pid"] for s in status.values()]
        finally:
            await cluster.stop()
        host = Host(spec.host("a"))
        assert not any([await host.alive(p) for p in pids])

    asyncio.run(go())


def test_stop_also_ends_children_a_service_leaves_behind(tmp_path):
    """A service killed by SIGTERM before it stops its children (as a stuck vLLM would leave its engine
    core) does not leak them: they are in the service's own process group, which stop() ends."""
    import psutil

    from workbench.cluster import HostSpec

    async def go():
        host = Host(HostSpec("l", "localhost", workdir=str(tmp_path)))
        pid = await host.spawn([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '60']); "
                                "time.sleep(60)"], "logs/leaky.log")
        for _ in range(100):
            children = psutil.Process(pid).children()
            if children:
                break
            await asyncio.sleep(0.05)
        assert os.getpgid(pid) == pid and [c.name() for c in children] == ["sleep"]
        await host.stop(pid)
        await asyncio.sleep(0.2)
        assert not await host.alive(pid)
        with contextlib.suppress(psutil.NoSuchProcess):  # gone, or a zombie waiting for its reaper
            assert children[0].status() == psutil.STATUS_ZOMBIE

    asyncio.run(go())


def test_a_service_started_nicer_runs_at_that_priority_children_and_session_included(tmp_path):
    """The collector and the instances start at a lower CPU priority than the scheduler (SERVICE_NICE).
    The recorded pid is still the service's own, its children inherit the priority, and where the kernel
    shares CPU between sessions (autogroup) the service's session carries it too: a process's own nice would
    otherwise rank it only against itself."""
    import psutil

    from workbench.cluster import SERVICE_NICE, HostSpec

    assert SERVICE_NICE["scheduler"] == 0 and min(v for k, v in SERVICE_NICE.items() if k != "scheduler") > 0

    async def go():
        host = Host(HostSpec("l", "localhost", workdir=str(tmp_path)))
        with pytest.raises(ValueError, match="nice must be 0-19"):
            await host.spawn(["true"], "logs/x.log", nice=-5)
        pid = await host.spawn([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '60']); "
                                "time.sleep(60)"], "logs/nice.log", nice=7)
        try:
            for _ in range(100):
                children = psutil.Process(pid).children()
                if children:
                    break
                await asyncio.sleep(0.05)
            assert psutil.Process(pid).cmdline()[0] == sys.executable and os.getpgid(pid) == pid
            assert os.getpriority(os.PRIO_PROCESS, pid) == 7 == children[0].nice()
            group = Path(f"/proc/{pid}/autogroup")
            if group.exists():
                assert group.read_text().split()[-1] == "7"
                assert Path("/proc/self/autogroup").read_text() != group.read_text()  # not the test's own group
        finally:
            await host.stop(pid)

    asyncio.run(go())
