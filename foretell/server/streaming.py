"""Streaming responses: per step, the newly stable left-to-right text as OpenAI SSE chunks.

A diffusion model reveals tokens anywhere in its canvas, but a token once revealed never changes,
so everything before the first still-masked position is final and can go to the client as an
ordinary OpenAI delta. Joined, the deltas equal the non-streamed text. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from foretell.engine.async_engine import AsyncEngine, RequestHandle, StreamUpdate
from foretell.engine.outputs import RequestOutput
from foretell.server.errors import APIError
from foretell.server.protocol import (
    DiffusionFields,
    diffusion_info,
    failure_message,
    finish_reason,
    logger,
    usage,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- deadlines ---------------------------------------------------------------------------
def timeout_error() -> APIError:
    """The 504 (or a stream's final error event) of a request past ``--request-timeout``."""
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


class Streamer:
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
                    yield _sse(timeout_error().body())
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
                    message = failure_message(update.error)
                    error = APIError(message, type="server_error", code="error")
                    yield _sse(error.body())
                    return
                text = update.text
                rest = text[len(sent[index]) :] if text.startswith(sent[index]) else ""
                if rest and update.finish_reason != "aborted":  # an aborted canvas has holes
                    yield self.chunk(index, rest)
                reason = finish_reason(update, self.handles[index], self.engine)
                yield self.chunk(index, None, reason, extra=diffusion_info(update))
            if self.include_usage:
                yield _sse({**self.base, "choices": [], "usage": usage(finals)})
            yield _sse("[DONE]")
        except Exception as err:  # the step loop failed this request: tell the client so
            logger.warning("stream failed: %r", err)
            yield _sse(APIError(failure_message(None), type="server_error").body())
        finally:
            for handle in self.handles:  # client gone or error: free the slots
                handle.abort_nowait()
