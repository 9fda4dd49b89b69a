"""One denoising step of one request, given the logits the runner gathered for it.

The runner asks ``positions_needed`` which canvas positions each request wants logits for,
runs the model once for the whole batch, and hands each request its rows; ``advance`` then
applies the early-commit test and the reveal rule and moves the request's cursor. This is the
general path (any family, rule, sampling, cfg); it is the reference the batched step of
:mod:`foretell.decoding.batched` equals, and steps the few requests that step does not take.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from foretell.decoding.early_commit import (
    answer_region,
    reduce_gaps,
    reported_gap,
    row_gaps,
    should_commit,
)
from foretell.decoding.unmask import (
    RowStats,
    above_threshold,
    candidates,
    choose,
    confidence_dtype,
    dream_transfer_count,
    greedy_llada,
    llada_step_count,
    ranked_threshold,
)
from foretell.scheduler.request import Request

# more_logits(positions) -> aligned logits at those canvas positions (after cfg): for the rare
# rows not gathered up front (a commit that fills masks outside the current block).
MoreLogits = Callable[[torch.Tensor], torch.Tensor]


_NOTHING = torch.empty(0, dtype=torch.long)


def _decoding_window(req: Request) -> torch.Tensor:
    """Masked positions the reveal rule may touch this step (:func:`window_np`)."""
    return torch.from_numpy(window_np(req))


def window_np(req: Request) -> np.ndarray:
    """Masked positions the reveal rule may touch this step, as a host array.

    Up to the end of the current block, not just within it: a position whose prediction was
    the mask token itself stays masked and, as in LLaDA's reference, remains a candidate while
    later blocks decode. A cached step (Fast-dLLM) only sees its own block's masks.
    """
    start, end = req.block_bounds()
    if req.family == "dream" and req.params.kv_cache is not None and not req.cached_step:
        return req.masked_np(start, start + 1)  # Fast-dLLM: the block's first position
    return req.masked_np(start if req.cached_step else req.prompt_len, end)


def positions_needed(req: Request) -> torch.Tensor:
    """Canvas positions whose logits this step needs, sorted and unique."""
    return torch.from_numpy(needed_np(req))


def needed_np(req: Request) -> np.ndarray:
    """:func:`positions_needed` as a host array (packing reads it with no tensor op)."""
    window = window_np(req)
    policy = req.params.early_commit
    if policy is None:
        return window
    span = policy.answer_span(req.prompt_len, req.canvas_len)
    if span is None:
        # The region is every generated mask: the window is inside it, and a commit needs
        # every mask anyway.
        return req.masked_np(req.prompt_len)
    start, end = span
    if end <= start:
        return window
    # The span is contiguous: keep the window's positions before and after it.
    lo, hi = np.searchsorted(window, (start, end))
    return np.concatenate([window[:lo], np.arange(start, end), window[hi:]])


def _rows(positions: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Indices into the sorted ``positions`` of each ``wanted`` position."""
    return torch.searchsorted(positions, wanted)


def advance(
    req: Request,
    positions: torch.Tensor,
    logits: torch.Tensor,
    more_logits: MoreLogits,
    stats: RowStats | None = None,
) -> None:
    """Apply one step to ``req`` (its forward pass has run): commit early, or reveal.

    ``stats``, when the runner computed them for the whole pass, are ``logits``' greedy
    statistics; they give the same result as ``logits`` and save per-request work.
    """
    p = req.params
    req.global_step += 1
    req.revealed_last_step = _NOTHING  # until this step reveals something
    dream_cached = req.family == "dream" and p.kv_cache is not None
    if (
        req.uses_blocks
        and not dream_cached
        and req.step_in_block == 0
        and p.remasking != "confidence_threshold"
    ):
        start, end = req.block_bounds()
        req.block_masks_at_start = req.masked_count(start, end)
    if p.early_commit is not None and _try_commit(req, positions, logits, more_logits, stats):
        return
    window_stats = None
    if p.early_commit is None:  # positions_needed gave exactly the window
        window, window_logits = positions, logits
        window_stats = stats
    else:
        window = _decoding_window(req)
        rows = _rows(positions, window)
        window_logits = logits[rows]
        window_stats = None if stats is None else stats.take(rows)
    if dream_cached:
        _reveal_dream_cached(req, window, window_logits)
    elif req.uses_blocks:
        _reveal_llada(req, window, window_logits, window_stats)
    else:
        _reveal_dream(req, window, window_logits)
    # The references write the constraints again after every reveal; that is a no-op here (a
    # constrained position is never masked, so never revealed), and is skipped.


