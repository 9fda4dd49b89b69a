"""ModelRunner: one packed forward pass for the whole batch, logits only where needed.

The pass's inputs come packed from ``foretell.engine.packing`` (a ``StepInput``: every canvas
back to back, no padding, with its KV pool use). The LM head then runs once, on just the rows
the decoders asked for (still-masked positions and Prophet's answer region), not on the whole
canvas. Batchable requests (almost all: ``foretell.decoding.batched.batchable``) get their
rows and their step from one ``BatchedStep``; the others ask per request
(``positions_needed``) and are stepped per request (``advance``). The
gathered logits stay on the model's device; decoding brings only token ids, flags and gaps to
the host.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from foretell.decoding import positions_needed
from foretell.decoding.batched import (
    OTHER_SCORES,
    BatchedStep,
    batchable,
    draws_reveal,
    filters,
    in_dtype,
)
from foretell.decoding.block_step import (
    BLOCK_CONSTANTS,
    block_constants,
    block_rows,
    sample_rows,
    sample_shared_rows,
    score_rows,
)
from foretell.decoding.unmask import (
    ProbVariant,
    RowStats,
    confidence,
    confidence_dtype,
    confidence_probs,
    filter_logits_by_row,
    greedy_llada,
    guided,
    sample,
    scale_rows,
    suppress,
    suppress_cells,
)
from foretell.engine.kv_cache import KVPool
from foretell.engine.packing import Packer, StepInput
from foretell.models.attention import CacheUse, PoolUses
from foretell.models.transformer import DiffusionLM
from foretell.ranges import concat_ranges
from foretell.scheduler.canvas_rows import CanvasRows, block_causal_rows
from foretell.scheduler.gather import is_none, pick, where
from foretell.scheduler.request import CANVAS_LEN, GEOMETRY, NUM_SEQUENCES, Request

logger = logging.getLogger(__name__)


def _index_in(registry: list, value: object) -> int:
    """``value``'s index in ``registry``, added at the end when new (a handful of entries)."""
    for index, known in enumerate(registry):
        if known == value or (known != known and value != value):  # NaN: one entry
            return index
    registry.append(value)
    return len(registry) - 1


# When only the wanted rows of a pass's logits get a softmax or a gap: a gather, and a scatter
# back, cost ops of their own and time in proportion to the rows kept, so the subset pays only
# when it is a small share of the rows and leaves out many logits. Measured on this CPU, float32
# (`benchmarks/row_stats.py --subset`), the subset's time against every row's: with rows of 51
# and 56 logits, 0.72-0.90x at a tenth of 1,147 or 4,096 rows, 0.86-1.00x at 30%, 0.97-1.11x
# at half, 1.01-1.20x at 70%, and 0.89-1.41x at 128 or 512 rows (under 26k logits left out);
# with 4k, 32k and 126k logits a row, 0.87-1.05x at 30%, 0.98-1.14x at half, 1.10-1.21x at 70%.
SOME_ROWS_MAX_SHARE = 1 / 3
SOME_ROWS_MIN_SAVED = 1 << 15


def _some_rows(wanted: np.ndarray, gathered: torch.Tensor) -> torch.Tensor | None:
    """The indices of the ``wanted`` rows, on the logits' device; or None (every row) unless
    they are few (``SOME_ROWS_MAX_SHARE``) and leave out many logits."""
    count = int(wanted.sum())
    left_out = len(wanted) - count
    if count > SOME_ROWS_MAX_SHARE * len(wanted) or left_out * gathered.shape[-1] < (
        SOME_ROWS_MIN_SAVED
    ):
        return None
    return torch.from_numpy(wanted.nonzero()[0]).to(gathered.device)


def _entries_present(indices: np.ndarray) -> list[int]:
    """The registry entries (``_variants``, ``_score_kinds``) ``indices`` name, in order, but
    entry 0 (the default: none): ``np.unique`` of the others, without its Python-level call."""
    present = np.bincount(indices, minlength=1)
    present[0] = 0
    return present.nonzero()[0].tolist()


def _reads_stats(req: Request) -> bool:
    """Whether ``advance`` uses :class:`RowStats` for this request (Prophet's gap, or the
    greedy LLaDA reveal)."""
    p = req.params
    greedy = greedy_llada(req.family, p.remasking, p.temperature, p.top_p, p.top_k)
    return p.cfg_scale <= 0 and (p.early_commit is not None or greedy)


@dataclass
class RequestLogits:
    """What one request gets back from a forward pass."""

    positions: torch.Tensor  # canvas positions, sorted
    logits: torch.Tensor  # [len(positions), vocab], aligned, cfg applied
    more: Callable[[torch.Tensor], torch.Tensor]  # logits at other positions of this pass
    stats: RowStats | None = None  # greedy statistics of ``logits`` (None with cfg)


@dataclass
class QueryTally:
    """Query tokens the model ran for a pass: canvases, cached spans and read-only rows (a
    commit's read-only rows, asked for while decoding, are added then). The pass's callbacks
    add to it; they hold this, never the :class:`PassOutput`, which holds them: a reference
    cycle would keep the pass's hidden states and gathered logits alive until the garbage
    collector ran, on a GPU device memory the allocator cannot reuse meanwhile."""

    tokens: int = 0


