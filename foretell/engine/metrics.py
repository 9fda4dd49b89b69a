"""Counters an engine keeps about itself: for benchmarks, progress bars and /metrics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class EngineMetrics:
    steps: int = 0  # engine steps that ran a forward pass
    sequences_in_passes: int = 0  # summed batch sizes, for mean occupancy
    tokens_in_passes: int = 0  # summed query tokens the model ran (canvases, cached spans, rows)
    generated_tokens: int = 0  # gen_length of every finished request
    step_seconds: float = 0.0  # wall time inside step()
    finished: Counter = field(default_factory=Counter)  # by finish reason
    kv_cache_bytes: int = 0  # bytes the running requests' KV caches hold now
    kv_cache_peak_bytes: int = 0  # the most they held at once

    @property
    def mean_batch_size(self) -> float:
        return self.sequences_in_passes / self.steps if self.steps else 0.0
