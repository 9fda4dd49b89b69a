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
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {max_num_batched_tokens}")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
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

    def add(self, req: Request) -> None:
        self.check_fits(req)
        self.waiting.append(req)

    def schedule(self) -> list[Request]:
        """The batch for the next forward pass: the running set plus whatever fits (FCFS)."""
        seqs = len(self.running)  # requests; a cfg copy counts in the token budget only
        tokens = sum(r.cost for r in self.running)
        now = time.monotonic()
        while self.waiting:
            nxt = self.waiting[0]
            if seqs + 1 > self.max_num_seqs:
                break
            if tokens + nxt.cost > self.max_num_batched_tokens:
                break
            self.waiting.popleft()
            nxt.status = Status.RUNNING
            nxt.first_scheduled_time = now
            self.running.append(nxt)
            seqs += 1
            tokens += nxt.cost
        return list(self.running)

    def update(self) -> list[Request]:
        """Evict every finished request; returns them."""
        done = [r for r in self.running if r.is_finished]
        if done:
            self.running = [r for r in self.running if not r.is_finished]
        return done

    def abort(self, request_id: str) -> Request | None:
        """Remove a request wherever it is; None if unknown or already gone (idempotent)."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    if not req.is_finished:
                        req.finish("aborted")
                    return req
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
