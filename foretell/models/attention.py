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

A sequence may use a KV cache (:class:`CacheUse`, Fast-dLLM's block cache): its rows' keys and
values are written into the request's cache buffer (a refresh writes the whole canvas; a cached
step writes the span it recomputes), and a cached step's queries attend to the buffer's keys
(cache plus the fresh span, in canvas order) instead of only their own: q length != k length.
With SDPA such a sequence is one call of its own; flash-attn and xformers get separate query
and key lengths per sequence (untested here: no GPU).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

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


@dataclass(frozen=True)
class CacheUse:
    """How one packed sequence uses its request's KV cache in a pass.

    Rows ``[write_row, write_row + write_len)`` of the sequence store their (rotated) keys and
    values at canvas positions ``[write_start, write_start + write_len)`` of ``buffer``
    (``[layers, 2, canvas, kv_heads, head_dim]``). With ``read_len`` None the sequence attends
    to itself (a refresh); otherwise every row attends to ``buffer[:read_len]``, after this
    pass's writes, and rows outside the written span are read-only (never stored).
    """

    buffer: torch.Tensor
    write_row: int
    write_start: int
    write_len: int
    read_len: int | None = None


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    backend: str = "sdpa",
    caches: list[CacheUse | None] | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence.

    ``q`` is ``[T, H, D]``, ``k``/``v`` are ``[T, H_kv, D]`` and ``seq_lens`` sums to ``T``.
    ``caches`` (one entry per sequence, or None) says which sequences use a KV cache at this
    ``layer`` (see :class:`CacheUse`). Returns ``[T, H, D]``.
    """
    if caches is not None and any(c is not None for c in caches):
        return _cached_attention(q, k, v, seq_lens, backend, caches, layer)
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
    _sdpa_runs(q, k, v, out, 0, seq_lens)
    return out


def _sdpa_runs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    start: int,
    seq_lens: list[int],
) -> None:
    """Self-attention of consecutive sequences from flat row ``start``, into ``out``
    (``k``/``v`` already expanded to every query head)."""
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


def _cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    backend: str,
    caches: list[CacheUse | None],
    layer: int,
) -> torch.Tensor:
    """Packed attention where some sequences write to and read from KV caches."""
    starts = [0]
    for n in seq_lens[:-1]:
        starts.append(starts[-1] + n)
    # Writes first: a cached step's keys are the cache with this pass's span in place.
    for start, cache in zip(starts, caches, strict=True):
        if cache is not None and cache.write_len:
            rows = slice(start + cache.write_row, start + cache.write_row + cache.write_len)
            span = slice(cache.write_start, cache.write_start + cache.write_len)
            cache.buffer[layer, 0, span] = k[rows]
            cache.buffer[layer, 1, span] = v[rows]

    def keys(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache, start = caches[i], starts[i]
        if cache is None or cache.read_len is None:
            return k[start : start + seq_lens[i]], v[start : start + seq_lens[i]]
        return cache.buffer[layer, 0, : cache.read_len], cache.buffer[layer, 1, : cache.read_len]

    num_heads = q.shape[1]
    if backend in ("flash", "xformers"):
        pairs = [keys(i) for i in range(len(seq_lens))]
        k_lens = [kk.shape[0] for kk, _ in pairs]
        k_all = torch.cat([kk for kk, _ in pairs])
        v_all = torch.cat([vv for _, vv in pairs])
        if backend == "flash":
            from flash_attn import flash_attn_varlen_func

            cu_q = torch.tensor([0, *seq_lens], device=q.device).cumsum(0).to(torch.int32)
            cu_k = torch.tensor([0, *k_lens], device=q.device).cumsum(0).to(torch.int32)
            return flash_attn_varlen_func(
                q, k_all, v_all, cu_q, cu_k, max(seq_lens), max(k_lens), causal=False
            )
        from xformers.ops import fmha

        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(seq_lens, kv_seqlen=k_lens)
        k_all, v_all = _expand_kv(k_all, num_heads, 1), _expand_kv(v_all, num_heads, 1)
        return fmha.memory_efficient_attention(q[None], k_all[None], v_all[None], attn_bias=bias)[0]
    out = torch.empty_like(q)
    i = 0
    while i < len(seq_lens):
        cache = caches[i]
        if cache is None or cache.read_len is None:
            # A run of sequences attending to themselves: batched as without caches.
            j = i
            while j < len(seq_lens) and (caches[j] is None or caches[j].read_len is None):
                j += 1
            end = starts[j - 1] + seq_lens[j - 1]
            rows = slice(starts[i], end)
            ks = _expand_kv(k[rows], num_heads, 1)
            vs = _expand_kv(v[rows], num_heads, 1)
            part = torch.empty_like(q[rows])
            _sdpa_runs(q[rows], ks, vs, part, 0, seq_lens[i:j])
            out[rows] = part
            i = j
            continue
        rows = slice(starts[i], starts[i] + seq_lens[i])
        kk, vv = keys(i)
        qs = q[rows].transpose(0, 1)[None]  # [1, H, Lq, D]
        ks = _expand_kv(kk, num_heads, 1).transpose(0, 1)[None]
        vs = _expand_kv(vv, num_heads, 1).transpose(0, 1)[None]
        out[rows] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
        i += 1
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
    ``[B, H_kv, L, D]``; ``attention_mask`` ``[B, L]`` with 1 for real tokens (HF style), or
    ``[B, L, L]`` saying which keys each query may see (training views of cached decoding).

    Padding keys are masked out; padding queries still get an output (ignored by callers).
    """
    k = _expand_kv(k, q.shape[1], 1)
    v = _expand_kv(v, q.shape[1], 1)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()
        mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
