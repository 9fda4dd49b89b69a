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

from foretell.models.attention import PoolUses
from foretell.ranges import concat_ranges
from foretell.scheduler.canvas_rows import CanvasRows, block_causal_rows
from foretell.scheduler.gather import attribute_array, equals, pick
from foretell.scheduler.request import NUM_SEQUENCES, Request

# Columns of ``StepInput.cursor``: a request's block, step in it, step, its block's masks at
# the block's start (``Request.cursor_np``'s first four), and its canvas row.
CURSOR = 5


@dataclass
class StepInput:
    """The packed pass. Host arrays (the decoders read them as they are: no tensor op), and
    the device copies of what the model reads once :meth:`to` has run."""

    ids: np.ndarray  # [tokens] the pass's token ids
    positions: np.ndarray  # [tokens] each token's canvas position (rotary angles)
    seq_lens: list[int]  # packed sequences' lengths (a cfg request has two)
    caches: PoolUses | None  # every packed sequence's KV pool use (None: no sequence's)
    # Where each request's recomputed rows begin in its packed sequence: after a cached step's
    # read-only rows before its span; at the start otherwise.
    row_offsets: np.ndarray
    # Each request's first flat token: of its (conditional) sequence, and of its cfg copy (-1:
    # none).
    cond_at: np.ndarray
    uncond_at: np.ndarray
    seq_of: np.ndarray  # each request's packed (conditional) sequence
    cached_step: np.ndarray  # whether each request's sequence is a cached step's span
    lengths: np.ndarray  # each request's (conditional) sequence length
    # Each request's geometry (``Request.geometry``) and cursor (``CURSOR``), as arrays: what
    # the batched step reads of its requests, gathered once for the pass.
    geometry: np.ndarray
    cursor: np.ndarray
    values: np.ndarray  # each request's float columns (``CanvasRows.values``)
    ids_d: torch.Tensor | None = field(default=None, repr=False)
    positions_d: torch.Tensor | None = field(default=None, repr=False)
    in_seq_d: torch.Tensor | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        return len(self.ids)

    uses_pool: bool = False  # whether some sequence reads or writes the KV pool

    @property
    def pool_uses(self) -> PoolUses | None:
        """The sequences' KV pool uses, or None when no sequence uses the pool."""
        return self.caches if self.uses_pool else None

    def offsets(self, i: int) -> tuple[int, int | None]:
        """Request ``i``'s (conditional, cfg copy or None) first flat token."""
        uncond = int(self.uncond_at[i])
        return int(self.cond_at[i]), (None if uncond < 0 else uncond)

    def span(self, i: int) -> np.ndarray | None:
        """A cached step's sequence positions (sorted), or None for any other request."""
        if not self.cached_step[i]:
            return None
        at = int(self.cond_at[i])
        return self.positions[at : at + int(self.lengths[i])]

    def places_on(self, device: torch.device, shifted: bool) -> torch.Tensor:
        """Copy what the model reads to ``device`` and return what ``logits_at`` reads as each
        token's place: its row within its own sequence for a model with ``shifted`` logits
        (Dream, the only one that reads it), else its canvas position."""
        self.to(device, in_seq=shifted)
        return self.in_seq_d if shifted else self.positions_d

    def to(self, device: torch.device, in_seq: bool = True) -> StepInput:
        """Copy what the model reads to ``device``, once (``in_seq``: and each token's row
        within its own sequence, which only a model with shifted logits, Dream, reads)."""
        if self.ids_d is None:
            self.ids_d = torch.from_numpy(self.ids).to(device)
            self.positions_d = torch.from_numpy(self.positions).to(device)
        if in_seq and self.in_seq_d is None:
            if self.cached_step.any():  # a cached step's span starts inside its canvas
                lens = np.asarray(self.seq_lens, dtype=np.int64)
                rows = concat_ranges(np.zeros_like(lens), lens)
                self.in_seq_d = torch.from_numpy(rows).to(device)
            else:  # every sequence is a whole canvas: its rows are its positions
                self.in_seq_d = self.positions_d
        return self


