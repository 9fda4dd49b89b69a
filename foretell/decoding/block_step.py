"""Denoising block-causal requests (SDAR, LLaDA2): one step of each one's current block.

A block-causal request decodes its canvas block by block, blocks aligned at position 0 (the
prompt's tail sits in the first block it denoises). Each step runs the block's queries over
the cached keys of every earlier block and reveals some of its masks:

- ``k_s = block_length // steps`` tokens at step ``s`` (one more for the first
  ``block_length % steps`` steps), the most confident first (``"low_confidence"``, the static
  schedule); with ``"confidence_threshold"`` (the dynamic one), every mask whose confidence is
  strictly above ``threshold`` when there are at least ``k_s`` of them, else the ``k_s`` best.
  ``k_s`` is capped at the masks left, so a prompt token or a revealed one is never written
  over (the official SDAR script's ``topk`` can pick them when a block holds the prompt's tail
  and ``k_s`` exceeds its masks; docs/guide.md);
- greedy, as the official decoders at temperature 0 are read (SGLang, diffusers): the argmax,
  with the softmax probability of the argmax as confidence, in the dtype of the model's logits
  (SDAR's head returns the model's dtype; LLaDA2's casts to float32, and takes the argmax of
  the probabilities);
- sampled (temperature > 0, or top-k / top-p), as both official decoders sample: the logits
  divided by the temperature, top-k then top-p filtered (to -inf), one multinomial draw per
  row of the whole block from the request's generator, and the confidence is the drawn
  token's filtered probability; an unseeded request's rows are filtered the same way, row by
  row with their own parameters, and drawn from the engine's shared stream for every such
  request of a pass at once (Gumbel-max: the same distribution, not the same draws);
- Prophet, block by block: the top-1 minus top-2 logit gap over the block's masks (or the part
  of an explicit answer span inside the block), against the threshold of the block's progress
  ``(step + 1) / steps``. When it fires, every mask of the block takes its argmax and the
  next block starts; the threshold rule still decides how many tokens a step reveals.

A block is done when it has no masks (or its ``steps`` are spent, as LLaDA2's loop ends); a
stop id in the generation then ends the request (both official decoders check after a whole
block), and so does the last block. With ``eos_early_stop`` (LLaDA2) a step that reveals a
stop id ends the request at once if everything before the first stop id is decoded.

The finished block's keys are stored by the next pass (``Request.kv_stored``): a sequence of
its own in the same forward as the next block's queries, written before any sequence reads, so
it is the official store pass (and the prompt's whole blocks the official prefill) in shape
and numbers, without a pass of its own. Every request of a pass is scored in a few batched
device ops and one transfer to the host; each request's reveal is then a few host operations
on its own block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np
import torch

from foretell.decoding.early_commit import DECIDE_MARGIN, reduce_gaps, reported_gap
from foretell.decoding.unmask import filter_logits_by_row, llada_step_count, sample, top2_gap
from foretell.params import PROPHET_COLUMNS, DecodeParams, Prophet
from foretell.scheduler.gather import attribute_array, pick
from foretell.scheduler.request import BLOCK, GLOBAL_STEP, STEP_IN_BLOCK, WRITES, Request

if TYPE_CHECKING:
    from foretell.scheduler.canvas_rows import CanvasRows

_NOTHING = torch.empty(0, dtype=torch.long)


def _span_in_block(policy: Prophet, req: Request, lo: int, hi: int) -> torch.Tensor:
    """The explicit answer span's positions inside ``[lo, hi)``, the generation's only (the
    tail past ``gen_length`` is cut)."""
    start, end = policy.answer_span(req.prompt_len, req.prompt_len + req.params.gen_length)
    return torch.arange(max(start, lo), max(min(end, hi), max(start, lo)))


def samples(req: Request) -> bool:
    """Whether ``req`` samples (else it is greedy)."""
    return _samples(req.params)


def _samples(p: DecodeParams) -> bool:
    return p.temperature > 0 or p.top_k is not None or p.top_p is not None


def block_positions(req: Request) -> torch.Tensor:
    """Canvas positions whose logits this step needs: the block's masks, and an explicit
    Prophet span's positions inside the block; sorted, unique. A sampled step needs the whole
    block: the official decoders draw a token for every row of it."""
    lo, hi = req.block_bounds()
    if samples(req):
        return torch.arange(lo, hi)
    masked = req.masked_positions(lo, hi)
    policy = req.params.early_commit
    if policy is None or policy.answer_start is None:
        return masked
    return torch.unique(torch.cat([masked, _span_in_block(policy, req, lo, hi)]))


def block_rows(
    reqs: Sequence[Request], canvas_rows: CanvasRows
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`block_positions` of every request of a pass at once, from the canvas rows:
    (their positions back to back, each one's count, the first position of each one's query
    sequence (``Request.query_start``), and whether each samples). Per request only an
    explicit Prophet span's part in the block, for a greedy request that has one."""
    view = _BlockView.of(reqs, canvas_rows)
    drawn = view.const[:, _SAMPLES] > 0
    need = np.where(drawn[:, None], view.inside, view.masked)
    need |= view.spans(np.flatnonzero(~drawn))
    who, col = np.nonzero(need)
    query = np.where(view.const[:, _BLOCK_CACHE] > 0, view.lo, 0)
    return view.lo[who] + col, need.sum(axis=1), query, drawn


