"""Admission and eviction: which requests share the next forward pass.

The scheduler decides and never touches the model. Three budgets bound a pass: requests
(``max_num_seqs``), the query tokens the pass runs (``max_num_batched_tokens``: a cached step is
charged the span it recomputes, not its canvas), and KV pool pages (taken at admission, given
back the step a request ends; a block-causal request takes its first pass's at admission and
the rest a block at a time, and when the pool is short the youngest block-causal requests are
preempted: pages back, restarted in arrival order in the queue). ``update()`` drops finished
requests at once, so the very next ``schedule()`` backfills their slots.

Admission is fair without head-of-line blocking: a waiting request that fits is admitted even
when an older one does not fit yet (it needs more pages or tokens than are free). Once the
queue's head has waited ``max_head_wait`` steps, nothing is admitted past it until it fits, so
it cannot starve.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter, getitem
from typing import TYPE_CHECKING

import numpy as np

from foretell.scheduler.gather import attribute_array, equals, identities, is_none, where
from foretell.scheduler.request import BLOCK, Request, Status

if TYPE_CHECKING:
    from foretell.engine.kv_cache import KVPool

# Steps the queue's head may be passed by requests behind it before admission holds for it.
DEFAULT_MAX_HEAD_WAIT = 32


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        kv_pool: KVPool | None = None,
        max_head_wait: int = DEFAULT_MAX_HEAD_WAIT,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {max_num_batched_tokens}")
        if isinstance(max_head_wait, bool) or not isinstance(max_head_wait, int):
            raise ValueError(f"max_head_wait: need an integer >= 0, got {max_head_wait!r}")
        if max_head_wait < 0:
            raise ValueError(f"max_head_wait: need an integer >= 0, got {max_head_wait!r}")
        self.max_num_seqs = max_num_seqs
        self._aside: list[Request] = []  # the requests in flight, set aside (``schedule``)
        self._held: set[int] = set()  # ids of requests left out of this pass for pages
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_pool = kv_pool
        self.max_head_wait = max_head_wait
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # block-causal requests sent back to wait for pages
        # Kept as requests join and leave the running list, so that a step whose requests all
        # fit decides its batch without a call per request: the running requests' summed
        # ``cost`` (an upper bound of what their next pass runs), how many take pages a block
        # at a time, and whether some running request was left out of a pass since.
        self._running_cost = 0
        self._growing = 0
        self._some_waited = False
        self._grow_failed = False  # a running request failed to grow its pages this step

    def check_fits(self, req: Request) -> None:
        """Refuse a request that could never be scheduled, before it is queued."""
        if req.cost > self.max_num_batched_tokens:
            what = "prompt + gen_length" + (" (x2 for cfg)" if req.num_sequences == 2 else "")
            raise ValueError(
                f"prompt: {what} = {req.cost} tokens exceeds max_num_batched_tokens "
                f"{self.max_num_batched_tokens}"
            )
        need = max(req.kv_pages_needed, req.kv_pages_max)
        if need:
            pool = self.kv_pool
            pages = 0 if pool is None else pool.num_pages
            if need > pages:
                page_bytes = 0 if pool is None else pool.page_bytes
                raise ValueError(
                    f"kv_cache_memory: this request's KV cache needs {need} "
                    f"pages ({need * page_bytes} bytes), more than the pool's "
                    f"{pages} pages"
                )

    def add(self, req: Request) -> None:
        self.check_fits(req)
        self.waiting.append(req)

    def schedule(
        self, in_flight: Sequence[Request] = (), group_size: int | None = None
    ) -> list[Request]:
        """The batch for the next forward pass.

        Running requests come first, those that waited longest for a step first, while their
        next pass's tokens fit (one always does: each fits alone). If every running request
        fits, waiting requests join in arrival order, each one that fits (see the module's
        docstring for the head's age bound).

        ``in_flight``: running requests whose pass is still running (an overlapped engine's
        other group): they are left out of this batch, their pages are neither grown nor
        taken back by a preemption, and they count against ``max_num_seqs``. ``group_size``
        caps this batch's requests, admitted ones included.
        """
        if not in_flight and group_size is None:
            return self._schedule(self.max_num_seqs)
        limit = self.max_num_seqs - len(in_flight)
        if group_size is not None:
            limit = min(limit, group_size)
        aside = set(map(id, in_flight))
        kept = [req for req in self.running if id(req) in aside]
        self.running = [req for req in self.running if id(req) not in aside]
        for req in kept:
            self._stop_running(req)
        self._aside = kept
        try:
            return self._schedule(limit)
        finally:
            self._aside = []
            for req in kept:  # back, charged as they were
                self.running.append(req)
                self._running_cost += req.charged_cost
                self._growing += bool(req.kv_pages_max)

    def _schedule(self, max_seqs: int) -> list[Request]:
        """:meth:`schedule` over ``self.running``, at most ``max_seqs`` requests running with
        the admitted."""
        self._held = set()
        self._grow_failed = False
        self._recharge_swapped()
        preempted = self._grow_block_caches() if self._growing else False
        if (
            not preempted
            and not self._held
            and not self._some_waited
            and len(self.running) <= max_seqs
            and self._fits_by_cost()
        ):
            # Every running request fits even charged its largest pass: all run, in the order
            # the loop below would give (no one has waited), each charged what it runs only
            # when an admission needs the exact sum (``tokens`` is None until then).
            return self._admit(list(self.running), None, max_seqs)
        tokens = 0
        batch: list[Request] = []
        skipped: list[Request] = []
        for req in sorted(self.running, key=lambda r: -r.steps_waited):
            if req.is_finished:  # failed to grow its pages: update() outputs it
                continue
            if id(req) in self._held:  # waits for pages a request in flight holds
                skipped.append(req)
                continue
            need = req.step_tokens
            if len(batch) >= max_seqs or (batch and tokens + need > self.max_num_batched_tokens):
                skipped.append(req)
                req.steps_waited += 1
                continue
            batch.append(req)
            tokens += need
            req.steps_waited = 0
        self._some_waited = bool(skipped)
        if skipped or preempted:
            return batch
        return self._admit(batch, tokens, max_seqs)

    def _fits_by_cost(self) -> bool:
        """Whether every running request fits charged its cost, and none has finished (after
        ``update()`` only a block-causal request failing to grow its pages can have)."""
        return self._running_cost <= self.max_num_batched_tokens and not self._grow_failed

    def _admit(self, batch: list[Request], tokens: int | None, max_seqs: int) -> list[Request]:
        """Waiting requests join ``batch`` (whose pass runs ``tokens``, or when None at most
        the running requests' summed cost) in arrival order, each one that fits, while at
        most ``max_seqs`` run."""
        bound = self._running_cost if tokens is None else tokens
        running_part = len(batch)
        admitted = 0  # the costs of the requests admitted so far
        now = time.monotonic()
        # Pages kept for the running block-causal requests' next blocks, so that admitting
        # a request does not preempt one at once.
        free_pages = 0
        if self.kv_pool is not None:
            free_pages = self.kv_pool.free_pages - (self._next_blocks() if self._growing else 0)
        seqs = len(self.running)
        head = self.waiting[0] if self.waiting else None
        for req in list(self.waiting):
            if seqs + 1 > max_seqs:
                break
            if req is not head and head.steps_waited >= self.max_head_wait:
                break  # the head has waited long enough: the room freed is kept for it
            if bound + req.cost > self.max_num_batched_tokens:
                if tokens is None:  # charged the cost: the exact sum may leave room
                    tokens = sum(r.step_tokens for r in batch[:running_part])
                    bound = tokens + admitted
                if bound + req.cost > self.max_num_batched_tokens:
                    continue
            if req.kv_pages_needed > free_pages:
                continue
            if req.kv_pages_needed:
                try:
                    req.kv_pages = self.kv_pool.allocate(req.kv_pages_needed)
                except Exception as err:  # the pool could not grow (out of memory): it holds
                    # nothing for the request, which ends with the error (update() outputs it)
                    self.waiting.remove(req)
                    req.finish("error", f"KV pool: {err!r}")
                    self._start_running(req)
                    continue
                req.kv_slots = self.kv_pool.slots(req.kv_pages, req.canvas_len)
                free_pages -= req.kv_pages_needed + self._next_block(req)
            self.waiting.remove(req)
            req.status = Status.RUNNING
            if req.first_scheduled_time is None:  # a restarted request keeps its first
                req.first_scheduled_time = now
            req.steps_waited = 0
            self._start_running(req)
            batch.append(req)
            seqs += 1
            bound += req.cost
            admitted += req.cost
        if self.waiting and self.waiting[0] is head:
            head.steps_waited += 1
        return batch

    def _start_running(self, req: Request) -> None:
        self.running.append(req)
        req.charged_cost, req.charged_params = req.cost, req.params  # what leaving takes off
        self._running_cost += req.charged_cost
        self._growing += bool(req.kv_pages_max)

    def _stop_running(self, req: Request) -> None:
        """Book-keeping of a request that left ``running``."""
        self._running_cost -= req.charged_cost
        self._growing -= bool(req.kv_pages_max)

    def _recharge_swapped(self) -> None:
        """A running request whose params object was swapped is charged its cost again (the
        held and charged params compared by identity in C: as ``CanvasRows.geometry_of``)."""
        running = self.running
        swapped = identities(running, "params") != identities(running, "charged_params")
        for req in where(running, swapped) if swapped.any() else ():
            self._running_cost += req.cost - req.charged_cost
            req.charged_cost, req.charged_params = req.cost, req.params

    def _growing_requests(self) -> list[Request]:
        """The running block-causal requests holding pages, not finished (gathered in C: no
        call per request)."""
        running = self.running
        growing = attribute_array(running, "kv_pages_max", np.int64) > 0
        growing &= ~is_none(running, "kv_pages") & ~equals(running, "status", Status.FINISHED)
        return where(running, growing)

    def _pages_short(self, reqs: list[Request], ahead: int) -> np.ndarray:
        """The pages each of ``reqs`` (block-causal, holding pages) lacks for its canvas up to
        the end of its current block (``ahead`` 0) or of the one after (1), as one array: a
        negative count is pages to spare. Read from the requests' cursors and page lists in C,
        not by a call per request."""
        n = len(reqs)
        size = attribute_array(reqs, "params.block_length", np.int64)
        cursors = map(attrgetter("cursor_np"), reqs)
        block = np.fromiter(map(getitem, cursors, repeat(BLOCK)), np.int64, n)
        canvas = attribute_array(reqs, "_canvas_len", np.int64)
        end = np.minimum((block + 1 + ahead) * size, canvas)  # blocks are aligned at 0
        held = np.fromiter(map(len, map(attrgetter("kv_pages"), reqs)), np.int64, n)
        return -(-end // self.kv_pool.page_size) - held

    def _grow_block_caches(self) -> bool:
        """Give every running block-causal request the pages of the block it denoises next,
        oldest first; where the pool is short, the youngest running ones are preempted (their
        pages taken back, restarted at the head of the queue) until the older ones fit.
        Returns whether any was preempted. When every request's pages fit, only those that
        need more take a step of their own (a request's once a block)."""
        pool = self.kv_pool
        growing = self._growing_requests()
        if not growing:
            return False
        short = self._pages_short(growing, 0)
        need = (short > 0).nonzero()[0]
        if int(short[need].sum()) <= pool.free_pages:
            for i in sorted(need.tolist(), key=lambda i: growing[i].arrival_time):
                self._grow(growing[i], int(short[i]))
            return False
        preempted = False
        for i in sorted(range(len(growing)), key=lambda i: growing[i].arrival_time):
            req, want = growing[i], int(short[i])  # preempting others leaves its own as it is
            if req.kv_pages is None or req.is_finished:
                continue  # preempted for an older one in this round
            while want > pool.free_pages:
                younger = [
                    r
                    for r in self.running
                    if r.kv_pages_max and r.kv_pages and r.arrival_time > req.arrival_time
                ]
                if not younger:
                    break
                self._preempt(max(younger, key=lambda r: r.arrival_time))
                preempted = True
            if want > pool.free_pages:
                if any(
                    r.kv_pages_max and r.kv_pages and r.arrival_time > req.arrival_time
                    for r in self._aside
                ):
                    # Younger requests in flight hold the pages: it waits a step, when they
                    # can be preempted for it, rather than preempt itself for them.
                    self._held.add(id(req))
                    req.steps_waited += 1
                    continue
                self._preempt(req)
                preempted = True
                continue
            if want > 0:
                self._grow(req, want)
        return preempted

    def _grow(self, req: Request, want: int) -> None:
        """``want`` more pages for ``req``; if the pool cannot give them, it ends."""
        pool = self.kv_pool
        try:
            req.kv_pages = req.kv_pages + pool.allocate(want)
        except Exception as err:  # the pool could not grow: this request ends
            req.finish("error", f"KV pool: {err!r}")
            self._grow_failed = True
            return
        req.kv_slots = pool.slots(req.kv_pages, len(req.kv_pages) * pool.page_size)

    def _next_blocks(self) -> int:
        """Pages the running block-causal requests need for their next block."""
        growing = self._growing_requests()
        if not growing:
            return 0
        return int(np.maximum(self._pages_short(growing, 1), 0).sum())

    def _next_block(self, r: Request) -> int:
        """Pages ``r`` (holding its first pages) needs for its next block."""
        if not r.kv_pages_max:
            return 0
        return max(0, int(self._pages_short([r], 1)[0]))

    def _preempt(self, req: Request) -> None:
        """Send a running block-causal request back to the head of the queue, restarted."""
        self.running.remove(req)
        self._stop_running(req)
        self._release(req)
        req.restart()
        req.status = Status.WAITING
        # Back in arrival order (ahead of every younger waiting request), not ahead of older.
        at = next(
            (k for k, w in enumerate(self.waiting) if w.arrival_time > req.arrival_time),
            len(self.waiting),
        )
        self.waiting.insert(at, req)
        self.num_preemptions += 1

    def _release(self, req: Request) -> None:
        req.release_canvas_row()
        pages = req.release_pages()
        if pages:
            self.kv_pool.free(pages)

    def update(self) -> list[Request]:
        """Evict every finished request and return its pages; returns them."""
        ended = equals(self.running, "status", Status.FINISHED)
        if not ended.any():
            return []
        done = where(self.running, ended)
        for req in done:
            self._release(req)
            self._stop_running(req)
        self.running = where(self.running, ~ended)
        return done

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is; None if unknown or already gone (idempotent)."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    if queue is self.running:
                        self._stop_running(req)
                    self._release(req)
                    if not req.is_finished:
                        req.finish("aborted")
                    return req
        return None

    @property
    def kv_cache_bytes(self) -> int:
        """Pool bytes the running requests hold now."""
        return 0 if self.kv_pool is None else self.kv_pool.used_bytes

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
