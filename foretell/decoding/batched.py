"""One denoising step for every batchable request of a pass at once.

The per-request step (:mod:`foretell.decoding.step`) runs a few dozen small tensor ops per
request; on a GPU each is a kernel launch, and with a small model they are a large share of
each pass. Almost every request (``batchable``: LLaDA's and Dream's rules, uncached and cached
steps, greedy or sampled, guided, with or without Prophet) reads only a score per row
(:class:`RowStats`: the candidate, its score, Prophet's gap; the runner puts sampled
candidates and guided rows in place first), so the whole step runs as a fixed number of ops
over the packed batch, however many requests it holds and however their lengths differ;
the request-by-request remainder works on host arrays.

The result equals the per-request step exactly (``tests/test_batched_step.py`` runs both paths
side by side): the same rows are gathered; Prophet's statistic is one float64 segment sum per
pass (a mean too close to its threshold is decided by the reference's own reduction); and
every request's reveal ranks the same scores. The ranking is one ``topk`` over the requests'
ranking rows padded to one length. Where it could differ from the reference's ``topk`` over
the unpadded row, that is only when two scores tie exactly at the cut (saturated
probabilities do): such a request is detected on the device and ranked again alone, over its
own row, as the reference ranks it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter, getitem

import numpy as np
import torch

from foretell.decoding.early_commit import undecided
from foretell.decoding.step import (
    cursor_stays,
    mark_committed,
    move_cursor,
    request_candidates,
)
from foretell.decoding.unmask import (
    RowStats,
    candidates,
    draw_without_replacement,
    dream_transfer_counts_np,
    guided,
    gumbel_perturbed,
    llada_step_count,
    suppress_cells,
)
from foretell.params import MEAN_COLUMN, Prophet
from foretell.scheduler.canvas_rows import CanvasRows
from foretell.scheduler.gather import is_none, pick
from foretell.scheduler.request import (
    AT_START,
    BLOCK,
    GLOBAL_STEP,
    IS_ORIGIN,
    IS_RANDOM,
    STEP_IN_BLOCK,
    WRITES,
    Request,
)

# Columns of the per-sequence geometry table (canvas positions).
(
    _PROMPT_END,
    _WINDOW_START,
    _BLOCK_START,
    _BLOCK_END,
    _SPAN_START,
    _SPAN_END,
    _REGION_IS_MASKED,
    _WINDOW_END,
) = range(8)
_COLUMNS = 8
_THRESHOLD = "confidence_threshold"
_ORIGIN = "origin"

# read_only(requests, canvas positions) -> logits at those positions of each request, from one
# pass of read-only rows against the requests' KV caches (a cached commit's masks outside it).
ReadOnly = Callable[[Sequence[Request], Sequence[torch.Tensor]], list[torch.Tensor]]


# Rules the batched step ranks by a score column of :class:`RowStats` (``prob``: the greedy
# token's probability, or a variant's margin or entropy).
OTHER_SCORES = ("margin", "entropy")
_SCORED = ("low_confidence", *OTHER_SCORES)


def filters(params: object) -> bool:
    """Whether a request's candidates are drawn or filtered (temperature, top-p, top-k), not
    the plain argmax: the batched step computes them per request group (``sampled_rows``)."""
    p = params
    return p.temperature > 0 or (p.top_p is not None and p.top_p < 1) or p.top_k is not None


def draws_reveal(req: Request) -> bool:
    """Whether Dream's ``alg_temp`` applies to ``req``: its uncached ranked rules (scored or
    random) draw their reveal from ``softmax(scores / alg_temp)`` without replacement; its
    threshold rule, ``origin`` and Fast-dLLM's cached steps do not read it."""
    p = req.params
    return (
        req.family == "dream"
        and bool(p.alg_temp)
        and p.kv_cache is None
        and p.remasking in (*_SCORED, "random")
    )


def batchable(req: Request) -> bool:
    """Whether :class:`BatchedStep` can step ``req`` (otherwise it takes the per-request path):
    LLaDA with any of its rules and cache modes; Dream without a cache by a scored rule
    (``maskgit_plus``, ``topk_margin``, ``entropy``), ``random``, ``origin`` or its threshold
    rule, with or without ``alg_temp``, and Fast-dLLM's cached Dream steps. Sampled or
    filtered candidates (temperature, top-p, top-k) are batched, with or without Prophet and a
    cache (a cached commit draws over every mask of its canvas in position order, those
    outside its pass from the read-only pass). Guided requests (cfg) are batched (the runner
    guides their gathered rows first; a commit guides the rows it asks for,
    :meth:`BatchedStep._more_own`). Only a block-causal request takes another path."""
    p = req.params
    if req.block_causal:
        return False
    if req.family == "dream" and p.kv_cache is not None:
        return True  # Fast-dLLM's Dream: entropy or threshold (validated)
    return p.remasking in (*_SCORED, "random", _THRESHOLD, _ORIGIN)


@dataclass
class _Fill:
    """Token ids a commit fills in, still on the logits' device, and where they go in the plan
    once every commit's have crossed to the host together (:meth:`BatchedStep._flush`): the
    flat rows ``rows`` of ``x0`` take ``tokens[in_rows]``; a cached commit's masks outside its
    pass (``outside``: the request and their canvas positions) take ``tokens[in_outside]``
    (None: all of ``tokens``)."""

    owners: list[int]  # the requests (indices into ``reqs``) it fills: a failure fails them
    tokens: torch.Tensor  # int64 ids, on the logits' device
    rows: np.ndarray | None = None
    in_rows: np.ndarray | None = None
    outside: tuple[int, np.ndarray] | None = None
    in_outside: np.ndarray | None = None

    def write(self, plan: _Plan, tokens: np.ndarray) -> None:
        """Put the host ``tokens`` (these ``self.tokens``) into ``plan``."""
        if self.rows is not None:
            plan.x0[self.rows] = tokens if self.in_rows is None else tokens[self.in_rows]
        if self.outside is not None:
            j, pos = self.outside
            plan.outside[j] = (pos, tokens if self.in_outside is None else tokens[self.in_outside])


