"""One attention interface for packed, variable-length, bidirectional sequences.

The engine packs every running canvas into one flat ``[tokens, heads, head_dim]`` tensor with
per-sequence boundaries, so attention must never cross a boundary. Backends:

- ``sdpa`` (default, CPU and GPU): torch's scaled_dot_product_attention run on views of the
  packed tensor, one batched call per run of consecutive equal-length sequences (the runner
  packs canvases ordered by length, so a run is usually every canvas of one length). On CPU
  this beat a padded batch with a boolean mask (see docs/benchmarks.md): no work on padding.
- ``flash``: flash-attn's varlen kernel (CUDA only; untested on the CPU machines we develop on).
- ``xformers``: xformers' memory-efficient attention with a block-diagonal mask (CUDA only;
  untested here).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash", "xformers")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Turn ``auto`` into a concrete backend, and refuse one that cannot run on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend: unknown backend {name!r}; choose one of {BACKENDS}")
    is_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "flash" if is_cuda and _installed("flash_attn") else "sdpa"
    if name in ("flash", "xformers"):
        module = "flash_attn" if name == "flash" else "xformers"
        if not is_cuda:
            raise ValueError(f"attention_backend: {name!r} needs a CUDA device, got {device}")
        if not _installed(module):
            raise ValueError(
                f"attention_backend: {name!r} needs the {module} package "
                f"(pip install 'foretell[{name}]')"
            )
    return name


def _expand_kv(x: torch.Tensor, num_heads: int, head_dim_axis: int) -> torch.Tensor:
    """Repeat grouped key/value heads so that every query head has its own (HF's repeat_kv)."""
    groups = num_heads // x.shape[head_dim_axis]
    return x if groups == 1 else x.repeat_interleave(groups, dim=head_dim_axis)


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    backend: str = "sdpa",
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence.

    ``q`` is ``[T, H, D]``, ``k``/``v`` are ``[T, H_kv, D]`` and ``seq_lens`` sums to ``T``.
    Returns ``[T, H, D]``.
    """
    num_heads = q.shape[1]
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        cu = torch.tensor([0, *seq_lens], device=q.device).cumsum(0).to(torch.int32)
        longest = max(seq_lens)
        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=False)
    k = _expand_kv(k, num_heads, 1)
    v = _expand_kv(v, num_heads, 1)
    if backend == "xformers":
        from xformers.ops import fmha

        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(seq_lens)
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    out = torch.empty_like(q)
    start = 0
    for length, count in _runs(seq_lens):
        end = start + length * count
        # A run of ``count`` equal-length sequences is one batched call:
        # [count * L, H, D] -> [count, H, L, D] (a view; the only copy is SDPA's output).
        qs, ks, vs = (
            t[start:end].reshape(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)
        )
        res = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
        out[start:end] = res.reshape(count * length, *q.shape[1:])
        start = end
    return out


def _runs(seq_lens: list[int]) -> list[tuple[int, int]]:
    """``(length, count)`` for each run of consecutive equal lengths."""
    runs: list[tuple[int, int]] = []
    for length in seq_lens:
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1] + 1)
        else:
            runs.append((length, 1))
    return runs


def padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Bidirectional attention over a padded batch: ``q`` ``[B, H, L, D]``, ``k``/``v``
    ``[B, H_kv, L, D]``; ``attention_mask`` ``[B, L]`` with 1 for real tokens (HF style).

    Padding keys are masked out; padding queries still get an output (ignored by callers).
    """
    k = _expand_kv(k, q.shape[1], 1)
    v = _expand_kv(v, q.shape[1], 1)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