def _try_commit(
    req: Request,
    positions: torch.Tensor,
    logits: torch.Tensor,
    more_logits: MoreLogits,
    stats: RowStats | None,
) -> bool:
    policy = req.params.early_commit
    masked = req.masked_positions(req.prompt_len)
    region = answer_region(policy, req.prompt_len, req.canvas_len, masked)
    rows = _rows(positions, region)
    gaps = row_gaps(logits[rows]) if stats is None else stats.gap[rows]
    # Reported as the batched step reports it; decided by the reference's own reduction.
    req.last_gap = reported_gap(gaps, policy.statistic)
    decisive = reduce_gaps(gaps, policy.statistic)
    if not should_commit(policy, decisive, req.global_step, req.params.steps):
        return False
    # Every remaining mask, in every block, takes this step's prediction.
    have = torch.isin(masked, positions)
    fill_logits = torch.empty(
        len(masked), logits.shape[-1], dtype=logits.dtype, device=logits.device
    )
    fill_logits[have.to(logits.device)] = logits[_rows(positions, masked[have])]
    if not bool(have.all()):
        fill_logits[(~have).to(logits.device)] = more_logits(masked[~have])
    x0, _ = request_candidates(req, fill_logits, "random")
    req.write(masked, x0)
    req.revealed_last_step = masked
    mark_committed(req)
    return True


def mark_committed(req: Request) -> None:
    """End ``req`` by early commit at this step (its canvas is already filled)."""
    req.commit_step = req.global_step
    req.finish("early_commit")


def move_block_cursor(req: Request) -> None:
    """After a LLaDA reveal: the next step of the block, or the next block; done after the
    last one."""
    req.step_in_block += 1
    if req.step_in_block == req.params.steps_per_block:
        req.block += 1
        req.step_in_block = 0
        if req.block == req.params.num_blocks:
            req.finish("steps")


def request_candidates(req: Request, logits: torch.Tensor, rule: str):
    """Proposed tokens and their scores, brought to the host (the canvas lives there): one
    request's ``[rows]`` ids and scores cross, never its logits."""
    p = req.params
    x0, scores = candidates(
        logits,
        family=req.family,
        rule=rule,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        generator=req.generator,
        prob_dtype=confidence_dtype(p, req.family, logits.dtype),
        suppressed=req.confidence_suppress,
    )
    return x0.cpu(), (None if scores is None else scores.cpu())


def _reveal(req: Request, window: torch.Tensor, x0: torch.Tensor, chosen: torch.Tensor) -> None:
    """Write ``x0[chosen]`` at ``window[chosen]``; revealed positions are kept in canvas order
    (the batched step's order), whatever order the ranking picked them in."""
    chosen = chosen.sort().values
    req.write(window[chosen], x0[chosen])
    req.revealed_last_step = window[chosen]


def _reveal_llada(
    req: Request, window: torch.Tensor, logits: torch.Tensor, stats: RowStats | None
) -> None:
    p = req.params
    if stats is not None and greedy_llada(req.family, p.remasking, p.temperature, p.top_p, p.top_k):
        x0 = stats.argmax.cpu()
        # In the request's own confidence dtype: the pass's statistics may be wider for
        # another request, and a request must rank (and meet its threshold) as it does alone.
        own = req.confidence_dtype or logits.dtype
        scores = None if p.remasking == "random" else stats.prob.cpu().to(own)
    else:
        x0, scores = request_candidates(req, logits, p.remasking)
    lo, hi = req.query_span()
    if p.remasking == "confidence_threshold":
        stalled = True
        if window.numel():
            # Fast-dLLM's get_transfer_index over the computed row (the canvas, or a cached
            # step's span), in its uncached ``generate`` as in its cached decoders.
            chosen = ranked_threshold(scores, p.threshold, window - lo, hi - lo)
            _reveal(req, window, x0, chosen)
            stalled = bool((x0[chosen] == req.mask_token_id).all())
        move_cursor(req, stalled, revealed=bool(window.numel()))
        return
    # The references rank (and draw random scores over) the rows the step computed: the canvas,
    # or a cached step's span.
    if p.remasking == "random":
        # The reference draws one uniform per computed position every step.
        scores = torch.rand(hi - lo, generator=req.generator)[window - lo]
    count = llada_step_count(req.block_masks_at_start, p.steps_per_block, req.step_in_block)
    _reveal(req, window, x0, choose(scores, count, None, req.generator, window - lo, hi - lo))
    move_cursor(req)


