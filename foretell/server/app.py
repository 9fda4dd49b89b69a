"""The OpenAI-compatible HTTP API over an AsyncEngine (FastAPI), and ``run_server``.

Streaming sends, per step, the newly stable left-to-right text: a diffusion model reveals tokens
anywhere in its canvas, but a token once revealed never changes, so everything before the first
still-masked position is final and can go to the client as an ordinary OpenAI delta. Joined,
the deltas equal the non-streamed text. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from foretell.engine.async_engine import (
    AsyncEngine,
    EngineClosedError,
    QueueFullError,
    RequestHandle,
    StreamUpdate,
)
from foretell.engine.outputs import RequestOutput
from foretell.server.limits import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_GEN_LENGTH,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MAX_PROMPTS_PER_REQUEST,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE,
    QUEUED_TOKENS_PER_BATCH_BUDGET,
    RETRY_AFTER_SECONDS,
)
from foretell.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DiffusionFields,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
logger = logging.getLogger(__name__)


# -- parsing ---------------------------------------------------------------------------
MAX_DEPTH = 32  # JSON nesting; the deepest valid body (early_commit) is 3 levels
MAX_INT_DIGITS = 40  # longer integers are read as infinity, which every numeric field refuses
JSON_TYPES = ("application/json",)
# Names pydantic puts in an error's location for the member of a union that failed.
_UNION_TAGS = re.compile(r"^(str|int|float|bool|dict|list|none|constrained-\w+)$|[\[\]\-]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")
# Body fields whose keys are data: errors inside them name the field itself.
MAPPING_FIELDS = ("constraints", "logit_bias", "early_commit")


def _parse_int(text: str) -> int | float:
    digits = len(text) - text.startswith("-")
    return int(text) if digits <= MAX_INT_DIGITS else math.inf


def _max_depth(raw: bytes) -> int:
    """An upper bound of the body's nesting depth, at C speed (brackets inside strings count
    too, so only a high value needs the exact walk)."""
    brackets = raw.translate(None, _NOT_BRACKETS)
    if brackets.count(b"[") + brackets.count(b"{") <= MAX_DEPTH:
        return MAX_DEPTH
    steps = torch.frombuffer(bytearray(brackets), dtype=torch.uint8)
    opening = (steps == ord("[")) | (steps == ord("{"))
    return int(torch.cumsum(opening.to(torch.int32) * 2 - 1, 0).max())


def _check_tree(raw: bytes, data: dict[str, Any]) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings no encoder can take (lone surrogates),
    naming the field. The common case costs two C-speed scans of the raw body."""
    if _max_depth(raw) > MAX_DEPTH:
        stack = [(v, 1) for v in data.values() if isinstance(v, (dict, list))]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise APIError(f"body: nested deeper than {MAX_DEPTH} levels")
            values = node.values() if isinstance(node, dict) else node
            stack.extend((v, depth + 1) for v in values if isinstance(v, (dict, list)))
    # A lone surrogate can only come from a \uD800-\uDFFF escape: look further only then.
    if not _SURROGATE_ESCAPE.search(raw):
        return
    for key, value in data.items():
        try:
            json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            param = key.encode("utf-8", "replace").decode()
            raise APIError(f"{param}: not valid Unicode (a lone surrogate)", param=param) from None


def _param(loc: tuple) -> str | None:
    """A pydantic error location as an API field name, e.g. ``messages.0.role``; the union
    member tags pydantic adds (``prompt.list[int]``) are left out, and so are the keys of
    mapping fields (``constraints``), which are data, not field names."""
    if loc and loc[0] in MAPPING_FIELDS:
        return str(loc[0])
    parts = []
    for part in loc:
        if isinstance(part, str) and _UNION_TAGS.search(part):
            break
        parts.append(str(part))
    return ".".join(parts) or None


async def _read_body(request: Request, limit: int | None) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_big = APIError(
        f"body: larger than the server's limit of {limit} bytes",
        status=413,
        code="request_too_large",
    )
    length = request.headers.get("content-length")
    if limit is not None and length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if limit is not None and size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, model: type[BaseModel], limit: int | None = None) -> Any:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in JSON_TYPES:
        raise APIError(
            f"content-type: expected application/json, got {media or 'none'!r}",
            status=415,
            code="unsupported_media_type",
        )
    raw = await _read_body(request, limit)
    # Decoding and validating up to max_body_bytes takes a while: not on the event loop.
    return await asyncio.to_thread(_decode, raw, model)


