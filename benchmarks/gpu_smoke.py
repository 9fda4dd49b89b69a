"""GPU smoke test (issue #24): every attention backend x dtype x cache mode against SDPA.

    python benchmarks/gpu_smoke.py --out benchmarks/results/gpu_smoke.json

For a CUDA machine; **it has not been run**: the machines foretell is developed on have no GPU.
Without CUDA it says so and exits 0 (CI does not run it), unless ``--device cpu`` asks for the
dry run of its own code over the one backend a CPU has (SDPA against itself).

For each backend (``sdpa``, and ``flash`` / ``xformers`` where installed), dtype (float32,
bfloat16, float16; flash-attn only runs in half precision) and cache mode (none, prefix, dual),
one mixed batch of greedy LLaDA requests (low-confidence, random and threshold remasking,
Prophet on half, prompts of different lengths, each request seeded) is generated, and:

- its tokens are compared with the same batch run with the SDPA backend in the same dtype
  (``identical``: requests whose tokens all match; half-precision kernels may round
  differently, so a near-tie can flip a token: the table shows how many do);
- the dispatched aten ops and host reads of tensor values per engine step are counted with the
  counters of ``benchmarks/host_overhead.py`` (on a GPU, kernel launches and synchronisations).

Then the batched step's per-row sampling (temperature, top-p, top-k and guidance factors, each
row with its own) is checked bit for bit against each row alone with Python scalars, in
float32, float64, bfloat16 and float16: CUDA divides by a host scalar through its reciprocal,
which the row-wise code follows on CUDA, untested until this runs there. Any row that differs
fails the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_overhead import HostReadCounter, OpCounter

from foretell import DecodeParams, Engine, Prophet
from foretell.bench.report import machine_info, write_json
from foretell.models.registry import LoadedModel
from foretell.models.tiny import tiny_model

DTYPES = ("float32", "bfloat16", "float16")
CACHES = (None, "prefix", "dual")
REMASKINGS = ("low_confidence", "random", "confidence_threshold")
HALF = ("bfloat16", "float16")


def backends(device: str) -> list[str]:
    """SDPA, and the optional CUDA backends that are installed."""
    found = ["sdpa"]
    if device == "cuda":
        found += [b for b, m in (("flash", "flash_attn"), ("xformers", "xformers")) if _has(m)]
    return found


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def workload(cache: str | None, n: int = 12) -> list[tuple[list[int], DecodeParams]]:
    """``n`` seeded requests of one cache mode: every remasking rule, Prophet on half,
    prompts of 5 to 60 tokens."""
    out = []
    for i in range(n):
        params = DecodeParams(
            gen_length=32,
            block_length=8,
            steps=16,
            remasking=REMASKINGS[i % len(REMASKINGS)],
            threshold=0.7,
            kv_cache=cache,
            early_commit=Prophet(answer_start=None) if i % 2 else None,
            seed=i,
        )
        prompt = [4 + (7 * i + 3 * j) % 40 for j in range(5 + 5 * i)]
        out.append((prompt, params))
    return out


def run(loaded: LoadedModel, backend: str, dtype: str, device: str, cases) -> dict:
    """One batch: token ids per request, and ops and host reads per step."""
    engine = Engine(
        loaded, dtype=dtype, device=device, attention_backend=backend, max_num_seqs=len(cases)
    )
    for prompt, params in cases:
        engine.add_request(prompt, params)
    ops, reads = OpCounter(), HostReadCounter()
    outputs, steps = {}, 0
    with ops, reads:
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs[int(out.request_id)] = out
            steps += 1
    errors = [o.error for o in outputs.values() if o.finish_reason == "error"]
    return {
        "tokens": [outputs[i].token_ids for i in sorted(outputs)],
        "errors": errors,
        "steps": steps,
        "ops_per_step": ops.count / steps,
        "reads_per_step": reads.reads / steps,
    }


DTYPES_FILTERED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def row_filtering(device: str, dtypes=DTYPES_FILTERED, trials: int = 40) -> list[dict]:
    """Per dtype, how many rows of the batched step's per-row sampling differ from the same
    row alone with Python scalars (the references' expression): temperature, top-p and
    top-k filtering (``filter_logits_by_row``), and guidance factors (``scale_rows``), with
    ties, a ``-inf`` column, and values no dtype holds exactly; and the first (trial, row)
    that differs. On CUDA a division by a host scalar is a product with its reciprocal,
    which ``scale_rows`` follows there: this is what checks it. ``tests/test_batched_step.py``
    runs it on the CPU."""
    from foretell.decoding.unmask import filter_logits, filter_logits_by_row, scale_rows

    out = []
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        rows_checked, differ, first = 0, 0, None
        for trial in range(trials):
            n, vocab = int(rng.integers(1, 24)), int(rng.choice([7, 50, 333]))
            logits = torch.from_numpy(rng.standard_normal((n, vocab)) * rng.choice([1, 5, 30]))
            if trial % 3 == 0:
                logits = (logits * 2).round() / 2  # ties
            logits = logits.to(device, dtype)
            logits[:, 3] = float("-inf")
            temperature = rng.choice([0.0, 0.7, 0.3, 1.0, 1.3, 0.123456789], n)
            top_p = rng.choice([1.0, 0.9, 0.5, 0.95, 0.3333333], n)
            top_k = rng.choice([0, 1, 3, 8, 1000], n)
            scale = rng.choice([0.3, 1.7, 2.0, 0.123456789], n)
            together = filter_logits_by_row(logits, temperature, top_p, top_k)
            guided = scale_rows(logits, scale + 1, divide=False)
            for r in range(n):
                alone = filter_logits(
                    logits[r : r + 1],
                    float(temperature[r]),
                    None if top_p[r] >= 1 else float(top_p[r]),
                    None if top_k[r] == 0 else int(top_k[r]),
                )
                scalar = (float(scale[r]) + 1) * logits[r]
                same = torch.equal(together[r : r + 1], alone) and torch.equal(guided[r], scalar)
                if not same and first is None:
                    first = (trial, r)
                differ += not same
                rows_checked += 1
        name = str(dtype).removeprefix("torch.")
        out.append({"dtype": name, "rows": rows_checked, "differ": differ, "first": first})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; skipped (this script is for a GPU machine)")
        return 0
    dtypes = DTYPES if args.device == "cuda" else ("float32",)
    rows = []
    for dtype in dtypes:
        loaded = tiny_model("llada", seed=7, dtype=dtype)
        for cache in CACHES:
            cases = workload(cache)
            reference = run(loaded, "sdpa", dtype, args.device, cases)
            for backend in backends(args.device):
                if backend == "flash" and dtype not in HALF:
                    continue  # flash-attn kernels take half precision only
                res = (
                    reference
                    if backend == "sdpa"
                    else run(loaded, backend, dtype, args.device, cases)
                )
                same = sum(a == b for a, b in zip(res["tokens"], reference["tokens"], strict=True))
                rows.append(
                    {
                        "backend": backend,
                        "dtype": dtype,
                        "kv_cache": cache or "none",
                        "requests": len(cases),
                        "identical": same,
                        "errors": res["errors"],
                        "steps": res["steps"],
                        "ops_per_step": res["ops_per_step"],
                        "reads_per_step": res["reads_per_step"],
                    }
                )
    header = f"{'backend':<9}{'dtype':<10}{'cache':<7}{'identical':>10}{'errors':>7}"
    print(header + f"{'ops/step':>10}{'reads/step':>11}")
    for r in rows:
        print(
            f"{r['backend']:<9}{r['dtype']:<10}{r['kv_cache']:<7}"
            f"{r['identical']:>6}/{r['requests']:<3}{len(r['errors']):>7}"
            f"{r['ops_per_step']:>10.1f}{r['reads_per_step']:>11.1f}"
        )
    filtering = row_filtering(args.device)
    print("per-row sampling against each row alone (rows that differ):")
    for r in filtering:
        print(f"  {r['dtype']:<10}{r['differ']:>5} of {r['rows']}")
    if args.out:
        write_json(
            args.out,
            {
                "rows": rows,
                "row_filtering": filtering,
                "device": args.device,
                "machine": machine_info(),
            },
        )
    failed = [r for r in rows if r["errors"]] + [r for r in filtering if r["differ"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
