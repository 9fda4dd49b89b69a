"""AsyncEngine: the Engine behind a background step loop, for asyncio programs and servers.

The Engine is not thread-safe, so one dedicated thread owns it and makes every call into it:
adds, aborts, steps, snapshots and the tokenizer work of rendering updates. Callers on any event
loop hand it commands through a list guarded by a condition variable and get their results back
through ``loop.call_soon_threadsafe``. With nothing queued or running the thread blocks on the
condition, so an idle engine costs no CPU.

A request is validated and tokenized on a separate preparation thread (so a long prompt never
delays the step loop), then admitted on the engine thread; a ``ValueError`` naming the field
comes back to the caller of ``add_request`` / ``generate`` / ``stream`` and nothing is queued.
With ``max_queued_requests`` / ``max_queued_tokens`` a full queue refuses new requests with
``QueueFullError`` instead of letting them wait without bound.
Cancelling a caller's task, or leaving a stream early, aborts the request so the next step
backfills its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

from foretell.engine.engine import Engine, Prompt
from foretell.engine.outputs import RequestOutput
from foretell.params import DecodeParams, as_params

logger = logging.getLogger(__name__)

FINISH_REASONS = ("steps", "early_commit", "stop", "aborted", "error")
DEFAULT_MASK_TEXT = "[MASK]"


@dataclass
class StreamUpdate(RequestOutput):
    """One step of a streamed request: the canvas as it stands after a forward pass.

    While the request runs (``finish_reason`` None), ``token_ids`` is the generation part of the
    canvas with the mask id where tokens are still hidden and ``text`` renders it with every
    mask shown as ``AsyncEngine.mask_text``. The last update of a stream is the final output
    (same fields as ``Engine.generate`` gives) with ``text`` as the final text.

    ``revealed`` holds the canvas positions revealed by this step (subtract
    ``len(prompt_token_ids)`` to index ``token_ids``) and ``revealed_token_ids`` the tokens put
    there. ``stable_text`` is the text of the leading fully revealed part of the generation, cut
    at a stop string and holding back what may still become one: it only ever grows, so
    successive differences are safe to send as left-to-right deltas. On the final update it
    equals ``text``.
    """

    revealed_token_ids: list[int] = field(default_factory=list)
    num_masked: int = 0
    stable_text: str = ""


class EngineClosedError(RuntimeError):
    """The engine is shut down (or shutting down) and takes no new requests."""


class QueueFullError(RuntimeError):
    """Admission refused: the queue of requests waiting for a slot is full; retry later."""


def _bare(err: BaseException) -> BaseException:
    """``err`` without its traceback and chained exceptions: their frames would keep a refused
    request's prompt (and anything else local) alive for as long as the error is held."""
    err.__traceback__ = None
    err.__context__ = None
    err.__cause__ = None
    return err


