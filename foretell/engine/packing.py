"""A pass's inputs, built once: the :class:`StepInput` that the model, attention and decoding read.

Every running canvas (and, for classifier-free guidance, its prompt-masked copy) is laid back
to back in one flat token tensor with per-sequence boundaries: no padding, so mixed lengths
cost only their own tokens. A cached request's sequence is its whole canvas at a block's
refresh, and in a cached step the span it recomputes plus read-only rows (Prophet's region
outside it), each with its KV pool use (:class:`CacheUse`). The order is chosen for attention:
self-attending sequences by length, so that equal lengths are neighbours and run as one call;
cached steps last, by query and key length, so that equal shapes share a call too. This is
nano-vllm's ``Context``: the runner builds it, then only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from foretell.models.attention import CacheUse
from foretell.scheduler.request import Request

# A request's sequence in a pass: its canvas positions (a host array) and how it uses the KV
# pool.
Layout = tuple[np.ndarray, CacheUse | None]


@dataclass
class StepInput:
    """The packed pass. Host tensors (built from host arrays: no tensor op per request), and
    their device copies once :meth:`to` has run."""

    ids: torch.Tensor  # [tokens] the pass's token ids
    positions: torch.Tensor  # [tokens] each token's canvas position (rotary angles)
    in_seq: torch.Tensor  # [tokens] each token's row within its own sequence (Dream's shift)
    seq_lens: list[int]  # packed sequences' lengths (a cfg request has two)
    caches: list[CacheUse | None]  # each packed sequence's KV pool use
    layouts: list[Layout]  # each request's sequence
    offsets: list[tuple[int, int | None]]  # each request's (conditional, cfg) first flat token
    seq_of: list[int]  # each request's packed sequence
    spans: dict[int, np.ndarray]  # a cached step's sequence positions, sorted, by request
    ids_d: torch.Tensor | None = field(default=None, repr=False)
    positions_d: torch.Tensor | None = field(default=None, repr=False)
    in_seq_d: torch.Tensor | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        return len(self.ids)

    @property
    def pool_uses(self) -> list[CacheUse | None] | None:
        """The sequences' KV pool uses, or None when no sequence uses the pool."""
        return self.caches if any(c is not None for c in self.caches) else None

    def row_offset(self, i: int) -> int:
        """Where request ``i``'s recomputed rows begin in its packed sequence: after a cached
        step's read-only rows before its span; at the start otherwise."""
        cache = self.layouts[i][1]
        return cache.write_row if i in self.spans else 0

    def to(self, device: torch.device) -> StepInput:
        """Copy what the model reads to ``device``, once."""
        if self.ids_d is None:
            self.ids_d = self.ids.to(device)
            self.positions_d = self.positions.to(device)
            self.in_seq_d = self.in_seq.to(device)
        return self


