"""The OpenAI-compatible HTTP API over an AsyncEngine (FastAPI): ``create_app`` and its routes,
and ``run_server``. Streaming is in ``streaming``, ``/metrics`` in ``metrics``, body parsing and
the limits in ``limits``; docs/serving.md describes the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from foretell.engine.async_engine import (
    AsyncEngine,
    EngineClosedError,
    QueueFullError,
    RequestHandle,
)
from foretell.engine.outputs import RequestOutput
from foretell.server.connections import guarded_config
from foretell.server.limits import (
    DEFAULT_KEEP_ALIVE_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_GEN_LENGTH,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MAX_PROMPTS_PER_REQUEST,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE,
    QUEUED_TOKENS_PER_BATCH_BUDGET,
    RETRY_AFTER_SECONDS,
    parse_body,
)
from foretell.server.metrics import PROMETHEUS_TEXT, render_metrics
from foretell.server.openapi import openapi_schema, served_limits
from foretell.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DiffusionFields,
    check_outputs,
    diffusion_info,
    failure_message,
    finish_reason,
    prompt_error,
    usage,
)
from foretell.server.streaming import SSE_HEADERS, Streamer, timeout_error

logger = logging.getLogger(__name__)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _origin_allowed(origin: str, request: Request, allowed: set[str]) -> bool:
    """An allowed origin, or the server's own pages (e.g. /docs) reached by a loopback name.
    Same-origin under any other name is not enough: a DNS-rebinding page is "same-origin"
    with the server under the attacker's name."""
    if origin in allowed or "*" in allowed:
        return True
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in LOOPBACK_HOSTS and origin == f"{request.url.scheme}://{host}"


