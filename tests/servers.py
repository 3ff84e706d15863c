"""Real uvicorn servers on 127.0.0.1 inside the test process, started and stopped per test."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn

from workbench.cluster import free_port


@contextlib.contextmanager
def serve(app, timeout: float = 10.0):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
