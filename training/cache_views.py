"""Training views of cached decoding, so that the shipped model tolerates a stale KV cache.

With Fast-dLLM's prefix or dual cache (``DecodeParams.kv_cache``) a block's later steps attend
to keys and values computed at the block's first step, when the block and everything after it
were still masks. Large LLaDA models tolerate that; the shipped model, trained on full
recomputation only, lost 19 (prefix) and 87 (dual) points of accuracy with it (Fast-dLLM's own
decoders gave the same tokens; docs/results.md). So training also shows it cached steps.

One view is one cached step written as a single differentiable pass over two copies of a
canvas. The first copy is the canvas at the block's refresh: the blocks before are clean, the
block and everything after it masked (positions in ``keep``, the forced marker, stay). Its rows
attend to each other, as the refresh pass does. The second copy holds the generation some
reveals later inside the block, and its rows attend to exactly what a cached step's rows attend
to: the refresh copy's keys and values where the cache is kept, the second copy's where the step
recomputes (``[block_start, end)`` for prefix, the block for dual). Its rows outside the
recomputed span are dual's read-only rows (Prophet's answer region): nothing attends to them.
Training scores the second copy's masked rows; the first copy's are marked too (its targets
are the same), but a refresh is a plain full pass, which plain training already teaches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

# Block lengths a view is drawn from (uniformly) unless told otherwise.
VIEW_BLOCK_LENGTHS = (4, 8, 16, 32)


class CacheViews(NamedTuple):
    """A batch of views: the model's inputs, the rows to score, and the step each stands for."""

    ids: torch.Tensor  # [B, S + G]: refresh canvas, then the step's generation
    positions: torch.Tensor  # [B, S + G] canvas positions (the step copy repeats the generation's)
    allowed: torch.Tensor  # [B, S + G, S + G] keys each row attends to
    masked: torch.Tensor  # [B, S + G] masked tokens of either copy (training scores the step's)
    dual: torch.Tensor  # [B] dual cache (else prefix)
    block_start: torch.Tensor  # [B] the step's block, as generation indices
    block_end: torch.Tensor


