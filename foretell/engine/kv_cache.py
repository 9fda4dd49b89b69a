"""The KV pool: one block of memory for every request's keys and values, cut into pages.

A request that caches keys and values (``DecodeParams.kv_cache``: Fast-dLLM's prefix/dual
cache; every block-causal request) holds a page table: the pool pages that store its canvas
positions, ``page_size`` positions a page. A Fast-dLLM request takes all its pages at admission
(its first pass writes its whole canvas); a block-causal one takes them a block at a time, and
the scheduler preempts the youngest block-causal requests when an older one's next block does
not fit (``Scheduler._grow_block_caches``). Pages return the step the request ends, however it
ends (finished, committed, stopped, aborted, failed); memory is never fragmented: any free page
serves any request.

Attention reads and writes the pool through *slots*, flat indices ``page * page_size +
offset``: a pass stores every written row with one indexed copy per layer, and gathers every
reading sequence's keys with one indexed read per layer (``foretell.models.attention``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import numpy as np
import torch

# "auto" on a CPU: this fraction of MemAvailable (/proc/meminfo) when the engine starts; on
# CUDA, this fraction of the device's total memory, less the weights and the activations of
# the largest forward pass the engine will run (profiled, as vLLM's gpu_memory_utilization).
AUTO_FRACTION_CPU = 0.5
AUTO_FRACTION_CUDA = 0.8
# vLLM's default block size; small pages waste at most page_size - 1 positions a request.
DEFAULT_PAGE_SIZE = 16


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


def check_kv_cache_memory(value: int | str | None) -> None:
    """Refuse a bad ``kv_cache_memory`` before the model loads."""
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"kv_cache_memory: need a number of bytes >= 0, 'auto' or None, got {value!r}"
        )


def resolve_kv_cache_memory(
    value: int | str | None,
    device: torch.device,
    profile_peak: int | None = None,
) -> int:
    """The byte budget for the pool: ``"auto"`` (see :data:`AUTO_FRACTION_CPU` and
    :data:`AUTO_FRACTION_CUDA`; ``profile_peak`` is the profiled forward's peak bytes on
    CUDA), an int >= 0 of bytes, or None for no limit but what the engine can use."""
    check_kv_cache_memory(value)
    if value is None:
        return 2**63 - 1
    if value == "auto":
        if device.type == "cuda":
            _, total = torch.cuda.mem_get_info(device)
            used = torch.cuda.memory_allocated(device) if profile_peak is None else profile_peak
            return max(0, int(total * AUTO_FRACTION_CUDA) - used)
        return int(_mem_available_cpu() * AUTO_FRACTION_CPU)
    return value


def check_page_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"kv_page_size: need a positive integer, got {value!r}")
    return value


class KVPool:
    """Fixed-size pages over one ``[layers, 2, slots, kv_heads, head_dim]`` tensor.

    ``budget`` bytes become ``budget // page_bytes`` pages, at most ``max_pages`` (the most the
    engine can hold at once: more would never be used). On a CPU the tensor holds the pages
    handed out so far and grows (doubling, up to every page) when a page past it is handed out,
    at admission, never during a pass: an engine that never caches pays nothing, and one with
    no byte limit holds only what its requests have used. Free pages are handed out lowest
    first, so the tensor grows only with the number of pages held at once. On CUDA it is
    allocated whole at the first request, as vLLM's: growing by copies would need the old and
    the new tensor at once, exactly when memory is fullest.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        budget: int,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        max_pages: int | None = None,
    ) -> None:
        self.page_size = check_page_size(page_size)
        self.device = torch.device(device)
        self.bytes_per_token = bytes_per_token(model)
        self.page_bytes = self.page_size * self.bytes_per_token
        pages = budget // self.page_bytes
        if max_pages is not None:
            pages = min(pages, max_pages)
        self.num_pages = int(pages)
        cfg = model.config
        self._shape = (cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
        self._dtype = model.embed.weight.dtype
        # Free pages: those never handed out are [_fresh, num_pages); the others wait in a heap.
        self._freed: list[int] = []
        self._fresh = 0
        self._used = 0
        self._storage: torch.Tensor | None = None
        self._capacity = 0  # pages the tensor holds
        # Called before the tensor is replaced by a larger one: an overlapped engine waits
        # there for the forward in flight, which writes the tensor being copied.
        self.before_grow: Callable[[], None] | None = None

    @property
    def storage(self) -> torch.Tensor:
        """``[layers, 2, pages held * page_size, kv_heads, head_dim]`` in the model's dtype."""
        if self._storage is None:
            self._grow(1)
        return self._storage

    def _grow(self, pages: int) -> None:
        """Hold at least ``pages`` pages (keeping what the held ones store)."""
        if pages <= self._capacity:
            return
        capacity = min(self.num_pages, max(pages, 2 * self._capacity))
        if self.device.type == "cuda":
            capacity = self.num_pages
        if self._storage is not None and self.before_grow is not None:
            self.before_grow()
        layers, kv, heads, dim = self._shape
        shape = (layers, kv, capacity * self.page_size, heads, dim)
        grown = torch.empty(shape, dtype=self._dtype, device=self.device)
        if self._storage is not None:
            grown[:, :, : self._storage.shape[2]] = self._storage
        self._storage, self._capacity = grown, capacity

    @property
    def capacity(self) -> int:
        """Pages the pool's tensor holds now (it grows up to ``num_pages``)."""
        return self._capacity

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def free_pages(self) -> int:
        return self.num_pages - self._used

    @property
    def used_pages(self) -> int:
        return self._used

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_bytes

    def allocate(self, pages: int) -> list[int]:
        """Take ``pages`` free pages (the caller checked that they are free)."""
        if pages > self.free_pages:
            raise RuntimeError(f"KV pool: {pages} pages asked, {self.free_pages} free")
        reused = heapq.nsmallest(min(pages, len(self._freed)), self._freed)
        fresh = range(self._fresh, self._fresh + pages - len(reused))
        taken = [*reused, *fresh]
        if taken:
            self._grow(max(taken) + 1)  # may fail (out of memory): nothing is taken then
        for _ in reused:
            heapq.heappop(self._freed)
        self._fresh += len(fresh)
        self._used += pages
        return taken

    def free(self, pages: list[int]) -> None:
        for page in pages:
            heapq.heappush(self._freed, page)
        self._used -= len(pages)

    def slots(self, pages: list[int], length: int) -> np.ndarray:
        """The pool slot of each position ``[0, length)`` of a request holding ``pages``: a host
        array (the page table as slots), computed once at admission; each pass's slots are
        cut from it on the host and go to the device in one copy (``plan_kv``)."""
        table = np.asarray(pages, dtype=np.int64)
        return (table[:, None] * self.page_size + np.arange(self.page_size)).reshape(-1)[:length]
