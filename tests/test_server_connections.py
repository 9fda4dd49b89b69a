"""The connection guard (issue 26): a read deadline for headers and body, a cap on open
connections that evicts half-open ones first, one-line rate-limited logs. A real uvicorn on
127.0.0.1 behind ``guarded_config``; bounded loops."""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
from serving import MODEL, metrics, serve

GOOD = {"model": MODEL, "prompt": "12+34=", "max_tokens": 16, "block_length": 8}


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def read_all(s: socket.socket, limit: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (or ``limit`` seconds)."""
    s.settimeout(limit)
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        chunks.append(b"<still open>")
    return b"".join(chunks)


def test_read_deadline_closes_half_open_and_answers_a_slow_body_408(llada64) -> None:
    guard = {"read_timeout": 1.0}
    with serve(llada64, guard=guard) as (base, _):
        start = time.monotonic()
        silent = connect(base)  # connects, sends nothing
        half = connect(base)  # half the headers
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        slow = connect(base)  # the headers, half the body, then nothing
        body = json.dumps(GOOD).encode()
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        assert read_all(silent) == b""
        assert read_all(half) == b""
        answer = read_all(slow)
        elapsed = time.monotonic() - start
        assert 0.9 < elapsed < 5, elapsed
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in head.lower()
        error = json.loads(payload)["error"]
        assert error["code"] == "request_timeout" and error["param"] is None
        for s in (silent, half, slow):
            s.close()
        closed = metrics(base)
        assert closed['foretell_connections_closed_total{reason="header_timeout"}'] == 2
        # A request that arrives in time is served, however long its answer takes.
        r = httpx.post(base + "/v1/completions", json={**GOOD, "max_tokens": 128}, timeout=30)
        assert r.status_code == 200


def test_the_cap_evicts_half_open_connections_then_answers_503(llada64) -> None:
    with serve(llada64, guard={"max_connections": 3, "read_timeout": 30.0}) as (base, _):
        idle = [connect(base) for _ in range(3)]  # at the cap, none has sent a request
        time.sleep(0.2)
        # A real client still gets in: the oldest half-open connection makes room.
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        assert read_all(idle[0], 2) == b""  # evicted: closed without a word
        assert read_all(idle[1], 0.5) == b"<still open>"
        for s in idle:
            s.close()
        # When every connection is inside a request, a new one is refused with a JSON 503.
        busy = []
        for _ in range(3):
            s = connect(base)
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            busy.append(s)
        time.sleep(0.3)
        refused = httpx.get(base + "/health", timeout=5)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "too_many_connections"
        for s in busy:
            s.close()
        time.sleep(0.3)
        values = metrics(base)
        assert values['foretell_connections_closed_total{reason="evicted"}'] >= 1
        assert values['foretell_connections_closed_total{reason="refused"}'] == 1
        assert values["foretell_connections_open"] <= 3


def test_repeated_warnings_are_one_line_and_rate_limited(caplog) -> None:
    from foretell.server.connections import RateLimitFilter

    log = logging.getLogger("test.ratelimit")
    filt = RateLimitFilter(interval=60)
    log.addFilter(filt)
    try:
        with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
            for i in range(1000):
                try:
                    raise ConnectionResetError(104, f"reset by peer {i}")
                except OSError:
                    log.warning("connection broke", exc_info=True)
            log.error("another message")
    finally:
        log.removeFilter(filt)
    # asyncio's own form: the template, then per-connection context lines.
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(filt)
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for fd in range(100):
                context = f"socket.accept() out of system resource\nsocket: <fd={fd}>"
                asyncio_log.error(context, exc_info=OSError(24, "Too many open files"))
    finally:
        asyncio_log.removeFilter(filt)
    (accept,) = [r for r in caplog.records if r.name == "asyncio"]
    assert accept.getMessage() == (
        "socket.accept() out of system resource; socket: <fd=0>: OSError: [Errno 24] Too many "
        "open files"
    )
    records = [r for r in caplog.records if r.name == "test.ratelimit"]
    assert len(records) == 2
    first = records[0]
    assert first.exc_info is None and "ConnectionResetError" in first.getMessage()
    assert "\n" not in first.getMessage()
    filt.interval = 0  # the next one reports what was dropped
    with caplog.at_level(logging.WARNING, logger="test.ratelimit"):
        log.addFilter(filt)
        try:
            log.warning("connection broke")
        finally:
            log.removeFilter(filt)
    assert "999 more like it" in caplog.records[-1].getMessage()


def test_pipelined_requests_each_get_their_own_read_deadline(llada64) -> None:
    """Two requests with bodies in one write: the second, read from h11's buffer once the
    first is answered, is not past a deadline."""
    body = json.dumps({**GOOD, "model": "not-served"}).encode()
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with serve(llada64, guard={"read_timeout": 5.0}) as (base, _):
        s = connect(base)
        s.sendall(request + request)
        s.settimeout(10)
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}}"):
            chunk = s.recv(65536)
            assert chunk, received
            received += chunk
        s.close()
    assert received.count(b"HTTP/1.1 404 ") == 2, received
    assert b"request_timeout" not in received