def cache_view_batch(
    ids: torch.Tensor,
    attention: torch.Tensor,
    is_gen: torch.Tensor,
    keep: torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
    dual_fraction: float = 0.5,
    block_lengths: tuple[int, ...] = VIEW_BLOCK_LENGTHS,
    uncertainty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    certain_first: float = 0.0,
) -> CacheViews:
    """Views of clean canvases (``ids`` ``[B, S]``, left-padded, generation last, as
    ``make_batch`` builds them) for :meth:`DiffusionLM.forward`.

    ``keep`` ``[B, S]`` marks generation positions never masked (forced by constraints when
    decoding). The targets of the ``masked`` rows are ``torch.cat([ids, ids[:, -G:]], 1)``.
    A block's revealed positions are a random subset of a uniform size. ``dual_fraction`` of
    the views are dual-cache steps, the rest prefix; each view's block length is drawn
    uniformly from ``block_lengths`` (each must divide G) and its block uniformly among them,
    or with ``uncertainty`` (canvases ``[N, S]`` and their attention masks to each generation
    position's uncertainty, ``[N, G]``, e.g. the model's entropy) in proportion to the
    uncertainty of its masks at its refresh: a block of spaces or EOS teaches a cache nothing,
    a block whose tokens are still being chosen is where a stale cache changes the choice.
    ``certain_first`` of the views (which needs ``uncertainty``) reveal the positions the model
    was surest of at the refresh (least uncertain first) instead of random ones: about the
    order low-confidence remasking reveals in, so these are the states a cached step actually
    meets (all of a block's spaces and one letter revealed is 1 view in 75 when positions are
    random).
    """
    b, s = ids.shape
    g = int(is_gen[0].sum())
    if not bool((is_gen.sum(1) == g).all()) or not bool(is_gen[:, s - g :].all()):
        raise ValueError("is_gen: every row's generation must be its last G positions")
    if not block_lengths or any(n <= 0 or g % n for n in block_lengths):
        raise ValueError(f"block_lengths: each of {block_lengths} must divide {g}")
    if not 0.0 <= certain_first <= 1.0:
        raise ValueError(f"certain_first: {certain_first} is not a fraction in [0, 1]")
    if certain_first > 0 and uncertainty is None:
        raise ValueError("certain_first: needs uncertainty (what the model is sure of)")
    lengths = torch.tensor(block_lengths)
    block_len = lengths[torch.randint(len(lengths), (b,), generator=generator)]  # [B]
    blocks = g // block_len
    # Drawn even when ``uncertainty`` then chooses: one seed gives one random stream either way
    # (the shipped checkpoint's training command relies on it to reproduce).
    block_start = (torch.rand(b, generator=generator) * blocks).long() * block_len  # gen index
    gen_index = torch.arange(g)
    maskable = ~keep[:, s - g :]  # [B, G]
    position_uncertainty = None
    if uncertainty is not None:
        block_start, position_uncertainty = _uncertain_blocks(
            ids, attention, maskable, block_len, mask_id, generator, uncertainty
        )
    block_end = block_start + block_len
    dual = torch.rand(b, generator=generator) < dual_fraction

    at_or_after = gen_index[None, :] >= block_start[:, None]
    in_block = at_or_after & (gen_index[None, :] < block_end[:, None])
    refresh_masked = at_or_after & maskable
    gen_ids = ids[:, s - g :]
    refresh = ids.clone()
    refresh[:, s - g :] = gen_ids.masked_fill(refresh_masked, mask_id)

    # Reveal a uniform number (0 .. n-1) of the block's n maskable positions: at random, or
    # (certain_first) the surest at the refresh first, random order breaking ties.
    n = (in_block & maskable).sum(1)
    revealed_count = (torch.rand(b, generator=generator) * n).long()
    order = torch.rand(b, g, generator=generator)
    if certain_first > 0:
        assert position_uncertainty is not None
        by_certainty = torch.rand(b, generator=generator) < certain_first
        surest = position_uncertainty.float() + 1e-6 * order
        order = torch.where(by_certainty[:, None], surest, order)
    order = order.masked_fill(~(in_block & maskable), float("inf"))
    rank = order.argsort(dim=1).argsort(dim=1)
    revealed = rank < revealed_count[:, None]
    step_masked = refresh_masked & ~revealed

    step = gen_ids.masked_fill(step_masked, mask_id)
    view_ids = torch.cat([refresh, step], 1)

    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    positions = torch.cat([positions, positions[:, s - g :]], 1)

    # Which canvas positions a cached step recomputes (fresh): prefix [start, G), dual the block.
    fresh = torch.where(dual[:, None], in_block, at_or_after)  # [B, G] over generation indices
    real = attention.bool()  # [B, S]
    cached_key = real.clone()
    cached_key[:, s - g :] &= ~fresh
    allowed = torch.zeros(b, s + g, s + g, dtype=torch.bool)
    allowed[:, :s, :s] = real[:, None, :]
    allowed[:, s:, :s] = cached_key[:, None, :]
    allowed[:, s:, s:] = fresh[:, None, :]
    masked = torch.cat([torch.zeros(b, s - g, dtype=torch.bool), refresh_masked, step_masked], 1)
    return CacheViews(view_ids, positions, allowed, masked, dual, block_start, block_end)


def _uncertain_blocks(
    ids: torch.Tensor,
    attention: torch.Tensor,
    maskable: torch.Tensor,
    block_len: torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
    uncertainty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's block start (a generation index), drawn in proportion to the uncertainty of
    its maskable positions on the block's refresh canvas (all candidates in one call), and the
    uncertainty of each generation position on the chosen block's refresh canvas ``[B, G]``."""
    s, g = ids.shape[1], maskable.shape[1]
    rows = torch.cat([torch.full((g // int(n),), r) for r, n in enumerate(block_len.tolist())])
    starts = torch.cat([torch.arange(0, g, int(n)) for n in block_len.tolist()])
    gen_index = torch.arange(g)[None, :]
    masked = (gen_index >= starts[:, None]) & maskable[rows]
    canvases = ids[rows].clone()
    canvases[:, s - g :] = canvases[:, s - g :].masked_fill(masked, mask_id)
    in_block = masked & (gen_index < (starts + block_len[rows])[:, None])
    per_position = uncertainty(canvases, attention[rows]).float()
    score = (per_position * in_block).sum(1).clamp(min=0)
    score = score + 1e-3  # a block of certain tokens is still drawn now and then
    chosen = torch.empty(len(block_len), dtype=torch.long)
    chosen_uncertainty = torch.empty(len(block_len), g)
    for r in range(len(block_len)):
        candidates = (rows == r).nonzero().flatten()
        pick = candidates[torch.multinomial(score[candidates], 1, generator=generator)]
        chosen[r] = starts[pick]
        chosen_uncertainty[r] = per_position[pick]
    return chosen, chosen_uncertainty


__all__ = ["VIEW_BLOCK_LENGTHS", "CacheViews", "cache_view_batch"]
