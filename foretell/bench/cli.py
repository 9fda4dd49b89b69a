"""``foretell bench``: the scheduling modes side by side on one workload, in one run.

Arguments are defined here (not in foretell/cli.py) so that the benchmark owns its options;
nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

MODE_NAMES = "reference,static,static-prophet,engine,engine-prophet"
KV_CACHE_NAMES = "none,prefix,dual"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _names(text: str) -> list[str]:
    """Comma-separated remasking rules, checked against DecodeParams' own list."""
    from foretell.params import REMASKING, REMASKING_ALIASES

    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in REMASKING and v not in REMASKING_ALIASES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"unknown remasking {unknown or text!r}; choose from {', '.join(REMASKING)}"
        )
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def chunk_tokens(text: str) -> int | str | None:
    """``--forward-chunk-tokens``: an integer, ``auto`` or ``none``."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"need an integer, 'auto' or 'none', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"need a positive integer, got {value}")
    return value


def add_forward_chunk_argument(p: argparse.ArgumentParser) -> None:
    """``--forward-chunk-tokens``, for every command that builds an engine."""
    p.add_argument(
        "--forward-chunk-tokens",
        type=chunk_tokens,
        default="auto",
        help="tokens per forward chunk: an integer, 'auto' (640 on CPU, the default) or 'none'",
    )


def _pair(text: str) -> tuple[int, int]:
    values = _ints(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated integers, got {text!r}")
    return values[0], values[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    p.add_argument(
        "--model",
        help="checkpoint directory or hub id (default: the shipped model); 'tiny' = a tiny "
        "random model (smoke tests: throughput only, accuracy meaningless); 'random' = the "
        "shipped architecture at --random-shape with random weights, random prompts of "
        "--prompt-tokens, gen 256, blocks of 32, full steps (speed only)",
    )
    p.add_argument(
        "--random-shape",
        type=_pair,
        help="hidden size,layers of --model random (default 256,8)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=_pair,
        help="min,max: random token-id prompts of this many tokens instead of task prompts "
        "(default 64,256 with --model random)",
    )
    p.add_argument(
        "--kv-cache",
        default="none",
        help=f"comma-separated block KV cache modes to run each mode with ({KV_CACHE_NAMES}; "
        "default none); runs are named mode+cache",
    )
    p.add_argument(
        "--prophet-span",
        type=_pair,
        help="start,length of Prophet's answer span within the generation (default: the "
        "model's; with --model random, 5 tokens from the start of the last block)",
    )
    p.add_argument(
        "--default-layout",
        action="store_true",
        help="decode --model with the shipped model's layout (answer marker, Prophet span), "
        "for checkpoints trained by training/train.py",
    )
    p.add_argument("--n", type=int, default=200, help="requests in the workload (default 200)")
    p.add_argument(
        "--batch-size",
        "--max-num-seqs",
        dest="batch_size",
        type=int,
        default=32,
        help="static batch size B and the engine's max_num_seqs (default 32)",
    )
    p.add_argument("--modes", help=f"comma-separated (default {MODE_NAMES})")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--workload", help="JSONL of requests instead of drawn ones (see docs)")
    p.add_argument(
        "--workload-preset",
        choices=["varied"],
        help="varied: random prompts of 16-512 tokens, gen 64-256 in blocks of 32 at full "
        "steps, each request with its own cache mode (none/prefix/dual, a third each) and "
        "Prophet on half (thresholds 100,100,0.1 unless --thresholds); modes default to engine "
        "(use with --model random)",
    )
    p.add_argument("--save-workload", help="write the workload used as JSONL here")
    p.add_argument("--tasks", help="comma-separated task names (default: the model's tasks)")
    p.add_argument(
        "--block-lengths", type=_ints, help="block lengths to mix (default: model-dependent)"
    )
    p.add_argument(
        "--step-budgets", type=_ints, help="step budgets to mix (default: model-dependent)"
    )
    p.add_argument(
        "--remaskings",
        type=_names,
        help="remasking rules to mix, e.g. low_confidence,random (default: model-dependent)",
    )
    p.add_argument(
        "--gen-lengths",
        type=_ints,
        help="generation lengths to mix (the shipped model's layout is fixed at its own)",
    )
    p.add_argument(
        "--thresholds",
        type=_floats,
        help="Prophet's early,mid,late gap thresholds (default: the model's)",
    )
    p.add_argument(
        "--prophet-statistic",
        choices=["mean", "min"],
        help="Prophet's gap statistic over the answer span (default: the model's)",
    )
    p.add_argument("--repeats", type=int, default=1, help="round-robin repeats; fastest kept")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up passes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--dtype", default="float32")
    add_forward_chunk_argument(p)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG chart here")
    p.add_argument(
        "--replicas",
        type=_ints,
        help="instead of the modes: engine-prophet on R engine replicas under Ray Data, for "
        "each R given (e.g. 1,2), next to one engine in this process (needs foretell[ray]; "
        "--batch-size is then the rows per replica batch, --max-num-seqs its engine's)",
    )
    p.add_argument(
        "--replica-max-num-seqs", type=int, default=32, help="each replica's max_num_seqs"
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="also: wall time for N in --scaling-n and throughput against max_num_seqs",
    )
    p.add_argument("--scaling-n", type=_ints, default=[100, 200, 400])
    p.add_argument("--scaling-seqs", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--scaling-sweep-n", type=int, help="requests per max_num_seqs point (--n)")
    p.add_argument("--scaling-mode", default="engine-prophet")
    p.add_argument("--scaling-repeats", type=int, default=2, help="fastest of R per point")
    p.add_argument("--scaling-plot", help="PNG for the scaling run")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; prints the table, writes JSON / PNG."""
    import torch

    from foretell.bench.report import (
        evaluate_targets,
        format_cache_table,
        format_settings,
        format_table,
        format_targets,
        machine_info,
        model_info,
        plot_modes,
        plot_scaling,
        write_json,
    )
    from foretell.bench.run import parse_kv_caches, parse_modes, run_modes, work_units
    from foretell.bench.scaling import format_scaling, run_scaling
    from foretell.bench.setup import RANDOM_MODEL, RANDOM_SHAPE, configure_prophet, load_for_bench
    from foretell.bench.workload import (
        VARIED_BLOCK_LENGTH,
        VARIED_GEN_LENGTHS,
        VARIED_THRESHOLDS,
        describe,
        load_workload,
        make_varied_workload,
        make_workload,
        save_workload,
    )

    varied = args.workload_preset == "varied"
    if varied and args.workload:
        raise ValueError("workload_preset: draws the workload; --workload reads one")
    modes = parse_modes(args.modes or ("engine" if varied else MODE_NAMES))
    kv_caches = parse_kv_caches(args.kv_cache)
    if args.n < 1:
        raise ValueError(f"n: must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {args.batch_size}")
    if args.repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {args.repeats}")
    if args.threads < 1:
        raise ValueError(f"threads: must be >= 1, got {args.threads}")
    if args.random_shape and args.model != RANDOM_MODEL:
        raise ValueError("random_shape: only for --model random")
    torch.set_num_threads(args.threads)
    setup = load_for_bench(
        args.model,
        dtype=args.dtype,
        default_layout=args.default_layout,
        random_shape=args.random_shape or RANDOM_SHAPE,
    )
    gen_lengths = args.gen_lengths or setup.gen_lengths
    step_budgets = args.step_budgets or setup.step_budgets
    prophet = setup.prophet
    if varied and setup.per_block_steps:
        raise ValueError(
            "workload-preset: 'varied' draws LLaDA's blocks of 32 at full steps; a block-causal "
            "model counts steps per block of its own (use the default workload)"
        )
    if varied:
        # The preset's own lengths (Prophet's span follows them below); Prophet commits in its
        # late phase, as in the KV-cache workload, not at once on a random model's wide gaps.
        gen_lengths, args.block_lengths = list(VARIED_GEN_LENGTHS), [VARIED_BLOCK_LENGTH]
        args.thresholds = args.thresholds or VARIED_THRESHOLDS
    if args.model == RANDOM_MODEL or varied:
        # Full steps for every generation length asked for; Prophet's span at the start of the
        # shortest generation's last block.
        step_budgets = args.step_budgets or gen_lengths
        block = max(args.block_lengths or setup.block_lengths)
        start = max(0, min(gen_lengths) - block)
        prophet = dataclasses.replace(prophet, answer_start=start)
    if args.prophet_span:
        start, length = args.prophet_span
        prophet = dataclasses.replace(prophet, answer_start=start, answer_length=length)
    prophet = configure_prophet(prophet, args.thresholds, args.prophet_statistic)
    tasks = args.tasks.split(",") if args.tasks else list(setup.tasks)
    prompt_tokens = args.prompt_tokens or setup.prompt_tokens

    def draw(n: int) -> list:
        if varied:
            return make_varied_workload(
                setup.base, n, seed=args.seed, prompt_vocab=setup.prompt_vocab
            )
        return make_workload(
            setup.base,
            n,
            seed=args.seed,
            tasks=tasks,
            block_lengths=args.block_lengths or setup.block_lengths,
            step_budgets=step_budgets,
            gen_lengths=gen_lengths,
            remaskings=args.remaskings or setup.remaskings,
            prompt_tokens=prompt_tokens,
            prompt_vocab=setup.prompt_vocab if prompt_tokens else None,
            per_block_steps=setup.per_block_steps,
        )

    if args.replicas:
        return _bench_replicas(args, setup, prophet, draw)

    if args.workload:
        chat = bool(getattr(setup.loaded.tokenizer, "chat_template", None))
        requests = load_workload(args.workload, setup.base, chat_template=chat)
        source = {"file": str(args.workload)}
    else:
        requests = draw(args.n)
        source = {
            "preset": args.workload_preset,
            "drawn": {"seed": args.seed, "prompts": "random token ids, 16-512 tokens"}
            if varied
            else {
                "seed": args.seed,
                "tasks": tasks,
                "block_lengths": args.block_lengths or setup.block_lengths,
                "step_budgets": step_budgets,
                "gen_lengths": gen_lengths or [setup.base.gen_length],
                "remaskings": args.remaskings or setup.remaskings or [setup.base.remasking],
                "prompts": (
                    f"random token ids, {prompt_tokens[0]}-{prompt_tokens[1]} tokens"
                    if prompt_tokens
                    else "held-out task prompts, chat template"
                ),
            },
        }
    if args.save_workload:
        save_workload(requests, args.save_workload)

    machine = machine_info()
    print(
        f"foretell bench: {len(requests)} requests, modes {', '.join(modes)}, kv cache "
        f"{', '.join(c or 'none' for c in kv_caches)}, B={args.batch_size}"
        f", model {setup.name} ({model_info(setup.loaded.model, setup.loaded.path)['parameters']:,}"
        f" params), {machine['cpu_count']} CPUs, {args.threads} torch thread(s), torch "
        f"{machine['torch']}",
        file=sys.stderr,
    )
    result = run_modes(
        setup.loaded,
        requests,
        modes,
        batch_size=args.batch_size,
        prophet=prophet,
        repeats=args.repeats,
        warmup=not args.no_warmup,
        forward_chunk_tokens=args.forward_chunk_tokens,
        kv_caches=kv_caches,
    )
    first = next(iter(result["modes"].values()))
    result["workload"] = {**describe(requests), "prompt_tokens": first["prompt_tokens"], **source}
    result["config"] = {
        "batch_size": args.batch_size,
        "modes": modes,
        "kv_caches": [c or "none" for c in kv_caches],
        "prophet": prophet.__dict__,
        "repeats": args.repeats,
        "warmup": not args.no_warmup,
        "threads": args.threads,
        "dtype": args.dtype,
        "forward_chunk_tokens": args.forward_chunk_tokens,
        "base_params": {k: v for k, v in setup.base.__dict__.items() if k != "early_commit"},
    }
    result["model"] = {"name": setup.name, **model_info(setup.loaded.model, setup.loaded.path)}
    result["machine"] = machine
    result["work_units_full_steps"] = work_units(setup.loaded, result["modes"])
    result["targets"] = evaluate_targets(result["modes"])
    result["args"] = {k: v for k, v in vars(args).items() if not callable(v)}
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    print()
    print(format_table(result["modes"]))
    caches = format_cache_table(result["modes"])
    if caches:
        print("\nKV cache:")
        print(caches)
    settings = format_settings(result["modes"])
    if settings:
        print("\nper setting:")
        print(settings)
    if result["targets"]:
        print("\ntargets:")
        print(format_targets(result["targets"]))
    print(f"\nevery mode ran the same {len(requests)} requests: {result['request_hash'][:16]}")

    if args.scaling:
        print("\nscaling:", file=sys.stderr)
        sweep_n = args.scaling_sweep_n or args.n
        pool = draw(max([*args.scaling_n, sweep_n])) if not args.workload else requests

        def prefix(n: int) -> list:
            if n > len(pool):
                raise ValueError(f"scaling: {n} requests asked, the workload has {len(pool)}")
            return pool[:n]

        result["scaling"] = run_scaling(
            setup.loaded,
            prefix,
            mode=args.scaling_mode,
            ns=args.scaling_n,
            batch_size=args.batch_size,
            max_num_seqs=args.scaling_seqs,
            sweep_n=sweep_n,
            prophet=prophet,
            repeats=args.scaling_repeats,
            forward_chunk_tokens=args.forward_chunk_tokens,
        )
        print()
        print(format_scaling(result["scaling"]))
        if args.scaling_plot:
            plot_scaling(result["scaling"], args.scaling_plot)

    if args.out:
        write_json(args.out, result)
    if args.plot:
        plot_modes(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _bench_replicas(args: argparse.Namespace, setup, prophet, draw) -> int:
    """``--replicas``: the same workload on each replica count (foretell/bench/replicas.py)."""
    from foretell.bench.replicas import format_replicas, run_replicas
    from foretell.bench.report import machine_info, write_json
    from foretell.bench.workload import describe
    from foretell.models.default import HELDOUT_SIZE

    if any(r < 1 for r in args.replicas):
        raise ValueError(f"replicas: must be >= 1, got {args.replicas}")
    if args.model == "tiny" or args.workload:
        raise ValueError("replicas: runs the shipped model or a --model path on drawn requests")
    # Throughput only: past the held-out prompts the workload repeats them (same params).
    pool = draw(min(args.n, HELDOUT_SIZE))
    requests = (pool * -(-args.n // len(pool)))[: args.n]
    print(
        f"foretell bench --replicas: {len(requests)} requests ({len(pool)} distinct), "
        f"engine-prophet, replicas {args.replicas}, {args.threads} torch thread(s) each",
        file=sys.stderr,
    )
    result = run_replicas(
        requests,
        args.replicas,
        model=args.model,
        prophet=prophet,
        batch_size=args.batch_size,
        max_num_seqs=args.replica_max_num_seqs,
        threads=args.threads,
        dtype=args.dtype,
        forward_chunk_tokens=args.forward_chunk_tokens,
    )
    result["workload"] = {**describe(requests), "distinct": len(pool), "seed": args.seed}
    result["machine"] = machine_info()
    result["args"] = {k: v for k, v in vars(args).items() if not callable(v)}
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print()
    print(format_replicas(result))
    if args.out:
        write_json(args.out, result)
    return 0
