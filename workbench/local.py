"""A local emulated cluster with a blocking API, for the CLI, the live autoscaler, benchmarks and tests.

It is the one driver, ``workbench.cluster.Cluster`` on ``ClusterSpec.local``; each of the driver's
coroutine methods (``stop``, ``set_policy``, ``add_instance``, ``drain_instance``, ``remove_instance``,
``kill``, ``status``...) is run to completion on a fresh event loop in a worker thread. A local cluster
holds no connection between calls, so that is safe, and callers may block on it from any thread, even
from inside their own ``asyncio.run``. Service logs and the DuckDB file are in ``workspace``.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from block.engines.settings import EngineSettings
from workbench.cluster import Cluster, ClusterSpec

T = TypeVar("T")


def blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh event loop in a worker thread, wherever it is called from."""
    with ThreadPoolExecutor(1, thread_name_prefix="cluster-driver") as pool:
        return pool.submit(asyncio.run, coro).result()


class LocalCluster:
    """The driver's attributes (URLs, ``reader()``, ``instance_names()``, ``sidecar_url()``, ``pids()``...),
    its coroutine methods made blocking; ``with LocalCluster(...) as c`` starts and stops it."""

    def __init__(self, workspace: str | Path, instances: int = 4, policy: str = "block",
                 engine: EngineSettings | None = None, ready_timeout: float = 90.0):
        self.workspace = Path(workspace)
        spec = ClusterSpec.local(instances, engine, policy, self.workspace)
        self.driver = Cluster(spec, run_id=uuid.uuid4().hex[:8], ready_timeout=ready_timeout)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.driver, name)
        return (lambda *a, **kw: blocking(attr(*a, **kw))) if inspect.iscoroutinefunction(attr) else attr

    def start(self) -> LocalCluster:
        blocking(self.driver.start())
        return self

    __enter__ = start

    def __exit__(self, *exc: object) -> None:
        blocking(self.driver.stop())
