"""``foretell serve`` as a subprocess on loopback, and a bounded half-open-connection flood.

Used by the tests (reduced sizes) and, run as a script, for the full-size measurement recorded
in docs/serving.md:

    python tests/server_process.py --connections 1100 --nofile 1024 --hold 8
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from serving import metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A running ``foretell serve``: its base URL, process and log file."""

    def __init__(self, process: subprocess.Popen, base: str, log: Path) -> None:
        self.process = process
        self.base = base
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and wait; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


@contextlib.contextmanager
def foretell_serve(
    args: list[str], *, env: dict[str, str] | None = None, nofile: int | None = None
) -> Iterator[Served]:
    """``foretell serve ARGS`` on a free loopback port (killed if still running after);
    ``nofile`` sets the server's open-file limit, like ``ulimit -n``."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="foretell-serve-", suffix=".log")[1])

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "foretell", "serve", "--port", str(port), *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=limit,
        )
    served = Served(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(served.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, served.log_text()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        log.unlink(missing_ok=True)


def half_open_flood(
    served: Served,
    connections: int,
    hold: float,
    completion: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Open ``connections`` sockets to the server, each sending the start of a request and
    nothing more, and hold them for ``hold`` seconds; meanwhile time ``/health`` (every 0.5 s)
    and send one small completion. Returns what was seen, the log's growth included."""
    host, port = served.base.removeprefix("http://").split(":")
    log_before = served.log.stat().st_size
    partial = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
    socks: list[socket.socket] = []
    refused = 0
    start = time.monotonic()
    try:
        for _ in range(connections):
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect((host, int(port)))
                s.sendall(partial)
            except OSError:
                refused += 1
                s.close()
                continue
            socks.append(s)
        opened = time.monotonic() - start
        health: list[float] = []
        completion_status = None
        with httpx.Client(base_url=served.base, timeout=30, headers=headers) as client:
            end = time.monotonic() + hold
            while time.monotonic() < end:
                t = time.monotonic()
                try:
                    ok = client.get("/health", timeout=5).status_code == 200
                except httpx.HTTPError:
                    ok = False
                health.append(time.monotonic() - t if ok else float("inf"))
                if completion_status is None:
                    try:
                        reply = client.post("/v1/completions", json=completion)
                        completion_status = reply.status_code
                    except httpx.HTTPError as err:
                        completion_status = type(err).__name__
                time.sleep(0.5)
    finally:
        for s in socks:
            s.close()
    return {
        "connections": connections,
        "opened_seconds": opened,
        "refused_by_os": refused,
        "health_seconds": health,
        "completion_status": completion_status,
        "log_growth_bytes": served.log.stat().st_size - log_before,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=1100)
    p.add_argument("--nofile", type=int, default=1024, help="the server's open-file limit")
    p.add_argument("--hold", type=float, default=8.0, help="seconds the flood is held")
    p.add_argument("serve_args", nargs="*", help="more `foretell serve` options (after --)")
    args = p.parse_args()
    client_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (client_limit, client_limit))
    body = {"model": "foretell-default", "prompt": "12+34=", "max_tokens": 8, "steps": 8}
    with foretell_serve(["--threads", "1", *args.serve_args], nofile=args.nofile) as served:
        seen = half_open_flood(served, args.connections, args.hold, body)
        after = metrics(served.base)
        status = served.stop()
    health = seen.pop("health_seconds")
    print({**seen, "health_max_seconds": max(health), "health_probes": len(health)})
    print({k: v for k, v in after.items() if "connections" in k})
    print("exit status after SIGTERM:", status)


if __name__ == "__main__":
    main()
