"""A local emulated cluster with a blocking API, for the CLI, the live autoscaler, benchmarks and tests.

The one driver, ``workbench.cluster.Cluster`` on ``ClusterSpec.local``, on its own event loop in a daemon
thread, where its supervisor runs between calls; each coroutine method (``add_instance``, ``kill``,
``status``...) runs there to completion, so callers may block on it from any other thread, even inside
their own ``asyncio.run``. Service logs and the DuckDB file are in ``workspace``."""

from __future__ import annotations

import asyncio
import inspect
import threading
import uuid
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from block.engines.settings import EngineSettings
from workbench.cluster import Cluster, ClusterSpec


class LocalCluster:
    """The driver's attributes, its coroutine methods made blocking; ``with LocalCluster(...)`` starts, stops."""

    def __init__(self, workspace: str | Path, instances: int | Sequence[EngineSettings] = 4, policy: str = "block",
                 engine: EngineSettings | None = None, ready_timeout: float = 90.0, restart: bool = True,
                 scheduler_flags: Sequence[str] = ()):
        self.workspace = Path(workspace)
        spec = ClusterSpec.local(instances, engine, policy, self.workspace)
        spec.scheduler.flags += scheduler_flags  # more of the scheduler's own flags (--prediction-source ...)
        self.driver = Cluster(spec, run_id=uuid.uuid4().hex[:8], ready_timeout=ready_timeout, restart=restart)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cluster-driver", daemon=True)
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.driver, name)
        return (lambda *a, **kw: self._run(attr(*a, **kw))) if inspect.iscoroutinefunction(attr) else attr

    def start(self) -> LocalCluster:
        try:
            self._run(self.driver.start())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, *exc: object) -> None:
        """Stop the cluster and end the driver's loop (``exc``: as ``__exit__``); stopping again does nothing."""
        if self._thread.is_alive():
            self._run(self.driver.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    __enter__, __exit__ = start, stop
