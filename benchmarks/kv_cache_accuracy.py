"""What the block KV cache's approximation costs in accuracy on the shipped model, by block length.

    python benchmarks/kv_cache_accuracy.py --n 200 --out kv_cache_accuracy.json
    python benchmarks/kv_cache_accuracy.py --n 500 --block-lengths 8 --prompts other-orders \\
        --remasking low_confidence,random --prophet --out kv_cache_accuracy_orders.json

``foretell eval --kv-cache`` measures the shipped decoding (blocks of 8); this sweeps the block
length (full steps, greedy, the ``answer:`` marker forced) with no cache, Fast-dLLM's ``prefix``
and ``dual`` cache on the same held-out prompts. A cached step reads keys/values frozen at the
block's first step for every position it does not recompute (before the block with ``prefix``;
before and after it with ``dual``), so the sweep shows how much of the loss comes from which
frozen positions, and how it depends on the blocks.

A gap over 500 prompts has a standard error near 1 point, as large as the 1-point bound it is
judged by. ``--prompts other-orders`` (``arrange``) measures instead on the five other orders of
each held-out letter set: never trained on (training drops every order of a held-out set) and not
the prompts ``foretell eval`` reports, so a checkpoint chosen on those is checked on 5x as many
others. Each row keeps the paired counts (right only uncached / only cached) and the gap's
standard error.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from foretell.bench.report import machine_info, model_info, write_json
from foretell.engine import Engine
from foretell.models.default import HELDOUT_SEED
from foretell.models.default.params import default_decode_params, default_prophet
from foretell.tasks import Example, arrange, get_task

CACHES = (None, "prefix", "dual")
PROMPT_SETS = ("heldout", "other-orders")


def other_orders(examples: list[Example], task_name: str) -> list[Example]:
    """Every other order of each example's letters: held-out problems (training drops every order
    of a held-out set) in prompts a checkpoint was not chosen on."""
    if task_name != "arrange":
        raise ValueError(f"--prompts other-orders: only for task 'arrange', not {task_name!r}")
    out = []
    for ex in examples:
        letters = arrange.parse_prompt(ex.prompt)
        for order in itertools.permutations(letters):
            word = "".join(order)
            if word != letters:
                # Any order is a valid answer; the example's own answer is only a placeholder.
                out.append(Example(prompt=f"arrange {word}", answer=word, scratch=word))
    return out


def paired_gap(uncached: list[bool], cached: list[bool]) -> dict:
    """The cached run's accuracy gap on the same prompts, with its paired counts: only prompts
    decided differently move it, so its standard error comes from those (McNemar's, under no
    difference: sqrt(discordant) / n)."""
    if len(uncached) != len(cached) or not cached:
        raise ValueError("uncached and cached: the same non-empty prompts")
    only_uncached = sum(a and not b for a, b in zip(uncached, cached, strict=True))
    only_cached = sum(b and not a for a, b in zip(uncached, cached, strict=True))
    n = len(cached)
    return {
        "points_vs_uncached": 100 * (only_cached - only_uncached) / n,
        "right_only_uncached": only_uncached,
        "right_only_cached": only_cached,
        "points_standard_error": 100 * (only_uncached + only_cached) ** 0.5 / n,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--n", type=int, default=200, help="held-out prompts (at most 500; other-orders: 5 each)"
    )
    p.add_argument("--block-lengths", default="4,8,16,32")
    p.add_argument("--task", default="arrange")
    p.add_argument("--prompts", choices=PROMPT_SETS, default="heldout")
    p.add_argument("--remasking", default="low_confidence", help="comma-separated rules")
    p.add_argument("--prophet", action="store_true", help="also run the model's Prophet")
    p.add_argument(
        "--model", default=None, help="a checkpoint of the shipped model's tasks (default: shipped)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    task = get_task(args.task)
    examples = task.heldout(args.n, HELDOUT_SEED)
    if args.prompts == "other-orders":
        examples = other_orders(examples, args.task)
    torch.set_num_threads(args.threads)
    engine = Engine(args.model, max_num_seqs=64)
    # The shipped model's decoding layout, also on another checkpoint trained for its tasks.
    engine.default_params = default_decode_params(engine.tokenizer)
    engine.default_prophet = default_prophet()
    prompts = [[{"role": "user", "content": ex.prompt}] for ex in examples]
    policies = {"Full": None, **({"Prophet": engine.default_prophet} if args.prophet else {})}
    rows = []
    print(
        f"{'block':>5} {'remasking':>14} {'policy':>7} {'cache':>7} {'accuracy':>9} {'pts':>6} "
        f"{'only none/cache':>15} {'se':>5} {'passes':>7}  (n={len(examples)})"
    )
    settings = itertools.product(
        (int(b) for b in args.block_lengths.split(",")), args.remasking.split(","), policies
    )
    for block, remasking, policy in settings:
        uncached: list[bool] = []
        for cache in CACHES:  # None first: the others are compared with it
            base = engine.default_params.replace(
                block_length=block,
                remasking=remasking,
                kv_cache=cache,
                early_commit=policies[policy],
            )
            params = [base.replace(seed=i) for i in range(len(examples))]
            outs = engine.generate(prompts, params, use_tqdm=False)
            right = [task.check(ex, o.text) for ex, o in zip(examples, outs, strict=True)]
            uncached = right if cache is None else uncached
            row = {
                "block_length": block,
                "remasking": remasking,
                "policy": policy,
                "kv_cache": cache,
                "n_prompts": len(right),
                "accuracy": sum(right) / len(right),
                **paired_gap(uncached, right),
                "mean_forward_passes": sum(o.num_forward_passes for o in outs) / len(outs),
            }
            rows.append(row)
            counts = f"{row['right_only_uncached']}/{row['right_only_cached']}"
            print(
                f"{block:>5} {remasking:>14} {policy:>7} {cache or 'none':>7} "
                f"{100 * row['accuracy']:>8.2f}% {row['points_vs_uncached']:>+6.2f} "
                f"{counts:>15} "
                f"{row['points_standard_error']:>5.2f} "
                f"{row['mean_forward_passes']:>7.1f}",
                flush=True,
            )
    if args.out:
        result = {
            "rows": rows,
            "n": args.n,
            "n_prompts": len(examples),
            "task": args.task,
            "prompts": args.prompts,
            # What each row changes (block length, remasking, early commit, cache) starts here.
            "default_params": {k: str(v) for k, v in engine.default_params.__dict__.items()},
            "model": model_info(engine.model, engine.model_path),
            "machine": machine_info(),
            "args": vars(args),
        }
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