def score_rows(logits: torch.Tensor, argmax_of_probs: bool) -> torch.Tensor:
    """``[3, rows]`` float64 on the logits' device: each row's greedy token, its softmax
    probability (in the logits' dtype) and its top-1 minus top-2 logit gap, for one
    transfer."""
    probs = logits.softmax(-1)
    x0 = (probs if argmax_of_probs else logits).argmax(-1)
    conf = probs.gather(-1, x0[:, None])[:, 0]
    if logits.shape[-1] > 1:
        gap = top2_gap(logits, logits.argmax(-1) if argmax_of_probs else x0)
    else:
        gap = torch.zeros_like(conf)
    # Float32 confidences and gaps convert to float64 and back exactly.
    return torch.stack([x0.double(), conf.float().double(), gap.float().double()])


def filter_block_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """The logits as both official block decoders filter them before a draw: divided by the
    temperature, then top-k, then top-p, dropped logits at ``-inf``."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = torch.where(logits < kth, float("-inf"), logits)
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        beyond = ordered.softmax(-1).cumsum(-1) > top_p
        beyond[..., 1:] = beyond[..., :-1].clone()
        beyond[..., 0] = False
        drop = torch.zeros_like(beyond).scatter(-1, order, beyond)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_rows(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """:func:`score_rows` for a seeded sampled step, on the host: the drawn tokens (one
    multinomial draw a row from the request's own generator, as the official decoders draw),
    their filtered probabilities and the raw logits' gaps (Prophet reads the logits before
    sampling)."""
    gaps = score_rows(logits, False)[2]
    probs = filter_block_logits(logits, temperature, top_k, top_p).softmax(-1).cpu()
    token = torch.multinomial(probs, 1, generator=generator)
    conf = probs.gather(-1, token)[:, 0]
    return torch.stack([token[:, 0].double(), conf.float().double(), gaps.cpu()])


def sample_shared_rows(
    logits: torch.Tensor,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    generator: torch.Generator,
) -> torch.Tensor:
    """:func:`sample_rows` for the rows of unseeded requests, each row with its own
    parameters (float64 ``temperature``, 0: none; int64 ``top_k``, 0: none; float64 ``top_p``,
    >= 1: none), in a fixed number of ops on the logits' device: each row is filtered exactly
    as :func:`filter_block_logits` filters it alone, and every row's token is drawn from the
    engine's shared ``generator`` by one ``[rows, vocab]`` uniform draw (Gumbel-max: a draw
    from the same distribution as the multinomial's, not the same draw). A row with a NaN
    logit draws no token: -1."""
    gaps = score_rows(logits, False)[2]
    filtered = filter_logits_by_row(
        logits, temperature, top_p, top_k, top_k_first=True, fill=float("-inf")
    )
    noise = torch.rand(
        filtered.shape, generator=generator, dtype=torch.float64, device=filtered.device
    )
    token = sample(filtered, 1.0, None, noise)  # the rows are divided by their temperature
    conf = filtered.softmax(-1).gather(-1, token[:, None])[:, 0]
    # A row with a NaN logit has no distribution to draw from (the official decoders'
    # multinomial refuses it): its token is -1, which fails its request (the runner).
    token = token.masked_fill(logits.isnan().any(-1), -1)
    return torch.stack([token.double(), conf.float().double(), gaps])


def advance_block(
    req: Request, positions: torch.Tensor, scores: torch.Tensor, gap: float | None = None
) -> None:
    """Apply one step to ``req`` given its rows' host ``scores`` (:func:`score_rows`'s, the
    rows of ``positions``). ``gap``: Prophet's reported gap when the batch's plan measured it
    and its test did not fire (a request ranked alone after a tie, :func:`advance_blocks`; NaN:
    no rows measured), so that it is not measured again."""
    p = req.params
    req.global_step += 1
    req.revealed_last_step = _NOTHING
    lo, hi = req.block_bounds()
    # This pass stored the keys of every position before the block.
    req.kv_stored = lo
    x0 = scores[0].long()
    conf = scores[1].float()
    masked = req.masked_positions(lo, hi)
    rows = torch.searchsorted(positions, masked)
    policy = p.early_commit
    fires = policy is not None and len(masked) > 0
    if fires and gap is not None:
        req.last_gap = gap  # the plan's (NaN: none); its test did not fire
    elif fires and _prophet_fires(req, policy, positions, scores[2].float(), lo, hi):
        _write(req, masked, x0[rows])
        req.commit_step = req.global_step  # the step of the latest block committed
        _block_done(req)
        return
    count = min(llada_step_count(p.block_length, p.steps, req.step_in_block), len(masked))
    row_conf = torch.full((hi - lo,), float("-inf"))
    row_conf[masked - lo] = conf[rows]
    chosen = None
    if p.remasking == "confidence_threshold":
        high = row_conf > p.threshold
        if int(high.sum()) >= count:
            chosen = high.nonzero().flatten()
    if chosen is None:
        chosen = row_conf.topk(count).indices
    at = torch.searchsorted(masked, chosen.sort().values + lo)
    _write(req, masked[at], x0[rows[at]])
    if p.eos_early_stop and _early_eos(req, x0[rows[at]]):
        return
    req.step_in_block += 1
    if req.step_in_block >= p.steps or not req.masked_count(lo, hi):
        _block_done(req)


def _prophet_fires(
    req: Request, policy: Prophet, positions: torch.Tensor, gaps: torch.Tensor, lo: int, hi: int
) -> bool:
    if policy.answer_start is None:
        region = req.masked_positions(lo, hi)
    else:
        region = _span_in_block(policy, req, lo, hi)
    region_gaps = gaps[torch.searchsorted(positions, region)]
    req.last_gap = reported_gap(region_gaps, policy.statistic)
    gap = reduce_gaps(region_gaps, policy.statistic)  # the reference's reduction decides
    if gap is None:
        return False
    return gap >= policy.threshold(req.step_in_block + 1, req.params.steps)


def _write(req: Request, positions: torch.Tensor, tokens: torch.Tensor) -> None:
    req.write(positions, tokens)
    req.revealed_last_step = positions


def _early_eos(req: Request, revealed: torch.Tensor) -> bool:
    """LLaDA2's ``eos_early_stop``: a stop id revealed, and every position of the generation
    before the first stop id decoded."""
    stops = torch.tensor(req.stop_ids, dtype=torch.long)
    if not bool(torch.isin(revealed, stops).any()):
        return False
    gen = req.canvas[req.prompt_len : req.prompt_len + req.params.gen_length]
    hits = torch.isin(gen, stops).nonzero()
    if not len(hits):  # revealed only in the tail past gen_length, which is cut
        return False
    first = int(hits[0])
    if bool((gen[:first] == req.mask_token_id).any()):
        return False
    req.finish("stop")
    return True


def _block_done(req: Request) -> None:
    """The block is finished: stop at a stop id, after the last block, or move on (the next
    pass stores this block's keys)."""
    stops = req.stop_ids
    _, hi = req.block_bounds()
    end = min(hi, req.prompt_len + req.params.gen_length)  # the tail past gen_length is cut
    if stops and bool(torch.isin(req.canvas[req.prompt_len : end], torch.tensor(stops)).any()):
        req.finish("stop")
        return
    req.block += 1
    req.step_in_block = 0
    if req.block * req.params.block_length >= req.canvas_len:
        req.finish("steps")


# Columns of :func:`block_constants`: a block-causal request's fixed numbers, which its canvas
# row keeps (``CanvasRows.block_constants``, computed once per params object).
(
    _BLOCK_LEN,
    _STEPS,
    _THRESHOLD_RULE,
    _THRESHOLD,
    _EOS_STOP,
    _HAS_POLICY,
    _SAMPLES,
    _BLOCK_CACHE,
    _EXPLICIT_SPAN,
) = range(9)
_POLICY = 9  # Prophet's columns (``Prophet.columns``) from here
BLOCK_CONSTANTS = _POLICY + PROPHET_COLUMNS  # how many


def block_constants(req: Request) -> tuple[float, ...]:
    """A block-causal request's fixed numbers, as the batched block step reads them: one row
    of a pass's table (see the column names above)."""
    return _constants(req.params)


def _constants(params: DecodeParams) -> tuple[float, ...]:
    policy = params.early_commit
    columns = policy.columns() if policy is not None else (np.nan,) * PROPHET_COLUMNS
    return (
        params.block_length,
        params.steps,
        float(params.remasking == "confidence_threshold"),
        params.threshold if params.threshold is not None else np.nan,
        float(bool(params.eos_early_stop)),
        float(policy is not None),
        float(_samples(params)),
        float(bool(params.block_cache)),
        float(policy is not None and policy.answer_start is not None),
        *columns,
    )


@dataclass
class _BlockView:
    """The current blocks of a pass's block-causal requests, as ``[requests, width]`` arrays
    over their canvas rows (``width``: the longest block; ``inside`` marks each one's own)."""

    reqs: Sequence[Request]
    const: np.ndarray  # each request's :func:`block_constants` row
    row: np.ndarray  # its canvas row
    lo: np.ndarray  # its block's first canvas position (blocks are aligned at position 0)
    block_len: np.ndarray
    inside: np.ndarray
    masked: np.ndarray  # the block's columns that hold the mask token

    @classmethod
    def of(cls, reqs: Sequence[Request], canvas_rows: CanvasRows) -> _BlockView:
        row = attribute_array(reqs, "canvas_row", np.int64)
        const = canvas_rows.block_constants[row]  # kept with the rows (``block_constants``)
        block_len = const[:, _BLOCK_LEN].astype(np.int64)
        lo = canvas_rows.cursor[row, BLOCK] * block_len
        inside = np.arange(int(block_len.max())) < block_len[:, None]
        at = np.where(inside, lo[:, None] + np.arange(inside.shape[1]), 0)
        masked = inside & (canvas_rows.tokens[row[:, None], at] == reqs[0].mask_token_id)
        return cls(reqs, const, row, lo, block_len, inside, masked)

    def spans(self, among: np.ndarray) -> np.ndarray:
        """The block columns of an explicit Prophet span (:func:`_span_in_block`), for those
        ``among`` the given requests that have one (the others' rows: none)."""
        flags = np.zeros_like(self.masked)
        for i in among[self.const[among, _EXPLICIT_SPAN] > 0].tolist():
            start, end = int(self.lo[i]), int(self.lo[i] + self.block_len[i])
            span = _span_in_block(self.reqs[i].params.early_commit, self.reqs[i], start, end)
            flags[i, span.numpy() - start] = True
        return flags


def advance_blocks(
    items: Sequence[tuple[Request, torch.Tensor, torch.Tensor]], canvas_rows: CanvasRows
) -> None:
    """:func:`advance_block` for every block-causal request of a pass at once, as array work
    over their canvas rows: the reveal counts, Prophet's gaps and test, the threshold rule's
    picks, the best ``k`` of each block, the writes and the cursors. Per request only what
    happens to one: a mean gap too close to its threshold (settled by the reference's own
    reduction), a tie at its ``k``-th score (the request then takes :func:`advance_block`,
    with the gap the plan measured), a revealed stop id (LLaDA2's early stop), and a finished
    block. If planning fails, nothing has changed and every request
    takes :func:`advance_block` on its own."""
    if not items:
        return
    try:
        plan = _plan_blocks(items, canvas_rows)
    except Exception:  # nothing has changed: each request alone attributes its own error
        for req, positions, scores in items:
            _call(req, advance_block, positions, scores)
        return
    _apply_blocks(items, canvas_rows, plan)


@dataclass
class _BlockPlan:
    row: np.ndarray  # each request's canvas row
    lo: np.ndarray  # its block's first canvas position
    fired: np.ndarray  # Prophet's test fired: every mask of the block is written
    gap: np.ndarray  # the gap it reports (NaN: none measured)
    gap_set: np.ndarray  # whether Prophet measured this step (``last_gap`` is written)
    chosen: np.ndarray  # [requests, width] block columns written this step
    x0: np.ndarray  # [requests, width] the token each column takes
    left: np.ndarray  # masks the block holds after the writes
    steps: np.ndarray  # each request's steps per block
    eos_stop: np.ndarray  # LLaDA2's ``eos_early_stop``
    ties: list[int]  # requests ranked alone (a tie at the cut): ``advance_block`` steps them


def _plan_blocks(items, canvas_rows: CanvasRows) -> _BlockPlan:
    reqs = [item[0] for item in items]
    n = len(reqs)
    view = _BlockView.of(reqs, canvas_rows)
    const, row, lo, block_len, masked = view.const, view.row, view.lo, view.block_len, view.masked
    steps = const[:, _STEPS].astype(np.int64)
    step_in_block = canvas_rows.cursor[row, STEP_IN_BLOCK]
    width = masked.shape[1]
    cols = np.arange(width)
    n_masked = masked.sum(axis=1)
    # Each request's scored rows (its positions) as block columns.
    lens = np.array([len(item[1]) for item in items], dtype=np.int64)
    positions = torch.cat([item[1] for item in items]).numpy()
    scores = torch.cat([item[2] for item in items], dim=1).numpy()
    owner = np.repeat(np.arange(n), lens)
    col = positions - lo[owner]
    x0 = np.zeros((n, width), dtype=np.int64)
    x0[owner, col] = scores[0].astype(np.int64)
    conf = np.full((n, width), -np.inf, dtype=np.float32)
    conf[owner, col] = scores[1].astype(np.float32)
    gaps = np.full((n, width), np.nan, dtype=np.float32)
    gaps[owner, col] = scores[2].astype(np.float32)
    # Prophet: the gap over the block's masks (or an explicit span's part in the block).
    measured = (const[:, _HAS_POLICY] > 0) & (n_masked > 0)
    explicit = const[:, _EXPLICIT_SPAN] > 0
    region = np.where(explicit[:, None], view.spans(np.flatnonzero(measured)), masked)
    in_region = region.sum(axis=1)
    policy_cols = const[:, _POLICY:]
    is_mean = policy_cols[:, PROPHET_COLUMNS - 1] > 0
    ordered = np.where(region, gaps.astype(np.float64), 0.0).cumsum(axis=1)[:, -1]
    mean = ordered / np.maximum(in_region, 1)  # the float64 sum, in order: ``reported_gap``
    least = np.where(region, gaps, np.inf).min(axis=1).astype(np.float64)
    gap = np.where(is_mean, mean, least)
    gap_set = measured.copy()
    has_gap = measured & (in_region > 0)
    gap = np.where(has_gap, gap, np.nan)
    threshold = np.full(n, np.nan)
    if measured.any():
        threshold[measured] = Prophet.thresholds_at(
            policy_cols[measured], step_in_block[measured] + 1, steps[measured]
        )
    fired = has_gap & (gap >= threshold)
    # A mean near its threshold is decided by the reference's own reduction (``reduce_gaps``).
    close = has_gap & is_mean & (np.abs(gap - threshold) <= DECIDE_MARGIN * np.abs(threshold))
    for i in np.flatnonzero(close).tolist():
        values = torch.from_numpy(gaps[i][region[i]])
        fired[i] = reduce_gaps(values, "mean") >= threshold[i]
    # The reveal: the threshold rule's scores above it when there are enough, else the best k.
    count = np.minimum(llada_step_count(block_len, steps, step_in_block), n_masked)
    row_conf = np.where(masked, conf, np.float32(-np.inf))
    threshold_rule = const[:, _THRESHOLD_RULE] > 0
    above = row_conf > const[:, _THRESHOLD].astype(np.float32)[:, None]
    by_threshold = threshold_rule & (above.sum(axis=1) >= count)
    order = np.argsort(-row_conf, axis=1, kind="stable")
    ranked = np.take_along_axis(row_conf, order, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(cols, order.shape), axis=1)
    best = rank < count[:, None]
    # A tie at the cut (the k-th and the next score equal) is ranked as the reference ranks it.
    kth = np.take_along_axis(ranked, np.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    nxt = np.take_along_axis(ranked, np.minimum(count, width - 1)[:, None], axis=1)[:, 0]
    tied = ~fired & ~by_threshold & (count > 0) & (count < block_len) & (kth == nxt)
    # torch's topk ranks NaN above every number, a sort below: such a row is ranked alone.
    tied |= ~fired & ~by_threshold & (count > 0) & np.isnan(row_conf).any(axis=1)
    chosen = np.where(by_threshold[:, None], above, best) & ~fired[:, None]
    chosen |= fired[:, None] & masked
    ties = np.flatnonzero(tied).tolist()
    chosen[ties] = False
    # A revealed token may be the mask token itself: that position stays masked.
    mask_token = reqs[0].mask_token_id
    left = n_masked - (chosen & (x0 != mask_token)).sum(axis=1)
    eos_stop = const[:, _EOS_STOP] > 0
    return _BlockPlan(row, lo, fired, gap, gap_set, chosen, x0, left, steps, eos_stop, ties)


def _apply_blocks(items, canvas_rows: CanvasRows, plan: _BlockPlan) -> None:
    reqs = [item[0] for item in items]
    n = len(reqs)
    tied = np.zeros(n, dtype=bool)
    tied[plan.ties] = True
    mine = ~tied
    row, lo = plan.row[mine], plan.lo[mine]
    cursor = canvas_rows.cursor
    cursor[row, GLOBAL_STEP] += 1
    canvas_rows.revealed[row] = False
    list(map(setattr, pick(reqs, np.flatnonzero(mine)), repeat("kv_stored"), lo.tolist()))
    gap_set = plan.gap_set & mine
    canvas_rows.last_gap[plan.row[gap_set]] = plan.gap[gap_set]
    who, col = np.nonzero(plan.chosen)
    where_ = plan.lo[who] + col
    canvas_rows.tokens[plan.row[who], where_] = plan.x0[who, col]
    canvas_rows.revealed[plan.row[who], where_] = True
    written = np.zeros(n, dtype=bool)
    written[who] = True
    cursor[plan.row[written], WRITES] += 1
    fired = np.flatnonzero(plan.fired & mine)
    for i in fired.tolist():  # committed: the block is done
        req = reqs[i]
        req.commit_step = req.global_step
    moved = mine & ~plan.fired
    stopped = np.zeros(n, dtype=bool)
    eos = np.flatnonzero(moved & written & plan.eos_stop)
    if eos.size:
        stop_ids = np.array(sorted(set().union(*(reqs[i].stop_ids for i in eos.tolist()))))
        hit = np.isin(plan.x0, stop_ids) & plan.chosen
        for i in eos[hit[eos].any(axis=1)].tolist():
            revealed = torch.from_numpy(plan.x0[i][plan.chosen[i]])
            stopped[i] = _call(reqs[i], _early_eos, revealed) or reqs[i].is_finished
    moved &= ~stopped
    cursor[plan.row[moved], STEP_IN_BLOCK] += 1
    done = plan.fired & mine
    done |= moved & ((cursor[plan.row, STEP_IN_BLOCK] >= plan.steps) | (plan.left == 0))
    for i in np.flatnonzero(done).tolist():
        _call(reqs[i], _block_done)
    for i in plan.ties:  # ranked as the reference ranks, alone; Prophet's test as planned
        req, positions, scores = items[i]
        _call(req, advance_block, positions, scores, float(plan.gap[i]))


def _call(req: Request, fn, *args) -> bool:
    """``fn(req, *args)``, a failure ending this request alone."""
    try:
        return bool(fn(req, *args))
    except Exception as err:
        req.finish("error", f"decoding failed: {err!r}")
        return False
