"""What the block KV cache's approximation costs in accuracy on the shipped model, by block length.

    python benchmarks/kv_cache_accuracy.py --n 200 --out kv_cache_accuracy.json

``foretell eval --kv-cache`` measures the shipped decoding (blocks of 8); this sweeps the block
length (full steps, greedy low-confidence remasking, the ``answer:`` marker forced) with no
cache, Fast-dLLM's ``prefix`` and ``dual`` cache on the same held-out prompts. A cached step
reads keys/values frozen at the block's first step for every position it does not recompute
(before the block with ``prefix``; before and after it with ``dual``), so the sweep shows how
much of the loss comes from which frozen positions, and how it depends on the blocks.
"""

from __future__ import annotations

import argparse
import sys

import torch

from foretell.bench.report import machine_info, write_json
from foretell.engine import Engine
from foretell.models.default import HELDOUT_SEED
from foretell.tasks import get_task

CACHES = (None, "prefix", "dual")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="held-out prompts (at most 500)")
    p.add_argument("--block-lengths", default="4,8,16,32")
    p.add_argument("--task", default="arrange")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine(max_num_seqs=64)
    task = get_task(args.task)
    examples = task.heldout(args.n, HELDOUT_SEED)
    prompts = [[{"role": "user", "content": ex.prompt}] for ex in examples]
    rows = []
    print(f"{'block':>5} {'cache':>7} {'accuracy':>9} {'pts':>8} {'passes':>7}")
    for block in (int(b) for b in args.block_lengths.split(",")):
        plain = None
        for cache in CACHES:
            params = [
                engine.default_params.replace(block_length=block, kv_cache=cache, seed=i)
                for i in range(len(examples))
            ]
            outs = engine.generate(prompts, params, use_tqdm=False)
            right = [task.check(ex, o.text) for ex, o in zip(examples, outs, strict=True)]
            acc = sum(right) / len(right)
            plain = acc if cache is None else plain
            row = {
                "block_length": block,
                "kv_cache": cache,
                "accuracy": acc,
                "points_vs_uncached": 100 * (acc - plain),
                "mean_forward_passes": sum(o.num_forward_passes for o in outs) / len(outs),
            }
            rows.append(row)
            print(
                f"{block:>5} {cache or 'none':>7} {100 * acc:>8.1f}% "
                f"{row['points_vs_uncached']:>+8.1f} {row['mean_forward_passes']:>7.1f}",
                flush=True,
            )
    if args.out:
        result = {
            "rows": rows,
            "n": args.n,
            "task": args.task,
            "params": {k: str(v) for k, v in engine.default_params.__dict__.items()},
            "machine": machine_info(),
            "args": vars(args),
        }
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
