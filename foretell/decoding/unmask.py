"""Which masked tokens to reveal at a step, and with what: LLaDA's and Dream's rules exactly.

Everything here works on the logits the runner gathered for one request (rows = positions,
already aligned to the position they predict), never on the full ``[canvas, vocab]`` matrix.
Random draws come from the request's own generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def confidence_dtype(params: object, family: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the softmax that scores candidates, following the reference of the decoding
    in use: the model's dtype for LLaDA's rules and Prophet (LLaDA's ``generate.py`` since
    2025-06-02, Prophet's ``generate_earlyexit.py``) and for Dream (``sample_tokens``); float64
    where Fast-dLLM's rules are matched (``remasking="confidence_threshold"``, or a KV cache
    mode) for the LLaDA family. ``params.confidence_dtype`` overrides."""
    chosen = getattr(params, "confidence_dtype", None)
    if chosen == "float64":
        return torch.float64
    if chosen == "model":
        return model_dtype
    fast_dllm = (
        getattr(params, "remasking", None) == "confidence_threshold"
        or getattr(params, "kv_cache", None) is not None
    )
    return torch.float64 if fast_dllm and family != "dream" else model_dtype


def suppress(logits: torch.Tensor, token_ids: tuple[int, ...]) -> torch.Tensor:
    """``logits`` with the columns ``token_ids`` set to ``-inf`` (a copy; the input as is when
    there is nothing to suppress)."""
    if not token_ids:
        return logits
    out = logits.clone()
    out[:, list(token_ids)] = float("-inf")
    return out


def suppress_cells(
    logits: torch.Tensor, cells: list[tuple[int, int, int]], *, inplace: bool = False
) -> torch.Tensor:
    """``logits`` with ``-inf`` at each ``(first row, end row, token)`` cell, in one indexed
    write for all of them (a copy, or ``logits`` itself with ``inplace``)."""
    if not cells:
        return logits
    row_idx = torch.cat([torch.arange(a, b) for a, b, _ in cells]).to(logits.device)
    col_idx = torch.cat([torch.full((b - a,), t) for a, b, t in cells]).to(logits.device)
    value = logits.new_full((), float("-inf"))
    if inplace:
        return logits.index_put_((row_idx, col_idx), value)
    return logits.index_put((row_idx, col_idx), value)