def move_cursor(
    req: Request,
    stalled: bool = False,
    revealed: bool = False,
    block_masks: int | None = None,
    masks: int | None = None,
) -> None:
    """After a step's reveal (both the per-request and the batched step): Dream's grid of
    steps over the whole generation (its threshold rule: until no mask is left, or a step
    stalls for good), Fast-dLLM's
    cached block loop, threshold decoding's next non-empty block, or LLaDA's block schedule.
    ``stalled``: a threshold step revealed only the mask token itself; ``revealed``: it
    revealed something. ``block_masks`` and ``masks``, when the caller has counted them: the
    masks left in the current block and in the whole generation (the batched step counts
    every request's at once; otherwise they are counted on the canvas)."""
    p = req.params
    if not req.uses_blocks:
        if p.remasking == "confidence_threshold":
            # Its one grid spans the whole generation, so a stall ends it with its masks left,
            # as a stalled block moves on to the next one, where the stall would repeat:
            # greedy candidates repeat it every later step (Fast-dLLM's loop would never
            # end); drawn ones may not, so they draw again until the step budget is spent.
            left = req.masked_count(req.prompt_len) if masks is None else masks
            final = p.temperature == 0 or req.global_step >= p.steps
            if left == 0 or (stalled and revealed and final):
                req.finish("steps")
        elif req.global_step == p.steps:
            req.finish("steps")
    elif p.kv_cache is not None:
        move_cached_cursor(req, stalled, block_masks)
    elif p.remasking == "confidence_threshold":
        if stalled and revealed:
            # Every reveal was the mask token itself: each later step would be the same
            # (Fast-dLLM would loop forever), so the next block starts.
            req.block += 1
            block_masks = None
        next_nonempty_block(req, block_masks)
    else:
        move_block_cursor(req)


