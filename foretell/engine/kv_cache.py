"""The block KV cache's memory: what one request's cache costs, and the engine's budget.

A cached request (``DecodeParams.kv_cache``) owns one buffer ``[layers, 2, canvas, kv_heads,
head_dim]`` in the model's dtype, allocated at its first refresh (a block's first step) and
freed the step it finishes. The buffer spans the whole canvas in both modes: ``dual`` reads all
of it; ``prefix`` reads the keys/values before the block and keeps the span it recomputes in
the rest, so that a step's read-only rows (Prophet's, a commit's) see exactly the keys of that
step. Admission reserves the full buffer, so a running request never waits for memory.
"""

from __future__ import annotations

import torch

# "auto" on a CPU: this fraction of MemAvailable (/proc/meminfo) when the engine starts; on
# CUDA, this fraction of the device's free memory after the weights are loaded.
AUTO_FRACTION_CPU = 0.5
AUTO_FRACTION_CUDA = 0.8


def bytes_per_token(model: torch.nn.Module) -> int:
    """Cache bytes per canvas position: 2 (K and V) x layers x kv_heads x head_dim x dtype size."""
    cfg = model.config
    dtype = model.embed.weight.dtype
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * size


def _mem_available_cpu() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_kv_cache_memory(value: int | str | None, device: torch.device) -> int:
    """The byte budget for all caches: ``"auto"`` (see :data:`AUTO_FRACTION_CPU` and
    :data:`AUTO_FRACTION_CUDA`), an int >= 0 of bytes, or None for no limit."""
    if value is None:
        return 2**63 - 1
    if value == "auto":
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * AUTO_FRACTION_CUDA)
        return int(_mem_available_cpu() * AUTO_FRACTION_CPU)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"kv_cache_memory: need a number of bytes >= 0, 'auto' or None, got {value!r}"
        )
    return value


def allocate(model: torch.nn.Module, tokens: int, device: torch.device) -> torch.Tensor:
    """An empty cache buffer ``[layers, 2, tokens, kv_heads, head_dim]`` for one request."""
    cfg = model.config
    shape = (cfg.num_layers, 2, tokens, cfg.num_kv_heads, cfg.head_dim)
    return torch.empty(shape, dtype=model.embed.weight.dtype, device=device)
