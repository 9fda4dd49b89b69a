"""A real server on loopback for the server tests, and its metrics."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn

from foretell import AsyncEngine
from foretell.server import create_app
from foretell.server.connections import guarded_config
from foretell.server.limits import (
    DEFAULT_KEEP_ALIVE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_READ_TIMEOUT,
)

MODEL = "tiny-llada"


@contextlib.contextmanager
def serve(
    model,
    app_kwargs: dict[str, Any] | None = None,
    guard: dict[str, Any] | None = None,
    **engine_kwargs,
) -> Iterator[tuple[str, AsyncEngine]]:
    """A real server on a free port of 127.0.0.1, in a thread; stopped (and the engine shut
    down) after. ``app_kwargs`` go to ``create_app``, ``guard`` to ``guarded_config``, the rest
    to ``AsyncEngine``."""
    engine = AsyncEngine(model, dtype="float64", **engine_kwargs)
    app = create_app(engine, MODEL, **(app_kwargs or {}))
    # Behind the connection guard, as run_server serves (its defaults unless ``guard`` says).
    guard = {
        "max_connections": DEFAULT_MAX_CONNECTIONS,
        "read_timeout": DEFAULT_READ_TIMEOUT,
        "keep_alive_timeout": DEFAULT_KEEP_ALIVE_TIMEOUT,
        **(guard or {}),
    }
    config = guarded_config(app, log_level="warning", timeout_graceful_shutdown=2, **guard)
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(10)
        asyncio.run(engine.shutdown())
        sock.close()


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