def _decode(raw: bytes, model: type[BaseModel]) -> Any:
    try:
        data = json.loads(raw, parse_int=_parse_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(f"body: malformed JSON ({err})") from None
    except RecursionError:
        raise APIError(f"body: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:
        raise APIError(f"body: unreadable JSON ({err})") from None
    if not isinstance(data, dict):
        raise APIError("body: expected a JSON object")
    _check_tree(raw, data)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = _param(first["loc"])
        why = first["msg"]
        if first["type"] == "extra_forbidden":
            why = "unknown or unsupported parameter"
        raise APIError(f"{param or 'body'}: {why}", param=param) from None


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- results -----------------------------------------------------------------------------
def _finish_reason(out: RequestOutput, handle: RequestHandle, engine: AsyncEngine) -> str:
    """OpenAI's finish_reason: "stop" when the model ended its text inside the canvas (an EOS
    token, or a stop string), "length" when it filled the canvas; "abort"/"error" otherwise."""
    if out.finish_reason == "aborted":
        return "abort"
    if out.finish_reason == "error":
        return "error"
    eos = set(getattr(engine.engine.model, "eos_token_ids", ()) or ())
    return "stop" if handle.stop_hit or eos & set(out.token_ids) else "length"


def _diffusion_info(out: RequestOutput) -> dict[str, Any]:
    return {
        "finish_reason": out.finish_reason,
        "num_forward_passes": out.num_forward_passes,
        "committed_early": out.committed_early,
        "commit_step": out.commit_step,
    }


def _usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(o.token_ids) for o in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _failure(error: str | None) -> str:
    """What a client is told of a failed request: the stage that failed, not the exception
    text (which may hold allocator or library internals); the server log has the details."""
    stage = (error or "").split(":", 1)[0].strip()
    if stage not in ("forward pass failed", "decoding failed"):
        stage = "internal error"
    return f"generation failed: {stage} (see the server log)"


def _check_outputs(outputs: list[RequestOutput]) -> None:
    for out in outputs:
        if out.finish_reason == "error":
            logger.warning("request %s failed: %s", out.request_id, out.error)
            raise APIError(_failure(out.error), status=500, type="server_error", code="error")
        if out.finish_reason == "aborted":
            raise APIError(
                "request aborted (server shutting down?)",
                status=503,
                type="server_error",
                code="aborted",
            )


def _prompt_error(err: ValueError, rename: dict[str, str] | None = None) -> APIError:
    """A 400 for a refused prompt; a batch's ``prompts[i]: prompt: why`` becomes
    ``prompt[i]: why`` (OpenAI's field is ``prompt``)."""
    if str(err).startswith("prompts: "):  # the batch as a whole
        return APIError(f"prompt: {str(err)[len('prompts: ') :]}", param="prompt")
    match = re.match(r"^prompts\[(\d+)\]: (.*)$", str(err), re.S)
    if match is None:
        return APIError.from_value_error(err, rename)
    index, inner = match.groups()
    api = APIError.from_value_error(ValueError(inner), rename)
    if api.param == "prompt":
        return APIError(f"prompt[{index}]: {inner[len('prompt: ') :]}", param="prompt")
    return api


# -- deadlines ---------------------------------------------------------------------------
def _timeout_error() -> APIError:
    return APIError(
        "request timed out: aborted after the server's request timeout",
        status=504,
        type="server_error",
        code="timeout",
    )


async def _next_before(updates: AsyncIterator[Any], deadline: float | None) -> Any:
    """The next item of ``updates``; TimeoutError once ``deadline`` (loop time) has passed."""
    if deadline is None:
        return await anext(updates)
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise TimeoutError
    return await asyncio.wait_for(anext(updates), remaining)


# -- streaming ---------------------------------------------------------------------------
async def _merge(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, StreamUpdate]]:
    """Updates of several streamed requests as they come, tagged with their choice index."""
    if len(handles) == 1:
        async for update in handles[0]:
            yield 0, update  # type: ignore[misc]
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for update in handle:
                await queue.put((index, update))
        except Exception as err:
            await queue.put((index, err))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            index, update = await queue.get()
            if isinstance(update, Exception):
                raise update
            if update.finished:
                remaining -= 1
            yield index, update
    finally:
        for task in tasks:
            task.cancel()


def _sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


class _Streamer:
    """Turns engine updates into OpenAI chunks for one response."""

    def __init__(
        self,
        engine: AsyncEngine,
        handles: list[RequestHandle],
        body: DiffusionFields,
        model_name: str,
        chat: bool,
        deadline: float | None = None,
    ) -> None:
        self.deadline = deadline
        self.engine = engine
        self.handles = handles
        self.body = body
        self.chat = chat
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        prefix = "chatcmpl" if chat else "cmpl"
        self.base = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }

    def chunk(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None = None,
        extra: dict[str, Any] | None = None,
        role: bool = False,
    ) -> str:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        if extra:
            choice["foretell"] = extra
        data = {**self.base, "choices": [choice]}
        if self.include_usage:
            data["usage"] = None
        return _sse(data)

    async def events(self) -> AsyncIterator[str]:
        sent = [""] * len(self.handles)
        finals: list[RequestOutput] = []
        try:
            if self.chat:
                for i in range(len(self.handles)):
                    yield self.chunk(i, "", role=True)
            updates = _merge(self.handles)
            while True:
                try:
                    index, update = await _next_before(updates, self.deadline)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    yield _sse(_timeout_error().body())
                    return
                if update.finish_reason is None:
                    stable = update.stable_text
                    delta = stable[len(sent[index]) :] if stable.startswith(sent[index]) else ""
                    sent[index] += delta
                    if delta or self.body.stream_canvas:
                        extra = None
                        if self.body.stream_canvas:
                            extra = {
                                "step": update.num_forward_passes,
                                "canvas": update.text,
                                "num_masked": update.num_masked,
                            }
                        yield self.chunk(index, delta, extra=extra)
                    continue
                finals.append(update)
                if update.finish_reason == "error":
                    logger.warning("request %s failed: %s", update.request_id, update.error)
                    error = APIError(_failure(update.error), type="server_error", code="error")
                    yield _sse(error.body())
                    return
                text = update.text
                rest = text[len(sent[index]) :] if text.startswith(sent[index]) else ""
                if rest and update.finish_reason != "aborted":  # an aborted canvas has holes
                    yield self.chunk(index, rest)
                reason = _finish_reason(update, self.handles[index], self.engine)
                yield self.chunk(index, None, reason, extra=_diffusion_info(update))
            if self.include_usage:
                yield _sse({**self.base, "choices": [], "usage": _usage(finals)})
            yield _sse("[DONE]")
        except Exception as err:  # the step loop failed this request: tell the client so
            logger.warning("stream failed: %r", err)
            yield _sse(APIError(_failure(None), type="server_error").body())
        finally:
            for handle in self.handles:  # client gone or error: free the slots
                handle.abort_nowait()