def cursor_stays(
    step_in_block: np.ndarray,
    global_step: np.ndarray,
    steps: np.ndarray,
    steps_per_block: np.ndarray,
    uses_blocks: np.ndarray,
    cached: np.ndarray,
    threshold: np.ndarray,
    stalled: np.ndarray,
    revealed: np.ndarray,
    block_masks: np.ndarray,
    masks: np.ndarray,
    drawn: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`move_cursor` for a whole batch, where it stays in the block (most steps): which
    requests' cursors stay, and which of those take the block's next step. Only a request
    that leaves its block or finishes needs the rule itself, so the batched step runs no
    per-request Python for the cursor in most steps. Arrays per request: the cursor before
    the move (``global_step`` after the step's increment), the params' step budgets, the
    kind (blocks, KV cache, threshold rule, whether its candidates are ``drawn``:
    temperature > 0), and the step's outcome as ``move_cursor`` takes it (``masks``:
    meaningful where the pass held the whole canvas)."""
    # Dream's grid over the whole generation (its threshold rule: until no mask is left, or
    # a step stalls that would repeat: greedy, or drawn past the step budget).
    final_stall = stalled & revealed & (~drawn | (global_step >= steps))
    whole_grid = np.where(threshold, (masks > 0) & ~final_stall, global_step != steps)
    # Fast-dLLM's cached block loop: on until the block empties, its schedule is spent, or a
    # cached threshold step stalls.
    in_cache = step_in_block > 0
    ends = (in_cache & (block_masks == 0)) | (~threshold & (step_in_block + 1 >= steps_per_block))
    cached_loop = ~(ends | (in_cache & stalled))
    # Threshold decoding: on in the block while it has masks and the step did not stall.
    on_threshold = ~(stalled & revealed) & (block_masks > 0)
    # LLaDA's schedule: the block's next step.
    scheduled = step_in_block + 1 < steps_per_block
    # (``np.select`` of the four, as nested ``where``: no Python-level NumPy call)
    stays = np.where(
        ~uses_blocks,
        whole_grid,
        np.where(cached, cached_loop, np.where(threshold, on_threshold, scheduled)),
    )
    return stays, uses_blocks & (cached | ~threshold)


def move_cached_cursor(req: Request, stalled: bool = False, block_masks: int | None = None) -> None:
    """Fast-dLLM's block loop: the refresh step is always followed by cached steps until the
    block has no masks.

    Where the reference would fail or never end, because a revealed token was the mask token
    itself, decoding moves on to the next block (whose refresh step sees the masks left): when
    the step schedule (``steps_per_block`` entries) runs out with masks left, or when a cached
    threshold step changed nothing (``stalled``), as every later step would then be the same.
    ``block_masks``: the masks left in the block, when the caller has counted them.
    """
    p = req.params
    cached = req.step_in_block > 0
    if cached and block_masks is None:
        block_masks = req.masked_count(*req.block_bounds())
    emptied = cached and block_masks == 0
    spent = p.remasking != "confidence_threshold" and req.step_in_block + 1 >= p.steps_per_block
    if not (emptied or spent or (cached and stalled)):
        req.step_in_block += 1
        return
    req.block += 1
    req.step_in_block = 0
    if req.block == p.num_blocks:
        req.finish("steps")


def next_nonempty_block(req: Request, block_masks: int | None = None) -> None:
    """Threshold decoding moves on once a block has no masks left (``block_masks``: the
    current block's, when the caller has counted them)."""
    while req.block < req.params.num_blocks:
        if block_masks is None:
            block_masks = req.masked_count(*req.block_bounds())
        if block_masks:
            return
        req.block += 1
        block_masks = None
    req.finish("steps")


def _reveal_dream_cached(req: Request, window: torch.Tensor, logits: torch.Tensor) -> None:
    """Fast-dLLM's cached Dream block step (``generation_utils_block.py``).

    The refresh step reveals the block's first position; later steps reveal by the threshold
    rule, or the top negative entropies, as many as Dream's ``eps`` schedule over the block's
    steps gives (all the remaining masks at the block's last step)."""
    p = req.params
    stalled = True
    if not req.cached_step:
        if window.numel():
            x0, _ = request_candidates(req, logits, "random")
            _reveal(req, window, x0, torch.arange(window.numel()))
            stalled = bool((x0 == req.mask_token_id).all())
    elif p.remasking == "confidence_threshold":
        if window.numel():
            x0, scores = request_candidates(req, logits, p.remasking)
            lo, hi = req.query_span()
            chosen = ranked_threshold(scores, p.threshold, window - lo, hi - lo)
            _reveal(req, window, x0, chosen)
            stalled = bool((x0[chosen] == req.mask_token_id).all())
    else:
        stalled = False  # the schedule bounds the block
        x0, scores = request_candidates(req, logits, "entropy")
        step = req.step_in_block
        count = dream_transfer_count(int(window.numel()), step, p.steps_per_block, req.timesteps)
        lo, hi = req.query_span()
        chosen = choose(scores, count, None, req.generator, window - lo, hi - lo)
        _reveal(req, window, x0, chosen)
    move_cursor(req, stalled)


def _reveal_dream(req: Request, window: torch.Tensor, logits: torch.Tensor) -> None:
    p = req.params
    step = req.global_step - 1
    stalled = revealed = False  # the threshold rule's outcome (``move_cursor``)
    if p.remasking == "origin":
        t, s = req.timesteps[step], req.timesteps[step + 1]
        p_transfer = 1 - s / t if step < p.steps - 1 else 1
        transfer = torch.rand(window.shape[0], generator=req.generator) < p_transfer
        x0, _ = request_candidates(req, logits[transfer], "origin")
        _reveal(req, window[transfer], x0, torch.arange(x0.shape[0]))
    elif p.remasking == "confidence_threshold":
        x0, scores = request_candidates(req, logits, p.remasking)
        if window.numel():
            chosen = above_threshold(scores, p.threshold)
            _reveal(req, window, x0, chosen)
            stalled, revealed = bool((x0[chosen] == req.mask_token_id).all()), True
    else:
        x0, scores = request_candidates(req, logits, p.remasking)
        if p.remasking == "random":
            scores = torch.rand(window.shape[0], generator=req.generator)
        count = dream_transfer_count(int(window.numel()), step, p.steps, req.timesteps)
        chosen = choose(scores, count, p.alg_temp, req.generator, window, req.canvas_len)
        _reveal(req, window, x0, chosen)
    move_cursor(req, stalled, revealed)
