"""Connection-level defences for ``run_server``: slow clients and connection floods.

uvicorn offers a keep-alive timeout and a request-concurrency cap, but its cap only answers 503
once a request's headers are complete and it has no deadline for receiving them, so a client
that opens connections and sends half a request holds them (and a file descriptor each) forever.
``guarded_protocol`` is uvicorn's own h11 protocol with three additions:

- a read deadline: a request's headers and body must arrive within ``read_timeout`` seconds of
  its first byte (of the connection, for its first request). A connection still without complete
  headers is closed then; a body still incomplete gets a 408 from the app (``limits``), and the
  connection is closed shortly after if the client still has not finished;
- a cap on open connections: a new connection beyond ``max_connections`` evicts the oldest one
  that is idle or has not finished sending its request headers (half-open), else it is answered
  with a JSON 503 and closed; so a flood of half-open connections never starves a real client;
- counters for ``/metrics`` and one rate-limited log line for all of it, never a traceback per
  connection (``RateLimitFilter`` does the same for uvicorn's and asyncio's own warnings).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections import Counter
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from foretell.server.errors import APIError
from foretell.server.limits import READ_DEADLINE_KEY

logger = logging.getLogger("foretell.server")

MAX_BACKLOG = 128  # connections the kernel queues, and asyncio accepts in one go
RESERVED_FDS = 64  # the process's own files (a loaded server holds about 10)
BODY_GRACE = 1.0  # after the read deadline, the app's 408 gets this long before the close
LOG_INTERVAL = 10.0
CLOSE_REASONS = {  # the reason label in /metrics -> what the log says
    "evicted": "evicted at --max-connections (idle or half-open)",
    "refused": "refused at --max-connections (503)",
    "header_timeout": "without complete headers by --request-read-timeout",
    "body_timeout": "without a complete body by --request-read-timeout",
}


def fd_limit() -> int:
    """The soft limit of open files, raised to the hard limit where the system allows it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def accept_backlog() -> int:
    """The listen backlog, which is also how many connections asyncio accepts in one go."""
    return min(MAX_BACKLOG, max(8, fd_limit() // 8))


def fit_max_connections(max_connections: int | None) -> int:
    """``max_connections``, lowered so that the cap plus one accept burst plus the process's
    own files stay under the open-file limit (None: as many as that allows): a flood then
    never makes accept() fail, which would stop the server taking any connection."""
    room = fd_limit() - accept_backlog() - RESERVED_FDS
    if room < 1:
        raise ValueError(f"max_connections: the open-file limit {fd_limit()} leaves no room")
    wanted = room if max_connections is None else max_connections
    if wanted > room:
        logger.warning(
            "max_connections: lowered from %d to %d to stay under the open-file limit %d "
            "(raise it with ulimit -n)",
            wanted,
            room,
            fd_limit(),
        )
    return min(wanted, room)


class ConnectionStats:
    """What the guard did, shared by every connection of one server (shown in /metrics)."""

    def __init__(self) -> None:
        self.open = 0
        self.closed: Counter[str] = Counter()
        self._logged: Counter[str] = Counter()
        self._last_log = 0.0

    def close(self, reason: str) -> None:
        """Count a connection the guard closed; log the counts at most every LOG_INTERVAL."""
        self.closed[reason] += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            new = self.closed - self._logged
            self._logged = Counter(self.closed)
            self._last_log = now
            what = ", ".join(f"{n} {CLOSE_REASONS[why]}" for why, n in sorted(new.items()))
            logger.warning(
                "closed connections since the last report: %s (%d open)", what, self.open
            )


def _raw_response(error: APIError) -> bytes:
    """A complete HTTP/1.1 response for a connection that has no request to answer yet."""
    body = json.dumps(error.body()).encode()
    head = (
        f"HTTP/1.1 {error.status} Service Unavailable\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


def guarded_protocol(
    stats: ConnectionStats, max_connections: int, read_timeout: float | None
) -> type[H11Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` enforcing the cap and the read
    deadline (None: no deadline). One class per server: the classes share ``stats`` and the
    set of connections that may be evicted."""
    # Connections with no request in progress (new, half-open, or idle between requests):
    # evictable, oldest first.
    waiting: dict[GuardedProtocol, None] = {}
    full = APIError(
        "server: too many open connections; retry later",
        status=503,
        type="server_error",
        code="too_many_connections",
    )

    class GuardedProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _seen: Any = None  # the request cycle whose headers were last seen
        _graced: Any = None  # the cycle given BODY_GRACE after the deadline

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            stats.open += 1
            waiting[self] = None
            self._arm(read_timeout)
            if len(self.connections) <= max_connections:
                return
            victim = next((c for c in waiting if c is not self), None)
            if victim is not None:
                victim._drop("evicted")
            else:  # every other connection is busy with a request: refuse this one
                self._drop("refused", _raw_response(full))

        def connection_lost(self, exc: Exception | None) -> None:
            stats.open -= 1
            waiting.pop(self, None)
            self._arm(None)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self._idle():
                self._arm(read_timeout)  # the first byte of a request on a kept-alive connection
            super().data_received(data)
            self._track()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._track()

        def _idle(self) -> bool:
            """No request in progress: none yet, or the last one fully answered."""
            return self.cycle is None or self.cycle.response_complete

        def _in_request(self) -> Any:
            """The cycle of a request whose headers have arrived and whose body has not."""
            cycle = self.cycle
            if cycle is None or cycle is not self._seen or not cycle.more_body:
                return None
            return cycle

        def _track(self) -> None:
            """Follow the request cycle: headers in (no longer evictable), body in (deadline
            met), response done (idle: evictable again, the keep-alive timer runs)."""
            cycle = self.cycle
            if self.transport.is_closing():
                return
            if cycle is not None and cycle is not self._seen:  # a new request's headers
                self._seen = cycle
                waiting.pop(self, None)
                if read_timeout is not None:
                    # No timer: a pipelined request, read from h11's buffer; it gets its own.
                    armed = self._deadline
                    deadline = armed.when() if armed else self.loop.time() + read_timeout
                    extensions = cycle.scope.setdefault("extensions", {})
                    extensions[READ_DEADLINE_KEY] = deadline
            if cycle is not None and not cycle.more_body:
                self._arm(None)
            if cycle is not None and cycle.response_complete and not cycle.more_body:
                waiting[self] = None
                self._arm(None)

        def _arm(self, seconds: float | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            if seconds is not None:
                self._deadline = self.loop.call_later(seconds, self._on_deadline)

        def _on_deadline(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self._in_request()
            if cycle is None and not self._idle():
                return  # the request is in and being answered: nothing left to read
            if cycle is None:
                self._drop("header_timeout")
            elif not cycle.response_started and self._graced is not cycle:
                self._graced = cycle  # the app answers 408 at the deadline; then close
                self._deadline = self.loop.call_later(BODY_GRACE, self._on_deadline)
            else:
                self._drop("body_timeout")

        def _drop(self, reason: str, response: bytes | None = None) -> None:
            waiting.pop(self, None)
            self._arm(None)
            if response is not None:
                self.transport.write(response)
            self.transport.close()
            stats.close(reason)

    return GuardedProtocol


class RateLimitFilter(logging.Filter):
    """At most one record per message template every ``interval`` seconds (the next one says
    how many were dropped), and a broken connection's error in one line, without its
    traceback. Installed on uvicorn's and asyncio's loggers by ``run_server``."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[Any, float] = {}
        self._dropped: Counter[Any] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        # asyncio appends per-connection context lines: the first line is the template.
        key = (record.name, str(record.msg).split("\n", 1)[0][:200])
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (OSError, asyncio.IncompleteReadError)):
            text = "; ".join(record.getMessage().splitlines())
            record.msg = f"{text}: {type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = None
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._dropped[key] += 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            more = f"(and {dropped} more like it in the last {self.interval:g} s)"
            record.msg = f"{record.msg} {more}"
        return True


def guarded_config(
    app: Any,
    *,
    max_connections: int | None,
    read_timeout: float | None,
    keep_alive_timeout: float,
    **uvicorn_kwargs: Any,
) -> uvicorn.Config:
    """A ``uvicorn.Config`` serving ``app`` behind the guard; the guard's ``ConnectionStats``
    go to ``app.state.connections`` (shown in /metrics)."""
    stats = ConnectionStats()
    app.state.connections = stats
    cap = fit_max_connections(max_connections)
    return uvicorn.Config(
        app,
        http=guarded_protocol(stats, cap, read_timeout),
        backlog=accept_backlog(),
        timeout_keep_alive=keep_alive_timeout,  # type: ignore[arg-type]
        **uvicorn_kwargs,
    )