def guided(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance of rows stacked as ``[conditional; unconditional]``:
    ``un + (scale + 1) * (cond - un)``, as LLaDA's reference (the logits as they are when
    ``cfg_scale`` is 0)."""
    if cfg_scale <= 0:
        return logits
    cond, un = logits.chunk(2)
    return un + (cfg_scale + 1) * (cond - un)


def confidence_probs(
    logits: torch.Tensor, dtype: torch.dtype, suppressed: tuple[int, ...] = ()
) -> torch.Tensor:
    """LLaDA's low-confidence probabilities: the softmax, in ``dtype``, of the logits with the
    ``suppressed`` columns at ``-inf`` (``confidence_eos_eot_inf``)."""
    return F.softmax(suppress(logits, suppressed).to(dtype), dim=-1)


@dataclass(frozen=True)
class ProbVariant:
    """Rows of a pass whose score differs from the default (the greedy token's probability in
    the model's dtype, nothing suppressed): another softmax dtype, suppressed columns, or
    another rule's score (``margin``, ``entropy``: see :func:`confidence`)."""

    rows: torch.Tensor  # indices into the gathered rows (unique, int64), on their device
    dtype: torch.dtype
    suppressed: tuple[int, ...] = ()
    rule: str = "low_confidence"


@dataclass(frozen=True)
class RowStats:
    """Greedy statistics of logits rows, computed once for a whole forward pass.

    Greedy LLaDA decoding and Prophet's gap need only these per row; computing them in a few
    batched ops instead of a few ops per request keeps the engine's per-step overhead small.
    Row ``i`` equals what :func:`candidates` (greedy, no filtering) and the gap of
    :func:`foretell.decoding.early_commit.row_gaps` compute from that row alone. They stay on
    the logits' device.
    """

    argmax: torch.Tensor  # [rows] the greedy token
    # [rows] softmax probability of the greedy token, or a variant's score (see ``of``)
    prob: torch.Tensor
    gap: torch.Tensor  # [rows] top-1 minus top-2 logit

    @classmethod
    def of(
        cls,
        logits: torch.Tensor,
        variants: Sequence[ProbVariant] = (),
        default_rows: torch.Tensor | None = None,
        gap_rows: torch.Tensor | None = None,
    ) -> RowStats:
        """``prob`` is in the logits' dtype (the default confidence), or in float64 when a
        variant asks for it (the other rows' values are then exactly those of their dtype).
        ``default_rows``: when given (unique int64 indices), the only rows that take the
        default confidence (the others are a variant's or read no score: 0), so the default
        softmax runs over those rows alone; a softmax is row by row, so their values are the
        same. ``gap_rows``: when given (likewise), the only rows whose gap anything reads (the
        others: NaN), for the same reason.
        A pass gathers many rows that only a commit's fill reads (their argmax): Prophet's
        region outside a request's block."""
        best, argmax = logits.max(dim=-1)  # the first maximal index, as ``argmax``
        wide = any(v.dtype != logits.dtype for v in variants)
        if default_rows is None:
            prob = _greedy_prob(logits, argmax, logits.dtype, ())
        else:
            prob = logits.new_zeros(len(logits))
            if len(default_rows):
                rows, best_of = _taken((logits, argmax), default_rows)
                prob.index_copy_(0, default_rows, _greedy_prob(rows, best_of, logits.dtype, ()))
        if wide:
            prob = prob.double()
        for v in variants:
            rows, best_of = _taken((logits, argmax), v.rows)
            probs = confidence_probs(rows, v.dtype, v.suppressed)
            prob.index_copy_(0, v.rows, confidence(probs, best_of, v.rule).to(prob.dtype))
        if gap_rows is None:
            gap = top2_gap(logits, argmax, best)
        else:
            gap = logits.new_full((len(logits),), float("nan"))
            if len(gap_rows):
                gap.index_copy_(0, gap_rows, top2_gap(*_taken((logits, argmax, best), gap_rows)))
        return cls(argmax, prob, gap)

    def take(self, rows: torch.Tensor | slice) -> RowStats:
        return RowStats(self.argmax[rows], self.prob[rows], self.gap[rows])


def _taken(tensors: tuple[torch.Tensor, ...], rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows ``rows`` (indices) of each of ``tensors``: ``index_select``, which copies whole
    rows (on a CPU, 3-4x faster than indexing for ``[rows, vocab]`` logits; the same values)."""
    return tuple(t.index_select(0, rows) for t in tensors)


def _greedy_prob(
    logits: torch.Tensor, argmax: torch.Tensor, dtype: torch.dtype, suppressed: tuple[int, ...]
) -> torch.Tensor:
    probs = confidence_probs(logits, dtype, suppressed)
    return probs.gather(-1, argmax[:, None]).squeeze(-1)


def greedy_llada(family: str, rule: str, temperature: float, top_p, top_k) -> bool:
    """Whether :class:`RowStats` give this decoding's candidates exactly (LLaDA's greedy rules
    without filtering; Dream scores with filtered float32 probabilities)."""
    return (
        family != "dream"
        and temperature == 0
        and (top_p is None or top_p >= 1)
        and top_k is None
        and rule in ("low_confidence", "confidence_threshold", "random")
    )


def llada_step_count(masked, steps, step):
    """LLaDA's reveal count at ``step`` of a block that held ``masked`` masks at its start:
    ``masked // steps``, plus one in the first ``masked % steps`` steps (the official
    ``get_num_transfer_tokens``, which SDAR and LLaDA2 apply to a whole block). Ints or NumPy
    arrays (a whole batch's counts in one expression)."""
    return masked // steps + (step < masked % steps)


def dream_transfer_counts_np(
    masked: np.ndarray, step: np.ndarray, steps: np.ndarray, t: np.ndarray, s: np.ndarray
) -> np.ndarray:
    """:func:`dream_transfer_count` for a whole batch, with no tensor op: ``t`` and ``s`` are
    each request's timesteps at ``step`` and ``step + 1`` (float32; anything where ``step`` is
    its last). The same IEEE float32 operations element by element (a quotient, a difference,
    a product), then truncation, so the counts are Dream's exactly."""
    part = masked.astype(np.float32) * (np.float32(1) - s.astype(np.float32) / t.astype(np.float32))
    return np.where(step >= steps - 1, masked, part.astype(np.int64))


def dream_transfer_count(num_masked: int, step: int, steps: int, timesteps: torch.Tensor) -> int:
    """Dream's count for step ``step`` (from 0), computed in float32 tensors as Dream does so
    that ``int()`` truncates at exactly the same places."""
    if step >= steps - 1:
        return num_masked
    num = torch.tensor(num_masked) / 1  # Dream: mask_index.sum() / batch size -> float32
    t, s = timesteps[step], timesteps[step + 1]
    return int(num * (1 - s / t))


def filter_logits(
    logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None
) -> torch.Tensor:
    """Temperature, nucleus and top-k filtering as Dream's ``sample_tokens`` applies them."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        remove = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        mask = torch.zeros_like(remove).scatter_(-1, sorted_idx, remove)
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
    return logits


def scale_rows(logits: torch.Tensor, factor: np.ndarray, *, divide: bool) -> torch.Tensor:
    """``logits`` divided (or multiplied) row by row by ``factor`` (float64 [rows]), rounded as
    the same op with a Python float on each row alone rounds it: the factor in the op's
    compute type (float64 for float64 logits, float32 otherwise; half-precision logits are
    computed in float32 and rounded back). CUDA divides by a host scalar as a product with its
    reciprocal, taken in that compute type, so on CUDA a division is that product too (not
    run here: no GPU)."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    np_compute = np.float64 if compute == torch.float64 else np.float32
    by = factor.astype(np_compute)
    if divide and logits.device.type == "cuda":
        by, divide = np_compute(1) / by, False
    by_d = torch.from_numpy(by).to(logits.device)[:, None]
    out = logits / by_d if divide else logits * by_d
    return out.to(logits.dtype)


def filter_logits_by_row(
    logits: torch.Tensor,
    temperature: np.ndarray,
    top_p: np.ndarray,
    top_k: np.ndarray,
    *,
    top_k_first: bool = False,
    fill: float | None = None,
) -> torch.Tensor:
    """:func:`filter_logits` with each row's own parameters, in a fixed number of ops whatever
    they are (no group per distinct value): ``temperature`` float64 [rows] (0: none),
    ``top_p`` float64 (>= 1: none), ``top_k`` int64 (0: none). Each row equals
    :func:`filter_logits` of that row alone, bit for bit in float32, float64 and bfloat16:
    each filter is row-wise, and each row's parameter takes the dtype the scalar would. The
    nucleus's sort and the top-k run only over the rows that ask for them (over a real
    vocabulary they cost far more than the gather). ``top_k_first`` and ``fill=-inf``: the
    block decoders' filter instead (``foretell.decoding.block_step.filter_block_logits``),
    which applies top-k before top-p and drops logits to ``-inf``."""
    out = logits
    tempered = temperature > 0
    if tempered.any():
        out = scale_rows(out, np.where(tempered, temperature, 1.0), divide=True)
    nucleus, has_k = top_p < 1, top_k > 0

    def nucleus_filter(out: torch.Tensor) -> torch.Tensor:
        return _on_rows(out, nucleus, lambda rows: _nucleus(rows, top_p[nucleus], fill))

    def top_k_filter(out: torch.Tensor) -> torch.Tensor:
        return _on_rows(out, has_k, lambda rows: _top_k(rows, top_k[has_k], fill))

    filters = [(has_k, top_k_filter), (nucleus, nucleus_filter)]
    for asked, apply in filters if top_k_first else filters[::-1]:
        if asked.any():
            out = apply(out)
    return out


def _on_rows(
    logits: torch.Tensor, which: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``fn`` applied to the rows ``which`` (bool [rows]), the others as they are."""
    if which.all():
        return fn(logits)
    at = torch.from_numpy(np.flatnonzero(which)).to(logits.device)
    out = logits.clone()
    out[at] = fn(logits[at])
    return out


def _nucleus(logits: torch.Tensor, top_p: np.ndarray, fill: float | None = None) -> torch.Tensor:
    """Dream's top-p over each row with its own ``top_p`` (each < 1); dropped logits take
    ``fill`` (default: the dtype's lowest, as Dream; the block decoders use ``-inf``)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    # The comparison's scalar takes the cumulative sum's dtype.
    cut = torch.from_numpy(top_p).to(logits.device, cumulative.dtype)
    remove = cumulative > cut[:, None]
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(remove).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min if fill is None else fill)


def _top_k(logits: torch.Tensor, top_k: np.ndarray, fill: float | None = None) -> torch.Tensor:
    """Top-k over each row with its own ``top_k`` (each >= 1); ``fill`` as :func:`_nucleus`."""
    k = np.minimum(top_k, logits.shape[-1])
    values = torch.topk(logits, int(k.max())).values  # sorted: the k-th largest at k - 1
    kth = values.gather(1, torch.from_numpy(k - 1).to(logits.device)[:, None])
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min if fill is None else fill)


def sample(
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy at temperature 0; otherwise a draw from ``softmax(logits / temperature)``.

    Gumbel-max in float64, like LLaDA's reference, but noise is drawn only for the rows given
    (the reference draws it over the whole canvas x vocabulary). ``noise``: the uniform draws,
    ``[rows, vocab]`` float64, drawn by the caller (the batched step draws every request's
    before ranking); otherwise they come from ``generator``.
    """
    if temperature == 0 or logits.shape[0] == 0:
        return logits.argmax(dim=-1)
    u = noise
    if u is None:
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
    return (logits.double() / temperature + gumbel_noise(u.to(logits.device))).argmax(dim=-1)


def gumbel_noise(uniforms: torch.Tensor) -> torch.Tensor:
    """Gumbel noise from float64 uniforms (a uniform of 0 held off at 1e-300): added to
    scores, their argmax (top-k) is a draw (without replacement) from their softmax."""
    return -torch.log(-torch.log(uniforms.clamp_min(1e-300)))


def top2_gap(
    values: torch.Tensor, argmax: torch.Tensor, best: torch.Tensor | None = None
) -> torch.Tensor:
    """Each row's largest value less its second largest, given the rows' ``argmax`` (and
    their largest values, when known): exactly ``topk(2)``'s two values subtracted (a tied
    best gives 0, as there), without ``topk``, which over a short last dimension costs
    several times a reduction (5x on a CPU)."""
    if best is None:
        best = values.gather(-1, argmax[:, None]).squeeze(-1)
    rest = values.scatter(-1, argmax[:, None], float("-inf"))
    return best - rest.amax(dim=-1)


def confidence(probs: torch.Tensor, x0: torch.Tensor, rule: str) -> torch.Tensor:
    """Score of each candidate: higher = reveal first."""
    if rule in ("low_confidence", "confidence_threshold"):
        return probs.gather(-1, x0[:, None]).squeeze(-1)
    if rule == "margin":
        return top2_gap(probs, probs.argmax(dim=-1))
    if rule == "entropy":
        return (probs * torch.log(probs + 1e-10)).sum(-1)
    raise ValueError(f"remasking: {rule!r} has no confidence score")


def candidates(
    logits: torch.Tensor,
    *,
    family: str,
    rule: str,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    generator: torch.Generator | None,
    prob_dtype: torch.dtype | None = None,
    suppressed: tuple[int, ...] = (),
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This step's proposed token for each row and its confidence (None for random rules).

    LLaDA scores with the softmax of the raw logits in ``prob_dtype`` (see
    :func:`confidence_dtype`; default the logits' dtype) with the ``suppressed`` columns at
    ``-inf``; Dream with the softmax of the temperature/top-p/top-k filtered logits, as
    ``sample_tokens`` does (in float64 only if ``prob_dtype`` asks for it).
    """
    filtered = filter_logits(logits, temperature, top_p, top_k)
    # ``filtered`` is already divided by the temperature.
    x0 = sample(filtered, 1.0 if temperature > 0 else 0.0, generator, noise)
    if rule in ("random", "origin"):
        return x0, None
    dtype = logits.dtype if prob_dtype is None else prob_dtype
    if family == "dream":
        probs = torch.softmax(filtered.to(dtype), dim=-1)
    else:
        probs = confidence_probs(logits, dtype, suppressed)
    return x0, confidence(probs, x0, rule)


def choose(
    scores: torch.Tensor,
    count: int,
    alg_temp: float | None,
    generator: torch.Generator,
    window: torch.Tensor,
    canvas_len: int,
) -> torch.Tensor:
    """Indices (into ``window``) of the ``count`` rows to reveal: the top scores, or (Dream's
    ``alg_temp``) a draw without replacement from ``softmax(scores / alg_temp)``.

    The top-k runs over a canvas-length row holding ``-inf`` outside ``window``, exactly the
    tensor the references rank: saturated confidences (probability 1.0) tie, and torch breaks
    ties by the row's layout, so ranking only the window could pick different positions.
    """
    count = min(count, scores.shape[0])
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    if alg_temp:
        return draw_without_replacement(scores, count, alg_temp, generator)
    row = torch.full((canvas_len,), float("-inf"), dtype=scores.dtype)
    row[window] = scores
    return torch.searchsorted(window, torch.topk(row, count).indices)


def draw_without_replacement(
    scores: torch.Tensor, count: int, alg_temp: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Dream's ``alg_temp`` reveal: ``count`` indices into ``scores`` drawn without
    replacement from ``softmax(scores / alg_temp)`` in float64, from ``generator`` (Dream's
    ``multinomial``, draw for draw)."""
    weights = F.softmax(scores.double() / alg_temp, dim=-1)
    return torch.multinomial(weights, count, generator=generator)


def gumbel_perturbed(
    scores: torch.Tensor, alg_temp: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Rows of ``scores`` (float64) over their ``alg_temp`` (one per row) plus Gumbel noise
    from ``uniforms``: their top ``k`` is a draw of ``k`` without replacement from
    ``softmax(scores / alg_temp)``, the distribution of Dream's ``multinomial`` (not its
    draws), in one op for any number of rows. ``-inf`` stays ``-inf``."""
    return scores.double() / alg_temp[:, None] + gumbel_noise(uniforms)


def above_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM's parallel rule: every row above ``threshold``, and at least the best one."""
    chosen = (scores > threshold).nonzero().flatten()
    if chosen.numel() == 0:
        chosen = scores.argmax().reshape(1)
    return chosen


def ranked_threshold(
    scores: torch.Tensor, threshold: float, window: torch.Tensor, row_len: int
) -> torch.Tensor:
    """Fast-dLLM's ``get_transfer_index`` threshold rule, as its cached decoders apply it:
    rank every candidate with one ``topk`` over the computed row (``-inf`` outside ``window``),
    keep the first and every later one whose score is >= ``threshold``. Indices into
    ``window``. Ties for the first place break as that ``topk`` breaks them (Dream's cached
    steps tie systematically: the span's first two rows read the same output)."""
    if window.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    row = torch.full((row_len,), float("-inf"), dtype=scores.dtype)
    row[window] = scores
    values, order = torch.topk(row, window.numel())
    keep = values >= threshold
    keep[0] = True
    return torch.searchsorted(window, order[keep])
