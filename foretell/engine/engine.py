"""Engine: continuous batching of diffusion requests with early-commit eviction.

One ``step()`` = the scheduler picks the batch (admitting waiting requests into free slots),
the runner does one packed forward pass, each request applies its own decoding rule, and every
request that finished (steps spent, or Prophet committed) is evicted at once so the next step
backfills its slot.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import weakref
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from foretell.decoding import advance
from foretell.decoding.block_step import advance_blocks
from foretell.engine import kv_cache
from foretell.engine.forward_process import ForwardProcess
from foretell.engine.metrics import EngineMetrics
from foretell.engine.outputs import RequestOutput
from foretell.engine.requests import Prompt, RequestBuilder
from foretell.engine.runner import (
    ForwardResult,
    ModelRunner,
    PassForward,
    PassOutput,
    finish_phases,
    resolve_forward_chunk_tokens,
)
from foretell.models.attention import CacheUse
from foretell.models.registry import LoadedModel, load_model, resolve_dtype
from foretell.models.transformer import DiffusionLM
from foretell.params import DecodeParams, Prophet
from foretell.scheduler import Request, Scheduler
from foretell.scheduler.scheduler import DEFAULT_MAX_HEAD_WAIT

logger = logging.getLogger(__name__)


def _resolve_model(model, tokenizer, dtype, device, attention_backend) -> LoadedModel:
    if model is None:
        from foretell.models.default import DEFAULT_MODEL_DIR

        model = DEFAULT_MODEL_DIR
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, dtype=dtype, device=device, attention_backend=attention_backend)
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, DiffusionLM):
        loaded = LoadedModel(model=model, tokenizer=tokenizer, path=None)
    else:
        raise ValueError(f"model: expected a path, a LoadedModel or a DiffusionLM, got {model!r}")
    if tokenizer is not None:
        loaded.tokenizer = tokenizer
    loaded.model = loaded.model.to(device=device, dtype=resolve_dtype(dtype)).eval()
    loaded.model.set_attention_backend(attention_backend)
    return loaded


def _profile_forward_peak(model: DiffusionLM, max_tokens: int, chunk_tokens: int | None) -> int:
    """CUDA: the memory peak (weights included) of the largest pass the engine will run, a
    packed batch of ``max_tokens`` tokens, so that the KV pool takes only what is left."""
    device = model.embed.weight.device
    tokens = max_tokens if chunk_tokens is None else min(max_tokens, chunk_tokens)
    length = min(tokens, model.max_length or tokens)
    lens = [length] * (tokens // length) + ([tokens % length] if tokens % length else [])
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    caches, storage = None, None
    if getattr(model, "block_causal", False):  # its passes always write and read the pool
        cfg = model.config
        shape = (cfg.num_layers, 2, max(lens), cfg.num_kv_heads, cfg.head_dim)
        storage = torch.empty(shape, dtype=model.embed.weight.dtype, device=device)
        slots = torch.arange(max(lens), device=device)
        caches = [CacheUse(slots, 0, 0, n, n, model.block_size) for n in lens]
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        hidden = model.forward_packed(ids, positions, lens, caches, storage)
        model.logits_at(hidden, positions, torch.arange(tokens, device=device))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del hidden, storage
    torch.cuda.empty_cache()
    return peak


def _is_block_default(path: object) -> bool:
    """Whether ``path`` is the shipped block-diffusion model's directory."""
    from foretell.models.block_default import BLOCK_DEFAULT_MODEL_DIR

    try:
        return path is not None and Path(path).resolve() == BLOCK_DEFAULT_MODEL_DIR.resolve()
    except (TypeError, OSError):
        return False


class _Pending(Protocol):
    """A forward running on the worker: a thread's ``Future`` or a ``PendingForward``."""

    def result(self) -> ForwardResult: ...


