"""Plain re-implementations of the references' Monte-Carlo log-likelihood, as test oracles.

Written from LLaDA's ``eval_llada.py`` (``_forward_process``, ``get_logits``,
``get_loglikelihood``, ``suffix_greedy_prediction``, ``_encode_pair``) and Dream's
``eval/eval.py`` (``_forward_process``, ``get_logits``, ``_eval_target_nll_mc`` with
``log_type='ftb'``, ``_encode_pair``). Literal: one request at a time, ``batch_size`` rows of
the whole sequence per draw, torch's global RNG in the reference's order. The one convention
taken from foretell is the seeding: the global RNG is seeded with ``seed`` before each request
(the references seed once per run). Nothing here imports foretell.

``model`` is a callable ``model(x: LongTensor[B, L]) -> FloatTensor[B, L, V]`` of raw logits
(for Dream: not yet shifted).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]


# -- LLaDA -------------------------------------------------------------------------------------
def llada_encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return list(ctx), list(whole[len(ctx) :])


def _llada_forward_process(batch: torch.Tensor, prompt_index: torch.Tensor, mask_id: int):
    b, length = batch.shape
    target_len = (length - prompt_index.sum()).item()
    k = torch.randint(1, target_len + 1, ())
    x = torch.round(torch.linspace(float(k), k + (b - 1) * (target_len / b), steps=b)).long()
    x = ((x - 1) % target_len) + 1
    assert x.min() >= 1 and x.max() <= target_len
    indices = torch.arange(target_len).repeat(b, 1)
    is_mask = indices < x.unsqueeze(1)
    for i in range(b):
        is_mask[i] = is_mask[i][torch.randperm(target_len)]
    is_mask = torch.cat((torch.zeros(b, prompt_index.sum(), dtype=torch.bool), is_mask), dim=1)
    noisy = torch.where(is_mask, mask_id, batch)
    return noisy, (x / target_len).unsqueeze(1).repeat(1, length)


def _llada_logits(model: Model, batch, prompt_index, mask_id: int, cfg: float) -> torch.Tensor:
    if cfg > 0.0:
        index = prompt_index.unsqueeze(0).repeat(batch.shape[0], 1)
        un_batch = batch.clone()
        un_batch[index] = mask_id
        batch = torch.cat([batch, un_batch])
    logits = model(batch)
    if cfg > 0.0:
        logits, un_logits = torch.chunk(logits, 2, dim=0)
        logits = un_logits + (cfg + 1) * (logits - un_logits)
    return logits


@torch.no_grad()
def llada_loglikelihood(
    model: Model,
    prefix: list[int],
    target: list[int],
    *,
    mask_id: int,
    mc_num: int,
    batch_size: int,
    cfg: float = 0.0,
    seed: int = 0,
) -> float:
    torch.manual_seed(seed)
    seq = torch.tensor(prefix + target)[None, :].repeat((batch_size, 1))
    prompt_index = torch.arange(seq.shape[1]) < len(prefix)
    losses = []
    for _ in range(mc_num // batch_size):
        perturbed, p_mask = _llada_forward_process(seq, prompt_index, mask_id)
        mask_indices = perturbed == mask_id
        logits = _llada_logits(model, perturbed, prompt_index, mask_id, cfg)
        loss = F.cross_entropy(logits[mask_indices], seq[mask_indices], reduction="none")
        loss = (loss / p_mask[mask_indices]).sum() / batch_size
        losses.append(loss.item())
    return -sum(losses) / len(losses)


@torch.no_grad()
def llada_suffix_greedy(
    model: Model, prefix: list[int], target: list[int], *, mask_id: int, cfg: float = 0.0
) -> bool:
    """LLaDA's greedy check: decoding ``len(target)`` masks after ``prefix`` one token per step
    (most confident first) writes exactly ``target``."""
    decoded = llada_greedy_suffix(model, prefix, len(target), mask_id=mask_id, cfg=cfg)
    return decoded == list(target)


# -- Dream -------------------------------------------------------------------------------------
def dream_encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = [*tokenizer.encode(context + continuation), tokenizer.eos_token_id]
    ctx = tokenizer.encode(context)
    return list(ctx), list(whole[len(ctx) :])


def _dream_forward_process(batch: torch.Tensor, mask_id: int, eps: float):
    b, length = batch.shape
    u0 = torch.rand(1, dtype=torch.float32)
    indices = torch.arange(b).float()
    t = (u0 + indices / b) % 1
    p_mask = (1 - eps) * t + eps
    p_mask = p_mask[:, None].repeat(1, length)
    mask_indices = torch.rand((b, length)) < p_mask
    mask_indices[:, 0] = False
    mask_indices[:, -1] = False
    return torch.where(mask_indices, mask_id, batch), p_mask


@torch.no_grad()
def dream_loglikelihood(
    model: Model,
    prefix: list[int],
    target: list[int],
    *,
    mask_id: int,
    mc_num: int,
    batch_size: int,
    eps: float = 1e-3,
    seed: int = 0,
) -> float:
    torch.manual_seed(seed)
    seq = torch.tensor(prefix + target)[None, :].repeat((batch_size, 1))
    losses = []
    for _ in range(max(mc_num // batch_size, 1)):
        perturbed = seq.clone()
        noisy, p_mask = _dream_forward_process(seq, mask_id, eps)
        perturbed[:, -len(target) :] = noisy[:, -len(target) :]
        mask_indices = perturbed == mask_id
        logits = model(perturbed)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        loss = F.cross_entropy(logits[mask_indices], seq[mask_indices], reduction="none")
        loss = (loss / p_mask[mask_indices]).sum() / batch_size
        losses.append(loss.item())
    return -sum(losses) / len(losses)


@torch.no_grad()
def llada_greedy_suffix(
    model: Model, prefix: list[int], length: int, *, mask_id: int, cfg: float = 0.0
) -> list[int]:
    """The tokens LLaDA's ``suffix_greedy_prediction`` decodes after ``prefix``: ``length``
    masks, one revealed per step, the most confident first."""
    seq = torch.full((1, len(prefix) + length), mask_id)
    prompt_index = torch.arange(seq.shape[1]) < len(prefix)
    seq[0, : len(prefix)] = torch.tensor(prefix)
    for _ in range(length):
        mask_index = seq == mask_id
        logits = _llada_logits(model, seq, prompt_index, mask_id, cfg)[mask_index]
        x0 = torch.argmax(logits, dim=-1)
        p = torch.softmax(logits.to(torch.float32), dim=-1)
        confidence = torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)).squeeze(dim=-1)
        _, index = torch.sort(confidence, descending=True)
        x0[index[1:]] = mask_id
        seq[mask_index] = x0.clone()
    return seq[0, len(prefix) :].tolist()
