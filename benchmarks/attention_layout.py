"""Attention layout on CPU: packed per-sequence SDPA against a padded batch with a boolean mask.

    python benchmarks/attention_layout.py --out benchmarks/results/attention_layout.json

The same mixed-length batch goes through ``model.forward_packed`` (canvases back to back, no
padding, one SDPA call per sequence, as the engine runs) and through ``model(input_ids,
attention_mask)`` (left-padded to the longest, one batched SDPA call with a boolean key mask), on
a model of the default model's size (the shipped weights if present, else the same shape with
random weights: speed does not depend on the values). Both give the same logits on real tokens
(checked). Timings alternate between the layouts and keep the median, so background load hits
both alike.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from foretell.bench.report import machine_info, model_info, write_json
from foretell.bench.setup import default_size_model


def workload_lengths(tokenizer, n: int, seed: int) -> list[int]:
    """Canvas lengths (prompt + generation) of the bench workload's first ``n`` requests."""
    from foretell.bench.setup import DEFAULT_BLOCK_LENGTHS, DEFAULT_STEP_BUDGETS
    from foretell.bench.workload import make_workload
    from foretell.models.default import TASK_NAMES
    from foretell.models.default.params import default_decode_params

    base = default_decode_params(tokenizer)
    reqs = make_workload(
        base,
        n,
        seed=seed,
        tasks=TASK_NAMES,
        block_lengths=DEFAULT_BLOCK_LENGTHS,
        step_budgets=DEFAULT_STEP_BUDGETS,
    )
    out = []
    for r in reqs:
        ids = tokenizer.apply_chat_template(r.prompt, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        out.append(len(ids) + r.params.gen_length)
    return out


def make_batch(lengths: list[int], vocab: int, mask_id: int, seed: int):
    """Random canvases of the given lengths, packed and left-padded."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        s = torch.randint(4, vocab, (n,), generator=g)
        s[n // 2 :] = mask_id  # like a canvas: a masked generation after the prompt
        seqs.append(s)
    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(n) for n in lengths])
    width = max(lengths)
    padded = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        padded[row, width - len(s) :] = s
        mask[row, width - len(s) :] = 1
    return ids, positions, padded, mask


def time_case(model, lengths: list[int], repeats: int, seed: int) -> dict:
    ids, positions, padded, mask = make_batch(lengths, model.vocab_size, model.mask_token_id, seed)

    def packed():
        return model.lm_logits(model.forward_packed(ids, positions, lengths))

    def padded_run():
        return model(padded, attention_mask=mask)

    with torch.inference_mode():
        a, b = packed(), padded_run()
        real = torch.cat([b[row, b.shape[1] - n :] for row, n in enumerate(lengths)])
        max_diff = float((a - real).abs().max())
        times: dict[str, list[float]] = {"packed": [], "padded": []}
        for _ in range(repeats):
            for name, fn in (("packed", packed), ("padded", padded_run)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    packed_ms = 1e3 * statistics.median(times["packed"])
    padded_ms = 1e3 * statistics.median(times["padded"])
    width = max(lengths)
    return {
        "batch": len(lengths),
        "min_len": min(lengths),
        "max_len": width,
        "real_tokens": sum(lengths),
        "padded_tokens": width * len(lengths),
        "padding_share": 1 - sum(lengths) / (width * len(lengths)),
        "packed_ms": packed_ms,
        "padded_ms": padded_ms,
        "padded_over_packed": padded_ms / packed_ms,
        "max_abs_logit_diff": max_diff,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded, name = default_size_model()
    model = loaded.model.float().eval()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    pool = workload_lengths(loaded.tokenizer, max(sizes), args.seed)
    rng = random.Random(args.seed)
    cases = [("workload mix", b, pool[:b]) for b in sizes]
    # Where packing should matter: canvases of very different lengths.
    cases += [
        ("wide spread 32-256", b, [rng.randint(32, 256) for _ in range(b)]) for b in sizes[1:]
    ]
    rows = []
    header = (
        f"{'case':<20} {'B':>3} {'lens':>9} {'pad%':>5} {'packed ms':>10} {'padded ms':>10} "
        f"{'padded/packed':>14}"
    )
    print(f"model: {name}, {model_info(model, loaded.path)['parameters']:,} parameters")
    print(header)
    print("-" * len(header))
    for label, _b, lengths in cases:
        row = {"case": label, **time_case(model, lengths, args.repeats, args.seed)}
        rows.append(row)
        print(
            f"{label:<20} {row['batch']:>3} {row['min_len']:>4}-{row['max_len']:<4} "
            f"{100 * row['padding_share']:>4.0f}% {row['packed_ms']:>10.1f} "
            f"{row['padded_ms']:>10.1f} {row['padded_over_packed']:>13.2f}x"
        )
    print("padded/packed > 1: the packed layout (what the engine runs) is faster.")
    if args.out:
        result = {
            "model": {"name": name, **model_info(model, loaded.path)},
            "cases": rows,
            "repeats": args.repeats,
            "machine": machine_info(),
            "command": "python benchmarks/attention_layout.py " + " ".join(sys.argv[1:]),
        }
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