@dataclass
class PassOutput:
    """A forward pass's results: per request for the general path, and the batchable
    requests as one :class:`BatchedStep`, stepped together. Freed by reference counting as
    soon as the step is decoded (nothing it holds refers back to it)."""

    per_request: list[tuple[Request, RequestLogits]]
    tally: QueryTally
    batched: BatchedStep | None = None
    # Block-causal requests: each one's needed positions and their host scores
    # (``foretell.decoding.block_step``).
    blocks: list[tuple[Request, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def query_tokens(self) -> int:
        return self.tally.tokens


# A pass's forward result: the rows' places in their sequences, the hidden states, the
# gathered rows and their logits, all on the model's device.
ForwardResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class PassForward:
    """A pass's device work, as ``ModelRunner.run_phases`` yields it: calling it runs the
    forward here; its fields are what a forward elsewhere needs (``Engine(overlap="process")``
    sends them to the model's own process)."""

    runner: ModelRunner
    step: StepInput
    seq_lens: list[int]
    rows: np.ndarray  # the flat rows whose logits the pass gathers

    def __call__(self) -> ForwardResult:
        return self.runner._forward_pass(self.step, self.seq_lens, self.rows)


def packed_forward(
    model: DiffusionLM,
    ids: torch.Tensor,
    positions: torch.Tensor,
    seq_lens: list[int],
    caches: PoolUses | None,
    storage: torch.Tensor | None,
    chunk_tokens: int | None,
) -> torch.Tensor:
    """Hidden states of a packed batch, in chunks of whole sequences of at most
    ``chunk_tokens`` (see ``forward_chunk_tokens``); a function of its arguments alone, so
    that the model's own process runs the same code as the engine's."""
    bounds = chunk_bounds(seq_lens, chunk_tokens)
    if len(bounds) == 1:
        return model.forward_packed(ids, positions, seq_lens, caches, storage)
    parts, start = [], 0
    for i, j in bounds:
        end = start + sum(seq_lens[i:j])
        parts.append(
            model.forward_packed(
                ids[start:end],
                positions[start:end],
                seq_lens[i:j],
                None if caches is None else caches[i:j],
                storage,
            )
        )
        start = end
    return torch.cat(parts)


def finish_phases(
    phases: Generator[PassForward, ForwardResult, PassOutput], result: ForwardResult
) -> PassOutput:
    """Hand a pass's forward ``result`` to its :meth:`ModelRunner.run_phases` and return the
    pass's output (the generator's return value)."""
    try:
        phases.send(result)
    except StopIteration as done:
        return done.value
    raise RuntimeError("run_phases yielded more than the forward's work")


# The CPU default of ``forward_chunk_tokens``: on the 2-core machine of docs/benchmarks.md a
# full batch of the shipped model ran 1.2 to 1.3x faster per sequence in chunks of about this
# many tokens than in one piece, and never slower (benchmarks/forward_chunks.py). For a large
# model a chunk of this size is still a large matrix product, so the cost is only re-reading
# the weights once per chunk.
CPU_FORWARD_CHUNK_TOKENS = 640


def resolve_forward_chunk_tokens(value: int | str | None, device: torch.device) -> int | None:
    """``"auto"``: :data:`CPU_FORWARD_CHUNK_TOKENS` on a CPU, no chunking elsewhere (a GPU
    wants the whole batch in one piece); an int >= 1; or None for no chunking."""
    if value == "auto":
        return CPU_FORWARD_CHUNK_TOKENS if device.type == "cpu" else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"forward_chunk_tokens: need a positive integer, 'auto' or None, got {value!r}"
        )
    return value


def chunk_bounds(seq_lens: list[int], budget: int | None) -> list[tuple[int, int]]:
    """Split packed sequences into the fewest consecutive runs ``[i, j)`` of about equal tokens
    with at most ``budget`` tokens each (a longer sequence is a run of its own); None: one run.
    Balanced, so that no chunk is a thin, fixed-cost tail."""
    total = sum(seq_lens)
    if budget is None or total <= budget:
        return [(0, len(seq_lens))]
    for pieces in range(-(-total // budget), len(seq_lens) + 1):
        bounds = _balanced(seq_lens, total / pieces)
        if all(j - i == 1 or sum(seq_lens[i:j]) <= budget for i, j in bounds):
            return bounds
    return [(i, i + 1) for i in range(len(seq_lens))]


# Columns the runner keeps beside each canvas row's geometry (``CanvasRows.extra``), from a
# request's params alone, so that a pass sorts its requests with array ops, not a call per
# request: whether the batched step takes it, whether its candidates are drawn or filtered,
# whether it suppresses logits, its confidence variant, and the kind of score a sampled
# request's drawn candidates take (indices into ``ModelRunner``'s registries, which hold a
# handful of entries fixed by the rules: 0 for the default confidence, no score).
_COLUMNS = 5
_BATCHABLE, _FILTERS, _SUPPRESSES, _VARIANT, _SCORE_KIND = range(GEOMETRY, GEOMETRY + _COLUMNS)
# And its float columns (``CanvasRows.values``): its threshold in its confidence's dtype (NaN:
# none), temperature, top-p (1: none), top-k (0: none), guidance factor (``cfg_scale + 1``) and
# Dream's ``alg_temp`` where its rule draws its reveal with it (0: none), so that every row's
# sampling runs with its own values in one call.
_VALUES = 6
_THRESHOLD, _TEMPERATURE, _TOP_P, _TOP_K, _GUIDANCE, _ALG_TEMP = range(_VALUES)


def _balanced(seq_lens: list[int], target: float) -> list[tuple[int, int]]:
    """Runs cut wherever adding the next sequence would leave the run further from ``target``."""
    bounds, i, tokens = [], 0, 0
    for j, length in enumerate(seq_lens):
        if j > i and tokens + length / 2 > target:
            bounds.append((i, j))
            i, tokens = j, 0
        tokens += length
    bounds.append((i, len(seq_lens)))
    return bounds


class ModelRunner:
    def __init__(
        self,
        model: DiffusionLM,
        device: torch.device | str = "cpu",
        *,
        batched: bool = True,
        forward_chunk_tokens: int | str | None = "auto",
        kv_pool: KVPool | None = None,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.kv_pool = kv_pool  # where cached requests' pages live
        self.batched = batched  # step batchable requests together (BatchedStep)
        # Run the packed batch through the model in chunks of whole sequences of at most this
        # many tokens (None: in one piece); sequences never see each other, so results equal
        # up to rounding.
        self.forward_chunk_tokens = resolve_forward_chunk_tokens(forward_chunk_tokens, self.device)
        self.forward_seconds = 0.0  # time inside the model, for overhead accounting
        self.forward_passes = 0
        self.packer = Packer()
        # The confidence variants and thresholds the requests' rows refer to (see
        # ``_row_columns``): entry 0 is the default / none.
        self._variants: list[tuple | None] = [None]
        # (rule, confidence dtype, suppressed ids) of sampled candidates' scores.
        self._score_kinds: list[tuple | None] = [None]
        # Every running request's canvas, as rows of one matrix (taken at a request's first
        # pass, given back when it ends: ``Request.release_canvas_row``).
        self.canvas_rows = CanvasRows(
            extra=self._row_columns,
            extra_width=_COLUMNS,
            values_of=self._row_values,
            values_width=_VALUES,
            block_constants_of=block_constants,
            block_constants_width=BLOCK_CONSTANTS,
        )
        # The shared random stream of requests without a seed (one draw a step for all), and
        # the host stream that seeds an unseeded request's own generator where its step needs
        # one (the per-request path, the fallback when a batched step cannot be built).
        self.generator = torch.Generator(self.device).manual_seed(0)
        self.host_generator = torch.Generator().manual_seed(0)

    def _row_columns(self, req: Request) -> tuple[int, ...]:
        """A request's columns beside its geometry (``_BATCHABLE`` on): computed once per
        params object, when it first runs."""
        p = req.params
        rule = p.remasking if p.remasking in OTHER_SCORES else None
        variant = 0
        if req.confidence_dtype is not None or req.confidence_suppress or rule is not None:
            key = (req.confidence_dtype, req.confidence_suppress, rule or "low_confidence")
            variant = _index_in(self._variants, key)
        drawn_or_filtered = filters(p)
        score_kind = 0
        if drawn_or_filtered and p.remasking not in ("random", "origin"):  # they read no score
            dtype = confidence_dtype(p, req.family, self.model.embed.weight.dtype)
            key = (rule or "low_confidence", dtype, req.confidence_suppress)
            score_kind = _index_in(self._score_kinds, key)
        return (
            int(batchable(req)),
            int(drawn_or_filtered),
            int(bool(req.logits_suppress)),
            variant,
            score_kind,
        )

    def _row_values(self, req: Request) -> tuple[float, ...]:
        """A request's float columns (``_THRESHOLD`` on), once per params object."""
        p = req.params
        threshold = float("nan")
        if p.remasking == "confidence_threshold" and not req.block_causal:
            own = req.confidence_dtype or self.model.embed.weight.dtype
            threshold = in_dtype(p.threshold, own)
        top_p = 1.0 if p.top_p is None else p.top_p
        # Any int is a valid top-k: one past every vocabulary is held as 2**31 (a float64
        # holds it exactly; the filter clamps it to the logits' width, as alone).
        top_k = 0 if p.top_k is None else min(p.top_k, 1 << 31)
        alg_temp = (p.alg_temp or 0.0) if draws_reveal(req) else 0.0
        return (threshold, p.temperature, top_p, top_k, p.cfg_scale + 1, alg_temp)

    def run(self, batch: list[Request]) -> PassOutput:
        """One pass for ``batch``: prepared, run and finished in a row (:meth:`run_phases`)."""
        phases = self.run_phases(batch)
        return finish_phases(phases, next(phases)())

    @torch.inference_mode()
    def run_phases(self, batch: list[Request]) -> Generator[PassForward, ForwardResult, PassOutput]:
        """One pass for ``batch`` in three phases, so that a caller can run the forward apart
        from the host work around it (``Engine(overlap=...)`` runs it on a worker thread or
        in the model's process while it decodes another group's pass): the host's
        preparation (the requests' rows, the layout, the batched step's plan), then it yields
        the forward as work to run (:class:`PassForward`: it touches the model's device and
        the KV pool only) and takes that work's result back, then it finishes (scores, the
        decoding callbacks) and returns the pass's output."""
        joined = is_none(batch, "canvas_row")
        for req in where(batch, joined) if joined.any() else ():  # its first pass
            self.canvas_rows.add(req)
        step = self.packer.pack(batch, self.canvas_rows)
        seq_lens, offsets, seq_of, total = step.seq_lens, step.offsets, step.seq_of, step.total
        ids, positions = step.ids, step.positions
        geo = step.geometry
        num_seqs = geo[:, NUM_SEQUENCES]

        group_np = geo[:, _BATCHABLE].nonzero()[0] if self.batched else np.zeros(0, int)
        group = group_np.tolist()
        greedy = None
        if group:
            try:
                greedy = BatchedStep(
                    pick(batch, group_np),
                    seq_of[group_np],
                    step.cond_at[group_np],
                    seq_lens,
                    ids,
                    positions,
                    batch[group[0]].mask_token_id,
                    row_offsets=step.row_offsets[group_np],
                    uncond_at=step.uncond_at[group_np],
                    generator=self.generator,
                    logits_dtype=self.model.embed.weight.dtype,
                    canvas_rows=self.canvas_rows,
                    geometry=geo[group_np],
                    cursor=step.cursor[group_np],
                    thresholds=step.values[group_np, _THRESHOLD],
                    alg_temps=step.values[group_np, _ALG_TEMP],
                    drawn=step.values[group_np, _TEMPERATURE] > 0,
                )
            except Exception:  # nothing has changed: the per-request path can take them
                logger.exception("batched step failed; stepping its requests one by one")
                group, group_np = [], np.zeros(0, int)
        # The rows to gather, as host flags (``needed_t``: the same memory, for tensor indices).
        needed = greedy.needed_np.copy() if greedy else np.zeros(total, dtype=bool)
        needed_t = torch.from_numpy(needed)
        guided = group_np[num_seqs[group_np] > 1].tolist()
        if guided:  # the unconditional copy's rows at the positions the conditional needs
            cond, uncond = step.cond_at[guided], step.uncond_at[guided]
            length = geo[guided, CANVAS_LEN]
            copied = needed[concat_ranges(cond, cond + length)]
            needed[concat_ranges(uncond, uncond + length)] = copied
        blocks_np = block_causal_rows(geo).nonzero()[0]
        blocks = blocks_np.tolist()
        block_pos = None
        if blocks:  # its sequence is its block (or, without the cache, its window)
            block_pos = block_rows(pick(batch, blocks_np), self.canvas_rows)
            flat, counts, query, _ = block_pos
            owner = np.repeat(np.arange(len(blocks)), counts)
            needed[step.cond_at[blocks_np][owner] + flat - query[owner]] = True
        alone = np.ones(len(batch), dtype=bool)
        alone[group_np] = False
        alone[blocks] = False
        others = alone.nonzero()[0].tolist()
        # The per-request path reads a cached step's positions as tensors.
        spans = {i: torch.from_numpy(step.span(i)) for i in others if step.cached_step[i]}
        for i in others:
            if batch[i].generator is None:  # once in the request's life
                seed = torch.randint(2**62, (1,), generator=self.host_generator)
                batch[i].generator = torch.Generator().manual_seed(int(seed))
        wanted = {i: positions_needed(batch[i]) for i in others}
        for i in others:
            needed_t[self._rows(wanted[i], offsets(i), spans.get(i))] = True
        # Rows in packed order: each request's rows are contiguous, conditional copy first.
        rows_np = needed.nonzero()[0]

        work = PassForward(self, step, seq_lens, rows_np)
        in_seq_d, hidden, rows_d, gathered = yield work
        first_row = self._first_rows(rows_np, seq_lens)
        # Each request's gathered rows: conditional copy, then the cfg copy when there is one.
        row_lo, row_hi = first_row[seq_of], first_row[seq_of + num_seqs]
        row_ranges = dict(enumerate(zip(row_lo.tolist(), row_hi.tolist(), strict=True)))
        if geo[:, _SUPPRESSES].any():
            self._suppress_logits(gathered, batch, row_ranges)
        # The batched step reads a guided request's conditional rows, guided in place.
        own_hi = row_hi.copy()
        own_hi[guided] = row_lo[guided] + (row_hi[guided] - row_lo[guided]) // 2
        if guided:
            suppressing = np.asarray(guided)[geo[guided, _SUPPRESSES] > 0].tolist()
            factors = step.values[guided, _GUIDANCE]
            self._guide_rows(gathered, batch, guided, suppressing, (row_lo, row_hi), factors)
        # One batched computation of what the batched step and Prophet read from each row, when
        # some request reads it (the batched step's guided rows are guided in place above; the
        # per-request step guides its own rows and does without).
        reads = greedy is not None or any(_reads_stats(batch[i]) for i in others)
        stats = None
        if reads:
            scored = num_seqs == 1  # unguided, and the batched step's guided requests
            scored[guided] = True
            # The rows anything reads a score or a gap of: the batched step's window rows
            # (scores) and Prophet's region rows (gaps); every row of a per-request one.
            reads_score = np.zeros(len(rows_np), dtype=bool)
            reads_gap = np.zeros(len(rows_np), dtype=bool)
            if greedy is not None:
                reads_score[:] = greedy.window_np[rows_np]
                reads_gap[:] = greedy.region_np[rows_np]
            for i in others:
                reads_score[row_ranges[i][0] : row_ranges[i][1]] = True
                reads_gap[row_ranges[i][0] : row_ranges[i][1]] = True
            variant = np.where(scored, geo[:, _VARIANT], 0)
            bounds = (row_lo, own_hi)
            variants, default_rows = self._prob_variants(gathered, variant, bounds, reads_score)
            stats = RowStats.of(gathered, variants, default_rows, _some_rows(reads_gap, gathered))
        tally = QueryTally(total)
        out = PassOutput([], tally)

        def more_flat(flat_rows: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                idx = flat_rows.to(self.device)
                return self.model.logits_at(hidden, in_seq_d, idx)

        def more(pos: torch.Tensor, req: Request, i: int) -> torch.Tensor:
            span = spans.get(i)
            if span is None:
                logits = self._guided(req, more_flat(self._rows(pos, offsets(i))))
                return suppress(logits, req.logits_suppress)
            # A cached step: rows of its sequence from this pass; any other position is a
            # read-only query against the cache as this pass left it (the same numbers as if
            # it had been one of the pass's read-only rows).
            logits = torch.empty(
                len(pos), self.model.vocab_size, dtype=gathered.dtype, device=gathered.device
            )
            at = torch.searchsorted(span, pos).clamp(max=len(span) - 1)
            inside = span[at] == pos
            if bool(inside.any()):
                logits[inside.to(gathered.device)] = more_flat(int(step.cond_at[i]) + at[inside])
            if not bool(inside.all()):
                (found,) = self._read_only_many([req], [pos[~inside]])
                logits[(~inside).to(gathered.device)] = found
                tally.tokens += int((~inside).sum())
            return suppress(logits, req.logits_suppress)

        for i in others:
            req, pos = batch[i], wanted[i]
            cursor, end = row_ranges[i]
            logits = self._guided(req, gathered[cursor:end])
            if req.params.cfg_scale > 0:  # guided here, so suppressed here
                logits = suppress(logits, req.logits_suppress)
            own = None
            if stats is not None and req.params.cfg_scale <= 0:
                own = stats.take(slice(cursor, end))
            more_fn = functools.partial(more, req=req, i=i)
            out.per_request.append((req, RequestLogits(pos, logits, more_fn, own)))

        def read_only(reqs: list[Request], pos: list[torch.Tensor]) -> list[torch.Tensor]:
            found = self._read_only_many(reqs, pos)
            tally.tokens += sum(len(p) for p in pos)
            return found

        if greedy is not None:
            # A seeded origin request draws its candidates itself, after its transfer draw.
            own = greedy.is_origin & greedy.seeded
            drawn = group_np[(geo[group_np, _FILTERS] > 0) & ~own].tolist()
            bounds = (row_lo, own_hi)
            columns = (geo[:, _SCORE_KIND], step.values)
            self._sampled_rows(
                batch, group, drawn, greedy, rows_np, gathered, stats, bounds, columns
            )
            greedy.bind(rows_np, rows_d, stats, more_flat, read_only, gathered)
        out.batched = greedy
        if blocks:
            row_bounds = (row_lo, row_hi)
            values = step.values[blocks_np]
            out.blocks = self._block_scores(
                batch, blocks_np, block_pos, gathered, row_bounds, values
            )
        return out

    def _block_scores(
        self,
        batch: list[Request],
        blocks: np.ndarray,
        block_pos: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        gathered: torch.Tensor,
        bounds: tuple[np.ndarray, np.ndarray],
        values: np.ndarray,
    ) -> list[tuple[Request, torch.Tensor, torch.Tensor]]:
        """Every block-causal request's rows scored on the device and brought to the host in
        one transfer: the greedy ones' (:func:`score_rows`) and the unseeded sampled ones'
        (:func:`sample_shared_rows`: one draw from the engine's shared stream for all) in a
        fixed number of ops; a seeded sampled request's drawn from its own generator, as the
        official decoders draw. ``block_pos``: :func:`block_rows`' positions of ``blocks``;
        ``bounds``: each request's first and end gathered row; ``values``: each request's
        float columns (``_TEMPERATURE``, ...)."""
        flat, counts, _, drawn = block_pos
        reqs = pick(batch, blocks)
        positions = torch.from_numpy(flat).split(counts.tolist())
        scores: list[torch.Tensor | None] = [None] * len(blocks)
        # A request with a generator (a seed) draws from it, as the batched step's do.
        seeded = drawn & ~is_none(reqs, "generator")
        greedy, shared = (~drawn).nonzero()[0], (drawn & ~seeded).nonzero()[0]
        first, end = bounds[0][blocks], bounds[1][blocks]
        device = gathered.device
        parts = []
        if greedy.size:
            index = torch.from_numpy(concat_ranges(first[greedy], end[greedy])).to(device)
            argmax_of_probs = getattr(self.model, "argmax_of_probs", False)
            parts.append(score_rows(gathered[index], argmax_of_probs))
        if shared.size:
            shared, drawn_shared = self._shared_samples(reqs, shared, first, end, gathered, values)
            parts.append(drawn_shared)
        if parts:
            scored = torch.cat(parts, dim=1).cpu() if len(parts) > 1 else parts[0].cpu()
            order = np.concatenate([greedy, shared])
            split = scored.split(counts[order].tolist(), dim=1)
            for k, part in zip(order.tolist(), split, strict=True):
                scores[k] = part
            # A shared draw's row of NaN logits (token -1): its request fails alone, as its
            # reference's multinomial would (looked for once, for all; per request only then).
            nan_rows = bool((scored[0] < 0).any()) if shared.size else False
            if nan_rows:
                for k in shared.tolist():
                    if bool((scores[k][0] < 0).any()):
                        reqs[k].finish("error", "sampling failed: NaN in the logits")
                        scores[k] = None
            elif len(order) == len(blocks):
                return list(zip(reqs, positions, scores, strict=True))
        for k in seeded.nonzero()[0].tolist():
            req, p = reqs[k], reqs[k].params
            state = None
            try:
                state = req.generator.get_state()
                rows = gathered[int(first[k]) : int(end[k])]
                scores[k] = sample_rows(rows, p.temperature, p.top_k, p.top_p, req.generator)
            except Exception as err:  # this request only; its stream as it was
                if state is not None:
                    req.generator.set_state(state)
                req.finish("error", f"sampling failed: {err!r}")
        items = zip(reqs, positions, scores, strict=True)
        return [item for item in items if item[2] is not None]

    def _shared_samples(
        self,
        reqs: list[Request],
        members: np.ndarray,
        first: np.ndarray,
        end: np.ndarray,
        gathered: torch.Tensor,
        values: np.ndarray,
    ) -> tuple[np.ndarray, torch.Tensor]:
        """The unseeded sampled block-causal requests ``members`` (indices into ``reqs``)
        drawn at once (:func:`sample_shared_rows`); if that fails, each is drawn alone, so
        that only a request that fails alone ends with an error. Returns the members drawn
        and their rows' scores, back to back."""

        def draw(at: np.ndarray) -> torch.Tensor:
            sizes = end[at] - first[at]
            index = torch.from_numpy(concat_ranges(first[at], end[at])).to(gathered.device)
            own = values[at]
            return sample_shared_rows(
                gathered[index],
                np.repeat(own[:, _TEMPERATURE], sizes),
                np.repeat(own[:, _TOP_K], sizes).astype(np.int64),
                np.repeat(own[:, _TOP_P], sizes),
                self.generator,
            )

        try:
            return members, draw(members)
        except Exception:
            logger.exception("shared draw failed; drawing its requests one by one")
        kept, parts = [], []
        for k in members.tolist():
            try:
                parts.append(draw(np.asarray([k])))
                kept.append(k)
            except Exception as err:  # this request only
                reqs[k].finish("error", f"sampling failed: {err!r}")
        if not parts:
            return np.zeros(0, dtype=np.int64), gathered.new_zeros((3, 0), dtype=torch.float64)
        return np.asarray(kept, dtype=np.int64), torch.cat(parts, dim=1)

    def _guide_rows(
        self,
        gathered: torch.Tensor,
        batch: list[Request],
        guided: list[int],
        suppressing: list[int],
        bounds: tuple[np.ndarray, np.ndarray],
        factors: np.ndarray,
    ) -> None:
        """Classifier-free guidance of the batched step's guided requests, in place on their
        conditional rows (:meth:`_guided`'s expression, each row with its own scale, rounded
        as that scalar rounds it: :func:`scale_rows`), then the ``logits_eos_inf`` columns of
        those ``suppressing``, as the per-request step orders them. ``bounds``: each request's
        first and end row; ``factors``: each one's ``cfg_scale + 1``."""
        first, end = bounds[0][guided], bounds[1][guided]
        half = first + (end - first) // 2
        cond_d = torch.from_numpy(concat_ranges(first, half)).to(gathered.device)
        uncond_d = torch.from_numpy(concat_ranges(half, end)).to(gathered.device)
        factor = np.repeat(factors, half - first)
        c, u = gathered[cond_d], gathered[uncond_d]
        gathered[cond_d] = u + scale_rows(c - u, factor, divide=False)
        lo = bounds[0][suppressing]
        hi = lo + (bounds[1][suppressing] - lo) // 2
        cells = [
            (a, b, t)
            for i, a, b in zip(suppressing, lo.tolist(), hi.tolist(), strict=True)
            for t in batch[i].logits_suppress
        ]
        suppress_cells(gathered, cells, inplace=True)

    def _sampled_rows(
        self,
        batch: list[Request],
        group: list[int],
        members: list[int],
        greedy: BatchedStep,
        rows: np.ndarray,
        gathered: torch.Tensor,
        stats: RowStats,
        bounds: tuple[np.ndarray, np.ndarray],
        columns: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """The batched step's sampled or filtered requests (``members``): their candidates and
        scores in place of the greedy ones in ``stats`` at their window rows, computed as the
        per-request step computes them (:func:`candidates`, row by row), in a fixed number of
        ops whatever their parameters: one filtering of every row with its own temperature,
        top-p and top-k (:func:`filter_logits_by_row`), one draw, and one score per kind of
        score (rule, confidence dtype, suppressed ids). ``bounds``: each request's first and end
        row of its own (conditional) rows; ``columns``: each request's score kind (an index
        into the registry) and float columns (``_TEMPERATURE``, ...).

        The uniforms come first, in request order: a request with a generator (a seed) draws
        its own ``[window rows, vocab]`` from it, as alone; the others share one draw from the
        engine's device stream. Random remasking's draws follow, in the step. A seeded request
        with Prophet keeps its generator's state from before the draw: if its test commits,
        its stream goes back there and draws its commit instead (``BatchedStep``), as alone."""
        if not members:
            return
        own = concat_ranges(bounds[0][members], bounds[1][members])
        keep = greedy.window_np[rows[own]]
        member_of_row = np.repeat(np.arange(len(members)), bounds[1][members] - bounds[0][members])
        window_rows = own[keep]
        sizes = np.bincount(member_of_row[keep], minlength=len(members))
        seeded = pick(batch, members)
        seeded = where(seeded, ~is_none(seeded, "generator"))
        drawn_from = [(g, g.get_state()) for g in {req.generator for req in seeded}]
        try:
            kinds, values = columns[0][members], columns[1][members]
            self._sample_members(
                batch, members, group, greedy, window_rows, sizes, gathered, stats, kinds, values
            )
        except Exception:  # the pass is retried in halves: each stream as it was
            for generator, state in drawn_from:
                generator.set_state(state)
            raise

    def _sample_members(
        self,
        batch: list[Request],
        members: list[int],
        group: list[int],
        greedy: BatchedStep,
        window_rows: np.ndarray,
        sizes: np.ndarray,
        gathered: torch.Tensor,
        stats: RowStats,
        kinds: np.ndarray,
        values: np.ndarray,
    ) -> None:
        device, vocab = gathered.device, gathered.shape[-1]
        reqs = pick(batch, members)
        temperature, top_p = values[:, _TEMPERATURE], values[:, _TOP_P]
        top_k = values[:, _TOP_K].astype(np.int64)
        index_d = torch.from_numpy(window_rows).to(device)
        logits = gathered[index_d]
        filtered = filter_logits_by_row(
            logits, np.repeat(temperature, sizes), np.repeat(top_p, sizes), np.repeat(top_k, sizes)
        )
        x0 = filtered.argmax(dim=-1)
        first = np.cumsum(sizes) - sizes  # each member's first row in ``window_rows``
        drawn = temperature > 0
        if drawn.any():
            noise = torch.full((len(window_rows), vocab), 0.5, dtype=torch.float64, device=device)
            shared = drawn & is_none(reqs, "generator")
            for m in (drawn & ~shared).nonzero()[0].tolist():
                req = reqs[m]
                if req.params.early_commit is not None:
                    greedy.draw_states[group.index(members[m])] = req.generator.get_state()
                shape = (int(sizes[m]), vocab)
                draw = torch.rand(shape, generator=req.generator, dtype=torch.float64)
                noise[first[m] : first[m] + sizes[m]] = draw.to(device)
            if shared.any():
                at = concat_ranges(first[shared], first[shared] + sizes[shared])
                noise[torch.from_numpy(at).to(device)] = torch.rand(
                    (len(at), vocab), generator=self.generator, dtype=torch.float64, device=device
                )
            # Gumbel-max over the filtered rows (already divided by their temperature).
            sampled = sample(filtered, 1.0, None, noise)
            x0 = torch.where(torch.from_numpy(np.repeat(drawn, sizes)).to(device), sampled, x0)
        stats.argmax[index_d] = x0
        dream = reqs[0].family == "dream"  # one model, one family
        for kind in _entries_present(kinds):
            rule, dtype, left_out = self._score_kinds[kind]
            same = (kinds == kind).nonzero()[0]
            at_np = concat_ranges(first[same], first[same] + sizes[same])
            at = torch.from_numpy(at_np).to(device)
            if dream:  # Dream scores the filtered logits
                probs = torch.softmax(filtered[at].to(dtype), dim=-1)
            else:
                probs = confidence_probs(logits[at], dtype, left_out)
            stats.prob[index_d[at]] = confidence(probs, x0[at], rule).to(stats.prob.dtype)

    def _read_only_many(
        self, reqs: list[Request], positions: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Logits at canvas ``positions`` of cached requests, as read-only rows against their
        pages: one pass for all of them (LLaDA: no shift)."""
        caches = [CacheUse(req.kv_slots, 0, 0, 0, req.canvas_len) for req in reqs]
        pos = [np.asarray(p) for p in positions]
        ids = np.concatenate([req.canvas_np[p] for req, p in zip(reqs, pos, strict=True)])
        pos_d = torch.from_numpy(np.concatenate(pos)).to(self.device)
        lens = [len(p) for p in positions]
        hidden = self.model.forward_packed(
            torch.from_numpy(ids).to(self.device), pos_d, lens, caches, self.kv_pool.storage
        )
        logits = self.model.logits_at(hidden, pos_d, torch.arange(len(pos_d), device=self.device))
        return list(logits.split(lens))

    @torch.inference_mode()  # per thread: a worker's call does not inherit the caller's
    def _forward_pass(
        self, step: StepInput, seq_lens: list[int], rows_np: np.ndarray
    ) -> ForwardResult:
        """The pass's device work: its inputs to the device, the forward, and the logits of
        the gathered rows ``rows_np``. They stay on the model's device, and so does
        everything computed from them; decoding brings only token ids, counts and gaps to the
        host."""
        start = time.perf_counter()
        in_seq_d = step.places_on(self.device, self.model.shifted_logits)
        hidden = self._forward(step.ids_d, step.positions_d, seq_lens, step.pool_uses)
        rows_d = torch.from_numpy(rows_np).to(self.device)
        gathered = self.model.logits_at(hidden, in_seq_d, rows_d)
        self.forward_seconds += time.perf_counter() - start
        self.forward_passes += 1
        return in_seq_d, hidden, rows_d, gathered

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: list[int],
        caches: PoolUses | None = None,
    ) -> torch.Tensor:
        """Hidden states of the packed batch, chunk by chunk (see ``forward_chunk_tokens``)."""
        storage = None if caches is None else self.kv_pool.storage
        return packed_forward(
            self.model, ids, positions, seq_lens, caches, storage, self.forward_chunk_tokens
        )

    @staticmethod
    def _first_rows(rows: np.ndarray, seq_lens: list[int]) -> np.ndarray:
        """Index into ``rows`` of each packed sequence's first gathered row, and the number of
        rows last."""
        ends = np.cumsum(seq_lens)
        return np.concatenate([[0], rows.searchsorted(ends[:-1]), [len(rows)]])

    def _suppress_logits(
        self, gathered: torch.Tensor, batch: list[Request], spans: dict[int, tuple[int, int]]
    ) -> None:
        """``logits_eos_inf``: -inf in place at the suppressed columns of every unguided
        request's rows (one op for the pass); guided rows are suppressed after guidance."""
        cells = [
            (start, end, token)
            for i, (start, end) in spans.items()
            if batch[i].params.cfg_scale <= 0
            for token in batch[i].logits_suppress
        ]
        suppress_cells(gathered, cells, inplace=True)

    def _prob_variants(
        self,
        gathered: torch.Tensor,
        variant: np.ndarray,
        bounds: tuple[np.ndarray, np.ndarray],
        reads_score: np.ndarray,
    ) -> tuple[list[ProbVariant], torch.Tensor | None]:
        """The rows whose confidence is not the default one (the model's dtype, nothing left
        out), one group per variant (``variant``: each request's index into the registry, 0
        for the default; ``bounds``: each request's first and end row); and the rows that do
        take the default, unless they are over a third of the rows or leave out few logits
        (None: every row; see :func:`_some_rows`). Only rows
        in ``reads_score`` are scored: the softmax over the vocabulary is the costly part."""
        first, end = bounds
        variants, covered = [], np.zeros(len(gathered), dtype=bool)
        for index in _entries_present(variant):
            dtype, left, rule = self._variants[index]
            held = variant == index
            rows = concat_ranges(first[held], end[held])
            rows = rows[reads_score[rows]]
            covered[rows] = True
            if rows.size:
                at = torch.from_numpy(rows).to(gathered.device)
                variants.append(ProbVariant(at, dtype or gathered.dtype, left, rule))
        return variants, _some_rows(reads_score & ~covered, gathered)

    @staticmethod
    def _rows(
        pos: torch.Tensor, starts: tuple[int, int | None], span: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Flat rows of canvas positions ``pos``: conditional copy, then the cfg copy; for a
        cached step, rows of its sequence's positions ``span``."""
        cond, uncond = starts
        if span is not None:
            return torch.searchsorted(span, pos) + cond
        return pos + cond if uncond is None else torch.cat([pos + cond, pos + uncond])

    @staticmethod
    def _guided(req: Request, logits: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance with the request's scale (:func:`guided`)."""
        return guided(logits, req.params.cfg_scale)
