"""Admission and eviction: which requests share the next forward pass.

The scheduler decides and never touches the model. ``schedule()`` admits waiting requests in
arrival order while the running set fits both budgets; ``update()`` drops finished requests at
once, so the very next ``schedule()`` backfills their slots.
"""

from __future__ import annotations

import time
from collections import deque

from foretell.scheduler.request import Request, Status


class Scheduler:
    def __init__(
        self, max_num_seqs: int, max_num_batched_tokens: int, kv_cache_memory: int = 2**63 - 1
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {max_num_batched_tokens}")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_cache_memory = kv_cache_memory  # bytes for every running request's KV cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def check_fits(self, req: Request) -> None:
        """Refuse a request that could never be scheduled, before it is queued."""
        if req.cost > self.max_num_batched_tokens:
            what = "prompt + gen_length" + (" (x2 for cfg)" if req.num_sequences == 2 else "")
            raise ValueError(
                f"prompt: {what} = {req.cost} tokens exceeds max_num_batched_tokens "
                f"{self.max_num_batched_tokens}"
            )
        if req.kv_reserved > self.kv_cache_memory:
            raise ValueError(
                f"kv_cache_memory: this request's KV cache needs {req.kv_reserved} bytes, more "
                f"than the engine's budget of {self.kv_cache_memory} bytes"
            )

    def add(self, req: Request) -> None:
        self.check_fits(req)
        self.waiting.append(req)

    def schedule(self) -> list[Request]:
        """The batch for the next forward pass: the running set plus whatever fits (FCFS)."""
        seqs = len(self.running)  # requests; a cfg copy counts in the token budget only
        tokens = sum(r.cost for r in self.running)
        kv = self.kv_reserved
        now = time.monotonic()
        while self.waiting:
            nxt = self.waiting[0]
            if seqs + 1 > self.max_num_seqs:
                break
            if tokens + nxt.cost > self.max_num_batched_tokens:
                break
            if kv + nxt.kv_reserved > self.kv_cache_memory:
                break  # waits (FCFS) until running caches are freed
            self.waiting.popleft()
            nxt.status = Status.RUNNING
            nxt.first_scheduled_time = now
            self.running.append(nxt)
            seqs += 1
            tokens += nxt.cost
            kv += nxt.kv_reserved
        return list(self.running)

    def update(self) -> list[Request]:
        """Evict every finished request; returns them."""
        done = [r for r in self.running if r.is_finished]
        for req in done:
            req.release_cache()
        if done:
            self.running = [r for r in self.running if not r.is_finished]
        return done

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is; None if unknown or already gone (idempotent)."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    req.release_cache()
                    if not req.is_finished:
                        req.finish("aborted")
                    return req
        return None

    @property
    def kv_reserved(self) -> int:
        """Cache bytes reserved by the running requests."""
        return sum(r.kv_reserved for r in self.running)

    @property
    def kv_cache_bytes(self) -> int:
        """Cache bytes the running requests hold now."""
        return sum(r.kv_cache_bytes for r in self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
