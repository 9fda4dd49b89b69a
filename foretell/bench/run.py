"""Run one workload under each scheduling mode, through the same Engine code.

Only scheduling differs between modes, never decoding: every mode builds a fresh ``Engine`` over
the same loaded model and submits the same requests with the same params, so a request's tokens
(and therefore accuracy) are the same in every mode that uses the same early-commit policy.

- ``reference``: one request at a time, full steps (what the LLaDA / Prophet evaluation scripts
  do: batch size 1).
- ``static``: fixed batches of B in arrival order, full steps; the next batch starts only when
  the last member of the current one has finished.
- ``static-prophet``: the same batches with Prophet; a row that commits early stops costing
  compute (the engine evicts it), but nothing takes its place.
- ``engine``: continuous batching with ``max_num_seqs=B``, full steps.
- ``engine-prophet``: continuous batching with Prophet: every early commit frees a slot that the
  next waiting request takes in the very next step.

Each mode can also run with a block KV cache (``kv_caches``: Fast-dLLM's ``prefix`` or ``dual``,
``DecodeParams.kv_cache``), named ``mode+cache`` (e.g. ``engine-prophet+dual``); its ratios
against the same mode without a cache are measured in the same run. A cache changes tokens
(it is an approximation), so cached runs may differ in accuracy and, with Prophet, in passes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from foretell.bench.workload import BenchRequest, request_hash
from foretell.engine import Engine
from foretell.models.registry import LoadedModel
from foretell.params import DecodeParams, Prophet
from foretell.tasks import get_task

ChunkTokens = int | str | None  # Engine's forward_chunk_tokens

MODES = ("reference", "static", "static-prophet", "engine", "engine-prophet")
# ``--kv-cache`` names: "none" is the exact, uncached engine.
KV_CACHES = ("none", "prefix", "dual")
PROPHET_MODES = frozenset({"static-prophet", "engine-prophet"})
CONTINUOUS_MODES = frozenset({"engine", "engine-prophet"})
# The scheduler's token budget is not what this benchmark varies: only max_num_seqs limits a batch.
UNLIMITED_TOKENS = 1 << 30

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    """Progress lines go to stderr, so that stdout carries only the table."""
    print(msg, file=sys.stderr, flush=True)


def parse_modes(text: str | Sequence[str]) -> list[str]:
    """Mode names from ``"static,engine-prophet"`` (or a list), in the order given."""
    names = [m.strip() for m in text.split(",")] if isinstance(text, str) else list(text)
    names = [m for m in names if m]
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        raise ValueError(f"modes: unknown {unknown or names}; choose from {', '.join(MODES)}")
    return list(dict.fromkeys(names))


def parse_kv_caches(text: str | Sequence[str | None]) -> list[str | None]:
    """Cache modes from ``"none,prefix,dual"`` (or a list), in the order given; None = none."""
    names = [c.strip() for c in text.split(",")] if isinstance(text, str) else list(text)
    names = ["none" if c is None else c for c in names if c is None or c]
    unknown = [c for c in names if c not in KV_CACHES]
    if unknown or not names:
        raise ValueError(
            f"kv_cache: unknown {unknown or names}; choose from {', '.join(KV_CACHES)}"
        )
    return [None if c == "none" else c for c in dict.fromkeys(names)]


def run_name(mode: str, kv_cache: str | None) -> str:
    """The key of a (mode, cache) run: ``engine``, ``engine+dual``, ..."""
    return mode if kv_cache is None else f"{mode}+{kv_cache}"


def mode_params(
    requests: Sequence[BenchRequest],
    mode: str,
    prophet: Prophet | None,
    kv_cache: str | None = None,
) -> list[DecodeParams]:
    """The params each request runs with in ``mode``: its own, plus Prophet in prophet modes,
    plus the cache mode, unless the request sets its own (``BenchRequest.kv_cache`` /
    ``.prophet``: a mixed workload)."""
    out = []
    for r in requests:
        on = mode in PROPHET_MODES if r.prophet is None else r.prophet
        if on and prophet is None:
            raise ValueError(f"mode {mode!r} needs a Prophet policy")
        out.append(
            r.params.replace(early_commit=prophet if on else None, kv_cache=_cache(r, kv_cache))
        )
    return out


def _cache(request: BenchRequest, kv_cache: str | None) -> str | None:
    """The cache mode ``request`` runs with when the mode's is ``kv_cache``."""
    own = request.kv_cache
    return kv_cache if own is None else (None if own == "none" else own)