class Packer:
    """Builds :class:`StepInput` s from the requests' canvas rows."""

    def pack(self, batch: list[Request], canvas_rows: CanvasRows) -> StepInput:
        """The pass of ``batch``, whose canvases are rows of ``canvas_rows``.

        An uncached request's sequence is its canvas; a cached request's, at its block's
        start, its canvas too, whose keys and values refresh its pages; in a cached step, the
        span it recomputes (its keys and values go into its pages) plus read-only rows for the
        positions Prophet's region needs outside it, attending to its whole canvas in the pool;
        a block-causal request's, its block's queries (:func:`_block_layouts`). The bounds come
        from the requests' geometry as arrays, the read-only rows of every cached step are laid
        out at once (:func:`_kept_positions`), and every sequence's tokens are one gather from
        the canvas rows."""
        n = len(batch)
        canvas_row = attribute_array(batch, "canvas_row", np.int64)
        # The rows' cursors (``Request.cursor_np``) with the row itself in the last column.
        cursor = canvas_rows.cursor[canvas_row]
        cursor[:, 4] = canvas_row
        block, step_in_block = cursor[:, 0], cursor[:, 1]
        fixed = canvas_rows.geometry_of(batch, canvas_row)
        num_seqs = fixed[:, NUM_SEQUENCES]
        prompt, canvas, uses_blocks, blocks_from, block_len, cached, prefix = fixed[:, :7].T
        span_start, span_end, every_mask = fixed[:, 8:11].T
        cached = cached.astype(bool)
        cached_step = cached & (step_in_block > 0)  # Request.cached_step
        block_start = np.where(uses_blocks.astype(bool), blocks_from + block * block_len, prompt)
        block_end = np.where(uses_blocks.astype(bool), block_start + block_len, canvas)
        lo = np.where(cached_step, block_start, 0)  # Request.query_span
        hi = np.where(cached_step & ~prefix.astype(bool), block_end, canvas)
        # A cached step that adds read-only rows (Prophet's region outside its span) keeps a
        # set of positions, all such steps' at once; a block-causal request is laid out alone.
        lengths = hi - lo
        write_row = np.zeros(n, dtype=np.int64)  # read-only rows ahead of a cached step's span
        reads_more = cached_step & (every_mask.astype(bool) | (span_end > span_start))
        reads_more = reads_more.nonzero()[0]
        if reads_more.size:
            r = reads_more
            kept, lengths[r], write_row[r] = _kept_positions(
                canvas_rows.tokens[canvas_row[r], : canvas[r].max()],
                batch[0].mask_token_id,
                prompt[r],
                canvas[r],
                lo[r],
                hi[r],
                every_mask[r].astype(bool),
                span_start[r],
                span_end[r],
            )
        read_len = np.where(cached_step, canvas, 0)
        blocks = block_causal_rows(fixed).nonzero()[0]
        if blocks.size:
            queries, stores = _block_layouts(pick(batch, blocks), cursor[blocks, 0])
            lo[blocks], lengths[blocks], read_len[blocks] = queries[2], queries[3], queries[4]
        # Each request's pool use (``PoolUses``' fields; its page table is its canvas row's):
        # a cached request writes the span it recomputes, after its read-only rows, and in a
        # cached step reads its whole canvas (a refresh attends to itself: -1). None uses it:
        # no pool use at all.
        uses_pool = bool(cached.any()) or bool(blocks.size)
        use = (
            None
            if not uses_pool
            else np.array(
                [
                    np.where(cached, canvas_row, -1),
                    write_row,
                    lo,
                    hi - lo,
                    np.where(cached_step, canvas, -1),
                    np.zeros(n, dtype=np.int64),
                ]
            )
        )
        if blocks.size:
            use[:, blocks] = queries
            use[0, blocks] = canvas_row[blocks]
            stores[0] = canvas_row[blocks[stores[0]]]  # (which block request) -> its table
        # Sequences in attention's order: block-causal requests' store sequences first (by
        # length and keys); then self-attending sequences by length; cached steps last, by
        # query and key length. A guided request's unconditional copy follows its own.
        reading = read_len > 0
        order = np.lexsort((read_len, lengths, reading))
        seq_req = order.repeat(num_seqs[order])
        first = num_seqs[order].cumsum() - num_seqs[order]  # each request's first sequence
        uncond = np.zeros(len(seq_req), dtype=bool)
        uncond[first[num_seqs[order] > 1] + 1] = True
        seq_lens_np = np.where(uncond, canvas[seq_req], lengths[seq_req])
        seq_lo = np.where(uncond, 0, lo[seq_req])
        all_lens, all_lo, rows = seq_lens_np, seq_lo, canvas_row[seq_req]
        k = 0 if not blocks.size else stores.shape[1]  # store sequences, ahead of the rest
        if k:
            all_lens = np.concatenate([stores[3], seq_lens_np])
            all_lo = np.concatenate([stores[2], seq_lo])
            rows = np.concatenate([stores[0], rows])
        positions = concat_ranges(all_lo, all_lo + all_lens)
        seq_start = all_lens.cumsum() - all_lens
        # Laid-out positions (their ranges above are placeholders) written over their sequence.
        req_first = np.empty(n, dtype=np.int64)
        req_first[order] = first + k  # each request's conditional sequence
        if reads_more.size:
            at = seq_start[req_first[reads_more]]
            positions[concat_ranges(at, at + lengths[reads_more])] = kept
        ids = canvas_rows.flat[(rows * canvas_rows.width).repeat(all_lens) + positions]
        cond_at = seq_start[req_first]
        uncond_at = np.full(n, -1, dtype=np.int64)
        guided = (num_seqs > 1).nonzero()[0]
        if guided.size:  # the copy's given positions (prompt, constraints) masked, all at once
            uncond_at[guided] = seq_start[req_first[guided] + 1]
            flat = concat_ranges(uncond_at[guided], uncond_at[guided] + canvas[guided])
            row_at = canvas_row[guided] * canvas_rows.width
            cells = concat_ranges(row_at, row_at + canvas[guided])
            ids[flat[canvas_rows.given.reshape(-1)[cells]]] = batch[0].mask_token_id
        caches = None
        if uses_pool:
            seq_use = use[:, seq_req]
            seq_use[0, uncond] = -1  # a guided request's copy uses no pool
            if k:
                seq_use = np.concatenate([stores, seq_use], axis=1)
            caches = PoolUses(canvas_rows.slots, *seq_use)
        return StepInput(
            ids=ids,
            positions=positions,
            seq_lens=all_lens.tolist(),
            caches=caches,
            row_offsets=write_row,
            cond_at=cond_at,
            uncond_at=uncond_at,
            seq_of=req_first,
            cached_step=cached_step,
            lengths=lengths,
            geometry=fixed,
            cursor=cursor,
            values=canvas_rows.values[canvas_row],
            uses_pool=uses_pool,
        )


