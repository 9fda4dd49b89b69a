"""``foretell serve`` as a process (issue 26): ``--threads`` reaches the serving process, SIGTERM
drains and exits 0, ``--shutdown-grace 0`` aborts at once, and a flood of half-open connections
past the open-file limit leaves the server answering (a reduced form of the full-size
measurement in docs/serving.md), and the server's startup heap is frozen while it serves and
given back when ``run_server`` returns. Loopback only; every loop bounded."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
from server_process import foretell_serve, free_port, half_open_flood, metrics

BODY = {"model": "tiny", "prompt": "12+34=", "max_tokens": 32, "block_length": 8}


def args(checkpoint: Path, *more: str) -> list[str]:
    return ["--model", str(checkpoint), "--served-model-name", "tiny", *more]


@contextlib.contextmanager
def stream(base: str, body: dict) -> Iterator[Iterator[dict]]:
    """A streamed completion's events as dicts, once its first one has arrived."""
    url, body = base + "/v1/completions", {**body, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = (line for line in r.iter_lines() if line.startswith("data: "))

        def events() -> Iterator[dict]:
            for line in lines:
                if line != "data: [DONE]":
                    yield json.loads(line[6:])

        it = events()
        first = next(it)
        yield itertools.chain([first], it)


def test_threads_reach_the_server_and_sigterm_drains_then_exits_0(tiny_checkpoint) -> None:
    """OMP_NUM_THREADS=3 in the environment: only --threads can make the server use 1. The
    server freezes its startup heap (``freeze_startup_heap``) before it serves."""
    env = {"OMP_NUM_THREADS": "3"}
    drain = args(tiny_checkpoint, "--threads", "1", "--shutdown-grace", "-1")
    abort = args(tiny_checkpoint, "--threads", "2", "--shutdown-grace", "0")
    with foretell_serve(drain, env=env) as waits, foretell_serve(abort, env=env) as aborts:
        loaded = metrics(waits.base)
        assert loaded["foretell_torch_threads"] == 1
        assert metrics(aborts.base)["foretell_torch_threads"] == 2
        # Loaded, the server froze its startup objects out of full collections' reach.
        assert loaded["foretell_gc_frozen_objects"] > 10_000
        assert 'foretell_gc_collections_total{generation="2"}' in loaded
        slow = {**BODY, "max_tokens": 128, "steps": 128}
        with stream(waits.base, slow) as events:
            waits.process.send_signal(signal.SIGTERM)
            *_, last = events
        assert last["choices"][0]["foretell"]["finish_reason"] == "steps"  # it finished
        assert waits.process.wait(60) == 0
        slower = {**BODY, "max_tokens": 1024, "steps": 1024}
        with stream(aborts.base, slower) as events:
            aborts.process.send_signal(signal.SIGTERM)
            *_, last = events
        assert last["choices"][0]["finish_reason"] == "abort"
        assert aborts.process.wait(60) == 0
        for served in (waits, aborts):
            assert "Traceback" not in served.log_text(), served.log_text()


def test_half_open_flood_past_the_file_limit_leaves_the_server_answering(tiny_checkpoint) -> None:
    """300 connections that send half a request and stop, against a server whose open-file
    limit is 256 (before issue 26 it stopped accepting, and logged a traceback a connection)."""
    serve_args = args(tiny_checkpoint, "--threads", "1", "--max-connections", "100")
    with foretell_serve(serve_args, nofile=256) as served:
        seen = half_open_flood(served, 300, hold=3.0, completion=BODY)
        values = metrics(served.base)
        assert served.stop() == 0
        log = served.log_text()
    assert seen["completion_status"] == 200, seen
    assert seen["health_seconds"] and max(seen["health_seconds"]) < 2, seen
    assert seen["log_growth_bytes"] < 20_000, seen
    assert values['foretell_connections_closed_total{reason="evicted"}'] >= 200
    assert values["foretell_connections_open"] <= 100
    assert "Traceback" not in log, log


RUN_SERVER_THEN_REPORT = """
import gc, os, signal, socket, sys, threading, time
from foretell.server.app import run_server

port = int(sys.argv[2])
served = []

def interrupt_once_serving():
    for _ in range(600):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                served.append(gc.get_freeze_count())
                os.kill(os.getpid(), signal.SIGINT)
                return
        time.sleep(0.1)

threading.Thread(target=interrupt_once_serving, daemon=True).start()
run_server(sys.argv[1], port=port, threads=1, log_level="warning")
print(served[0], gc.get_freeze_count())
"""


def test_run_server_freezes_its_heap_while_serving_and_gives_it_back(tiny_checkpoint) -> None:
    """Called from Python, ``run_server`` serves with its startup heap frozen, and returns the
    caller's collector as it was: the app, engine and model it leaves behind are then garbage
    that a frozen heap would never free."""
    done = subprocess.run(
        [sys.executable, "-c", RUN_SERVER_THEN_REPORT, str(tiny_checkpoint), str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    frozen_while_serving, frozen_after = map(int, done.stdout.split()[-2:])
    assert frozen_while_serving > 10_000
    assert frozen_after == 0