def _deliver(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> bool:
    """Run ``fn(*args)`` on ``loop``; False if that loop is gone (its caller cannot listen)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # loop closed
        return False
    return True


def _resolve(fut: asyncio.Future, value: Any = None, error: BaseException | None = None) -> None:
    if fut.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


class RequestHandle:
    """A queued request: iterate it for its updates, or await ``result()`` for the output.

    Use it as ``async with`` (or call ``abort()``) so that a caller who stops listening frees
    the request's slot.
    """

    def __init__(
        self, engine: AsyncEngine, request_id: str, stream: bool, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._engine = engine
        self.request_id = request_id
        self.stream = stream
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.output: RequestOutput | None = None  # the final output, once it has arrived
        # Whether the final text was cut at one of the params' stop strings (OpenAI's "stop").
        self.stop_hit = False
        self._error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.output is not None or self._error is not None

    def _push(self, item: RequestOutput | BaseException, stop_hit: bool = False) -> None:
        self.stop_hit = stop_hit
        self._queue.put_nowait(item)

    async def _next(self) -> RequestOutput:
        if self._error is not None:
            raise self._error
        if self.output is not None:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._error = item
            raise item
        if item.finish_reason is not None:
            self.output = item
        return item

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> RequestOutput:
        """The next update (``StreamUpdate`` for stream handles), the final output last."""
        return await self._next()

    async def result(self) -> RequestOutput:
        """Wait for the final output, skipping any per-step updates."""
        while self.output is None:
            await self._next()
        return self.output

    def abort_nowait(self) -> None:
        """Ask the engine thread to abort this request (no-op once it has finished)."""
        if not self.finished:
            self._engine._abort_nowait(self.request_id)

    async def abort(self) -> None:
        self.abort_nowait()

    async def __aenter__(self) -> RequestHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort_nowait()


@dataclass
class _Track:
    """Engine-thread bookkeeping for one request."""

    handle: RequestHandle
    params: DecodeParams
    last_step: int = 0


class AsyncEngine:
    """An ``Engine`` driven by a background thread, safe to use from many asyncio tasks.

    ``model`` is anything ``Engine`` accepts, or an existing ``Engine`` (which this object then
    owns: do not call into it elsewhere). Other keyword arguments go to ``Engine``.
    ``mask_text`` is how still-masked tokens appear in streamed ``text`` (default: the
    tokenizer's mask token string, else ``[MASK]``). ``max_queued_requests`` bounds the requests
    waiting for a batch slot (beyond those that fit free slots) and ``max_queued_tokens`` their
    canvas tokens; past either, ``add_requests`` raises ``QueueFullError`` (None: no bound).
    """

    def __init__(
        self,
        model: Engine | str | os.PathLike | object | None = None,
        *,
        mask_text: str | None = None,
        max_queued_requests: int | None = None,
        max_queued_tokens: int | None = None,
        **engine_kwargs: Any,
    ) -> None:
        for name, value in (
            ("max_queued_requests", max_queued_requests),
            ("max_queued_tokens", max_queued_tokens),
        ):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}: must be an integer >= 0 or None, got {value!r}")
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        if isinstance(model, Engine):
            if engine_kwargs:
                raise ValueError(
                    f"{sorted(engine_kwargs)[0]}: cannot be given with an existing Engine"
                )
            self.engine = model
        else:
            self.engine = Engine(model, **engine_kwargs)
        tok = self.engine.tokenizer
        if mask_text is None:
            mask_text = getattr(tok, "mask_token", None) or DEFAULT_MASK_TEXT
        self.mask_text: str = mask_text
        self.tokenizer = tok
        self.mask_token_id = self.engine.mask_token_id
        self.max_num_seqs: int = self.engine.scheduler.max_num_seqs
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._stopping = False
        self._abort_on_stop = True
        self._closed = False
        self._tracks: dict[str, _Track] = {}  # engine thread only
        self._stats_lock = threading.Lock()
        self._stats: dict[str, Any] = {}
        self._last_batch = 0
        self._publish_stats()
        if tok is not None:
            # A fast tokenizer resets its truncation state on its first call, which must not
            # race with the step loop's decoding: make that call now, before either thread runs.
            with contextlib.suppress(Exception):
                tok("warm up")
        # Validation and tokenization run here, one request at a time, off the step loop.
        self._prepare = ThreadPoolExecutor(1, thread_name_prefix="foretell-prepare")
        self._thread = threading.Thread(target=self._run, name="foretell-engine", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------------
    async def add_request(
        self,
        prompt: Prompt,
        params: DecodeParams | dict | None = None,
        request_id: str | None = None,
        *,
        stream: bool = False,
    ) -> RequestHandle:
        """Validate and queue a request; returns once it is queued (or raises ValueError).

        Splitting queueing from listening lets a server refuse a bad request before it has
        sent any response headers.
        """
        ids = None if request_id is None else [request_id]
        return (await self.add_requests([prompt], params, ids, stream=stream))[0]

    async def add_requests(
        self,
        prompts: Sequence[Prompt],
        params: DecodeParams | dict | None = None,
        request_ids: Sequence[str] | None = None,
        *,
        stream: bool = False,
    ) -> list[RequestHandle]:
        """Queue several requests, all or none: if one is invalid, none is queued and the
        ``ValueError`` names its index (``prompts[i]: ...``)."""
        if params is None:
            params = DecodeParams()
        elif isinstance(params, dict):
            params = as_params(params)  # pure: errors need no trip to the engine thread
        if not isinstance(params, DecodeParams):
            raise ValueError(f"params: expected DecodeParams, got {type(params).__name__}")
        prompts = list(prompts)
        if request_ids is None:
            rids = [f"async-{next(self._ids)}" for _ in prompts]
        else:
            rids = [str(r) for r in request_ids]
            if len(rids) != len(prompts):
                raise ValueError(f"request_ids: {len(rids)} ids for {len(prompts)} prompts")
            if len(set(rids)) != len(rids):
                raise ValueError("request_ids: not unique")
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closed or self._stopping:
                raise EngineClosedError("AsyncEngine: shut down; no new requests")
        engine = self.engine

        def prepare() -> list:
            built = []
            for i, (prompt, rid) in enumerate(zip(prompts, rids, strict=True)):
                try:
                    built.append(engine.make_request(prompt, params, rid))
                except ValueError as err:
                    if len(rids) > 1:
                        raise ValueError(f"prompts[{i}]: {err}") from None
                    raise
            return built

        try:
            built = await loop.run_in_executor(self._prepare, prepare)
        except Exception as err:  # a ValueError naming the field, or a tokenizer's own failure
            raise _bare(err) from None
        handles = [RequestHandle(self, rid, stream, loop) for rid in rids]
        queued: asyncio.Future[None] = loop.create_future()

        def add() -> None:
            added: list[str] = []
            try:
                self._admit(built)
                for req in built:
                    if req.request_id in self._tracks:
                        raise ValueError(f"request_id: {req.request_id!r} is already running")
                for req in built:
                    added.append(engine.enqueue(req))
            except Exception as err:
                for rid in added:  # only if something unexpected failed halfway
                    engine.abort(rid)
                built.clear()
                _deliver(loop, _resolve, queued, None, _bare(err))
                return
            built.clear()
            for handle in handles:
                self._tracks[handle.request_id] = _Track(handle, params)
            if not _deliver(loop, _resolve, queued):
                for rid in rids:
                    engine.abort(rid)

        try:
            self._submit(add)
        except EngineClosedError:
            built.clear()
            raise
        try:
            await queued
        except asyncio.CancelledError:
            for rid in rids:  # runs after the add: commands keep their order
                self._abort_nowait(rid)
            raise
        return handles

    def _admit(self, built: list) -> None:
        """Refuse requests that would overfill the queue (engine thread)."""
        scheduler = self.engine.scheduler
        if self.max_queued_requests is not None:
            most = scheduler.max_num_seqs + self.max_queued_requests
            if len(built) > most:  # would never fit
                raise ValueError(
                    f"prompts: {len(built)} prompts exceed max_num_seqs + max_queued_requests "
                    f"{most}"
                )
            free = max(0, scheduler.max_num_seqs - scheduler.num_running)
            queued = max(0, scheduler.num_waiting - free)
            new = max(0, scheduler.num_waiting + len(built) - free) - queued
            if new and queued + new > self.max_queued_requests:
                raise QueueFullError(
                    f"queue full: {queued} requests waiting for a slot "
                    f"(max_queued_requests {self.max_queued_requests}); retry later"
                )
        if self.max_queued_tokens is not None:
            queued_tokens = sum(r.cost for r in scheduler.waiting)
            new_tokens = sum(r.cost for r in built)
            if len(built) > 1 and new_tokens > self.max_queued_tokens:  # would never fit
                raise ValueError(
                    f"prompts: {len(built)} prompts of {new_tokens} canvas tokens in all exceed "
                    f"max_queued_tokens {self.max_queued_tokens}"
                )
            # One request is always admitted when nothing waits, whatever its size.
            if (queued_tokens or len(built) > 1) and (
                queued_tokens + new_tokens > self.max_queued_tokens
            ):
                raise QueueFullError(
                    f"queue full: {queued_tokens} tokens waiting for a slot "
                    f"(max_queued_tokens {self.max_queued_tokens}); retry later"
                )

    async def generate(
        self,
        prompt: Prompt,
        params: DecodeParams | dict | None = None,
        request_id: str | None = None,
    ) -> RequestOutput:
        """The final output of one request; cancelling the caller aborts it."""
        handle = await self.add_request(prompt, params, request_id)
        async with handle:
            return await handle.result()

    async def stream(
        self,
        prompt: Prompt,
        params: DecodeParams | dict | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[StreamUpdate]:
        """One ``StreamUpdate`` per forward pass the request takes part in, the final one last.

        Leaving the loop early aborts the request (at once with ``contextlib.aclosing``, else
        when the generator is garbage-collected).
        """
        handle = await self.add_request(prompt, params, request_id, stream=True)
        async with handle:
            async for update in handle:
                yield update  # type: ignore[misc]

    async def abort(self, request_id: str) -> None:
        """Abort a request by id; its caller gets an output with finish_reason "aborted"."""
        self._abort_nowait(str(request_id))

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for /metrics, as of the last step (safe from any thread)."""
        with self._stats_lock:
            out = dict(self._stats)
            out["finished"] = dict(self._stats["finished"])
            return out

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    async def shutdown(self, *, abort: bool = True) -> None:
        """Stop the step loop and join its thread.

        With ``abort`` (default) every request still queued or running is aborted and its
        caller gets finish_reason "aborted"; otherwise they all run to the end first. New
        requests are refused from now on.
        """
        with self._cond:
            if not self._stopping:
                self._stopping = True
                self._abort_on_stop = abort
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self._prepare.shutdown(wait=False)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- plumbing ------------------------------------------------------------------------
    def _submit(self, command: Callable[[], None], *, control: bool = False) -> None:
        with self._cond:
            if self._closed or (self._stopping and not control):
                raise EngineClosedError("AsyncEngine: shut down; no new requests")
            self._commands.append(command)
            self._cond.notify()

    def _abort_nowait(self, request_id: str) -> None:
        with contextlib.suppress(RuntimeError):  # closed: nothing left to abort
            self._submit(lambda: self.engine.abort(request_id), control=True)

    def _run(self) -> None:
        """The step loop: run queued commands, then one step if anything is in flight."""
        engine = self.engine
        while True:
            with self._cond:
                while not (self._commands or self._stopping or engine.has_unfinished_requests()):
                    self._cond.wait()
                commands, self._commands = self._commands, []
                stopping, abort_all = self._stopping, self._abort_on_stop
            for command in commands:
                try:
                    command()
                except Exception:
                    logger.exception("foretell: engine command failed")
            if stopping and abort_all:
                for rid in list(self._tracks):
                    engine.abort(rid)
            if engine.has_unfinished_requests():
                try:
                    self._step()
                except Exception as err:  # never let the loop die: callers would hang
                    logger.exception("foretell: step loop failed")
                    for rid in list(self._tracks):
                        self._fail(rid, err)
            self._publish_stats()
            if stopping and not engine.has_unfinished_requests():
                with self._cond:
                    if not self._commands:
                        self._closed = True
                        engine.close()  # no pass is in flight now: stops the forward worker
                        return

    def _fail(self, rid: str, err: BaseException) -> None:
        """End one request with ``err`` raised to its caller (engine thread)."""
        track = self._tracks.pop(rid, None)
        self.engine.abort(rid)
        if track is not None:
            _deliver(track.handle._loop, track.handle._push, RuntimeError(repr(err)))

    def _step(self) -> None:
        engine = self.engine
        before = engine.metrics.sequences_in_passes
        try:
            finished = engine.step()
        except Exception as err:  # a bug in the engine: fail every request, keep serving
            logger.exception("foretell: engine step failed")
            for rid in list(self._tracks):
                self._fail(rid, err)
            with contextlib.suppress(Exception):
                engine.step()  # collect the aborted outputs nobody waits for now
            return
        self._last_batch = engine.metrics.sequences_in_passes - before
        deliveries: list[tuple[RequestHandle, RequestOutput, bool]] = []
        for out in finished:
            track = self._tracks.pop(out.request_id, None)
            if track is None:
                continue
            try:
                item = self._update(out, track.params) if track.handle.stream else out
                deliveries.append((track.handle, item, self._stop_hit(out, track.params)))
            except Exception as err:  # e.g. the tokenizer cannot decode: this request only
                logger.exception("foretell: rendering request %s failed", out.request_id)
                _deliver(track.handle._loop, track.handle._push, RuntimeError(repr(err)))
        for rid, track in list(self._tracks.items()):
            if not track.handle.stream:
                continue
            try:
                snap = engine.snapshot(rid)
                if snap is None or snap.num_forward_passes == track.last_step:
                    continue  # still waiting for a slot
                track.last_step = snap.num_forward_passes
                deliveries.append((track.handle, self._update(snap, track.params), False))
            except Exception as err:
                logger.exception("foretell: rendering request %s failed", rid)
                self._fail(rid, err)
        self._publish_stats()  # before anyone hears of this step, so stats() agrees with it
        for handle, item, stop_hit in deliveries:
            delivered = _deliver(handle._loop, handle._push, item, stop_hit)
            if not delivered and item.finish_reason is None:
                engine.abort(handle.request_id)  # the caller's loop is closed: nobody listens

    # -- rendering (engine thread) -------------------------------------------------------
    def _decode(self, ids: list[int], params: DecodeParams) -> str:
        if self.tokenizer is None or not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)

    def render(self, token_ids: list[int], params: DecodeParams) -> str:
        """Text of a partly denoised generation, each mask shown as ``mask_text``."""
        parts, run = [], []
        for t in token_ids:
            if t == self.mask_token_id:
                if run:
                    parts.append(self._decode(run, params))
                    run = []
                parts.append(self.mask_text)
            else:
                run.append(t)
        if run:
            parts.append(self._decode(run, params))
        return "".join(parts)

    def _stable_text(self, token_ids: list[int], params: DecodeParams) -> str:
        mask = self.mask_token_id
        end = token_ids.index(mask) if mask in token_ids else len(token_ids)
        text = self._decode(token_ids[:end], params)
        cuts = [i for i in (text.find(s) for s in params.stop) if i != -1]
        if cuts:
            return text[: min(cuts)]  # the final text ends here whatever comes later
        if end == len(token_ids):
            return text
        text = text.rstrip("\ufffd")  # a multi-byte character still incomplete
        hold = 0
        for stop in params.stop:  # a stop string may be starting at the end
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        return text[: len(text) - hold]

    def _stop_hit(self, out: RequestOutput, params: DecodeParams) -> bool:
        return out.stop_string is not None

    def _update(self, out: RequestOutput, params: DecodeParams) -> StreamUpdate:
        base = {f.name: getattr(out, f.name) for f in fields(RequestOutput)}
        ids = out.token_ids
        offset = len(out.prompt_token_ids)
        revealed_ids = [ids[p - offset] for p in out.revealed if 0 <= p - offset < len(ids)]
        num_masked = ids.count(self.mask_token_id)
        if out.finish_reason is None:
            base["text"] = self.render(ids, params)
            stable = self._stable_text(ids, params)
        else:
            stable = out.text
        return StreamUpdate(
            **base, revealed_token_ids=revealed_ids, num_masked=num_masked, stable_text=stable
        )

    def _publish_stats(self) -> None:
        engine = self.engine
        m = engine.metrics
        finished = {reason: m.finished.get(reason, 0) for reason in FINISH_REASONS}
        for reason, count in m.finished.items():
            finished.setdefault(reason, count)
        stats = {
            "running": engine.scheduler.num_running,
            "waiting": engine.scheduler.num_waiting,
            "in_flight": len(self._tracks),
            "max_num_seqs": self.max_num_seqs,
            "forward_passes": m.steps,
            "sequences_in_passes": m.sequences_in_passes,
            "tokens_in_passes": m.tokens_in_passes,
            "generated_tokens": m.generated_tokens,
            "step_seconds": m.step_seconds,
            "kv_cache_bytes": m.kv_cache_bytes,
            "kv_cache_peak_bytes": m.kv_cache_peak_bytes,
            "preemptions": engine.scheduler.num_preemptions,
            "finished": finished,
            "early_commits": finished["early_commit"],
            "batch_size": self._last_batch,
            "batch_occupancy": self._last_batch / self.max_num_seqs,
            "mean_batch_size": m.mean_batch_size,
            "mean_batch_occupancy": m.mean_batch_size / self.max_num_seqs,
        }
        with self._stats_lock:
            self._stats = stats