@dataclass
class _InFlight:
    """An overlapped engine's pass whose forward runs on the worker (a thread, or the model's
    process): its requests (and their ids), its phases (``ModelRunner.run_phases``, waiting for
    the forward's result) and the forward itself."""

    batch: list[Request]
    request_ids: set[str]
    phases: Generator[PassForward, ForwardResult, PassOutput]
    future: _Pending

    def wait(self) -> None:
        """Until the forward has ended, whatever its outcome."""
        with contextlib.suppress(Exception):
            self.future.result()


def check_forward_threads(value: object, overlap: str | None) -> None:
    """``forward_threads``: None, or an integer >= 1 with ``overlap="process"``."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"forward_threads: must be an integer >= 1, got {value!r}")
    if overlap != "process":
        raise ValueError(
            "forward_threads: sets the model's process's threads, so only with "
            f"overlap='process' (got overlap={overlap!r})"
        )


# ``Engine(overlap=...)``: where the forward in flight runs (True is "thread").
OVERLAP_MODES = ("thread", "process")


def resolve_overlap(value: object, device: torch.device) -> str | None:
    """``overlap`` as a mode (None: off), or a ValueError naming the field."""
    if value is False or value is None:
        return None
    if value is True:
        return "thread"
    if value not in OVERLAP_MODES:
        raise ValueError(f"overlap: must be False, True, 'thread' or 'process', got {value!r}")
    if value == "process" and device.type != "cpu":
        raise ValueError(
            "overlap: 'process' runs the model in a CPU process of its own; on "
            f"{device.type} use 'thread' (the device runs the forward)"
        )
    return value


class Engine:
    """Offline and embedded generation over one model.

    ``model`` is a checkpoint directory (or hub id), a ``LoadedModel``, a ``DiffusionLM`` (with
    ``tokenizer``), or None for the small model shipped with foretell.
    ``forward_chunk_tokens`` runs each step's packed batch through the model in chunks of whole
    sequences of at most that many tokens (``"auto"``: 640 on a CPU, where it keeps activations
    in cache, none on a GPU; None: never). Sequences never attend across chunks, so results are
    the same up to floating-point rounding, as with any other batch composition.
    ``kv_cache_memory`` is the byte size of the KV pool that holds every request's KV cache
    (``DecodeParams.kv_cache``), cut into pages of ``kv_page_size`` positions: ``"auto"`` sizes
    it from the device's memory (half of MemAvailable on a CPU; on CUDA 80% of the device less
    the weights and the peak of a profiled maximal forward pass, as vLLM's
    ``gpu_memory_utilization``), an int is bytes, None is as much as the engine could ever use.
    The pool never has more pages than ``max_num_seqs`` of the longest canvases could hold; on
    a CPU its memory grows with the pages in use, on CUDA it is allocated whole at the first
    cached request. Admission takes a Fast-dLLM-cached request's pages for its whole canvas
    and a block-causal request's for its first pass (the rest a block at a time, preempting
    the youngest block-causal requests when short); a request that does not fit yet waits
    while others that fit pass it, until it has waited ``max_head_wait`` steps at the queue's
    head; one that could never fit is refused by ``add_request``. ``max_num_batched_tokens``
    bounds the query tokens a pass runs: a cached step is charged the span it recomputes, not
    its canvas.
    ``max_model_len`` caps a request's canvas (prompt + ``gen_length``) below the model's own
    maximum length, and ``max_gen_length`` its ``gen_length`` (and so its ``steps``); None: no
    cap but the model's and ``max_num_batched_tokens`` (for a block-causal model, whose pass
    is about two blocks, the model's length alone when it is known). Every limit is checked
    before a request allocates anything.
    ``overlap`` (off by default) hides the host's work of a step behind a forward pass: the
    running requests form two groups of at most half ``max_num_seqs`` that take turns, and
    each step starts one group's forward while it decodes the other's pass. ``"thread"`` (or
    True) runs the forward on a worker thread (torch gives up the interpreter's lock while an
    op computes, but the host work beside it slows it on a CPU; on a GPU the device runs it);
    ``"process"`` (CPU only) runs it in a process of its own that maps the weights and the KV
    pool from shared memory, started with the engine and using ``forward_threads`` torch
    threads (None: as many as the engine's process uses; on a CPU, run the engine's process
    on one thread and give the model's the cores). Each request's tokens are the same as
    without it (a seeded request's draws are its own); an abort of a request whose pass is
    running takes effect once that pass is decoded, a step later. A forward that fails on the
    worker is run again here, in halves, as without overlap; a model process that ended is
    started again at the next pass. :meth:`close` waits for a pass in flight and stops the
    worker.
    """

    def __init__(
        self,
        model: str | os.PathLike | LoadedModel | DiffusionLM | None = None,
        *,
        tokenizer: object | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 16384,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        attention_backend: str = "auto",
        forward_chunk_tokens: int | str | None = "auto",
        kv_cache_memory: int | str | None = "auto",
        kv_page_size: int = kv_cache.DEFAULT_PAGE_SIZE,
        max_head_wait: int = DEFAULT_MAX_HEAD_WAIT,
        max_gen_length: int | None = None,
        max_model_len: int | None = None,
        overlap: bool | str = False,
        forward_threads: int | None = None,
    ) -> None:
        overlap = resolve_overlap(overlap, torch.device(device))
        check_forward_threads(forward_threads, overlap)
        if overlap and max_num_seqs < 2:
            raise ValueError(f"overlap: needs max_num_seqs >= 2 (two groups), got {max_num_seqs}")
        for name, value in (("max_gen_length", max_gen_length), ("max_model_len", max_model_len)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 2
            ):
                raise ValueError(f"{name}: must be an integer >= 2, got {value!r}")
        # Resolved (and validated) before the model loads, so a bad value fails at once.
        chunk_tokens = resolve_forward_chunk_tokens(forward_chunk_tokens, torch.device(device))
        kv_cache.check_kv_cache_memory(kv_cache_memory)
        kv_cache.check_page_size(kv_page_size)
        loaded = _resolve_model(model, tokenizer, dtype, device, attention_backend)
        # "auto" reads the free memory, so only once the weights are loaded (and on CUDA once
        # the largest pass has shown its activations' peak).
        peak = None
        if kv_cache_memory == "auto" and torch.device(device).type == "cuda":
            peak = _profile_forward_peak(loaded.model, max_num_batched_tokens, chunk_tokens)
        kv_budget = kv_cache.resolve_kv_cache_memory(kv_cache_memory, torch.device(device), peak)
        # What ``generate`` uses when given no params: the shipped model's own layout, a
        # block-causal family's official rule (the dynamic schedule at its threshold), else
        # DecodeParams' defaults.
        self.default_params = DecodeParams()
        self.default_prophet = Prophet()  # what "early_commit: prophet" means for this model
        official = getattr(loaded.model, "official_threshold", None)
        if official is not None:
            self.default_params = DecodeParams(remasking="confidence_threshold", threshold=official)
        if model is None:
            from foretell.models.default.params import default_decode_params, default_prophet

            self.default_params = default_decode_params(loaded.tokenizer)
            self.default_prophet = default_prophet()
        elif _is_block_default(loaded.path):
            from foretell.models.block_default import params as block_params

            self.default_params = block_params.default_decode_params()
            self.default_prophet = block_params.default_prophet()
        self.model: DiffusionLM = loaded.model
        self.tokenizer = loaded.tokenizer
        self.mask_token_id: int = self.model.mask_token_id
        self.model_path = loaded.path
        # The longest canvas (prompt + generation) a request may have; None: no bound but the
        # batch's token budget.
        limits = [self.model.max_length, max_model_len]
        self.max_model_len: int | None = min((x for x in limits if x is not None), default=None)
        self.kv_bytes_per_token = kv_cache.bytes_per_token(self.model)
        # A block-causal request's pass is about two blocks, so its canvas is bounded by the
        # model's length, not by the batch's token budget (the budget when none is known).
        block_causal = bool(getattr(self.model, "block_causal", False))
        budget = None if block_causal and self.max_model_len is not None else max_num_batched_tokens
        # Never more pages than max_num_seqs of the longest canvases could hold at once.
        longest = min(x for x in (budget, self.max_model_len) if x is not None)
        self.kv_pool = kv_cache.KVPool(
            self.model,
            torch.device(device),
            kv_budget,
            page_size=kv_page_size,
            max_pages=max_num_seqs * -(-longest // kv_page_size),
        )
        self.scheduler = Scheduler(
            max_num_seqs, max_num_batched_tokens, self.kv_pool, max_head_wait=max_head_wait
        )
        # Overlap: each group's pass holds at most half the requests; the pass in flight (its
        # requests, its phases, its forward's future) and the aborts that wait for it.
        self.overlap: str | None = overlap
        self._group_size = -(-max_num_seqs // 2)
        self._in_flight: _InFlight | None = None
        self._aborts_after_pass: set[str] = set()
        self._forward_worker: ThreadPoolExecutor | None = None
        self._forward_process: ForwardProcess | None = None
        limits = [budget, self.max_model_len, max_gen_length]
        self.max_gen_length: int = min(x for x in limits if x is not None)
        self.requests = RequestBuilder(
            self.model,
            self.tokenizer,
            self.kv_pool,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.max_model_len,
            max_gen_length=self.max_gen_length,
        )
        self.runner = ModelRunner(
            self.model, device, forward_chunk_tokens=chunk_tokens, kv_pool=self.kv_pool
        )
        # A forward in flight writes the pool's tensor: one that must grow waits for it (a
        # weak reference: the pool must not keep a dropped engine, and its process, alive).
        wait_in_flight = weakref.WeakMethod(self._wait_in_flight)
        self.kv_pool.before_grow = lambda: (wait := wait_in_flight()) and wait()
        if overlap == "process":
            own = torch.get_num_threads()
            threads = forward_threads or own
            cores = os.cpu_count() or 1
            if own > 1 and own + threads > cores:
                logger.warning(
                    "overlap='process': this process's %d torch threads and the model "
                    "process's %d on %d cores will slow each other; run this one on 1 "
                    "(torch.set_num_threads(1), --threads 1) and give the model's the cores "
                    "(forward_threads, --forward-threads)",
                    own,
                    threads,
                    cores,
                )
            self._forward_process = ForwardProcess(self.model, chunk_tokens, threads)
        self.metrics = EngineMetrics()
        self._ids = itertools.count()
        self._live: dict[str, Request] = {}
        self._ready: list[RequestOutput] = []  # aborted or unclaimed, returned by next step()

    # -- requests ------------------------------------------------------------------------
    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt any request can have (with gen_length 1 and no cfg)."""
        return self.requests.max_prompt_tokens

    def resolve_params(self, params: DecodeParams | dict) -> DecodeParams:
        """``params`` as this engine's model reads them (a block-causal model's block and
        per-block steps filled in), or a ``ValueError`` naming the field: the checks that do
        not need a prompt."""
        return self.requests.resolve_params(params)

    def make_request(
        self, prompt: Prompt, params: DecodeParams | None = None, request_id: str | None = None
    ) -> Request:
        """Validate and build a request without queueing it (errors name the field)."""
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._live:
            raise ValueError(f"request_id: {request_id!r} is already running")
        params = params if params is not None else self.default_params
        req = self.requests.build(prompt, params, request_id)
        self.scheduler.check_fits(req)
        return req

    def add_request(
        self, prompt: Prompt, params: DecodeParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; it joins the batch at the next ``step()`` with a free slot."""
        return self.enqueue(self.make_request(prompt, params, request_id))

    def enqueue(self, req: Request) -> str:
        """Queue a request built (and validated) by ``make_request``."""
        if req.request_id in self._live:
            raise ValueError(f"request_id: {req.request_id!r} is already running")
        self.scheduler.add(req)
        self._live[req.request_id] = req
        return req.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; its slot is free at the next step. Idempotent. With
        ``overlap``, a request whose pass is running is stopped once that pass is decoded (the
        forward writes its KV pages until then), a step later."""
        request_id = str(request_id)
        flight = self._in_flight
        if flight is not None and request_id in flight.request_ids:
            self._aborts_after_pass.add(request_id)
            return
        req = self.scheduler.abort(request_id)
        if req is not None:
            self._live.pop(req.request_id, None)
            self.metrics.finished[req.finish_reason] += 1
            self._ready.append(self.output(req))
            self._track_kv_cache()

    def _track_kv_cache(self) -> None:
        used = self.scheduler.kv_cache_bytes
        self.metrics.kv_cache_bytes = used
        self.metrics.kv_cache_peak_bytes = max(self.metrics.kv_cache_peak_bytes, used)

    def snapshot(self, request_id: str) -> RequestOutput | None:
        """The current state of a request still in flight (``finish_reason`` None): its
        partly denoised canvas and the positions revealed in its last step. None if unknown or
        finished."""
        req = self._live.get(str(request_id))
        return None if req is None or req.is_finished else self.output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._ready) or self._in_flight is not None

    # -- stepping ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one forward pass for the whole batch (with ``overlap``: decode one group's pass
        while the other group's runs); returns the requests that finished."""
        start = time.perf_counter()
        ready, self._ready = self._ready, []
        if self.overlap:
            self._step_overlapped()
        else:
            batch = self.scheduler.schedule()
            if batch:
                self._step_batch(batch)
                # Peak: while the pass's caches are all alive, before the finished are freed.
                self._track_kv_cache()
        for req in self.scheduler.update():
            self._live.pop(req.request_id, None)
            self.metrics.finished[req.finish_reason] += 1
            if req.finish_reason in ("steps", "early_commit", "stop"):
                self.metrics.generated_tokens += len(req.generated_ids)
            ready.append(self.output(req))
        self._track_kv_cache()
        self.metrics.step_seconds += time.perf_counter() - start
        return ready

    def _step_overlapped(self) -> None:
        """Schedule and prepare the next group's pass (Y: the requests not in the pass in
        flight, X, and those admitted now) while X's forward runs, take X's result, start Y's
        forward on the worker, then decode X while Y's forward runs. X's requests take no part
        in Y's schedule: their canvases are a step behind until X is decoded. A pass whose
        forward failed is run again first, in halves as :meth:`_run_group` does (so that only
        a request that fails alone ends with an error), with no other forward running beside
        it; one whose finish fails, once Y's forward has ended."""
        flight = self._in_flight
        if flight is None:
            self._start_group(())
            return
        group = self._prepare_group(flight.batch)
        try:
            result = flight.future.result()
            failed = False
        except Exception:  # run again below, in halves
            result, failed = None, True
        self._in_flight = None
        try:
            if failed:
                flight.phases.close()
                self._step_batch(flight.batch)  # nothing else in flight: X is done after it
                self._start_prepared(*group)
                return
            self._count_pass(flight.batch)
            self._start_prepared(*group)
            try:
                output = finish_phases(flight.phases, result)
            except Exception:
                output = None
            del result
            if output is None:
                if self._in_flight is not None:  # one forward at a time on the model
                    self._in_flight.wait()
                self._run_group(flight.batch)
            else:
                self._decode(output)
            del output
            self._track_kv_cache()  # peak: before the finished are freed
        finally:
            self._abort_after(flight)

    def _start_group(self, in_flight: Sequence[Request]) -> None:
        """Schedule the group beside the requests ``in_flight`` and start its pass."""
        self._start_prepared(*self._prepare_group(in_flight))

    def _prepare_group(
        self, in_flight: Sequence[Request]
    ) -> tuple[list[Request], tuple[Generator, PassForward] | None]:
        """Schedule the group beside the requests ``in_flight`` and prepare its pass (its
        phases, waiting at the forward, and the forward's work); None for a preparation that
        failed (nothing has changed: the batch's step runs as without overlap). A forward in
        flight does not stop it: it touches only the group's requests (their canvas rows and
        pages) and the runner's append-only registries, and the KV pool's tensor is never
        replaced while a forward may write it (``KVPool.before_grow``)."""
        batch = self.scheduler.schedule(in_flight, self._group_size)
        if not batch:
            return batch, None
        try:
            phases = self.runner.run_phases(batch)
            return batch, (phases, next(phases))
        except Exception:
            logger.exception("a pass could not be prepared; stepping it without overlap")
            return batch, None

    def _start_prepared(
        self, batch: list[Request], prepared: tuple[Generator, PassForward] | None
    ) -> None:
        """Start ``batch``'s prepared forward on the worker (nothing else is in flight); a
        batch whose preparation failed, or that the model's process cannot take, takes its
        step here, now."""
        if not batch:
            return
        if prepared is None:
            self._step_batch(batch)
            return
        phases, work = prepared
        if self._forward_process is not None:
            storage = self.kv_pool.storage if work.step.pool_uses is not None else None
            try:
                future = self._forward_process.submit(work, storage)
            except Exception:
                logger.exception("the model's process could not take a pass; running it here")
                if self._forward_process.unusable:  # not again at every pass
                    logger.error("overlap='process': the forward runs on a thread from now on")
                    self._forward_process.close()
                    self._forward_process, self.overlap = None, "thread"
                phases.close()
                self._step_batch(batch)
                return
        else:
            if self._forward_worker is None:
                self._forward_worker = ThreadPoolExecutor(1, thread_name_prefix="foretell-forward")
            future = self._forward_worker.submit(work)
        ids = {req.request_id for req in batch}
        self._in_flight = _InFlight(batch, ids, phases, future)

    def _wait_in_flight(self) -> None:
        if self._in_flight is not None:
            self._in_flight.wait()

    def _abort_after(self, flight: _InFlight) -> None:
        """The aborts that waited for ``flight``'s pass: a request that finished in it is left
        to ``update()`` (it ended on its own)."""
        for request_id in flight.request_ids & self._aborts_after_pass:
            self._aborts_after_pass.discard(request_id)
            req = self._live.get(request_id)
            if req is not None and not req.is_finished:
                self.abort(request_id)

    def close(self) -> None:
        """Wait for the pass in flight (``overlap``), if any, and stop the forward worker (the
        thread, or the model's process): an engine dropped with a pass in flight would leave
        its forward running on the model, which another engine may share. Its requests stay
        where they are (the pass is run again at the next step), and the engine can step
        again (a new worker starts)."""
        flight = self._in_flight
        if flight is not None:
            flight.wait()  # its pass runs again at the next step
            self._in_flight = None
            flight.phases.close()
            self._abort_after(flight)
        if self._forward_worker is not None:
            self._forward_worker.shutdown(wait=True)
            self._forward_worker = None
        if self._forward_process is not None:
            self._forward_process.close()

    def _step_batch(self, batch: list[Request]) -> None:
        self._count_pass(batch)
        self._run_group(batch)

    def _count_pass(self, batch: list[Request]) -> None:
        self.metrics.steps += 1
        self.metrics.sequences_in_passes += len(batch)

    def _run_group(self, group: list[Request]) -> None:
        """One forward pass for ``group`` and its decoding step. If the pass fails, its halves
        are retried on their own, recursively, so that only a request that fails alone ends
        with "error"; every other request still takes this step once, from the sub-pass that
        succeeded (sequences never attend across each other, so its result is the same)."""
        try:
            result = self.runner.run(group)
        except Exception as err:
            if len(group) == 1:
                logger.warning("request %s: forward pass failed: %r", group[0].request_id, err)
                group[0].finish("error", f"forward pass failed: {err!r}")
                return
            result = None  # leave the except block first: its traceback holds the pass' memory
        if result is None:
            half = len(group) // 2
            self._run_group(group[:half])
            self._run_group(group[half:])
            return
        self._decode(result)

    def _decode(self, result: PassOutput) -> None:
        """A pass's decoding step, for each of its requests."""
        for req, res in result.per_request:
            try:
                advance(req, res.positions, res.logits, res.more, res.stats)
            except Exception as err:  # one request's failure must not stop the others
                req.finish("error", f"decoding failed: {err!r}")
        advance_blocks(result.blocks, self.runner.canvas_rows)  # errors attributed inside
        if result.batched is not None:
            result.batched.advance()  # errors are attributed inside, per request where possible
        # Counted after decoding: a commit's read-only rows of a cached request run then.
        self.metrics.tokens_in_passes += result.query_tokens

    def output(self, req: Request) -> RequestOutput:
        """The caller's view of a request (finished or in flight)."""
        token_ids = req.generated_ids
        text, stop_string = "", None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(
                token_ids, skip_special_tokens=req.params.skip_special_tokens
            )
            cuts = [(text.find(s), s) for s in req.params.stop if s in text]
            if cuts:
                cut, stop_string = min(cuts)
                text = text[:cut]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=list(req.prompt_token_ids),
            token_ids=token_ids,
            text=text,
            num_forward_passes=req.global_step,
            finish_reason=req.finish_reason,
            committed_early=req.commit_step is not None,
            commit_step=req.commit_step,
            last_gap=req.last_gap,
            error=req.error,
            stop_string=stop_string,
            arrival_time=req.arrival_time,
            first_scheduled_time=req.first_scheduled_time,
            finished_time=req.finished_time,
            revealed=[] if req.revealed_last_step is None else req.revealed_last_step.tolist(),
        )

    # -- offline -------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: DecodeParams | Sequence[DecodeParams] | None = None,
        *,
        use_tqdm: bool = True,
        errors: str = "raise",
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        ``errors="raise"``: all-or-nothing admission, if any prompt or params is invalid, none
        runs and the error names its index. ``errors="return"``: an invalid one gets an output
        with ``finish_reason`` "error" and the message, and the others run (bulk jobs, where
        one bad row must not stop the rest).
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors: expected 'raise' or 'return', got {errors!r}")
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], (int, dict))
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, DecodeParams):
            params_list = [params] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"params: {len(params_list)} params for {len(prompts)} prompts")
        results: list[RequestOutput | None] = [None] * len(prompts)
        order: dict[str, int] = {}
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            request_id = f"gen-{next(self._ids)}"
            try:
                requests.append(self.make_request(prompt, p, request_id=request_id))
            except ValueError as err:
                if errors == "raise":
                    raise ValueError(f"prompts[{i}]: {err}") from None
                results[i] = _invalid_output(request_id, prompt, str(err))
                continue
            order[request_id] = i
        for req in requests:
            self.enqueue(req)
        bar = tqdm(total=len(prompts), desc="Generating", unit="req", disable=not use_tqdm)
        bar.update(len(prompts) - len(requests))
        start, passes, tokens, remaining = time.perf_counter(), 0, 0, len(requests)
        unclaimed = []
        try:
            while remaining:
                outputs = self.step()
                passes += 1
                for out in outputs:
                    if out.request_id not in order:
                        unclaimed.append(out)
                        continue
                    results[order[out.request_id]] = out
                    remaining -= 1
                    tokens += len(out.token_ids)
                    bar.update(1)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tok_s=f"{tokens / elapsed:.0f}", passes_s=f"{passes / elapsed:.1f}")
        finally:
            bar.close()
            self._ready.extend(unclaimed)
        return results


def _invalid_output(request_id: str, prompt: object, error: str) -> RequestOutput:
    """What ``generate(errors="return")`` hands back for a request that never ran."""
    return RequestOutput(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=[],
        token_ids=[],
        text="",
        num_forward_passes=0,
        finish_reason="error",
        error=error,
    )
