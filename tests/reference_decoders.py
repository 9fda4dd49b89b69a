"""Plain re-implementations of the reference decoders, used as test oracles.

Written from /work/shared/PROPHET.md and the public reference code (LLaDA ``generate.py``,
Prophet ``generate_earlyexit.py``, Dream-7B ``generation_utils.py``). They are deliberately
literal: batch size 1, the whole canvas every step, the same tensor operations and the same
draws from torch's global RNG in the same order as the reference, so that a seeded run of the
engine can be compared token for token. Nothing here is optimised and nothing imports foretell.

``model`` is any callable ``model(x: LongTensor[B, L]) -> FloatTensor[B, L, V]`` returning raw
logits (for Dream: raw HF-style logits, not yet shifted).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]

# Prophet's defaults (generate_earlyexit.py / eval_llada.py).
DEFAULT_THRESHOLDS = (7.5, 5.0, 2.5)
DEFAULT_BOUNDS = (0.33, 0.67)
DEFAULT_ANSWER_LENGTH = 5
_EARLY_EXIT_KEYS = {"answer_start", "answer_length", "thresholds", "bounds"}
_STATISTICS = ("mean", "min")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's per-step reveal counts: ``m // steps`` each, plus one for the first ``m % steps``.

    ``mask_index`` is a bool tensor [B, block_length]; returns int64 [B, steps].
    """
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, : remainder[i]] += 1
    return num_transfer_tokens


