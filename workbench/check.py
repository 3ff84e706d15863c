"""Self-check of the workbench: a two-host emulated cluster driven over real SSH on loopback.

Starts an in-process SSH server, describes two "hosts" reached through it, brings up one emulated
instance on each plus scheduler and collector, runs 50 requests through the scheduler, stops the
cluster and counts processes left behind. Ends with a RESULT line.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from block.engines.settings import EngineSettings
from simulator.workload import Request
from workbench.cluster import Cluster, ClusterSpec, InstanceSpec, ServiceSpec, free_port
from workbench.loadgen import run_load, summarize
from workbench.sshserver import LoopbackSSH, start_loopback_ssh


def two_host_spec(ssh: LoopbackSSH, workdir: str) -> ClusterSpec:
    """One emulated instance (A30 at 20x speed) on each of two "hosts" reached over ``ssh``."""
    hosts = {n: ssh.host(n, workdir, sys.executable) for n in ("host-a", "host-b")}
    engine = EngineSettings(time_scale=20.0)
    instances = [InstanceSpec.emulated(f"{h}-0", h, engine, free_port(), free_port()) for h in hosts]
    return ClusterSpec(hosts, instances, ServiceSpec("host-a", free_port(), "block"),
                       ServiceSpec("host-b", free_port(), db=f"{workdir}/block.duckdb"))


async def check(folder: Path, n: int = 50) -> dict:
    ssh = await start_loopback_ssh(folder / "ssh")
    cluster = Cluster(two_host_spec(ssh, str(folder)), run_id="check")
    pids: list[int] = []
    try:
        await cluster.start()
        pids = cluster.pids()
        arr = np.cumsum(np.random.default_rng(0).exponential(1 / 20.0, n))
        records = await run_load(cluster.scheduler_url, [Request(i, float(a), 40, 24) for i, a in enumerate(arr)],
                                 "Llama-2-7B")
        status = await cluster.status()
        ok = all(s["alive"] for s in status.values()) and len(status) == 6
    finally:
        await cluster.stop()
        await ssh.close()
    leftover = 0
    for pid in pids:
        try:
            os.kill(pid, 0)
            leftover += 1
        except ProcessLookupError:
            pass
    return {"ssh_cluster_ok": ok, "requests_ok": summarize(records)["completed"], "leftover_processes": leftover}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(check(Path(tmp)))
    print(f"RESULT ssh_cluster_ok={'true' if result['ssh_cluster_ok'] else 'false'} "
          f"requests_ok={result['requests_ok']} leftover_processes={result['leftover_processes']}")


if __name__ == "__main__":
    main()
