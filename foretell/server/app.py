"""The OpenAI-compatible HTTP API over an AsyncEngine (FastAPI), and ``run_server``.

Streaming sends, per step, the newly stable left-to-right text: a diffusion model reveals tokens
anywhere in its canvas, but a token once revealed never changes, so everything before the first
still-masked position is final and can go to the client as an ordinary OpenAI delta. Joined,
the deltas equal the non-streamed text. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from foretell.engine.async_engine import AsyncEngine, RequestHandle, StreamUpdate
from foretell.engine.outputs import RequestOutput
from foretell.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DiffusionFields,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- parsing ---------------------------------------------------------------------------
async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(f"body: malformed JSON ({err})") from None
    if not isinstance(data, dict):
        raise APIError("body: expected a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        why = first["msg"]
        if first["type"] == "extra_forbidden":
            why = "unknown or unsupported parameter"
        raise APIError(f"{param}: {why}", param=param) from None


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


def _check_outputs(outputs: list[RequestOutput]) -> None:
    for out in outputs:
        if out.finish_reason == "error":
            raise APIError(
                f"generation failed: {out.error}", status=500, type="server_error", code="error"
            )
        if out.finish_reason == "aborted":
            raise APIError(
                "request aborted (server shutting down?)",
                status=503,
                type="server_error",
                code="aborted",
            )


def _prompt_error(err: ValueError) -> APIError:
    """A 400 for a refused prompt; a batch's ``prompts[i]: prompt: why`` becomes
    ``prompt[i]: why`` (OpenAI's field is ``prompt``)."""
    match = re.match(r"^prompts\[(\d+)\]: (.*)$", str(err), re.S)
    if match is None:
        return APIError.from_value_error(err)
    index, inner = match.groups()
    api = APIError.from_value_error(ValueError(inner))
    if api.param == "prompt":
        return APIError(f"prompt[{index}]: {inner[len('prompt: ') :]}", param="prompt")
    return api


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
    ) -> None:
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
            async for index, update in _merge(self.handles):
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
                    error = APIError(
                        f"generation failed: {update.error}", type="server_error", code="error"
                    )
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
            yield _sse(APIError(f"generation failed: {err}", type="server_error").body())
        finally:
            for handle in self.handles:  # client gone or error: free the slots
                handle.abort_nowait()


# -- the app -----------------------------------------------------------------------------
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


def create_app(engine: AsyncEngine, model_name: str = "foretell") -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name``; the caller owns the engine
    (start it before serving, ``shutdown()`` it after)."""
    app = FastAPI(title="foretell", version="0.1.0")
    app.state.engine = engine
    app.state.model_name = model_name
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        body = APIError(str(err.detail), status=err.status_code, type=kind).body()
        return JSONResponse(body, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(str(err)).body(), status_code=400)

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
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "foretell"}
        return {"object": "list", "data": [card]}

    async def run(
        request: Request,
        body: DiffusionFields,
        prompts: list[Any],
        chat: bool,
    ) -> Response:
        if body.model != model_name:
            raise APIError(
                f"model: {body.model!r} is not served here; use {model_name!r}",
                param="model",
                status=404,
                code="model_not_found",
            )
        params = body.to_params()
        try:
            handles = await engine.add_requests(prompts, params, stream=bool(body.stream))
        except ValueError as err:
            raise _prompt_error(err) from None
        except RuntimeError as err:  # shutting down
            raise APIError(str(err), status=503, type="server_error") from None
        if body.stream:
            streamer = _Streamer(engine, handles, body, model_name, chat)
            return StreamingResponse(
                streamer.events(), media_type="text/event-stream", headers=SSE_HEADERS
            )
        try:
            outputs = await _gather_or_disconnect(request, handles)
        except RuntimeError as err:  # the step loop failed these requests
            raise APIError(f"generation failed: {err}", status=500, type="server_error") from None
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

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = await _parse(request, CompletionRequest)
        return await run(request, body, body.prompts(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        return await run(request, body, [body.chat()], chat=True)

    return app


async def _gather_or_disconnect(
    request: Request, handles: list[RequestHandle]
) -> list[RequestOutput] | None:
    """All final outputs, or None (with every request aborted) if the client disconnects."""
    results = asyncio.ensure_future(asyncio.gather(*(h.result() for h in handles)))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({results, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if results.done():
            return results.result()
        results.cancel()
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
    graceful_timeout: float | None = 10.0,
    **engine_kwargs: Any,
) -> None:
    """Load ``model`` (None: the shipped default) and serve it until interrupted.

    ``engine_kwargs`` go to ``Engine`` (max_num_seqs, max_num_batched_tokens, dtype, device,
    attention_backend) plus ``mask_text`` for AsyncEngine. On Ctrl-C, requests in flight get
    ``graceful_timeout`` seconds to finish (None: as long as they need); then the rest are
    aborted and the step thread is joined.
    """
    import uvicorn

    engine = AsyncEngine(model, **engine_kwargs)
    app = create_app(engine, model_name or default_model_name(model))
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

    asyncio.run(serve())
