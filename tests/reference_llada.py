"""A literal LLaDA forward pass, written from the description of the official
``modeling_llada.py`` (GSAI-ML/LLaDA-8B-Instruct), as a test oracle for foretell's model.

Batch of whole canvases, no padding, nothing shared with foretell but the weights (read by
their checkpoint names from ``state``). What matters for bfloat16:
- RMS norm in float32, cast back, then times the weight in the model's dtype;
- the rotary table (cos, sin) built once in float32 for ``max_sequence_length`` positions;
  with ``rope_full_precision`` q and k go to float32, rotate with the float32 table and are
  cast back; without it the table is cast to the model's dtype and q, k rotate in it;
- grouped K/V heads repeated per query head, scaled dot-product attention without a mask;
- SwiGLU as ``silu(ff_proj(x)) * up_proj(x)``, then ``ff_out``; the LM head ``ff_out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    b, nh, t, hs = x.size()
    x1, x2 = x.view(b, nh, t, 2, hs // 2).unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_table(config: dict, head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(length, config.get("max_sequence_length", 1024))
    theta = config.get("rope_theta", 10000.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    seq = torch.arange(n, dtype=torch.float)
    freqs = torch.einsum("i , j -> i j", seq, inv_freq)
    positions = torch.cat((freqs, freqs), dim=-1)
    return positions.sin()[None, None], positions.cos()[None, None]


def _rope(config: dict, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    full = config.get("rope_full_precision", True)
    q_, k_ = (q.float(), k.float()) if full else (q, k)
    length = k_.shape[-2]
    sin, cos = _rotary_table(config, q.shape[-1], length)
    sin, cos = sin[:, :, :length].type_as(q_), cos[:, :, :length].type_as(q_)
    q_ = ((q_ * cos) + (_rotate_half(q_) * sin)).to(q_.dtype)
    k_ = ((k_ * cos) + (_rotate_half(k_) * sin)).to(k_.dtype)
    return q_.type_as(q), k_.type_as(k)


@torch.no_grad()
def llada_forward(state: dict[str, torch.Tensor], config: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, L, vocab]`` of LLaDA's model for canvases ``ids`` ``[B, L]``."""
    p = "model.transformer."
    d, n_heads = config["d_model"], config["n_heads"]
    n_kv = config.get("n_kv_heads") or n_heads
    hs = d // n_heads
    eps = config.get("rms_norm_eps", 1e-5)
    x = F.embedding(ids, state[p + "wte.weight"])
    b, t = ids.shape
    for i in range(config["n_layers"]):
        blk = f"{p}blocks.{i}."
        h = _rms(x, state[blk + "attn_norm.weight"], eps)
        q = F.linear(h, state[blk + "q_proj.weight"]).view(b, t, n_heads, hs).transpose(1, 2)
        k = F.linear(h, state[blk + "k_proj.weight"]).view(b, t, n_kv, hs).transpose(1, 2)
        v = F.linear(h, state[blk + "v_proj.weight"]).view(b, t, n_kv, hs).transpose(1, 2)
        q, k = _rope(config, q, k)
        if n_kv != n_heads:
            k = k.repeat_interleave(n_heads // n_kv, dim=1, output_size=n_heads)
            v = v.repeat_interleave(n_heads // n_kv, dim=1, output_size=n_heads)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0)
        att = att.transpose(1, 2).contiguous().view(b, t, d)
        x = x + F.linear(att, state[blk + "attn_out.weight"])
        h = _rms(x, state[blk + "ff_norm.weight"], eps)
        up = F.linear(h, state[blk + "up_proj.weight"])
        h = F.silu(F.linear(h, state[blk + "ff_proj.weight"])) * up
        x = x + F.linear(h, state[blk + "ff_out.weight"])
    x = _rms(x, state[p + "ln_f.weight"], eps)
    head = state[p + ("wte.weight" if config.get("weight_tying") else "ff_out.weight")]
    return F.linear(x, head)