def add_gumbel_noise(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gumbel-max in float64 as LLaDA/Prophet do; at temperature 0 no noise and no RNG draw."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def masked_prompt_copy(x: torch.Tensor, prompt_index: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The unconditional cfg input: a copy of the canvas with the prompt positions masked."""
    un_x = x.clone()
    un_x[prompt_index] = mask_id
    return un_x


def llada_logits(
    model: Model, x: torch.Tensor, prompt_index: torch.Tensor, cfg_scale: float, mask_id: int
) -> torch.Tensor:
    """One forward pass; with cfg the two rows go in one call (cond first) and are combined."""
    if cfg_scale > 0.0:
        un_x = masked_prompt_copy(x, prompt_index, mask_id)
        x_ = torch.cat([x, un_x], dim=0)
        logits = model(x_)
        logits, un_logits = torch.chunk(logits, 2, dim=0)
        return un_logits + (cfg_scale + 1) * (logits - un_logits)
    return model(x)


def apply_constraints(x: torch.Tensor, prompt_len: int, constraints: dict[int, int] | None) -> None:
    """Write the forced tokens (relative position -> id) into the canvas, as Prophet does."""
    if constraints is None:
        return
    for pos, token_id in constraints.items():
        absolute_pos = prompt_len + pos
        if absolute_pos < x.shape[1]:
            x[:, absolute_pos] = token_id


def early_exit_of(policy: object | None) -> dict | None:
    """The ``early_exit`` dict for an object carrying its four fields as attributes (the tests
    pass foretell's ``Prophet``), or None for no policy."""
    if policy is None:
        return None
    return {key: getattr(policy, key) for key in sorted(_EARLY_EXIT_KEYS)}


def resolve_early_exit(
    early_exit: dict | None, constraints: dict[int, int] | None, prompt_len: int, gen_length: int
) -> tuple[list[int], tuple[float, float, float], tuple[float, float]] | None:
    """Turn the ``early_exit`` dict into (absolute answer positions, thresholds, bounds).

    Returns None when there is no early exit: no dict, or no answer start (neither given nor
    derivable from the constraints as ``max(constraints) + 2``).
    """
    if early_exit is None:
        return None
    unknown = set(early_exit) - _EARLY_EXIT_KEYS
    if unknown:
        raise ValueError(f"unknown early_exit keys: {sorted(unknown)}")
    answer_start = early_exit.get("answer_start")
    if answer_start is None and constraints:
        answer_start = max(constraints.keys()) + 2
    if answer_start is None:
        return None
    answer_length = early_exit.get("answer_length", DEFAULT_ANSWER_LENGTH)
    thresholds = tuple(early_exit.get("thresholds", DEFAULT_THRESHOLDS))
    bounds = tuple(early_exit.get("bounds", DEFAULT_BOUNDS))
    if len(thresholds) != 3 or len(bounds) != 2:
        raise ValueError("thresholds must be (early, mid, late) and bounds (b0, b1)")
    # Prophet: range(answer_start_pos, min(P + gen_length, answer_start_pos + answer_length)),
    # then only positions inside the generation are used.
    total_len = prompt_len + gen_length
    answer_start_pos = prompt_len + answer_start
    positions = [
        pos
        for pos in range(answer_start_pos, min(total_len, answer_start_pos + answer_length))
        if prompt_len <= pos < total_len
    ]
    return positions, thresholds, bounds  # type: ignore[return-value]


def answer_gap(logits: torch.Tensor, positions: list[int], statistic: str = "mean") -> float | None:
    """Prophet's statistic: top-1 minus top-2 raw logit per answer position, mean (or min)."""
    gaps = []
    for pos in positions:
        top2_vals, _ = torch.topk(logits[:, pos, :], k=2, dim=-1)
        gaps.append((top2_vals[0, 0] - top2_vals[0, 1]).item())
    if not gaps:
        return None
    if statistic == "mean":
        return sum(gaps) / len(gaps)
    if statistic == "min":
        return min(gaps)
    raise ValueError(f"unknown statistic: {statistic!r}")


def should_early_exit(
    current_step: int,
    max_steps: int,
    gap: float | None,
    thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
) -> bool:
    """Prophet's phase-aware rule: the threshold falls as progress = step / max_steps grows."""
    if gap is None:
        return False
    progress = current_step / max_steps
    if progress < bounds[0]:
        return gap >= thresholds[0]
    if progress < bounds[1]:
        return gap >= thresholds[1]
    return gap >= thresholds[2]


# --------------------------------------------------------------------------------------------
# LLaDA generate / Prophet generate_earlyexit
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def llada_generate(
    model: Model,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int,
    constraints: dict[int, int] | None = None,
    early_exit: dict | None = None,
    statistic: str = "mean",
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    eos_id: int | None = None,
    eot_id: int | None = None,
) -> tuple[torch.Tensor, int]:
    """LLaDA's ``generate`` (``early_exit=None``) or Prophet's ``generate_earlyexit``.

    As LLaDA's current ``generate.py`` and Prophet's code, the low-confidence softmax runs in
    the model's dtype (the logits' own). ``logits_eos_inf`` / ``confidence_eos_eot_inf`` are
    ``generate.py``'s options (ids given here; LLaDA-8B's are 126081 and 126348; an ``eot_id``
    of None skips EOT). Prophet's gap reads the logits after ``logits_eos_inf`` and before
    ``confidence_eos_eot_inf`` (no reference combines them; this is foretell's rule).

    Returns the final canvas [1, P + gen_length] and the number of forward passes (model calls;
    one per step, cfg included, since both cfg rows go in one call).
    """
    if statistic not in _STATISTICS:
        raise ValueError(f"unknown statistic: {statistic!r}")
    if remasking not in ("low_confidence", "random"):
        raise NotImplementedError(remasking)
    prompt_len = prompt.shape[1]
    x = torch.full((1, prompt_len + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt.clone()
    apply_constraints(x, prompt_len, constraints)
    # As in Prophet: taken after the constraints, so cfg also masks the constrained positions.
    prompt_index = x != mask_id

    exit_cfg = resolve_early_exit(early_exit, constraints, prompt_len, gen_length)

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks

    global_step = 0
    max_steps = steps
    for num_block in range(num_blocks):
        block_start = prompt_len + num_block * block_length
        block_end = prompt_len + (num_block + 1) * block_length
        block_mask_index = x[:, block_start:block_end] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps_per_block)

        for i in range(steps_per_block):
            global_step += 1
            mask_index = x == mask_id
            logits = llada_logits(model, x, prompt_index, cfg_scale, mask_id)
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf

            logits_with_noise = add_gumbel_noise(logits, temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)
            gap = None
            if exit_cfg is not None:
                gap = answer_gap(logits, exit_cfg[0], statistic)

            if confidence_eos_eot_inf:
                # generate.py's chained assignment: EOS in the noisy logits (the same tensor as
                # the logits at temperature 0), EOT in the logits.
                logits_with_noise[:, :, eos_id] = -torch.inf
                if eot_id is not None:
                    logits[:, :, eot_id] = -torch.inf

            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            else:
                x0_p = torch.rand((x0.shape[0], x0.shape[1]))

            if exit_cfg is not None:
                _, thresholds, bounds = exit_cfg
                if should_early_exit(global_step, max_steps, gap, thresholds, bounds):
                    remaining_mask = x == mask_id
                    x[remaining_mask] = x0[remaining_mask]
                    apply_constraints(x, prompt_len, constraints)
                    return x, global_step

            x0_p[:, block_end:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)

            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                k = int(num_transfer_tokens[j, i].item())
                if k > 0:
                    _, select_index = torch.topk(confidence[j], k=k)
                    transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
            apply_constraints(x, prompt_len, constraints)

    return x, global_step


# --------------------------------------------------------------------------------------------
# Dream-7B diffusion_generate / _sample
# --------------------------------------------------------------------------------------------


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Dream's nucleus filter: drop tokens once the cumulative probability exceeds top_p."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_indices_to_remove = cumulative_probs > top_p
    # Shift right so the token that crosses the threshold is kept; always keep the first.
    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
    sorted_indices_to_remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask = mask.scatter_(-1, sorted_indices, sorted_indices_to_remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dream's top-k filter: everything below the k-th largest logit is masked out."""
    top_k = min(top_k, logits.size(-1))
    indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    margin_confidence: bool = False,
    neg_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's ``sample_tokens``: returns (confidence, x0) for rows of logits [N, V]."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)

    if temperature > 0:
        # Dream falls back to argmax when sampling fails; mirrored for fidelity.
        try:
            x0 = torch.distributions.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except Exception:
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)

    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        top1_probs = sorted_probs[:, 0]
        top2_probs = sorted_probs[:, 1]
        confidence = top1_probs - top2_probs

    if neg_entropy:
        epsilon = 1e-10
        log_probs = torch.log(probs + epsilon)
        confidence = torch.sum(probs * log_probs, dim=-1)

    return confidence, x0


@torch.no_grad()
def dream_generate(
    model: Model,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    eps: float = 1e-3,
    alg: str = "origin",
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    mask_id: int,
    early_exit: dict | None = None,
    statistic: str = "mean",
) -> tuple[torch.Tensor, int]:
    """Dream-7B's ``diffusion_generate``/``_sample`` on one prompt, optionally with Prophet.

    ``early_exit`` takes the same keys as in :func:`llada_generate`; ``answer_start`` (relative
    to the generation start) must be given, otherwise there is no early exit. The check runs on
    the shifted logits right after the forward pass; on firing every still-masked position takes
    the argmax of those logits. Returns the final canvas and the number of forward passes.
    """
    if statistic not in _STATISTICS:
        raise ValueError(f"unknown statistic: {statistic!r}")
    if alg not in ("origin", "maskgit_plus", "topk_margin", "entropy"):
        raise RuntimeError(f"Unknown alg: {alg}")
    prompt_len = prompt.shape[1]
    x = F.pad(prompt, (0, gen_length), value=mask_id)
    exit_cfg = resolve_early_exit(early_exit, None, prompt_len, gen_length)

    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

        if exit_cfg is not None:
            positions, thresholds, bounds = exit_cfg
            gap = answer_gap(logits, positions, statistic)
            if should_early_exit(i + 1, steps, gap, thresholds, bounds):
                remaining_mask = x == mask_id
                x[remaining_mask] = torch.argmax(logits, dim=-1)[remaining_mask]
                return x, i + 1

        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]

        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], dtype=torch.long) + mask_id
            transfer_index_t_s = torch.rand(*x0.shape) < p_transfer
            _, x0[transfer_index_t_s] = sample_tokens(
                mask_logits[transfer_index_t_s], temperature=temperature, top_p=top_p, top_k=top_k
            )
            x[mask_index] = x0.clone()
        else:
            confidence, x0 = sample_tokens(
                mask_logits,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                margin_confidence=alg == "topk_margin",
                neg_entropy=alg == "entropy",
            )
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = (
                int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            )
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                else:
                    full_confidence = full_confidence / alg_temp
                    full_confidence = F.softmax(full_confidence, dim=-1)
                    transfer_index = torch.multinomial(
                        full_confidence, num_samples=number_transfer_tokens
                    )
                x_ = torch.zeros_like(x, dtype=torch.long) + mask_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0)).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]

    return x, steps
