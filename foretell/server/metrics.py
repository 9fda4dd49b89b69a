"""``/metrics``: Prometheus text exposition of ``AsyncEngine.stats()``."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from foretell.server.connections import ConnectionStats

PROMETHEUS_TEXT = "text/plain; version=0.0.4"


def render_metrics(stats: dict[str, Any], connections: ConnectionStats | None = None) -> str:
    """Prometheus text exposition (version 0.0.4) of ``AsyncEngine.stats()``, the process's
    torch threads and garbage collector (a full collection stalls every request in flight)
    and, under ``run_server``, what the connection guard did."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, Any]]) -> None:
        lines.append(f"# HELP foretell_{name} {help_}")
        lines.append(f"# TYPE foretell_{name} {kind}")
        for labels, value in samples:
            lines.append(f"foretell_{name}{labels} {value}")

    finished = stats["finished"]
    metric(
        "requests_finished_total",
        "counter",
        "Requests finished, by finish reason.",
        [(f'{{reason="{r}"}}', n) for r, n in sorted(finished.items())],
    )
    metric(
        "forward_passes_total",
        "counter",
        "Engine steps that ran a forward pass.",
        [("", stats["forward_passes"])],
    )
    metric(
        "early_commits_total",
        "counter",
        "Requests finished by early commit (Prophet).",
        [("", stats["early_commits"])],
    )
    metric(
        "sequences_in_passes_total",
        "counter",
        "Requests summed over forward passes.",
        [("", stats["sequences_in_passes"])],
    )
    metric(
        "tokens_in_passes_total",
        "counter",
        "Packed tokens summed over forward passes.",
        [("", stats["tokens_in_passes"])],
    )
    metric(
        "generated_tokens_total",
        "counter",
        "Canvas tokens of requests that finished generating.",
        [("", stats["generated_tokens"])],
    )
    metric(
        "step_seconds_total",
        "counter",
        "Wall time spent inside engine steps.",
        [("", f"{stats['step_seconds']:.6f}")],
    )
    metric("requests_running", "gauge", "Requests in the batch.", [("", stats["running"])])
    metric("requests_waiting", "gauge", "Requests queued for a slot.", [("", stats["waiting"])])
    metric("max_num_seqs", "gauge", "Batch slots.", [("", stats["max_num_seqs"])])
    metric("kv_cache_bytes", "gauge", "Bytes held by KV caches.", [("", stats["kv_cache_bytes"])])
    metric(
        "preemptions_total",
        "counter",
        "Block-causal requests restarted to free KV pages for older ones.",
        [("", stats.get("preemptions", 0))],
    )
    metric(
        "batch_occupancy",
        "gauge",
        "Requests in the last forward pass over max_num_seqs.",
        [("", f"{stats['batch_occupancy']:.6f}")],
    )
    metric(
        "mean_batch_occupancy",
        "gauge",
        "Mean requests per forward pass over max_num_seqs, since start.",
        [("", f"{stats['mean_batch_occupancy']:.6f}")],
    )
    metric(
        "torch_threads",
        "gauge",
        "torch intra-op threads of the serving process (--threads).",
        [("", torch.get_num_threads())],
    )
    metric(
        "gc_collections_total",
        "counter",
        "Garbage collections of the serving process, by generation (2: full).",
        [(f'{{generation="{g}"}}', st["collections"]) for g, st in enumerate(gc.get_stats())],
    )
    metric(
        "gc_frozen_objects",
        "gauge",
        "Objects frozen out of garbage collection: run_server freezes its startup heap.",
        [("", gc.get_freeze_count())],
    )
    if connections is not None:
        metric("connections_open", "gauge", "Open client connections.", [("", connections.open)])
        metric(
            "connections_closed_total",
            "counter",
            "Connections the server closed: evicted or refused at --max-connections, or past "
            "--request-read-timeout.",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(connections.closed.items())],
        )
    return "\n".join(lines) + "\n"