# -- the app -----------------------------------------------------------------------------
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


def render_metrics(stats: dict[str, Any]) -> str:
    """Prometheus text exposition (version 0.0.4) of ``AsyncEngine.stats()``."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, Any]]) -> None:
        lines.append(f"# HELP foretell_{name} {help_}")
        lines.append(f"# TYPE foretell_{name} {kind}")
        for labels, value in samples:
            lines.append(f"foretell_{name}{labels} {value}")

    finished = stats["finished"]
    metric(
        "requests_finished_total",
        "counter",
        "Requests finished, by finish reason.",
        [(f'{{reason="{r}"}}', n) for r, n in sorted(finished.items())],
    )
    metric(
        "forward_passes_total",
        "counter",
        "Engine steps that ran a forward pass.",
        [("", stats["forward_passes"])],
    )
    metric(
        "early_commits_total",
        "counter",
        "Requests finished by early commit (Prophet).",
        [("", stats["early_commits"])],
    )
    metric(
        "sequences_in_passes_total",
        "counter",
        "Requests summed over forward passes.",
        [("", stats["sequences_in_passes"])],
    )
    metric(
        "tokens_in_passes_total",
        "counter",
        "Packed tokens summed over forward passes.",
        [("", stats["tokens_in_passes"])],
    )
    metric(
        "generated_tokens_total",
        "counter",
        "Canvas tokens of requests that finished generating.",
        [("", stats["generated_tokens"])],
    )
    metric(
        "step_seconds_total",
        "counter",
        "Wall time spent inside engine steps.",
        [("", f"{stats['step_seconds']:.6f}")],
    )
    metric("requests_running", "gauge", "Requests in the batch.", [("", stats["running"])])
    metric("requests_waiting", "gauge", "Requests queued for a slot.", [("", stats["waiting"])])
    metric("max_num_seqs", "gauge", "Batch slots.", [("", stats["max_num_seqs"])])
    metric("kv_cache_bytes", "gauge", "Bytes held by KV caches.", [("", stats["kv_cache_bytes"])])
    metric(
        "batch_occupancy",
        "gauge",
        "Requests in the last forward pass over max_num_seqs.",
        [("", f"{stats['batch_occupancy']:.6f}")],
    )
    metric(
        "mean_batch_occupancy",
        "gauge",
        "Mean requests per forward pass over max_num_seqs, since start.",
        [("", f"{stats['mean_batch_occupancy']:.6f}")],
    )
    return "\n".join(lines) + "\n"


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
        return PlainTextResponse(
            render_metrics(engine.stats()), media_type="text/plain; version=0.0.4"
        )

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
        params = body.to_params()
        length_name, _ = body.length_field()
        try:
            handles = await engine.add_requests(prompts, params, stream=bool(body.stream))
        except ValueError as err:
            rename = {"gen_length": length_name}
            if chat:  # the chat prompt is rendered from the messages
                rename["prompt"] = "messages"
            raise _prompt_error(err, rename) from None
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
            streamer = _Streamer(engine, handles, body, model_name, chat, deadline)
            return StreamingResponse(
                streamer.events(), media_type="text/event-stream", headers=SSE_HEADERS
            )
        try:
            outputs = await _gather_or_disconnect(request, handles, deadline)
        except RuntimeError as err:  # the step loop failed these requests
            logger.warning("request failed: %r", err)
            raise APIError(_failure(None), status=500, type="server_error") from None
        if outputs is None:  # the client left; nobody to answer
            return Response(status_code=499)
        _check_outputs(outputs)
        if chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": out.text},
                    "logprobs": None,
                    "finish_reason": _finish_reason(out, handle, engine),
                    "foretell": _diffusion_info(out),
                }
                for i, (out, handle) in enumerate(zip(outputs, handles, strict=True))
            ]
        else:
            choices = [
                {
                    "index": i,
                    "text": out.text,
                    "logprobs": None,
                    "finish_reason": _finish_reason(out, handle, engine),
                    "foretell": _diffusion_info(out),
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
                "usage": _usage(outputs),
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
        body: CompletionRequest = await _parse(request, CompletionRequest, max_body_bytes)
        return await run(request, body, body.prompts(), False, deadline)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        deadline = deadline_of()
        guard(request)
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest, max_body_bytes)
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
            raise _timeout_error()
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
    enable_docs: bool = True,
    **engine_kwargs: Any,
) -> None:
    """Load ``model`` (None: the shipped default) and serve it until interrupted.

    ``engine_kwargs`` go to ``Engine`` (max_num_seqs, max_num_batched_tokens, dtype, device,
    attention_backend, forward_chunk_tokens) plus ``mask_text`` for AsyncEngine;
    ``max_gen_length`` caps a request's ``max_tokens`` and ``max_model_len`` its prompt plus
    ``max_tokens`` (None: the model's own maximum, if any; see ``Engine``). The limits
    are ``create_app``'s and ``AsyncEngine``'s (``max_queued_tokens`` None: four times the
    token budget of a batch). On Ctrl-C, requests in flight get ``graceful_timeout`` seconds to
    finish (None: as long as they need); then the rest are aborted and the step thread is
    joined.
    """
    import uvicorn

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
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=backstop
    )
    server = uvicorn.Server(config)

    async def abort_after_exit() -> None:
        while not server.should_exit:
            await asyncio.sleep(0.2)
        if graceful_timeout is not None:
            await asyncio.sleep(graceful_timeout)
            await engine.shutdown(abort=True)

    async def serve() -> None:
        async with engine:
            watcher = asyncio.ensure_future(abort_after_exit())
            try:
                await server.serve()
            finally:
                watcher.cancel()

    # uvicorn re-raises the Ctrl-C it caught once it has stopped; by then every connection is
    # closed, so it only needs to end the process quietly (the step thread is a daemon).
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