class Packer:
    """Builds :class:`StepInput` s, keeping the ``arange`` s it has made (they recur)."""

    def __init__(self) -> None:
        self._aranges: dict[int, np.ndarray] = {}

    def arange(self, n: int) -> np.ndarray:
        if n not in self._aranges:
            self._aranges[n] = np.arange(n)
        return self._aranges[n]

    def pack(self, batch: list[Request]) -> StepInput:
        layouts = [self.layout(req) for req in batch]
        spans = {i: layouts[i][0] for i, r in enumerate(batch) if r.cached_step}
        seqs: list[np.ndarray] = []
        seq_positions: list[np.ndarray] = []
        caches: list[CacheUse | None] = []
        offsets: list[tuple[int, int | None]] = [(0, None)] * len(batch)
        seq_of: list[int] = [0] * len(batch)
        total = 0
        # A block-causal request's rows whose keys are due in its pages (the prompt's whole
        # blocks, or the block it finished) are a sequence of their own, as the official
        # prefill and store passes are; they come first, and are stored in every layer before
        # any sequence reads.
        stores = [s for s in (self.store_layout(r) for r in batch if r.block_causal) if s]
        for req, (pos, cache) in sorted(stores, key=lambda s: _pack_key(s[1])):
            seqs.append(req.canvas_np[pos[0] : pos[-1] + 1])
            seq_positions.append(pos)
            caches.append(cache)
            total += len(pos)
        for i in sorted(range(len(batch)), key=lambda i: _pack_key(layouts[i])):
            req, (pos, cache) = batch[i], layouts[i]
            cond = total
            seq_of[i] = len(seqs)
            whole = cache is None or cache.read_len is None
            seqs.append(req.canvas_np if whole else req.canvas_np[pos])
            seq_positions.append(pos)
            caches.append(cache)
            total += len(pos)
            uncond = None
            if req.params.cfg_scale > 0:
                uncond = total
                seqs.append(np.where(req.given_np, req.mask_token_id, req.canvas_np))
                seq_positions.append(pos)
                caches.append(None)
                total += req.canvas_len
            offsets[i] = (cond, uncond)
        seq_lens = [len(s) for s in seqs]
        positions = np.concatenate(seq_positions)
        # Only a cached step's span differs from its canvas positions.
        if spans:
            lens = np.asarray(seq_lens, dtype=np.int64)
            in_seq = concat_ranges(np.zeros_like(lens), lens)
        else:
            in_seq = positions
        return StepInput(
            ids=torch.from_numpy(np.concatenate(seqs)),
            positions=torch.from_numpy(positions),
            in_seq=torch.from_numpy(in_seq),
            seq_lens=seq_lens,
            caches=caches,
            layouts=layouts,
            offsets=offsets,
            seq_of=seq_of,
            spans=spans,
        )

    def layout(self, req: Request) -> Layout:
        """Canvas positions of ``req``'s sequence in this pass, and how it uses its pages.

        A block-causal request: its current block, attending to its pages up to the block's
        end. Uncached: the canvas. A cached request's block start: the canvas, whose keys and
        values refresh its pages. A cached step: the span it recomputes (its keys/values go
        into its pages) plus read-only rows for the positions it needs outside it (Prophet's
        region: :func:`foretell.decoding.step.needed_np`; its window is inside the span),
        attending to its whole canvas in the pool."""
        if req.block_causal:  # its block's queries over its pages (see store_layout)
            lo, hi = req.query_start, req.block_bounds()[1]
            block = req.params.block_length
            return np.arange(lo, hi), CacheUse(req.kv_slots, 0, lo, hi - lo, hi, block)
        if req.params.kv_cache is None:
            return self.arange(req.canvas_len), None
        length = req.canvas_len
        if not req.cached_step:
            return self.arange(length), CacheUse(req.kv_slots, 0, 0, length, None)
        lo, hi = req.query_span()
        policy = req.params.early_commit
        span = None if policy is None else policy.answer_span(req.prompt_len, length)
        keep = None
        if policy is not None and span is None:  # every generated mask
            keep = req.canvas_np == req.mask_token_id
            keep[: req.prompt_len] = False
        elif span is not None:  # an explicit answer span
            start, end = span
            if end > start:
                keep = np.zeros(length, dtype=bool)
                keep[start:end] = True
        if keep is None:
            return np.arange(lo, hi), CacheUse(req.kv_slots, 0, lo, hi - lo, length)
        before = int(np.count_nonzero(keep[:lo]))  # read-only rows ahead of the span
        keep[lo:hi] = True
        pos = np.flatnonzero(keep)
        return pos, CacheUse(req.kv_slots, before, lo, hi - lo, length)

    @staticmethod
    def store_layout(req: Request) -> tuple[Request, Layout] | None:
        """A block-causal request's store sequence, when keys are due: canvas positions from
        the first not stored to its block's start, written and read block-causally (the
        official decoders' prefill, and SDAR's store pass of a finished block)."""
        lo = req.block_bounds()[0]
        if req.kv_stored >= lo or not req.params.block_cache:
            return None
        start, block = req.kv_stored, req.params.block_length
        cache = CacheUse(req.kv_slots, 0, start, lo - start, lo, block)
        return req, (np.arange(start, lo), cache)


def concat_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The integers of every ``[starts[i], ends[i])`` in order, as one array: a batch's rows
    in a fixed number of NumPy calls, not one ``arange`` per request."""
    lens = ends - starts
    first = np.cumsum(lens) - lens  # where each range begins in the result
    return np.repeat(starts - first, lens) + np.arange(int(lens.sum()))


def _pack_key(layout: Layout) -> tuple:
    pos, cache = layout
    if cache is None or cache.read_len is None:
        return (0, len(pos), 0)
    return (1, len(pos), cache.read_len)
