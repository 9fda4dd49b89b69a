"""Plain re-implementations of Fast-dLLM's cached decoders (LLaDA and Dream), test oracles.

Written from NVlabs/Fast-dLLM as stored at commit 24cc59e (``llada/generate.py``:
``generate_with_prefix_cache``, ``generate_with_dual_cache``, ``get_transfer_index``;
``llada/model/modeling_llada.py``: how ``past_key_values`` and ``replace_position`` enter
attention; ``dream/model/generation_utils_block.py``: Dream's block ``_sample``). Batch size 1,
literal loops, and its own forward over the weights of a foretell model, re-implementing the
layer math with past keys/values and replaced positions: nothing here calls foretell's packed
forward.

What the reference does, and this file with it:
- every block starts with a full forward of the canvas that returns the keys/values of every
  position (before rotary, as LLaDA caches them) and reveals with the block's first count;
- ``prefix`` keeps the keys/values before the block; later steps run ``x[block_start:]`` against
  them; ``dual`` keeps the whole canvas and later steps run ``x[block_start:block_end]``, whose
  fresh keys/values replace the cached ones of the block;
- a later step's candidates are its block's masks; ``get_transfer_index``'s threshold rule keeps
  the most confident candidate and every other one whose confidence is >= ``threshold``;
- the loop runs until the block has no masks. Where the reference would fail or never end
  because a revealed token was the mask token itself (its schedule has run out with masks
  left, or a threshold step changed nothing, so every later one would be the same), the next
  block starts.

Prophet on top (foretell's rule, docs/design.md): after each forward pass, logits of positions a
cached step did not run are those of read-only queries at those positions against this step's
keys/values (the cache with the step's fresh span); the gap test and a commit's fill then read a
whole-canvas logits tensor, exactly as ``reference_decoders.llada_generate`` does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from reference_decoders import (
    answer_gap,
    apply_constraints,
    get_num_transfer_tokens,
    resolve_early_exit,
    sample_tokens,
    should_early_exit,
)

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values) [1, kv_heads, L, hd]


class LLaDAReference:
    """The LLaDA / Dream (Qwen2) layer math over a foretell model's weights, read as plain
    tensors (Dream adds q/k/v biases; its logits come out unshifted, as its own model's)."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        self.w = {name: p.detach() for name, p in model.named_parameters()}
        self.layers, self.heads, self.kv_heads = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads
        self.hd = cfg.hidden_size // cfg.num_heads
        self.theta, self.eps = cfg.rope_theta, cfg.rms_norm_eps
        self.tied = cfg.tie_embeddings
        self.full_precision = cfg.rope_full_precision

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # Both official models normalise in float32 and scale in the model's dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.w[name] * h.to(x.dtype)

    def _proj(self, x: torch.Tensor, name: str) -> torch.Tensor:
        out = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return out if bias is None else out + bias

    def _rope(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of ``t`` [1, h, n, hd] at ``positions`` [n]: a float32 table of
        angles for positions ``[0, L)`` sliced by position, as LLaDA's ``RotaryEmbedding``
        (``L`` a multiple of 64, so every entry comes from the same vectorised kernel); with
        ``rope_full_precision`` the rotation itself runs in float32 and is cast back."""
        length = -(-(int(positions.max()) + 1) // 64) * 64
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, dtype=torch.float) / self.hd))
        freqs = torch.einsum("i,j->ij", torch.arange(length, dtype=torch.float), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        dtype = torch.float32 if self.full_precision else t.dtype
        sin, cos = angles.sin()[positions].to(dtype), angles.cos()[positions].to(dtype)
        x = t.to(dtype)
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2 :]
        return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(t.dtype)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        past: KV | None = None,
        mode: str | None = None,
        replace: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """Logits ``[1, n, V]`` of tokens ``ids`` [1, n] at canvas ``positions`` [n], and the
        keys/values of this call (``present``).

        ``past`` None: the tokens attend to each other. ``mode="prefix"``: their keys follow the
        past ones (``cat``). ``mode="dual"``: their keys replace the past ones at canvas
        positions ``replace`` (in a copy). ``mode="read"``: they attend to the past keys only,
        theirs are dropped (Prophet's read-only rows).
        """
        h = self.w["embed.weight"][ids[0]][None]
        n = ids.shape[1]
        present: KV = []
        for i in range(self.layers):
            pre = f"blocks.{i}."
            x = self._norm(h, pre + "attn_norm.weight")
            q = self._proj(x, pre + "q_proj").view(1, n, self.heads, self.hd)
            k = self._proj(x, pre + "k_proj").view(1, n, self.kv_heads, self.hd)
            v = self._proj(x, pre + "v_proj").view(1, n, self.kv_heads, self.hd)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if past is None:
                keys, values, key_pos = k, v, positions
            elif mode == "prefix":
                pk, pv = past[i]
                keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
                key_pos = torch.arange(keys.shape[2])
            elif mode == "dual":
                pk, pv = past[i][0].clone(), past[i][1].clone()
                pk[:, :, replace[0] : replace[1]] = k
                pv[:, :, replace[0] : replace[1]] = v
                keys, values, key_pos = pk, pv, torch.arange(pk.shape[2])
            elif mode == "read":
                keys, values = past[i]
                key_pos = torch.arange(keys.shape[2])
            else:
                raise ValueError(mode)
            present.append((keys, values))
            qr = self._rope(q, positions)
            kr = self._rope(keys, key_pos)
            groups = self.heads // self.kv_heads
            kr = kr.repeat_interleave(groups, dim=1)
            vr = values.repeat_interleave(groups, dim=1)
            scores = qr @ kr.transpose(-1, -2) / math.sqrt(self.hd)
            att = torch.softmax(scores, dim=-1) @ vr  # bidirectional: no mask
            att = att.transpose(1, 2).reshape(1, n, self.heads * self.hd)
            h = h + att @ self.w[pre + "o_proj.weight"].T
            x = self._norm(h, pre + "mlp_norm.weight")
            gate = x @ self.w[pre + "gate_proj.weight"].T
            up = x @ self.w[pre + "up_proj.weight"].T
            h = h + (F.silu(gate) * up) @ self.w[pre + "down_proj.weight"].T
        h = self._norm(h, "norm.weight")
        head = self.w["embed.weight"] if self.tied else self.w["lm_head.weight"]
        return h @ head.T, present


def get_transfer_index(
    logits: torch.Tensor,
    remasking: str,
    mask_index: torch.Tensor,
    x: torch.Tensor,
    num_transfer_tokens: torch.Tensor | None,
    threshold: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM's ``get_transfer_index`` at temperature 0 (greedy)."""
    x0 = torch.argmax(logits, dim=-1)
    if remasking == "low_confidence":
        p = F.softmax(logits.to(torch.float64), dim=-1)
        x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
    elif remasking == "random":
        x0_p = torch.rand((x0.shape[0], x0.shape[1]))
    else:
        raise NotImplementedError(remasking)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -np.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    if threshold is not None:
        num_transfer_tokens = mask_index.sum(dim=1, keepdim=True)
    for j in range(confidence.shape[0]):
        k = int(num_transfer_tokens[j])
        _, select_index = torch.topk(confidence[j], k=k)
        transfer_index[j, select_index] = True
        if threshold is not None:
            for kk in range(1, k):
                if confidence[j, select_index[kk]] < threshold:
                    transfer_index[j, select_index[kk]] = False
    return x0, transfer_index


@torch.no_grad()
def cached_generate(
    ref: LLaDAReference,
    prompt: torch.Tensor,
    *,
    mode: str,
    steps: int,
    gen_length: int,
    block_length: int,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    mask_id: int,
    constraints: dict[int, int] | None = None,
    early_exit: dict | None = None,
    statistic: str = "mean",
) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's ``generate_with_prefix_cache`` / ``generate_with_dual_cache`` (greedy),
    with Prophet's early exit when ``early_exit`` is given. ``threshold`` given: the
    confidence-threshold rule (``remasking`` then scores the candidates). Returns the final
    canvas and the number of forward passes (nfe)."""
    assert mode in ("prefix", "dual")
    prompt_len = prompt.shape[1]
    total = prompt_len + gen_length
    x = torch.full((1, total), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt.clone()
    apply_constraints(x, prompt_len, constraints)
    exit_cfg = resolve_early_exit(early_exit, constraints, prompt_len, gen_length)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks
    everything = torch.arange(total)
    nfe = 0

    def early_exit_now(full_logits: torch.Tensor) -> bool:
        """Prophet's test on this step's whole-canvas logits; on success, the fill."""
        if exit_cfg is None:
            return False
        positions, thresholds, bounds = exit_cfg
        gap = answer_gap(full_logits, positions, statistic)
        if not should_early_exit(nfe, steps, gap, thresholds, bounds):
            return False
        x0 = torch.argmax(full_logits, dim=-1)
        remaining = x == mask_id
        x[remaining] = x0[remaining]
        return True

    for num_block in range(num_blocks):
        start = prompt_len + num_block * block_length
        end = start + block_length
        num_transfer = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)

        # The block's first step: the whole canvas, refreshing the cache, and a reveal.
        nfe += 1
        logits, past = ref.forward(x, everything)
        if early_exit_now(logits):
            return x, nfe
        mask_index = x == mask_id
        mask_index[:, end:] = 0
        count = None if threshold is not None else num_transfer[:, 0]
        x0, transfer = get_transfer_index(logits, remasking, mask_index, x, count, threshold)
        x[transfer] = x0[transfer]
        if mode == "prefix":
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in past]

        i = 1
        while True:
            if threshold is None and i == steps_per_block:
                break  # the reference would index past its schedule here
            nfe += 1
            hi = total if mode == "prefix" else end
            span = torch.arange(start, hi)
            logits, present = ref.forward(
                x[:, start:hi], span, past, mode, None if mode == "prefix" else (start, end)
            )
            if exit_cfg is not None:
                # Read-only rows for every other position, against this step's keys/values.
                full = torch.empty(1, total, logits.shape[-1], dtype=logits.dtype)
                full[:, start:hi] = logits
                others = torch.cat([torch.arange(0, start), torch.arange(hi, total)])
                if len(others):
                    full[:, others] = ref.forward(x[:, others], others, present, "read")[0]
                if early_exit_now(full):
                    return x, nfe
            mask_index = x[:, start:hi] == mask_id
            mask_index[:, block_length:] = 0
            count = None if threshold is not None else num_transfer[:, i]
            window = x[:, start:hi]
            x0, transfer = get_transfer_index(
                logits, remasking, mask_index, window, count, threshold
            )
            x[:, start:hi][transfer] = x0[transfer]
            if (x[:, start:end] == mask_id).sum() == 0:
                break
            if threshold is not None and bool((x0[transfer] == mask_id).all()):
                break  # nothing changed: the reference would repeat this step forever
            i += 1
    return x, nfe


def _shift(logits: torch.Tensor) -> torch.Tensor:
    """Dream's alignment, over whatever the call ran: row i reads output i-1, row 0 itself."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


@torch.no_grad()
def dream_cached_generate(
    ref: LLaDAReference,
    prompt: torch.Tensor,
    *,
    mode: str,
    steps: int,
    gen_length: int,
    block_length: int,
    alg: str,
    threshold: float = 0.9,
    mask_id: int,
    eps: float = 1e-3,
) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's block ``_sample`` for Dream (``dream/model/generation_utils_block.py``),
    greedy, with ``use_cache`` and ``dual_cache`` for ``mode``. ``alg`` is
    ``confidence_threshold`` or anything else (which ranks by negative entropy there).

    Its non-threshold loop runs one more forward pass when the block's schedule has run out
    with masks left and discards it; that pass is not run here (no token depends on it)."""
    assert mode in ("prefix", "dual")
    prompt_len = prompt.shape[1]
    total = prompt_len + gen_length
    x = torch.full((1, total), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt.clone()
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    timesteps = torch.linspace(1, eps, steps_per_block + 1)
    nfe = 0
    for num_block in range(num_blocks):
        start = prompt_len + num_block * block_length
        end = start + block_length
        nfe += 1
        logits, past = ref.forward(x, torch.arange(total))
        _, x0 = sample_tokens(_shift(logits)[0])
        x[:, start] = x0[start]
        if mode == "prefix":
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in past]
        i = 1
        while True:
            if alg != "confidence_threshold" and i == steps_per_block:
                break
            hi = total if mode == "prefix" else end
            nfe += 1
            logits, _ = ref.forward(
                x[:, start:hi],
                torch.arange(start, hi),
                past,
                mode,
                None if mode == "prefix" else (start, end),
            )
            logits = _shift(logits)
            mask_index = x[:, start:hi] == mask_id
            if alg == "confidence_threshold":
                confidence, x0 = sample_tokens(logits[mask_index])
                x_ = torch.full_like(x[:, start:hi], mask_id)
                full_confidence = torch.full(x_.shape, -torch.inf, dtype=logits.dtype)
                x_[mask_index] = x0.clone()
                full_confidence[mask_index] = confidence
                full_confidence[:, block_length:] = -torch.inf
                n = int((x[:, start:end] == mask_id).sum())
                selected, select_index = torch.topk(full_confidence, n)
                transfer = torch.zeros_like(x_, dtype=torch.bool)
                transfer[0, select_index[0]] = True
                for k in range(1, n):
                    if selected[0, k] < threshold:
                        transfer[0, select_index[0, k]] = False
                x[:, start:hi][transfer] = x_[transfer]
                if (x[:, start:end] == mask_id).sum() == 0:
                    break
                if bool((x_[transfer] == mask_id).all()):
                    break  # nothing changed: the reference would repeat this step forever
                continue
            t, s = timesteps[i], timesteps[i + 1]
            mask_index[:, block_length:] = False
            confidence, x0 = sample_tokens(logits[mask_index], neg_entropy=True)
            num_mask = mask_index.sum() / mask_index.shape[0]
            count = int(num_mask * (1 - s / t)) if i < steps_per_block - 1 else int(num_mask)
            full_confidence = torch.full(mask_index.shape, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            full_confidence[:, block_length:] = -torch.inf
            if count > 0:
                _, transfer_index = torch.topk(full_confidence, count)
                x_ = torch.full_like(x[:, start:hi], mask_id)
                x_[mask_index] = x0.clone()
                x[:, start:hi][0, transfer_index[0]] = x_[0, transfer_index[0]]
            i += 1
            if (x[:, start:end] == mask_id).sum() == 0:
                break
    return x, nfe


@torch.no_grad()
def threshold_generate(
    model,
    prompt: torch.Tensor,
    *,
    gen_length: int,
    block_length: int,
    threshold: float,
    mask_id: int,
    max_nfe: int = 10_000,
) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's uncached ``generate`` with ``threshold`` (greedy, low confidence): the whole
    canvas every step, candidates every mask up to the block's end, and a block runs until it
    has no masks. ``model(x) -> logits`` over the canvas. Where every reveal of a step is the
    mask token itself, Fast-dLLM would repeat that step forever; here the next block starts
    (the engine's documented rule)."""
    prompt_len = prompt.shape[1]
    x = torch.full((1, prompt_len + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt.clone()
    nfe = 0
    for num_block in range(gen_length // block_length):
        end = prompt_len + (num_block + 1) * block_length
        while (x[:, end - block_length : end] == mask_id).any() and nfe < max_nfe:
            nfe += 1
            mask_index = x == mask_id
            logits = model(x)
            mask_index[:, end:] = 0
            x0, transfer_index = get_transfer_index(
                logits, "low_confidence", mask_index, x, None, threshold
            )
            before = x.clone()
            x[transfer_index] = x0[transfer_index]
            if torch.equal(before, x):
                break
    return x, nfe