def create_app(
    engine: AsyncEngine,
    model_name: str = "foretell",
    *,
    api_key: str | None = None,
    allowed_origins: Sequence[str] = (),
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    max_prompts_per_request: int | None = DEFAULT_MAX_PROMPTS_PER_REQUEST,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    enable_docs: bool = True,
) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name``; the caller owns the engine
    (start it before serving, ``shutdown()`` it after).

    ``api_key``: requests to ``/v1/*`` need ``Authorization: Bearer <key>`` (401 otherwise).
    ``allowed_origins``: browser origins allowed to call the API (CORS); a request carrying any
    other ``Origin`` header is refused with 403. ``max_body_bytes`` (413),
    ``max_prompts_per_request`` (400) and ``request_timeout`` seconds (504, or a final SSE
    error, with the request aborted) bound what one request can take; None lifts a bound.
    ``enable_docs`` serves /docs, /redoc and /openapi.json. See docs/serving.md.
    """
    docs = {} if enable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="foretell", version="0.1.0", **docs)
    limits = served_limits(
        engine,
        model_name,
        api_key=api_key is not None,
        max_prompts_per_request=max_prompts_per_request,
    )
    schema = openapi_schema(limits, app.title, app.version)
    app.openapi = lambda: schema  # type: ignore[method-assign]
    app.state.engine = engine
    app.state.model_name = model_name
    created = int(time.time())
    origins = set(allowed_origins)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sorted(origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    key = None if api_key is None else api_key.encode()

    def guard(request: Request) -> None:
        """Refuse foreign browser origins (403) and, with a key, unauthenticated calls (401)."""
        origin = request.headers.get("origin")
        if origin is not None and not _origin_allowed(origin, request, origins):
            raise APIError(
                f"origin: {origin[:100]!r} is not allowed (see --allowed-origins)",
                status=403,
                type="permission_error",
                code="origin_not_allowed",
            )
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise APIError(
                "authorization: missing or wrong API key (send 'Authorization: Bearer KEY')",
                status=401,
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        body = APIError(str(err.detail), status=err.status_code, type=kind).body()
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError("body: invalid request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        # Logged by the server; the client learns nothing of the internals.
        body = APIError("internal server error", status=500, type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        text = render_metrics(engine.stats(), getattr(app.state, "connections", None))
        return PlainTextResponse(text, media_type=PROMETHEUS_TEXT)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        guard(request)
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "foretell"}
        return {"object": "list", "data": [card]}

    async def run(
        request: Request,
        body: DiffusionFields,
        prompts: list[Any],
        chat: bool,
        deadline: float | None,
    ) -> Response:
        if body.model != model_name:
            raise APIError(
                f"model: {body.model!r} is not served here; use {model_name!r}",
                param="model",
                status=404,
                code="model_not_found",
            )
        if max_prompts_per_request is not None and len(prompts) > max_prompts_per_request:
            raise APIError(
                f"prompt: {len(prompts)} prompts in one request; the server takes at most "
                f"{max_prompts_per_request}",
                param="prompt",
            )
        params = body.to_params(limits.max_gen_length)
        length_name, _ = body.length_field()
        try:
            handles = await engine.add_requests(prompts, params, stream=bool(body.stream))
        except ValueError as err:
            rename = {"gen_length": length_name}
            if chat:  # the chat prompt is rendered from the messages
                rename["prompt"] = "messages"
            raise prompt_error(err, rename) from None
        except QueueFullError as err:
            raise APIError(
                str(err),
                status=429,
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        except EngineClosedError as err:  # shutting down
            raise APIError(str(err), status=503, type="server_error") from None
        if body.stream:
            streamer = Streamer(engine, handles, body, model_name, chat, deadline)
            return StreamingResponse(
                streamer.events(), media_type="text/event-stream", headers=SSE_HEADERS
            )
        try:
            outputs = await _gather_or_disconnect(request, handles, deadline)
        except RuntimeError as err:  # the step loop failed these requests
            logger.warning("request failed: %r", err)
            raise APIError(failure_message(None), status=500, type="server_error") from None
        if outputs is None:  # the client left; nobody to answer
            return Response(status_code=499)
        check_outputs(outputs)
        if chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": out.text},
                    "logprobs": None,
                    "finish_reason": finish_reason(out, handle, engine),
                    "foretell": diffusion_info(out),
                }
                for i, (out, handle) in enumerate(zip(outputs, handles, strict=True))
            ]
        else:
            choices = [
                {
                    "index": i,
                    "text": out.text,
                    "logprobs": None,
                    "finish_reason": finish_reason(out, handle, engine),
                    "foretell": diffusion_info(out),
                }
                for i, (out, handle) in enumerate(zip(outputs, handles, strict=True))
            ]
        return JSONResponse(
            {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": choices,
                "usage": usage(outputs),
            }
        )

    def deadline_of() -> float | None:
        if request_timeout is None:
            return None
        return asyncio.get_running_loop().time() + request_timeout

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        deadline = deadline_of()
        guard(request)
        body: CompletionRequest = await parse_body(request, CompletionRequest, max_body_bytes)
        return await run(request, body, body.prompts(), False, deadline)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        deadline = deadline_of()
        guard(request)
        body: ChatCompletionRequest = await parse_body(
            request, ChatCompletionRequest, max_body_bytes
        )
        return await run(request, body, [body.chat()], True, deadline)

    return app


async def _gather_or_disconnect(
    request: Request, handles: list[RequestHandle], deadline: float | None = None
) -> list[RequestOutput] | None:
    """All final outputs, or None (with every request aborted) if the client disconnects;
    past ``deadline`` (loop time) every request is aborted and the caller gets a 504."""
    results = asyncio.ensure_future(asyncio.gather(*(h.result() for h in handles)))
    # A gather cancelled below ends with an exception nobody reads: read it, so asyncio does
    # not log a traceback for every client that leaves.
    results.add_done_callback(lambda f: f.cancelled() or f.exception())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    timeout = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
    try:
        await asyncio.wait({results, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if results.done():
            return results.result()
        results.cancel()
        if not watcher.done():
            raise timeout_error()
        return None
    finally:
        watcher.cancel()
        if not results.done():
            results.cancel()
        for handle in handles:
            handle.abort_nowait()


def default_model_name(model: object) -> str:
    """The name /v1/models shows: the checkpoint directory's name, else "foretell"."""
    if model is None:
        return "foretell-default"
    if isinstance(model, (str, os.PathLike)):
        return Path(model).name or str(model)
    return "foretell"


class DrainingServer(uvicorn.Server):
    """uvicorn's server, minus re-raising the signal that stopped it: after a graceful drain
    the process ends normally (status 0), not killed by its SIGTERM (143)."""

    on_exit: Any = None  # called (in the loop's thread) when a signal asks to stop

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if self.on_exit is not None:
            self.on_exit()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _quiet_logs() -> None:
    """Broken connections in one line, repeated warnings at most every few seconds: a flood
    must not turn into a flood of log (see connections.RateLimitFilter)."""
    from foretell.server.connections import RateLimitFilter

    for name in ("uvicorn", "uvicorn.error", "asyncio", "foretell.server", __name__):
        log = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in log.filters):
            log.addFilter(RateLimitFilter())


def freeze_startup_heap() -> int:
    """Take every object alive once the server has loaded (its libraries, the model, the
    tokenizer: 358k objects with the shipped model) out of the garbage collector's reach, as
    vLLM's engine process does: a full collection would otherwise walk them all (171 ms with
    the shipped model on the 2-core machine of docs/benchmarks.md: ``benchmarks/gc_pause.py``),
    a stall for every request in flight. A library call (``Engine``, ``AsyncEngine``) must
    not change its caller's collector, so only :func:`run_server` does this, while it serves.
    Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def run_server(
    model: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_name: str | None = None,
    log_level: str = "info",
    graceful_timeout: float | None = DEFAULT_SHUTDOWN_GRACE,
    api_key: str | None = None,
    allowed_origins: Sequence[str] = (),
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    max_prompts_per_request: int | None = DEFAULT_MAX_PROMPTS_PER_REQUEST,
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
    max_queued_requests: int | None = DEFAULT_MAX_QUEUED_REQUESTS,
    max_queued_tokens: int | None = None,
    max_gen_length: int | None = DEFAULT_MAX_GEN_LENGTH,
    max_model_len: int | None = DEFAULT_MAX_MODEL_LEN,
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
    request_read_timeout: float | None = DEFAULT_READ_TIMEOUT,
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
    enable_docs: bool = True,
    threads: int | None = None,
    **engine_kwargs: Any,
) -> None:
    """Load ``model`` (None: the shipped default) and serve it until SIGINT or SIGTERM.

    ``engine_kwargs`` go to ``Engine`` (max_num_seqs, max_num_batched_tokens, dtype, device,
    attention_backend, forward_chunk_tokens) plus ``mask_text`` for AsyncEngine;
    ``max_gen_length`` caps a request's ``max_tokens`` and ``max_model_len`` its prompt plus
    ``max_tokens`` (None: the model's own maximum, if any; see ``Engine``). The limits
    are ``create_app``'s and ``AsyncEngine``'s (``max_queued_tokens`` None: four times the
    token budget of a batch). ``max_connections`` caps open connections (lowered to fit the
    open-file limit), ``request_read_timeout`` bounds the time a request's headers and body may
    take to arrive, ``keep_alive_timeout`` an idle connection's life (see ``connections``).
    ``threads``: torch's intra-op threads, set before the model loads. On a signal, requests in
    flight get ``graceful_timeout`` seconds to finish (0: aborted at once; None: as long as
    they need); then the rest are aborted, the step thread is joined, and the function returns
    (so ``foretell serve`` exits with status 0).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads: must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if graceful_timeout is not None and not graceful_timeout >= 0:
        raise ValueError(f"shutdown_grace: must be >= 0 or None, got {graceful_timeout}")
    if request_read_timeout is not None and not request_read_timeout > 0:
        raise ValueError(f"request_read_timeout: must be > 0, got {request_read_timeout}")
    if not keep_alive_timeout > 0:
        raise ValueError(f"keep_alive_timeout: must be > 0, got {keep_alive_timeout}")
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"max_connections: must be >= 1, got {max_connections}")
    _quiet_logs()
    if max_queued_tokens is None:
        budget = engine_kwargs.get("max_num_batched_tokens", 16384)
        max_queued_tokens = QUEUED_TOKENS_PER_BATCH_BUDGET * budget
    engine = AsyncEngine(
        model,
        max_queued_requests=max_queued_requests,
        max_queued_tokens=max_queued_tokens,
        max_gen_length=max_gen_length,
        max_model_len=max_model_len,
        **engine_kwargs,
    )
    app = create_app(
        engine,
        model_name or default_model_name(model),
        api_key=api_key,
        allowed_origins=allowed_origins,
        max_body_bytes=max_body_bytes,
        max_prompts_per_request=max_prompts_per_request,
        request_timeout=request_timeout,
        enable_docs=enable_docs,
    )
    # uvicorn's own timeout is only a backstop: cancelling handlers mid-flight logs tracebacks,
    # while aborting in the engine lets each one answer (503, or a stream's "abort" chunk).
    backstop = None if graceful_timeout is None else graceful_timeout + 5.0
    config = guarded_config(
        app,
        max_connections=max_connections,
        read_timeout=request_read_timeout,
        keep_alive_timeout=keep_alive_timeout,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=backstop,
    )
    server = DrainingServer(config)

    async def abort_after_exit(exiting: asyncio.Event) -> None:
        await exiting.wait()
        if graceful_timeout is not None:
            await asyncio.sleep(graceful_timeout)
            await engine.shutdown(abort=True)

    async def serve() -> None:
        exiting = asyncio.Event()
        loop = asyncio.get_running_loop()
        server.on_exit = lambda: loop.call_soon_threadsafe(exiting.set)
        async with engine:
            watcher = asyncio.ensure_future(abort_after_exit(exiting))
            try:
                await server.serve()
            finally:
                watcher.cancel()

    # Loaded: what is alive now lives as long as the server. A caller that goes on after
    # run_server returns gets its collector back as it was (the app, the engine and the model
    # then become garbage that a frozen heap would never free).
    froze = gc.get_freeze_count() == 0
    freeze_startup_heap()
    try:
        asyncio.run(serve())
    finally:
        if froze:
            gc.unfreeze()