def share_model(
    loaded: LoadedModel,
    max_num_seqs: int,
    dtype: str = "float32",
    forward_chunk_tokens: ChunkTokens = "auto",
) -> Engine:
    """A fresh engine (fresh scheduler, runner and metrics) over an already loaded model."""
    return Engine(
        LoadedModel(model=loaded.model, tokenizer=loaded.tokenizer, path=loaded.path),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=UNLIMITED_TOKENS,
        dtype=dtype,
        forward_chunk_tokens=forward_chunk_tokens,
    )


def warm_up(
    loaded: LoadedModel,
    requests: Sequence[BenchRequest],
    batch_size: int,
    forward_chunk_tokens: ChunkTokens = "auto",
    kv_caches: Sequence[str | None] = (None,),
) -> None:
    """A few untimed passes at batch 1 and at batch B (with each cache mode: a refresh and two
    cached steps), so the first timed mode does not pay for allocator and thread-pool start-up."""
    for size in sorted({1, batch_size}):
        for kv_cache in kv_caches:
            _warm(loaded, requests, size, forward_chunk_tokens, kv_cache)


def _warm(
    loaded: LoadedModel,
    requests: Sequence[BenchRequest],
    size: int,
    forward_chunk_tokens: ChunkTokens,
    kv_cache: str | None,
) -> None:
    engine = share_model(loaded, size, _dtype(loaded), forward_chunk_tokens)
    ids = [
        engine.add_request(r.prompt, r.params.replace(kv_cache=_cache(r, kv_cache)))
        for r in requests[:size]
    ]
    for _ in range(3):
        engine.step()
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished_requests():
        engine.step()


def _dtype(loaded: LoadedModel) -> str:
    return str(next(loaded.model.parameters()).dtype).removeprefix("torch.")