def _block_layouts(reqs: list[Request], block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block-causal requests' sequences as :class:`PoolUses` columns (table, write row, write
    start, write length, read length, block size), the table column holding each one's index
    into ``reqs`` until the caller puts its canvas row there; ``block``: each one's block.

    Each request's query sequence is its block's positions (without the block cache, its window
    from position 0, re-encoded), written and read block-causally up to the block's end. When
    keys are due (``Request.kv_stored`` short of the block's start, with the block cache), a
    store sequence of its own holds the positions from the first not stored to the block's
    start (the official decoders' prefill, and SDAR's store pass of a finished block); store
    sequences come ordered by length and keys (a stable order)."""
    n = len(reqs)
    size = attribute_array(reqs, "params.block_length", np.int64)
    cached = equals(reqs, "params.block_cache", True)
    stored = attribute_array(reqs, "kv_stored", np.int64)
    start = block * size  # blocks are aligned at position 0
    end = start + size
    query = np.where(cached, start, 0)
    zeros = np.zeros(n, dtype=np.int64)
    queries = np.stack([np.arange(n), zeros, query, end - query, end, size])
    due = (cached & (stored < start)).nonzero()[0]
    due = due[np.lexsort((start[due], start[due] - stored[due]))]
    lens = start[due] - stored[due]
    stores = np.stack([due, zeros[due], stored[due], lens, start[due], size[due]])
    return queries, stores


def _kept_positions(
    tokens: np.ndarray,
    mask_token_id: int,
    prompt: np.ndarray,
    canvas: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    every_mask: np.ndarray,
    span_start: np.ndarray,
    span_end: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sequences of cached steps that add read-only rows, for all of them at once over
    their canvas rows ``tokens``: their positions back to back,
    each one's count, and each one's read-only rows ahead of its span ``[lo, hi)``. Prophet's
    region is every generated mask, or an explicit span."""
    cols = np.arange(tokens.shape[1])
    in_canvas = cols < canvas[:, None]
    masks = (tokens == mask_token_id) & (cols >= prompt[:, None])
    in_span = (cols >= span_start[:, None]) & (cols < span_end[:, None])
    keep = np.where(every_mask[:, None], masks, in_span) & in_canvas
    before = np.count_nonzero(keep & (cols < lo[:, None]), axis=1)
    keep |= (cols >= lo[:, None]) & (cols < hi[:, None])
    which, kept = np.nonzero(keep)
    return kept, np.bincount(which, minlength=len(lo)), before