@dataclass
class _Plan:
    """A pass's decisions for every request of the group, before any request changes. Host
    arrays over the pass's flat tokens: the request-by-request part of the step reads and
    writes them with NumPy, dispatching no tensor op per request."""

    new_ids: np.ndarray  # the pass's flat tokens with every reveal written
    x0: np.ndarray  # flat candidates of the gathered rows: greedy or sampled (commits add theirs)
    chosen: np.ndarray  # flat rows revealed (bool [tokens])
    gaps: np.ndarray  # each request's statistic this step (float64; NaN: none)
    commits: np.ndarray  # bool: whether each request commits
    block_masks_at_start: np.ndarray  # each request's (a new block's, where one starts)
    outside: dict[int, tuple[np.ndarray, np.ndarray]]  # a cached commit's other masks
    # A sampled cached commit's other masks and their logits (suppressed), to draw from.
    outside_logits: dict[int, tuple[np.ndarray, torch.Tensor]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # requests whose own part failed
    fills: list[_Fill] = field(default_factory=list)  # commits' fills, before they cross
    # (flat rows, each request's first and end index into them): revealed rows.
    picked: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # Per request: the masks left in its block and its generation once every reveal is
    # written; whether its threshold step stalled (revealed only the mask token itself) and
    # whether it revealed anything; whether its cursor stays in its block, and if so whether
    # it takes the block's next step (``foretell.decoding.step.cursor_stays``).
    block_masks: np.ndarray | None = None
    masks: np.ndarray | None = None
    stalled: np.ndarray | None = None
    revealed: np.ndarray | None = None
    stays: np.ndarray | None = None
    steps_on: np.ndarray | None = None


@dataclass
class _Gaps:
    """Prophet's statistic of every request with a policy and region rows, on the device."""

    members: list[int]  # requests, in packed order
    values: torch.Tensor  # [members] float64: the mean (summed in row order) or the min
    region_rows: np.ndarray  # indices into the gathered rows of every member's region rows
    segment: np.ndarray  # each region row's index into ``members``


@dataclass
class _Ranking:
    """One pass's reveal, as computed on the device (see ``BatchedStep._reveal``)."""

    members: list[int]  # requests that rank this step
    ks: list[int]  # each one's reveal count (threshold: 1, the best)
    row_start: list[int]  # flat first row of each one's ranking row
    row_len: list[int]
    offset: list[int]  # the column of its ranking row where its ranked extent begins
    scores: torch.Tensor | None  # [members, widest extent], -inf outside each window
    chosen: torch.Tensor  # bool over the gathered rows
    # Whether a member's cut tied (then it is ranked again alone), read on the host from the
    # pass's one transfer: each member's k-th and next scores (``[members, 2]``) and whether
    # any of its scores reaches its threshold (None: no member can tie), and what the host
    # knows already: which can tie (a cut inside its row) and which take a threshold.
    cut: torch.Tensor | None
    any_above: torch.Tensor | None
    can_tie: np.ndarray
    threshold_rule: np.ndarray
    # Each member's ranked columns as flat tokens (the pass's length past a row's end), and
    # the members (indices into ``members``) that draw their reveal from their own stream
    # (Dream's ``alg_temp`` with a seed: :meth:`BatchedStep._draw_reveals`).
    index: np.ndarray | None = None
    draws_own: np.ndarray | None = None


class BatchedStep:
    """The batchable requests of one packed pass: which rows they need, then their step.

    ``ids`` and ``positions`` are the pass's flat tokens and their canvas positions;
    ``seq_index[i]`` is the packed sequence holding ``reqs[i]`` and ``starts[i]`` its first flat
    token. ``row_offsets[i]`` is where, within that sequence, the rows the step ranks begin
    (the rows it recomputes: the canvas, or a cached step's span after its read-only rows).
    ``uncond_at[i]``: a guided request's unconditional copy's first flat token (-1: none).
    """

    def __init__(
        self,
        reqs: Sequence[Request],
        seq_index: Sequence[int],
        starts: Sequence[int],
        seq_lens: Sequence[int],
        ids: np.ndarray,
        positions: np.ndarray,
        mask_token_id: int,
        row_offsets: Sequence[int] | None = None,
        uncond_at: np.ndarray | None = None,
        generator: torch.Generator | None = None,
        logits_dtype: torch.dtype = torch.float32,
        *,
        canvas_rows: CanvasRows,
        geometry: np.ndarray,
        cursor: np.ndarray,
        thresholds: np.ndarray,
        drawn: np.ndarray,
        alg_temps: np.ndarray | None = None,
    ) -> None:
        self.reqs = list(reqs)
        self.seq_index_np = np.asarray(seq_index, dtype=np.int64)
        self.seq_index = self.seq_index_np.tolist()
        self.starts_np = np.asarray(starts, dtype=np.int64)
        self.starts = self.starts_np.tolist()
        self.seq_lens = np.asarray(seq_lens, dtype=np.int64)[self.seq_index_np].tolist()
        if row_offsets is None:
            row_offsets = np.zeros(len(reqs), dtype=np.int64)
        self.row_offsets_np = np.asarray(row_offsets, dtype=np.int64)
        # A guided request's unconditional copy's first flat token (-1: none).
        self.uncond_at = np.full(len(reqs), -1) if uncond_at is None else uncond_at
        self.num_seqs = len(seq_lens)
        self.mask_token_id = mask_token_id
        self.generator = generator  # the shared stream of requests without a seed
        self.logits_dtype = logits_dtype  # the model's: a confidence's dtype unless set
        self.canvas_rows = canvas_rows  # every request's canvas is a row of it
        # (rows, device rows, stats, more, read_only), once the pass has run
        self._pass: tuple | None = None
        self._logits: torch.Tensor | None = None
        # A seeded sampled request with Prophet: its generator's state before this step's draw
        # (by index into ``reqs``), restored if it commits (see ``_sampled_commits``).
        self.draw_states: dict[int, torch.Tensor] = {}
        # Each request's geometry from its fixed part (``Request.geometry``) and its cursor
        # (``foretell.engine.packing.CURSOR``), as whole-batch arrays the packer gathered: no
        # method call per request. Every other packed sequence gets a geometry that selects
        # nothing.
        fixed = geometry
        prompt, canvas, uses_blocks, blocks_from, block_len, cached, prefix = fixed[:, :7].T
        dream_cached, span_start, span_end, every_mask = fixed[:, 7:11].T
        self.steps_np, self.steps_per_block_np = fixed[:, 11:13].T
        self.is_dream, self.is_threshold = fixed[:, 13:15].T.astype(bool)
        block, step_in_block, self.global_step_np, self.block_masks_at_start_np = cursor.T[:4]
        # Whether the block after the current one exists (a block move that does not finish).
        self.more_blocks_np = uses_blocks.astype(bool) & (
            (block + 1) * block_len < canvas - blocks_from
        )
        self.canvas_row_np = cursor[:, 4]
        # Prophet's constants of each request (``CanvasRows.policy``; NaN: no policy).
        self.policy_np = canvas_rows.policy[self.canvas_row_np]
        self.has_policy = ~np.isnan(self.policy_np[:, 0])
        # Each request's threshold rounded to its confidence's dtype (:func:`in_dtype`; NaN:
        # none), as the runner keeps it with the canvas rows.
        self.threshold_np = thresholds
        self.drawn = drawn  # whether each request's candidates are drawn (temperature > 0)
        # Dream's ``alg_temp`` where the request's rule draws its reveal with it (0: none).
        self.alg_temps = np.zeros(len(reqs)) if alg_temps is None else alg_temps
        self.step_in_block_np = step_in_block
        uses_blocks = uses_blocks.astype(bool)
        self.uses_blocks_np = uses_blocks
        block_start = np.where(uses_blocks, blocks_from + block * block_len, prompt)
        block_end = np.where(uses_blocks, block_start + block_len, canvas)
        self.cached_np = cached.astype(bool)
        cached_step = self.cached_np & (step_in_block > 0)  # Request.cached_step
        self.cached_step_np = cached_step
        # The rows the step recomputes (``Request.query_span``): a cached step's span.
        span_lo = np.where(cached_step, block_start, 0)
        span_hi = np.where(cached_step & ~prefix.astype(bool), block_end, canvas)
        self.row_lens_np = span_hi - span_lo
        self.row_lens = self.row_lens_np.tolist()
        # A cached step (Fast-dLLM) only sees its own block's masks; Fast-dLLM's Dream refresh
        # step, only its block's first position.
        refresh = dream_cached.astype(bool) & ~cached_step
        self.refresh = refresh
        self.is_random = fixed[:, IS_RANDOM].astype(bool)
        self.seeded = ~is_none(self.reqs, "generator")
        self.seeded_random = self.is_random & self.seeded
        # Dream's ``origin`` rule transfers each window row with the step's probability
        # (``_origin_transfers``, ``_origin_own``): it ranks nothing.
        self.is_origin = fixed[:, IS_ORIGIN].astype(bool)
        # Dream's uncached threshold rule keeps scores above it (Fast-dLLM's: at or above).
        self.strict = self.is_dream & ~uses_blocks
        window_start = np.where(cached_step | refresh, block_start, prompt)
        window_end = np.where(refresh, block_start + 1, block_end)
        self.window_start_np, self.window_end_np = window_start, window_end
        # One row per column, one column per packed sequence (each column's values per token
        # then come out as contiguous rows of one gather).
        table = np.zeros((_COLUMNS, self.num_seqs), dtype=np.int64)
        table[:, self.seq_index] = np.array(
            [
                prompt,
                window_start,
                block_start,
                block_end,
                span_start,
                span_end,
                every_mask,
                window_end,
            ]
        )
        lens = np.asarray(seq_lens)
        seq_of_token = np.arange(self.num_seqs).repeat(lens)
        self.seq_of_token_np = seq_of_token
        self.ids_np = ids
        self.positions_np = pos = positions
        masked = self.ids_np == mask_token_id
        # Only masks and explicit spans can be in any of the sets below, so they are computed
        # over those tokens alone (a pass's prompts and revealed tokens are most of it).
        spans = table[_SPAN_END] > table[_SPAN_START]
        at = (masked | spans[seq_of_token]).nonzero()[0] if spans.any() else masked.nonzero()[0]
        per_token = table[:, seq_of_token[at]]
        pos, masked_at = pos[at], masked[at]
        generated_at = masked_at & (pos >= per_token[_PROMPT_END])
        # The reveal window (masked, up to the end of the current block), Prophet's answer
        # region (an explicit span, masked or not, or every masked generated position), the
        # current block's masks (its reveal schedule), and what a commit fills: host arrays.
        window_at = masked_at & (pos >= per_token[_WINDOW_START]) & (pos < per_token[_WINDOW_END])
        region_at = (pos >= per_token[_SPAN_START]) & (pos < per_token[_SPAN_END])
        region_at |= generated_at & per_token[_REGION_IS_MASKED].astype(bool)
        in_block_at = masked_at & (pos >= per_token[_BLOCK_START]) & (pos < per_token[_BLOCK_END])
        sets = np.zeros((4, len(masked)), dtype=bool)
        sets[:, at] = (generated_at, window_at, region_at, in_block_at)
        generated, window, region, in_block = sets
        self.generated_np = generated
        self.window_np = window
        self.needed_np = window | region
        self.region_np = region
        self.in_block_np = in_block

    def bind(
        self,
        rows: np.ndarray,
        rows_d: torch.Tensor,
        stats: RowStats,
        more: Callable[[torch.Tensor], torch.Tensor],
        read_only: ReadOnly | None = None,
        logits: torch.Tensor | None = None,
    ) -> None:
        """The pass's results: gathered ``rows`` (sorted flat token indices, including this
        batch's ``needed``; ``rows_d``, the same on the logits' device), their ``stats``,
        ``more(flat_rows)`` for rows not gathered, ``read_only`` for canvas positions a cached
        step's pass did not hold, and the gathered ``logits`` themselves (a sampled request's
        commit draws from them)."""
        self._pass = (rows, rows_d, stats, more, read_only)
        self._logits = logits

    def advance(self) -> None:
        """Step every request. A failure while planning (before any request changes, though
        random remasking has drawn) finishes every member with an error; a failure while one
        request's step is applied finishes only that one."""
        rows, rows_d, stats, more, read_only = self._pass
        try:
            plan = self._plan(rows, rows_d, stats, more, read_only)
        except Exception as err:  # not attributable to one request
            for req in self.reqs:
                req.finish("error", f"decoding failed: {err!r}")
            return
        # Every request's revealed rows and remaining masks, from one pass over the flat arrays
        # (each request then takes its slices).
        starts = self.starts_np
        ends = starts + np.asarray(self.seq_lens)
        left = plan.new_ids == self.mask_token_id
        picked = plan.chosen.nonzero()[0]
        plan.picked = (picked, picked.searchsorted(starts), picked.searchsorted(ends))
        # The masks every request has left in its block and in its generation once every
        # reveal is written (the pass holds each one's block, and an uncached one's canvas),
        # for the cursor rule: counted once for all.
        seqs = self.seq_of_token_np
        s = self.seq_index_np
        block_masks = np.bincount(seqs[left & self.in_block_np], minlength=self.num_seqs)[s]
        masks = np.bincount(seqs[left & self.generated_np], minlength=self.num_seqs)[s]
        plan.block_masks, plan.masks = block_masks, masks
        # What each request revealed: anything, and anything but the mask token itself.
        revealed = np.bincount(seqs[picked], minlength=self.num_seqs)[s] > 0
        real = picked[plan.x0[picked] != self.mask_token_id]
        real_counts = np.bincount(seqs[real], minlength=self.num_seqs)[s]
        plan.stalled = self.is_threshold & (real_counts == 0)
        plan.revealed = revealed
        stays, steps_on = cursor_stays(
            self.step_in_block_np,
            self.global_step_np + 1,  # as ``_apply`` leaves it
            self.steps_np,
            self.steps_per_block_np,
            self.uses_blocks_np,
            self.cached_np,
            self.is_threshold,
            plan.stalled,
            plan.revealed,
            block_masks,
            masks,
            self.drawn,
        )
        plan.stays, plan.steps_on = stays, steps_on
        # Every reveal written at once, into the requests' canvas rows (a commit discarded its
        # reveal while planning; its fill is written by ``_commit``).
        positions = self.positions_np[picked]
        row_of_seq = np.zeros(self.num_seqs, dtype=np.int64)
        row_of_seq[self.seq_index_np] = self.canvas_row_np
        rows = self.canvas_rows
        at = row_of_seq[seqs[picked]] * rows.width + positions
        rows.flat[at] = plan.x0[picked]
        # Then every cursor, gap and reveal record at once, in the rows; a request's own rule
        # runs only when it fails, commits, or leaves its block (or finishes).
        failed = np.zeros(len(self.reqs), dtype=bool)
        failed[list(plan.failed)] = True
        own = self.canvas_row_np
        moved = own[~failed]
        rows.cursor[moved, GLOBAL_STEP] += 1
        rows.cursor[moved, AT_START] = plan.block_masks_at_start[~failed]
        rows.cursor[own, WRITES] += 1  # their masked positions are counted again
        gapped = self.has_policy & ~failed
        rows.last_gap[own[gapped]] = plan.gaps[gapped]
        revealing = ~failed & ~plan.commits
        rows.revealed[own[revealing]] = False
        rows.revealed.reshape(-1)[at] = True
        staying = stays & revealing
        rows.cursor[own[staying], STEP_IN_BLOCK] += steps_on[staying]
        # A request whose schedule moves it on to a next block (LLaDA's, or Fast-dLLM's cached
        # loop: ``move_block_cursor``, ``move_cached_cursor``) that exists: one write for all.
        # Only commits, finishes, threshold decoding's search for a block with masks and
        # Dream's grid run a request's own rule.
        on = ~stays & revealing & self.more_blocks_np & (self.cached_np | ~self.is_threshold)
        rows.cursor[own[on], BLOCK] += 1
        rows.cursor[own[on], STEP_IN_BLOCK] = 0
        for j in (~staying & ~on).nonzero()[0].tolist():
            req = self.reqs[j]
            if failed[j]:
                req.finish("error", plan.failed[j])
                continue
            try:
                self._apply(j, req, plan)
            except Exception as err:
                self._unwrite(j, req, plan)  # its canvas as it was before this step
                req.finish("error", f"decoding failed: {err!r}")

    def _unwrite(self, j: int, req: Request, plan: _Plan) -> None:
        """Put back the tokens request ``j``'s reveals overwrote in its canvas row (its step
        failed after the batch's write: it ends with its canvas as the step found it)."""
        flat, first, end = plan.picked
        picked = flat[first[j] : end[j]]
        req.write_np(self.positions_np[picked], self.ids_np[picked])

    # -- planning: tensors only; no request changes except random remasking's draws --------
    def _plan(
        self,
        rows: np.ndarray,
        rows_d: torch.Tensor,
        stats: RowStats,
        more: Callable[[torch.Tensor], torch.Tensor],
        read_only: ReadOnly | None,
    ) -> _Plan:
        """Every request's Prophet statistic and reveal, computed on the logits' device; then
        one transfer for the whole pass, whatever its size (greedy tokens, reveals, ties and
        gaps); one more when some request's ranking ties at its cut (every tied request's
        scores), one per request whose mean gap is too close to its threshold to decide in
        float64 (its rows' reference reduction), and one when some request commits with masks
        whose rows were not gathered, or with draws (the fills of all of them: :meth:`_flush`).

        The reveal is computed for every request, also those whose gap will commit them
        (they discard it): so nothing waits for the gaps to reach the host first.
        """
        gap = self._gaps(rows, stats)
        # LLaDA's block schedule follows from the masks its block holds at its first step
        # (Dream's counts come from its grid; the threshold rules have none).
        at_start = self.block_masks_at_start_np.copy()
        starting = ~self.is_dream & ~self.is_threshold & (self.step_in_block_np == 0)
        if starting.any():
            counts = np.bincount(self.seq_of_token_np[self.in_block_np], minlength=self.num_seqs)
            at_start[starting] = counts[self.seq_index_np[starting]]
        ranking = self._reveal(rows, rows_d, stats, at_start)
        origin = self.is_origin.nonzero()[0]  # (ndarray.nonzero: no Python call a step)
        if origin.size:
            transfer = self._origin_transfers(origin[~self.seeded[origin]], rows)
            if transfer is not None:
                ranking.chosen = ranking.chosen | transfer
        # The pass's one device -> host transfer: the gathered rows' greedy tokens, which of
        # them are revealed, each ranking's scores at its cut and whether any reaches its
        # threshold, and the gaps (float64 holds token ids, scores and gaps exactly).
        parts = [stats.argmax, ranking.chosen]
        n_rows, n_ranked = len(rows), len(ranking.members)
        n_cut = 0 if ranking.cut is None else 3 * n_ranked
        if ranking.cut is not None:
            parts += [ranking.cut.flatten(), ranking.any_above]
        if gap is not None:
            parts.append(gap.values)
        host = torch.cat([t.to(torch.float64) for t in parts]).cpu().numpy()
        argmax = host[:n_rows].astype(np.int64)
        chosen_rows = host[n_rows : 2 * n_rows].astype(bool)
        tied = np.zeros(n_ranked, dtype=bool)
        if n_cut:
            kth, nxt = host[2 * n_rows : 2 * n_rows + 2 * n_ranked].reshape(-1, 2).T
            any_above = host[2 * n_rows + 2 * n_ranked : 2 * n_rows + n_cut].astype(bool)
            tied = ranking.can_tie & (kth == nxt) & (kth > -np.inf)
            tied &= ~ranking.threshold_rule | ~any_above
        gaps, commits = self._decide(gap, host[2 * n_rows + n_cut :], stats)
        x0 = np.zeros(len(self.ids_np), dtype=np.int64)
        x0[rows] = argmax
        chosen = np.zeros(len(self.ids_np), dtype=bool)
        chosen[rows[chosen_rows]] = True
        if ranking.draws_own is not None and ranking.draws_own.size:
            tied[ranking.draws_own] = False  # not ranked: drawn
            self._draw_reveals(ranking, chosen)
        if tied.any():
            self._rank_alone(tied.nonzero()[0].tolist(), ranking, chosen)
        for j in commits.nonzero()[0].tolist():  # a commit discards its reveal
            chosen[self.starts[j] : self.starts[j] + self.seq_lens[j]] = False
        failed: dict[int, str] = {}
        if origin.size:
            own = origin[self.seeded[origin] & ~commits[origin]]
            failed = self._origin_own(own.tolist(), rows, x0, chosen)
        new_ids = self.ids_np.copy()
        new_ids[chosen] = x0[chosen]
        plan = _Plan(new_ids, x0, chosen, gaps, commits, at_start, {}, failed=failed)
        self._fill_commits(plan, more, read_only)
        self._sampled_commits(plan, rows, more)
        self._flush(plan)
        return plan

    @staticmethod
    def _flush(plan: _Plan) -> None:
        """Every commit's fill to the host in one transfer, whatever the number of commits (on
        a GPU each ``.cpu()`` is a synchronisation), then into the plan. A failed transfer
        fails every request it fills; a failed write, its own."""
        fills, plan.fills = plan.fills, []
        if not fills:
            return
        try:
            host = torch.cat([fill.tokens for fill in fills]).cpu().numpy()
        except Exception as err:
            for fill in fills:
                for j in fill.owners:
                    plan.failed.setdefault(j, f"decoding failed: {err!r}")
            return
        ends = np.cumsum([len(fill.tokens) for fill in fills]).tolist()
        for fill, start, end in zip(fills, [0, *ends[:-1]], ends, strict=True):
            try:
                fill.write(plan, host[start:end])
            except Exception as err:  # its requests only
                for j in fill.owners:
                    plan.failed.setdefault(j, f"decoding failed: {err!r}")

    def _sampled_commits(
        self, plan: _Plan, rows: np.ndarray, more: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """A committing sampled (or filtered) request fills every mask with a draw, not the
        argmax, as the per-request step does: from the logits of all its masks in position
        order (gathered, or asked for), with its stream back where it stood before this
        step's reveal draw (a seeded request) or a fresh draw from the shared stream. The
        draws stay on the device until :meth:`_flush` takes every commit's at once."""
        for j in plan.commits.nonzero()[0].tolist():
            req = self.reqs[j]
            if filters(req.params) and j not in plan.failed:
                try:
                    plan.fills.append(self._sampled_commit(j, req, plan, rows, more))
                except Exception as err:  # this request only
                    plan.failed[j] = f"decoding failed: {err!r}"

    def _sampled_commit(
        self,
        j: int,
        req: Request,
        plan: _Plan,
        rows: np.ndarray,
        more: Callable[[torch.Tensor], torch.Tensor],
    ) -> _Fill:
        """One committing sampled request's fill (see :meth:`_sampled_commits`): over every
        mask of its canvas in position order, as alone. An uncached pass holds them all; a
        cached step's pass holds its span and Prophet's region, and the read-only pass gave
        the others (``plan.outside_logits``)."""
        p = req.params
        start, end = self.starts[j], self.starts[j] + self.seq_lens[j]
        fill = self.generated_np[start:end].nonzero()[0] + start
        have = self.needed_np[fill]
        own = self._logits.new_empty((len(fill), self._logits.shape[-1]))
        if have.any():
            at = torch.from_numpy(np.searchsorted(rows, fill[have])).to(own.device)
            own[torch.from_numpy(have).to(own.device)] = self._logits[at]
        if not have.all():
            cells = [(0, int((~have).sum()), t) for t in req.logits_suppress]
            asked = suppress_cells(self._more_own(j, fill[~have], more), cells)
            own[torch.from_numpy(~have).to(own.device)] = asked
        logits = own
        outside = plan.outside_logits.pop(j, None)
        if outside is not None:  # the pass's masks and the others, in position order
            pos, found = outside
            masked = req.masked_np(req.prompt_len)
            in_pass = np.searchsorted(masked, self.positions_np[fill])
            others = np.searchsorted(masked, pos)
            logits = own.new_empty((len(masked), own.shape[-1]))
            logits[torch.from_numpy(in_pass).to(own.device)] = own
            logits[torch.from_numpy(others).to(own.device)] = found
        noise = None
        if p.temperature > 0:
            shape = tuple(logits.shape)
            if req.generator is not None:
                if j in self.draw_states:  # back before this step's draw (none: none made)
                    req.generator.set_state(self.draw_states[j])
                noise = torch.rand(shape, generator=req.generator, dtype=torch.float64)
            else:
                noise = torch.rand(
                    shape, generator=self.generator, dtype=torch.float64, device=logits.device
                )
        x0, _ = candidates(
            logits,
            family=req.family,
            rule="random",
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            generator=None,
            noise=noise,
        )
        if outside is None:
            return _Fill([j], x0, rows=fill)
        return _Fill([j], x0, rows=fill, in_rows=in_pass, outside=(j, pos), in_outside=others)

    def _more_own(
        self, j: int, flat: np.ndarray, more: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Logits of request ``j``'s flat rows ``flat`` (of its conditional sequence) that
        the pass did not gather, as its gathered rows are: a guided request's with the same
        rows of its unconditional copy asked for too, then guided as alone (not yet
        suppressed)."""
        uncond = int(self.uncond_at[j])
        if uncond < 0:
            return more(torch.from_numpy(flat))
        copy = flat - self.starts[j] + uncond
        both = more(torch.from_numpy(np.concatenate([flat, copy])))
        return guided(both, self.reqs[j].params.cfg_scale)

    def _decide(
        self, gap: _Gaps | None, values: np.ndarray, stats: RowStats
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each request's reported gap (NaN: none) and Prophet's decision at this step, as
        arrays (``Prophet.threshold`` and ``should_commit`` over the batch's policies). A mean
        decides in float64 unless it falls too close to the threshold (:func:`undecided`, over
        the arrays); then the reference's own reduction of its rows decides (one more
        transfer, rarely)."""
        gaps = np.full(len(self.reqs), np.nan)
        commits = np.zeros(len(self.reqs), dtype=bool)
        if gap is None:
            return gaps, commits
        members = np.asarray(gap.members, dtype=np.int64)
        policy = self.policy_np[members]
        step, steps = self.global_step_np[members] + 1, self.steps_np[members]
        threshold = Prophet.thresholds_at(policy, step, steps)
        gaps[members] = values
        decisive = values.copy()
        # A minimum is exact in any order; a float64 mean stands for the reference's own
        # reduction unless it is too close to the threshold to tell.
        close = (policy[:, MEAN_COLUMN] > 0) & undecided(values, threshold, stats.gap.dtype)
        for m in close.nonzero()[0].tolist():
            own = gap.region_rows[gap.segment == m]
            decisive[m] = float(stats.gap[torch.from_numpy(own).to(stats.gap.device)].mean())
        commits[members] = decisive >= threshold  # NaN (no statistic) never commits
        return gaps, commits

    def _fill_commits(
        self,
        plan: _Plan,
        more: Callable[[torch.Tensor], torch.Tensor],
        read_only: ReadOnly | None,
    ) -> None:
        """The argmax at every generated mask of the committing greedy requests whose rows
        were not gathered, from one LM-head call for all the unguided ones (with each one's
        suppressed ids) and one per guided one (both copies, guided: :meth:`_more_own`); a
        sampled one asks for its own when it draws (:meth:`_sampled_commit`). For cached
        steps, the masks outside their pass, from one read-only pass for all: their argmax,
        or a sampled one's logits, to draw from with its other masks. The argmaxes stay on
        the device until :meth:`_flush` takes every commit's fill at once."""
        missing, missing_of, cells = [], [], []
        outside_reqs, outside_pos, outside_of = [], [], []
        at = 0
        for j in plan.commits.nonzero()[0].tolist():
            req = self.reqs[j]
            start, end = self.starts[j], self.starts[j] + self.seq_lens[j]
            fill = self.generated_np[start:end].nonzero()[0]
            rows = fill[~self.needed_np[start:end][fill]] + start
            if not rows.size or filters(req.params):
                pass
            elif self.uncond_at[j] >= 0:  # guided: its own call, then guided
                try:
                    own = [(0, rows.size, t) for t in req.logits_suppress]
                    logits = suppress_cells(self._more_own(j, rows, more), own)
                    plan.fills.append(_Fill([j], logits.argmax(dim=-1), rows=rows))
                except Exception as err:  # this request only
                    plan.failed[j] = f"decoding failed: {err!r}"
            else:
                missing_of.append(j)
                missing.append(rows)
                cells += [(at, at + rows.size, t) for t in req.logits_suppress]
                at += rows.size
            if req.cached_step:
                held = self.positions_np[start:end]
                masked = req.masked_np(req.prompt_len)
                absent = masked[~np.isin(masked, held)]
                if absent.size:
                    outside_reqs.append(req)
                    outside_pos.append(absent)
                    outside_of.append(j)
        if missing:
            flat = np.concatenate(missing)
            logits = suppress_cells(more(torch.from_numpy(flat)), cells)
            plan.fills.append(_Fill(missing_of, logits.argmax(dim=-1), rows=flat))
        if outside_reqs:
            try:
                found = read_only(outside_reqs, outside_pos)
            except Exception:  # retried one request at a time: only one that fails alone fails
                found = []
                for req, pos, j in zip(outside_reqs, outside_pos, outside_of, strict=True):
                    try:
                        found.extend(read_only([req], [pos]))
                    except Exception as err:
                        found.append(None)
                        plan.failed[j] = f"decoding failed: {err!r}"
            pairs = zip(outside_of, outside_reqs, outside_pos, found, strict=True)
            for j, req, pos, logits in pairs:
                if logits is None:
                    continue
                cells = [(0, len(pos), t) for t in req.logits_suppress]
                logits = suppress_cells(logits, cells)
                if filters(req.params):  # drawn with its other masks (``_sampled_commit``)
                    plan.outside_logits[j] = (pos, logits)
                    continue
                plan.fills.append(_Fill([j], logits.argmax(dim=-1), outside=(j, pos)))

    def _gaps(self, rows: np.ndarray, stats: RowStats) -> _Gaps | None:
        """Prophet's statistic of every request with a policy, on the device, in a fixed
        number of ops: each request's region rows are a segment of the pass's gathered rows;
        one ``index_add_`` sums every segment in float64, row by row in order (the value a
        request reports, :func:`foretell.decoding.early_commit.reported_gap`), and one
        ``scatter_reduce_`` takes every minimum (exact in any order). None without a policy
        with region rows."""
        member_of_seq = np.full(self.num_seqs, -1)
        holders = self.has_policy.nonzero()[0]
        if not holders.size:
            return None
        members_np = holders[np.argsort(self.seq_index_np[holders], kind="stable")]
        members = members_np.tolist()
        member_of_seq[self.seq_index_np[members_np]] = np.arange(len(members))
        segment_of_row = member_of_seq[self.seq_of_token_np[rows]]
        region_rows = (self.region_np[rows] & (segment_of_row >= 0)).nonzero()[0]
        segment = segment_of_row[region_rows]
        counts = np.bincount(segment, minlength=len(members))
        if not counts.any():
            return None
        kept = counts.nonzero()[0]  # requests whose region has rows this step
        if len(kept) < len(members):
            renumber = np.full(len(members), -1)
            renumber[kept] = np.arange(len(kept))
            segment = renumber[segment]
            members_np, counts = members_np[kept], counts[kept]
            members = members_np.tolist()
        device = stats.gap.device
        gap = stats.gap[torch.from_numpy(region_rows).to(device)]
        seg_d = torch.from_numpy(segment).to(device)
        n = len(members)
        # Only the statistics some member takes (the mean is the default: most passes take
        # no minimum).
        is_mean = self.policy_np[members_np, MEAN_COLUMN] > 0
        values = None
        if is_mean.any():
            sums = torch.zeros(n, dtype=torch.float64, device=device)
            values = sums.index_add_(0, seg_d, gap.double()) / torch.from_numpy(counts).to(device)
        if not is_mean.all():
            mins = torch.full((n,), torch.inf, dtype=gap.dtype, device=device)
            mins = mins.scatter_reduce_(0, seg_d, gap, "amin").double()
            if values is None:
                values = mins
            else:
                values = torch.where(torch.from_numpy(is_mean).to(device), values, mins)
        return _Gaps(members, values, region_rows, segment)

    def _reveal(
        self,
        rows: np.ndarray,
        rows_d: torch.Tensor,
        stats: RowStats,
        block_masks_at_start: np.ndarray,
    ) -> _Ranking:
        """Which gathered rows every request reveals, on the device, with no transfer.

        Each request ranks its ranking row (the rows its step recomputes, ``-inf`` outside its
        window) by its score (the candidate's probability, a margin or an entropy), random by
        its uniforms; the threshold rules keep every window row at or above the threshold
        (Fast-dLLM; Dream's uncached rule: above it) and at least the best. All rows are
        ranked by one ``topk`` over a ``[requests, longest row]`` matrix; requests whose cut
        ties are flagged, to be ranked again alone (:meth:`_rank_alone`).
        """
        device = stats.prob.device
        total = len(self.ids_np)
        in_window_np = self.window_np[rows]
        counts = np.bincount(self.seq_of_token_np[rows[in_window_np]], minlength=self.num_seqs)
        sizes = counts[self.seq_index]
        # Fast-dLLM's Dream refresh reveals its window (the block's first position) whole; the
        # other threshold rules reveal one best row and those above their threshold.
        ranked = ~self.is_threshold | self.refresh
        ks = np.where(ranked, self._counts(sizes, block_masks_at_start), 1)
        idle = (sizes == 0) | (ks <= 0) | self.is_origin
        for j in (idle & self.seeded_random).nonzero()[0].tolist():
            # The references draw their uniforms every step, revealing or not: LLaDA one per
            # computed row, Dream one per window row.
            req = self.reqs[j]
            draws = self.row_lens[j] if req.uses_blocks else int(sizes[j])
            torch.rand(draws, generator=req.generator)
        members_np = (~idle).nonzero()[0]
        members = members_np.tolist()
        if not members:
            chosen = stats.prob.new_zeros(len(rows), dtype=torch.bool)
            none = np.zeros(0, dtype=bool)
            return _Ranking([], [], [], [], [], None, chosen, None, None, none, none)
        ks = np.where(ranked, np.minimum(ks, sizes), 1)[members_np]
        # A threshold is compared in the request's own confidence dtype, as it is alone; NaN
        # (no threshold) compares false.
        thresholds = np.where(ranked[members_np], np.nan, self.threshold_np[members_np])
        # Dream's uncached threshold keeps scores above it; Fast-dLLM's, at or above.
        strict = self.strict[members_np]
        # Scores over the pass's flat tokens (one spare slot at the end for padding): the
        # greedy probability at window rows, -inf elsewhere.
        window_rows = in_window_np.nonzero()[0]
        # At least float32, so that random remasking's float32 draws keep their order in the
        # same matrix (a confidence is held exactly in a wider type); float64 when some
        # request draws its reveal from the shared stream (``alg_temp``: float64 scores).
        sampling = self.alg_temps[members_np] > 0
        shared = (sampling & ~self.seeded[members_np]).nonzero()[0]
        wide = torch.promote_types(stats.prob.dtype, torch.float32)
        if shared.size:
            wide = torch.float64
        prob_flat = stats.prob.new_full((total + 1,), float("-inf"), dtype=wide)
        window_d = torch.from_numpy(window_rows).to(device)
        prob_flat[rows_d[window_d]] = stats.prob[window_d].to(wide)
        row_start_np = self.starts_np[members_np] + self.row_offsets_np[members_np]
        row_len_np = self.row_lens_np[members_np]
        row_start, row_len = row_start_np.tolist(), row_len_np.tolist()
        # Only the window's extent of each ranking row is ranked (the rest is -inf in the
        # reference's row, and no reveal count exceeds the window's masks): its columns
        # ``[offset, offset + width)``, from the positions the row's first token holds.
        span_lo = self.positions_np[row_start_np]
        lo = np.minimum(np.maximum(self.window_start_np[members_np] - span_lo, 0), row_len_np)
        hi = np.minimum(np.maximum(self.window_end_np[members_np] - span_lo, lo), row_len_np)
        width_np = hi - lo
        longest = max(int(width_np.max()), 1)
        col = np.arange(longest)
        index = np.where(col < width_np[:, None], (row_start_np + lo)[:, None] + col, total)
        index_d = torch.from_numpy(index).to(device)
        scores = prob_flat[index_d]
        draws = self._draws(members_np, row_start, row_len, lo, longest, device)
        if draws is not None:
            random_rows, random_scores = draws
            window_flat = np.zeros(total + 1, dtype=bool)
            window_flat[:total] = self.window_np
            outside = torch.from_numpy(~window_flat[index[random_rows]]).to(device)
            random_scores = random_scores.to(device, scores.dtype).masked_fill(outside, -torch.inf)
            scores[torch.from_numpy(random_rows).to(device)] = random_scores
        if shared.size:  # drawn without replacement as top-k of Gumbel-perturbed scores
            temps = torch.from_numpy(self.alg_temps[members_np[shared]]).to(device)
            at = torch.from_numpy(shared).to(device)
            uniforms = torch.rand(
                (len(shared), longest), generator=self.generator, dtype=torch.float64, device=device
            )
            scores[at] = gumbel_perturbed(scores[at], temps, uniforms)
        k_top = min(int(ks.max()) + 1, longest)
        values, order = scores.topk(k_top, dim=1)
        # Rows the top-k picks (threshold: the best one), then the threshold's others; both
        # scattered, so that nothing waits for the device. What the host knows goes over once
        # each: the ranks each request takes, and its threshold in the scores' dtype (+inf:
        # none; a strict one as the next value above it, so that ``>=`` is its ``>``; padding
        # and rows outside a window score -inf, below every threshold, which is positive).
        take = torch.from_numpy(np.arange(k_top) < ks[:, None]).to(device)
        picked = torch.zeros(total + 1, dtype=torch.bool, device=device)
        picked.scatter_(0, index_d.gather(1, order).flatten(), take.flatten())
        is_threshold = ~np.isnan(thresholds)
        like = np.float64 if scores.dtype == torch.float64 else np.float32
        threshold = thresholds.astype(like)
        threshold = np.where(strict, np.nextafter(threshold, like(np.inf)), threshold)
        threshold = np.where(is_threshold, threshold, like(np.inf))
        above = scores >= torch.from_numpy(threshold).to(device)[:, None]
        kept = torch.zeros(total + 1, dtype=torch.bool, device=device)
        kept.scatter_(0, index_d.flatten(), above.flatten())
        chosen_flat = picked | kept
        # A tie at the cut: the k-th and (k+1)-th scores equal (for the threshold rule, the best
        # two, below the threshold); decided on the host from the pass's one transfer.
        cut = any_above = None
        if k_top > 1:
            at = np.empty((len(ks), 2), dtype=np.int64)
            at[:, 0], at[:, 1] = ks - 1, np.minimum(ks, k_top - 1)
            cut = values.gather(1, torch.from_numpy(at).to(device))
            any_above = above.any(dim=1)
        chosen = chosen_flat[rows_d]
        can_tie = ks < k_top
        ks = ks.tolist()
        own = (sampling & self.seeded[members_np]).nonzero()[0]
        return _Ranking(
            members,
            ks,
            row_start,
            row_len,
            lo.tolist(),
            scores,
            chosen,
            cut,
            any_above,
            can_tie,
            is_threshold,
            index,
            own,
        )

    def _rank_alone(self, tied: list[int], ranking: _Ranking, chosen: np.ndarray) -> None:
        """Rank the requests whose cut tied over their own row, as the references do: the
        ``topk`` of ``k`` (threshold: of the window's size) over a row of the step's length,
        on the host (only these rows' scores cross). ``chosen`` is the host flat choice."""
        scores = ranking.scores[torch.tensor(tied, device=ranking.scores.device)].cpu().numpy()
        # Every tied request's whole row, as the reference ranks it: -inf outside the ranked
        # extent (one scatter for all; columns past a row's end go to a spare last column).
        lengths = np.asarray([ranking.row_len[i] for i in tied])
        cols = np.asarray([ranking.offset[i] for i in tied])[:, None] + np.arange(scores.shape[1])
        cols = np.where(cols < lengths[:, None], cols, lengths.max())
        rows_np = np.full((len(tied), int(lengths.max()) + 1), -np.inf, dtype=scores.dtype)
        np.put_along_axis(rows_np, cols, scores, axis=1)
        finite = np.isfinite(rows_np)
        # Host tensors from here (views of host arrays: nothing more crosses), ranked with
        # ``topk`` as the references rank; the picks are written into ``chosen`` through a
        # view of it.
        rows = torch.from_numpy(rows_np)
        picks = []
        for n, (row, i) in enumerate(zip(rows, tied, strict=True)):
            req = self.reqs[ranking.members[i]]
            start, length = ranking.row_start[i], ranking.row_len[i]
            line = row[:length].to(self._rank_dtype(req))
            chosen[start : start + length] = False
            if req.params.remasking == _THRESHOLD and not req.uses_blocks:
                # Dream: every score above the threshold, or else the first best one.
                above = (line > req.params.threshold).nonzero().flatten()
                picked = above if above.numel() else line.argmax().reshape(1)
            elif req.params.remasking == _THRESHOLD:
                values, order = torch.topk(line, int(finite[n, :length].sum()))
                keep = values >= req.params.threshold
                keep[0] = True
                picked = order[keep]
            else:
                picked = torch.topk(line, ranking.ks[i]).indices
            picks.append(picked + start)
        torch.from_numpy(chosen)[torch.cat(picks)] = True

    def _origin_p(self, members: np.ndarray) -> np.ndarray:
        """Dream's ``origin`` transfer probability of each of ``members`` at this step,
        ``1 - s / t`` over its timestep grid in float32 as Dream computes it (1 at its last
        step: every row)."""
        step, steps = self.global_step_np[members], self.steps_np[members]
        t, s = self._timesteps(members, step, steps)
        return np.where(step < steps - 1, np.float32(1) - s / t, np.float32(1))

    def _origin_transfers(self, members: np.ndarray, rows: np.ndarray) -> torch.Tensor | None:
        """Unseeded ``origin`` requests' transfers, over the gathered rows: each window row of
        theirs with a uniform from one shared draw below its request's probability (Dream's
        rule, from the engine's stream). None without such a request or row."""
        if not members.size:
            return None
        seq_p = np.zeros(self.num_seqs, dtype=np.float32)
        seq_p[self.seq_index_np[members]] = self._origin_p(members)
        theirs = np.zeros(self.num_seqs, dtype=bool)
        theirs[self.seq_index_np[members]] = True
        at = (self.window_np[rows] & theirs[self.seq_of_token_np[rows]]).nonzero()[0]
        if not at.size:
            return None
        device = self._logits.device
        uniforms = torch.rand(len(at), generator=self.generator, device=device)
        p = torch.from_numpy(seq_p[self.seq_of_token_np[rows[at]]]).to(device)
        transfer = torch.zeros(len(rows), dtype=torch.bool, device=device)
        transfer[torch.from_numpy(at).to(device)] = uniforms < p
        return transfer

    def _origin_own(
        self, members: list[int], rows: np.ndarray, x0: np.ndarray, chosen: np.ndarray
    ) -> dict[int, str]:
        """Seeded ``origin`` requests' reveals, as Dream steps them alone, from their own
        streams: one uniform per window row against the transfer probability, then the
        candidates of the rows transferred alone (a drawn one's noise over those rows only,
        after the transfer draw: so the runner draws none for it). ``x0`` and ``chosen`` are
        the host flat candidates and choice. The requests that fail, with their errors."""
        failed = {}
        if not members:
            return failed
        p = self._origin_p(np.asarray(members))
        for n, j in enumerate(members):
            req = self.reqs[j]
            try:
                start, end = self.starts[j], self.starts[j] + self.seq_lens[j]
                window = self.window_np[start:end].nonzero()[0] + start
                uniforms = torch.rand(len(window), generator=req.generator)
                moved = window[uniforms.numpy() < p[n]]
                if self.drawn[j] and moved.size:
                    at = torch.from_numpy(np.searchsorted(rows, moved)).to(self._logits.device)
                    drawn, _ = request_candidates(req, self._logits[at], _ORIGIN)
                    x0[moved] = drawn.numpy()
                chosen[window] = False
                chosen[moved] = True
            except Exception as err:  # this request only
                failed[j] = f"decoding failed: {err!r}"
        return failed

    def _draw_reveals(self, ranking: _Ranking, chosen: np.ndarray) -> None:
        """The seeded ``alg_temp`` members' reveals (``ranking.draws_own``), as Dream draws
        them alone: ``multinomial(softmax(scores / alg_temp), k)`` without replacement over its
        window's scores in position order, from its own stream (after its candidates' and
        random remasking's draws this step, as there). Their scores cross to the host in one
        transfer; ``chosen``, the host flat choice, takes their draws in place of the top-k."""
        which = ranking.draws_own
        scores = ranking.scores[torch.from_numpy(which).to(ranking.scores.device)].cpu()
        window = np.append(self.window_np, False)  # the padding column is no window row
        for n, i in enumerate(which.tolist()):
            req = self.reqs[ranking.members[i]]
            cols = window[ranking.index[i]].nonzero()[0]
            flat = ranking.index[i][cols]
            alg_temp, count = req.params.alg_temp, ranking.ks[i]
            drawn = draw_without_replacement(scores[n, cols], count, alg_temp, req.generator)
            chosen[flat] = False
            chosen[flat[drawn.numpy()]] = True

    def _own_dtype(self, req: Request) -> torch.dtype:
        """The dtype of the request's confidence (the model's unless its rule sets one)."""
        return req.confidence_dtype or self.logits_dtype

    def _rank_dtype(self, req: Request) -> torch.dtype:
        """The dtype a request ranks in alone: random draws are float32; confidences are in
        the request's own confidence dtype (the pass's may be wider, for another request)."""
        if req.params.alg_temp:  # only an unseeded one ranks: its perturbed float64 scores
            return torch.float64
        return torch.float32 if req.params.remasking == "random" else self._own_dtype(req)

    def _draws(
        self,
        members: np.ndarray,
        row_start: list[int],
        row_len: list[int],
        offset: np.ndarray,
        longest: int,
        device: torch.device,
    ) -> tuple[np.ndarray, torch.Tensor] | None:
        """Random remasking's scores over the ranked extents (columns ``offset`` on of each
        ranking row), ``[random members, longest]`` with the index of each among ``members``
        (a host array).
        A seeded request draws its own from its generator, as its reference does (so it stays
        exact with it): LLaDA one uniform per ranking row, Dream one per window row, in order;
        the others share one draw from the engine's stream, over the extents alone."""
        random_rows = self.is_random[members].nonzero()[0]
        if not random_rows.size:
            return None
        seeded = self.seeded_random[members[random_rows]]
        if not seeded.any():  # the shared draw is every row's, in order: no copy into place
            shared = torch.rand(
                (len(random_rows), longest), generator=self.generator, device=device
            )
            return random_rows, shared
        out = torch.empty(len(random_rows), longest)
        unseeded = (~seeded).nonzero()[0].tolist()
        for n in seeded.nonzero()[0].tolist():  # each from its own stream, as alone
            i = int(random_rows[n])
            gen = self.reqs[members[i]].generator
            if self.uses_blocks_np[members[i]]:
                lo = int(offset[i])
                width = min(longest, row_len[i] - lo)
                out[n, :width] = torch.rand(row_len[i], generator=gen)[lo : lo + width]
            else:
                start = row_start[i]
                cols = self.window_np[start : start + row_len[i]].nonzero()[0] - offset[i]
                out[n, torch.from_numpy(cols)] = torch.rand(len(cols), generator=gen)
        if unseeded:
            shared = torch.rand((len(unseeded), longest), generator=self.generator, device=device)
            out = out.to(device)
            out[torch.tensor(unseeded, device=device)] = shared
        return random_rows, out

    def _counts(self, sizes: np.ndarray, block_masks_at_start: np.ndarray) -> np.ndarray:
        """Every request's reveal count this step, as one array: LLaDA's block schedule, or
        Dream's count for its ``sizes`` window masks at this step of its timestep grid (all of
        them in Fast-dLLM's Dream refresh step). Meaningless for the threshold rules."""
        spb = np.maximum(self.steps_per_block_np, 1)
        ks = llada_step_count(block_masks_at_start, spb, self.step_in_block_np)
        dream = self.is_dream.nonzero()[0]
        if dream.size:
            # Fast-dLLM's cached steps run the grid within each block.
            in_blocks = self.uses_blocks_np[dream]
            step = np.where(in_blocks, self.step_in_block_np[dream], self.global_step_np[dream])
            steps = np.where(in_blocks, spb[dream], self.steps_np[dream])
            t, s = self._timesteps(dream, step, steps)
            counts = dream_transfer_counts_np(sizes[dream], step, steps, t, s)
            ks[dream] = np.where(self.refresh[dream], sizes[dream], counts)
        return ks

    def _timesteps(
        self, members: np.ndarray, step: np.ndarray, steps: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Dream's timesteps ``t`` and ``s`` (float32) at ``step`` and ``step + 1`` of each of
        ``members``' grids of ``steps`` (anything where ``step`` is its grid's last), read
        from their grids in C."""
        at = np.maximum(np.minimum(step, steps - 2), 0)  # any entry past the grid's last
        grids = list(map(attrgetter("timesteps_np"), pick(self.reqs, members)))
        t = np.fromiter(map(getitem, grids, at.tolist()), np.float32, len(grids))
        s = np.fromiter(map(getitem, grids, (at + 1).tolist()), np.float32, len(grids))
        return t, s

    # -- applying: one request at a time, attribute updates only --------------------------
    def _apply(self, j: int, req: Request, plan: _Plan) -> None:
        """Request ``j``'s own rule, when it commits or its cursor leaves its block (its
        reveals, step count and gap are written already: ``advance``)."""
        if plan.commits[j]:
            self._commit(j, req, plan)
            return
        whole = not self.cached_step_np[j]  # a cached step's pass holds only its span
        masks = int(plan.masks[j]) if whole else None
        stalled, any_revealed = bool(plan.stalled[j]), bool(plan.revealed[j])
        move_cursor(req, stalled, any_revealed, int(plan.block_masks[j]), masks)

    def _commit(self, j: int, req: Request, plan: _Plan) -> None:
        """Every generated mask of a committing request takes this step's candidate (rows not
        gathered were filled in while planning, and a cached step's masks outside its pass by a
        read-only pass)."""
        start, end = self.starts[j], self.starts[j] + self.seq_lens[j]
        fill = self.generated_np[start:end].nonzero()[0]
        # The pass holds an uncached canvas whole, in order: its masks are ``fill``; a cached
        # step's are all its canvas's, its span's and those the read-only pass filled.
        masked = fill if not self.cached_step_np[j] else req.masked_np(req.prompt_len)
        req.write_np(self.positions_np[fill + start], plan.x0[fill + start])
        if j in plan.outside:
            req.write_np(*plan.outside[j])
        req.revealed_last_step = masked
        mark_committed(req)


@functools.lru_cache(maxsize=256)
def in_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (a threshold compared in a confidence's dtype), once."""
    return float(torch.tensor(value, dtype=dtype))