def _ids_hash(outputs: Sequence) -> str:
    blob = json.dumps([o.prompt_token_ids for o in outputs], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def run_mode(
    loaded: LoadedModel,
    requests: Sequence[BenchRequest],
    mode: str,
    *,
    batch_size: int,
    prophet: Prophet | None,
    forward_chunk_tokens: ChunkTokens = "auto",
    kv_cache: str | None = None,
) -> dict:
    """Run every request under ``mode`` (with ``kv_cache``) and measure it; returns the run's
    JSON record."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r}; choose from {', '.join(MODES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    size = 1 if mode == "reference" else batch_size
    engine = share_model(loaded, size, _dtype(loaded), forward_chunk_tokens)
    prompts = [r.prompt for r in requests]
    params = mode_params(requests, mode, prophet, kv_cache)
    submitted: list[tuple] = []

    start_mono = time.monotonic()
    start_cpu = time.process_time()
    start = time.perf_counter()
    if mode in CONTINUOUS_MODES:
        submitted += zip(prompts, params, strict=True)
        outputs = engine.generate(prompts, params, use_tqdm=False)
    else:
        outputs = []
        for i in range(0, len(prompts), size):
            chunk = slice(i, i + size)
            submitted += zip(prompts[chunk], params[chunk], strict=True)
            outputs += engine.generate(prompts[chunk], params[chunk], use_tqdm=False)
    wall = time.perf_counter() - start
    cpu = time.process_time() - start_cpu
    return _summarise(
        engine,
        requests,
        outputs,
        submitted,
        mode=mode,
        kv_cache=kv_cache,
        size=size,
        wall=wall,
        cpu=cpu,
        t0=start_mono,
    )


def _summarise(
    engine: Engine,
    requests: Sequence[BenchRequest],
    outputs: Sequence,
    submitted: Sequence[tuple],
    *,
    mode: str,
    kv_cache: str | None = None,
    size: int,
    wall: float,
    cpu: float,
    t0: float,
) -> dict:
    n = len(outputs)
    m = engine.metrics
    latencies = np.array([o.finished_time - t0 for o in outputs])
    passes = [o.num_forward_passes for o in outputs]
    checked = [
        get_task(r.task).check(r.task_prompt or "", o.text)
        for r, o in zip(requests, outputs, strict=True)
        if r.task is not None
    ]
    by_setting = _by_setting(requests, outputs)
    commits = [o.commit_step for o in outputs if o.committed_early]
    policy = submitted[0][1].early_commit if submitted else None
    forward = engine.runner.forward_seconds
    prompt_tokens = [len(o.prompt_token_ids) for o in outputs]
    return {
        "mode": mode,
        "kv_cache": kv_cache,
        "name": run_name(mode, kv_cache),
        "batch_size": size,
        "n": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s": m.generated_tokens / wall,
        "tokens_per_cpu_s": m.generated_tokens / cpu,
        "requests_per_s": n / wall,
        "generated_tokens": m.generated_tokens,
        "latency_mean_s": float(latencies.mean()),
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "mean_forward_passes": statistics.fmean(passes),
        "mean_steps_budget": statistics.fmean(r.params.steps for r in requests),
        "forward_passes_total": m.steps,
        "mean_batch_occupancy": m.mean_batch_size,
        "sequence_passes": m.sequences_in_passes,
        # Cost of one request in one forward pass: flat across modes means the machine charges
        # by work done, not by passes (compute-bound, as a CPU is).
        "wall_ms_per_sequence_pass": 1e3 * wall / max(1, m.sequences_in_passes),
        "cpu_ms_per_sequence_pass": 1e3 * cpu / max(1, m.sequences_in_passes),
        "mean_tokens_per_pass": m.tokens_in_passes / m.steps if m.steps else 0.0,
        # Tokens the model ran (queries: canvases, cached spans, read-only rows), all and per
        # request per pass: what a cache saves.
        "tokens_in_passes": m.tokens_in_passes,
        "forward_tokens_per_sequence_pass": m.tokens_in_passes / max(1, m.sequences_in_passes),
        "kv_cache_peak_bytes": m.kv_cache_peak_bytes,
        "kv_cache_bytes_after": m.kv_cache_bytes,  # 0: every cache freed
        "kv_cache_bytes_per_token": engine.kv_bytes_per_token,
        "kv_page_size": engine.kv_pool.page_size,  # a cache holds whole pages
        "forward_s": forward,
        "step_s": m.step_seconds,
        "overhead_share": max(0.0, 1.0 - forward / wall),
        "accuracy": statistics.fmean(checked) if checked else None,
        "accuracy_n": len(checked),
        "committed_early_share": len(commits) / n,
        "mean_commit_step": statistics.fmean(commits) if commits else None,
        "finish_reasons": dict(Counter(o.finish_reason for o in outputs)),
        "prompt_tokens": {
            "min": min(prompt_tokens),
            "mean": statistics.fmean(prompt_tokens),
            "max": max(prompt_tokens),
        },
        "by_setting": by_setting,
        "early_commit": None if policy is None else dataclasses.asdict(policy),
        "request_hash": request_hash(submitted),
        "prompt_ids_hash": _ids_hash(outputs),
        # Other load on the machine while this ran (1-minute average, read at the end).
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def setting_name(params: DecodeParams) -> str:
    """The workload's knobs of one request, as a short label."""
    return (
        f"gen {params.gen_length} block {params.block_length} steps {params.steps} "
        f"{params.remasking}"
    )


def _by_setting(requests: Sequence[BenchRequest], outputs: Sequence) -> dict[str, dict]:
    """Accuracy and forward passes per decoding setting: where a policy gains or loses."""
    groups: dict[str, list] = {}
    for r, o in zip(requests, outputs, strict=True):
        groups.setdefault(setting_name(r.params), []).append((r, o))
    out = {}
    for name in sorted(groups):
        pairs = groups[name]
        checked = [get_task(r.task).check(r.task_prompt or "", o.text) for r, o in pairs if r.task]
        out[name] = {
            "n": len(pairs),
            "accuracy": statistics.fmean(checked) if checked else None,
            "mean_forward_passes": statistics.fmean(o.num_forward_passes for _, o in pairs),
        }
    return out


RATIO_KEYS = (
    "tokens_per_s",
    "tokens_per_cpu_s",
    "requests_per_s",
    "mean_forward_passes",
    "forward_passes_total",
    "latency_mean_s",
)


def ratios(modes: dict[str, dict], against: str = "static") -> dict[str, dict[str, float]]:
    """Each mode's key numbers divided by ``against``'s (empty if that mode did not run)."""
    if against not in modes:
        return {}
    base = modes[against]
    return {
        name: {k: rec[k] / base[k] for k in RATIO_KEYS if base[k]} for name, rec in modes.items()
    }


def cache_ratios(runs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each cached run's key numbers divided by its own mode's uncached run (same requests,
    same policy, same process): the cache's speed-up."""
    out = {}
    for name, rec in runs.items():
        base = runs.get(rec.get("mode", name))
        if rec.get("kv_cache") is None or base is None or base is rec:
            continue
        keys = (*RATIO_KEYS, "tokens_in_passes")
        out[name] = {k: rec[k] / base[k] for k in keys if base.get(k)}
    return out


def check_same_requests(modes: dict[str, dict]) -> str:
    """The one request hash every mode saw; raises if any mode saw different requests."""
    hashes = {name: (rec["request_hash"], rec["prompt_ids_hash"]) for name, rec in modes.items()}
    if len(set(hashes.values())) != 1:
        raise RuntimeError(f"modes ran different requests: {hashes}")
    return next(iter(hashes.values()))[0]


def run_modes(
    loaded: LoadedModel,
    requests: Sequence[BenchRequest],
    modes: Sequence[str] = MODES,
    *,
    batch_size: int = 32,
    prophet: Prophet | None = None,
    repeats: int = 1,
    warmup: bool = True,
    log: Log | None = stderr_log,
    forward_chunk_tokens: ChunkTokens = "auto",
    kv_caches: Sequence[str | None] = (None,),
) -> dict:
    """Every mode (times every cache mode in ``kv_caches``) on the same requests, side by side
    in one process; runs are keyed by :func:`run_name`.

    With ``repeats > 1`` the runs go round-robin that many times (so a slow phase of a noisy
    machine hits one run of each, not every run of one), and each keeps its fastest run:
    background load only ever adds time.
    """
    prophet = prophet or Prophet()
    log = log or (lambda _msg: None)
    if warmup:
        warm_up(loaded, requests, batch_size, forward_chunk_tokens, kv_caches)
    plan = [(mode, cache) for mode in modes for cache in kv_caches]
    runs: dict[str, list[dict]] = {run_name(m, c): [] for m, c in plan}
    for r in range(repeats):
        for mode, cache in plan:
            rec = run_mode(
                loaded,
                requests,
                mode,
                batch_size=batch_size,
                prophet=prophet,
                forward_chunk_tokens=forward_chunk_tokens,
                kv_cache=cache,
            )
            runs[run_name(mode, cache)].append(rec)
            rep = f" (run {r + 1}/{repeats})" if repeats > 1 else ""
            log(
                f"  {run_name(mode, cache):<21} {rec['wall_s']:7.1f} s  "
                f"{rec['tokens_per_s']:8.1f} tok/s  {rec['mean_forward_passes']:5.1f} passes/req  "
                f"{rec['forward_tokens_per_sequence_pass']:6.1f} tokens/req-pass{rep}"
            )
    results = {}
    for mode, recs in runs.items():
        chosen = dict(min(recs, key=lambda rec: rec["wall_s"]))
        chosen["wall_s_runs"] = [rec["wall_s"] for rec in recs]
        results[mode] = chosen
    request_digest = check_same_requests(results)
    return {
        "modes": results,
        "ratios_vs_static": ratios(results),
        "ratios_vs_uncached": cache_ratios(results),
        "same_requests": True,
        "request_hash": request_digest,
    }


def work_units(loaded: LoadedModel, results: dict) -> float:
    """params x steps x tokens per request x requests of a full-steps run, the unit of the
    project's time budget (about 4e12 per two minutes on the development machine)."""
    params = sum(p.numel() for p in loaded.model.parameters())
    rec = next(iter(results.values()))
    tokens = rec["prompt_tokens"]["mean"] + _mean_gen(rec)
    return params * rec["mean_steps_budget"] * tokens * rec["n"]


def _mean_gen(rec: dict) -> float:
    return rec["generated_tokens"] / max(1, rec["n"])


__all__ = [
    "CONTINUOUS_MODES",
    "KV_CACHES",
    "MODES",
    "PROPHET_MODES",
    "cache_ratios",
    "check_same_requests",
    "mode_params",
    "parse_kv_caches",
    "parse_modes",
    "ratios",
    "run_mode",
    "run_modes",
    "run_name",
    "share_model",
    "warm_up",
    "work_units",
]
