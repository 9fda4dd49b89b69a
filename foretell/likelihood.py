"""Monte-Carlo log-likelihood of a continuation under a masked diffusion LM.

A diffusion LM has no left-to-right factorisation, so ``log p(target | prefix)`` is estimated
from the model's masked-token loss: mask a random share of the target, score the masked tokens,
and weight each loss by one over the share masked. Two official estimators exist and foretell
reproduces each one's draws exactly:

- ``"llada"`` (LLaDA's ``eval_llada.py``): per Monte-Carlo draw of ``batch_size`` rows, the
  number of masked target tokens is stratified over the rows from one random offset, each row
  masks a random subset of that size, and the loss is divided by ``masked / target_len``;
  optional classifier-free guidance (the prompt masked in the unconditional copy).
- ``"dream"`` (Dream's ``eval/eval.py`` with ``nll_type=mc``, ``log_type=ftb``): per draw, the
  rows' masking rates are stratified over ``[eps, 1]`` from one random offset and each target
  token is masked independently at its row's rate; the first and last tokens of the sequence
  are never masked.

Unlike the references, which draw from one global generator across all requests, every
request draws from its own generator seeded with ``seed``: its estimate does not depend on the
order of the requests or on what it is batched with. Rows of many requests are packed into one
forward pass (no padding) and the LM head runs only on the masked positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from foretell.models.transformer import DiffusionLM

SCHEMES = ("llada", "dream")
HEAD_ROWS = 2048  # masked positions per LM-head call


@dataclass(frozen=True)
class LikelihoodParams:
    """How to estimate one log-likelihood (the references' defaults).

    ``batch_size`` is the number of rows of one Monte-Carlo draw: the stratification of the
    masking ratio runs over these rows, so it changes the estimate (the references use the
    harness's ``--batch_size``). ``scheme`` None means the model family's own estimator.
    """

    mc_num: int = 128
    batch_size: int = 32
    cfg_scale: float = 0.0
    seed: int = 0
    scheme: str | None = None
    sampling_eps: float = 1e-3  # Dream's lowest masking rate

    def __post_init__(self) -> None:
        for name in ("mc_num", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.scheme is not None and self.scheme not in SCHEMES:
            raise ValueError(f"scheme: unknown {self.scheme!r}; choose one of {SCHEMES}")
        if self.scheme == "llada" and self.mc_num % self.batch_size:
            raise ValueError(
                f"mc_num: {self.mc_num} is not a multiple of batch_size {self.batch_size} "
                "(LLaDA's estimator draws whole batches)"
            )
        if not isinstance(self.cfg_scale, (int, float)) or not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale: must be >= 0, got {self.cfg_scale!r}")
        if self.scheme == "dream" and self.cfg_scale > 0:
            raise ValueError("cfg_scale: Dream's estimator has no classifier-free guidance")
        if not 0.0 <= self.sampling_eps < 1.0:
            raise ValueError(f"sampling_eps: must be in [0, 1), got {self.sampling_eps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")

    def for_model(self, model: DiffusionLM) -> LikelihoodParams:
        """These params with the scheme resolved from the model's family (and re-validated)."""
        if self.scheme is not None:
            return self
        scheme = "dream" if model.family == "dream" else "llada"
        return LikelihoodParams(**{**self.__dict__, "scheme": scheme})

    @property
    def draws(self) -> int:
        """Monte-Carlo draws of ``batch_size`` rows each."""
        return max(self.mc_num // self.batch_size, 1)


def llada_masks(target_len: int, rows: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One draw of LLaDA's forward process over the target: ``(mask [rows, target_len],
    share masked per row)``. The masked counts are evenly spaced (mod ``target_len``) from a
    random start, so one draw covers the whole range of ratios."""
    start = torch.randint(1, target_len + 1, (), generator=gen)
    counts = torch.linspace(float(start), start + (rows - 1) * (target_len / rows), steps=rows)
    counts = (torch.round(counts).long() - 1) % target_len + 1
    mask = torch.arange(target_len).repeat(rows, 1) < counts[:, None]
    for i in range(rows):
        mask[i] = mask[i][torch.randperm(target_len, generator=gen)]
    return mask, counts / target_len


def dream_masks(
    seq_len: int, prefix_len: int, rows: int, eps: float, gen: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """One draw of Dream's forward process: ``(mask [rows, seq_len], rate per row)``. Rates are
    stratified over ``[eps, 1]``; only the target is noised, never the first or last token."""
    offset = torch.rand(1, generator=gen)
    t = (offset + torch.arange(rows).float() / rows) % 1
    rate = (1 - eps) * t + eps
    mask = torch.rand((rows, seq_len), generator=gen) < rate[:, None]
    mask[:, 0] = False
    mask[:, -1] = False
    mask[:, :prefix_len] = False
    return mask, rate


@dataclass
class _Row:
    request: int
    ids: torch.Tensor  # the noised sequence [L]
    masked: torch.Tensor  # positions masked, [m]
    targets: torch.Tensor  # their true tokens, [m]
    share: torch.Tensor  # share of the target masked (a float32 scalar, as the references)
    uncond: torch.Tensor | None  # cfg: the noised sequence with the prompt masked too


def _rows(
    model: DiffusionLM, index: int, prefix: list[int], target: list[int], p: LikelihoodParams
) -> Iterator[_Row]:
    seq = torch.tensor([*prefix, *target], dtype=torch.long)
    mask_id = model.mask_token_id
    gen = torch.Generator().manual_seed(p.seed)
    for _ in range(p.draws):
        if p.scheme == "llada":
            target_mask, share = llada_masks(len(target), p.batch_size, gen)
            mask = torch.cat(
                [torch.zeros(p.batch_size, len(prefix), dtype=torch.bool), target_mask], 1
            )
        else:
            mask, share = dream_masks(len(seq), len(prefix), p.batch_size, p.sampling_eps, gen)
        for r in range(p.batch_size):
            noised = torch.where(mask[r], mask_id, seq)
            masked = (noised == mask_id).nonzero().flatten()
            uncond = None
            if p.cfg_scale > 0:
                uncond = noised.clone()
                uncond[: len(prefix)] = mask_id
            yield _Row(index, noised, masked, seq[masked], share[r], uncond)


def _full(logits: torch.Tensor) -> torch.Tensor:
    """The loss in at least float32 (half-precision logits are upcast)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


@torch.inference_mode()
def loglikelihoods(
    model: DiffusionLM,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    params: LikelihoodParams | None = None,
    *,
    max_tokens: int = 16384,
) -> list[float]:
    """``log p(target | prefix)`` estimated for each ``(prefix, target)`` pair of token ids.

    Rows are packed into forward passes of at most ``max_tokens`` tokens (a row longer than
    that runs alone).
    """
    p = (params or LikelihoodParams()).for_model(model)
    for i, (prefix, target) in enumerate(pairs):
        if not target:
            raise ValueError(f"pairs[{i}]: the target is empty")
        if model.mask_token_id in prefix or model.mask_token_id in target:
            raise ValueError(f"pairs[{i}]: contains the mask token {model.mask_token_id}")
        limit = model.max_length
        if limit is not None and len(prefix) + len(target) > limit:
            raise ValueError(
                f"pairs[{i}]: {len(prefix) + len(target)} tokens exceed the model's maximum "
                f"length {limit}"
            )
    device = model.embed.weight.device
    # Per request and draw: the sum over its rows of loss / share masked.
    sums = [[0.0] * p.draws for _ in pairs]
    rows_seen = [0] * len(pairs)

    def run(batch: list[_Row]) -> None:
        seqs = [r.ids for r in batch] + [r.uncond for r in batch if r.uncond is not None]
        lens = [len(s) for s in seqs]
        ids = torch.cat(seqs).to(device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(device)
        hidden = model.forward_packed(ids, positions, lens)
        starts = torch.tensor([0, *lens]).cumsum(0).tolist()
        flat = torch.cat([starts[j] + r.masked for j, r in enumerate(batch)]).to(device)
        un_flat = None
        if p.cfg_scale > 0:
            base = len(batch)
            un_flat = torch.cat([starts[base + j] + r.masked for j, r in enumerate(batch)])
            un_flat = un_flat.to(device)
        targets = torch.cat([r.targets for r in batch]).to(device)
        pieces = []
        # The LM head in slices of rows: [rows, vocab] logits are large for a real vocabulary.
        for a in range(0, len(flat), HEAD_ROWS):
            b = min(a + HEAD_ROWS, len(flat))
            logits = _full(model.logits_at(hidden, positions, flat[a:b]))
            if un_flat is not None:
                un = _full(model.logits_at(hidden, positions, un_flat[a:b]))
                logits = un + (p.cfg_scale + 1) * (logits - un)
            pieces.append(F.cross_entropy(logits, targets[a:b], reduction="none").cpu())
        losses = torch.cat(pieces) if pieces else torch.empty(0)
        offset = 0
        for r in batch:
            m = len(r.masked)
            loss = float((losses[offset : offset + m] / r.share).sum()) if m else 0.0
            offset += m
            draw = rows_seen[r.request] // p.batch_size
            sums[r.request][draw] += loss
            rows_seen[r.request] += 1

    batch: list[_Row] = []
    tokens = 0
    for i, (prefix, target) in enumerate(pairs):
        for row in _rows(model, i, list(prefix), list(target), p):
            cost = len(row.ids) * (2 if row.uncond is not None else 1)
            if batch and tokens + cost > max_tokens:
                run(batch)
                batch, tokens = [], 0
            batch.append(row)
            tokens += cost
    if batch:
        run(batch)
    return [-sum(s / p.batch_size for s in draws) / p.draws for draws in sums]


def greedy_matches(
    engine: object, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], cfg_scale: float = 0.0
) -> list[bool]:
    """LLaDA's greedy check (``suffix_greedy_prediction``): whether the target is what the model
    decodes after the prefix, one token per step by confidence over the whole target, greedy.

    That is LLaDA decoding with ``steps = gen_length = block_length = len(target)``, so it runs
    as ordinary requests through ``engine`` (a ``foretell.Engine``), all at once. A pair with an
    empty prefix cannot be decoded and counts as not greedy.
    """
    from foretell.params import DecodeParams

    todo = [i for i, (prefix, _) in enumerate(pairs) if len(prefix) > 0]
    params = [
        DecodeParams(
            gen_length=len(pairs[i][1]),
            steps=len(pairs[i][1]),
            block_length=len(pairs[i][1]),
            remasking="low_confidence",
            temperature=0.0,
            cfg_scale=cfg_scale,
        )
        for i in todo
    ]
    prompts = [list(pairs[i][0]) for i in todo]
    outs = engine.generate(prompts, params, use_tqdm=False) if todo else []  # type: ignore[attr-defined]
    result = [False] * len(pairs)
    for i, out in zip(todo, outs, strict=True):
        result[i] = out.finish_reason != "error" and out.token_ids == list(pairs[i][1])
    return result
