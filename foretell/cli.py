"""The ``foretell`` command: generate | bench | eval | serve (also ``python -m foretell``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from foretell.params import DecodeParams, Prophet, row_params


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (defaults: the model's own, else DecodeParams')")
    g.add_argument("--gen-length", type=int)
    g.add_argument(
        "--steps", type=int, help="step budget; per block for block-causal models (SDAR, LLaDA2)"
    )
    g.add_argument(
        "--block-length", type=int, help="block size (block-causal models: the model's default)"
    )
    g.add_argument("--temperature", type=float)
    g.add_argument(
        "--remasking",
        help="low_confidence | random | margin | entropy | confidence_threshold | origin (Dream)",
    )
    g.add_argument("--threshold", type=float, help="for confidence_threshold")
    g.add_argument("--cfg-scale", type=float)
    g.add_argument(
        "--kv-cache", choices=["prefix", "dual"], help="Fast-dLLM's block KV cache (docs/guide.md)"
    )
    g.add_argument("--seed", type=int)
    g.add_argument("--early-commit", choices=["prophet", "none"])
    g.add_argument("--thresholds", help="Prophet's early,mid,late gap thresholds, e.g. 7.5,5,2.5")
    g.add_argument("--stop", action="append", help="cut the text at this string (repeatable)")
    g.add_argument(
        "--stop-token-id",
        dest="stop_token_ids",
        type=int,
        action="append",
        help="end the generation after this token id (repeatable)",
    )
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        default=None,
        help="block-causal models: do not stop at the model's EOS",
    )


def _decode_params(args: argparse.Namespace, engine) -> DecodeParams:
    base: DecodeParams = engine.default_params
    changes = {
        name: getattr(args, name) for name in _PARAM_FLAGS if getattr(args, name, None) is not None
    }
    policy = base.early_commit
    if args.early_commit == "none":
        policy = None
    elif args.early_commit == "prophet" or args.thresholds:
        policy = policy or engine.default_prophet
        if args.thresholds:
            values = tuple(float(v) for v in args.thresholds.split(","))
            policy = Prophet(**{**policy.__dict__, "thresholds": values})
    changes["early_commit"] = policy
    return base.override(**changes)  # derived defaults follow a new gen_length unless given


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads``: torch's intra-op threads, set before any model loads (every command that
    runs an engine calls this first; Ray replicas set it in each actor)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads: must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _engine(args: argparse.Namespace):
    from foretell.engine import Engine

    _set_threads(args)
    return Engine(
        args.model,
        max_num_seqs=args.max_num_seqs,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        forward_chunk_tokens=args.forward_chunk_tokens,
        overlap=args.overlap or False,
        forward_threads=args.forward_threads,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    if args.replicas is not None:
        return _generate_on_ray(args)
    engine = _engine(args)
    params = _decode_params(args, engine)
    if args.file:
        lines = Path(args.file).read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        prompts, plist = [], []
        for i, rec in enumerate(records):
            if "prompt" not in rec:
                raise ValueError(f"{args.file} line {i + 1}: prompt: missing")
            prompts.append(_as_prompt(engine, rec["prompt"], args.raw))
            try:
                plist.append(row_params(params, rec.get("params")))
            except ValueError as err:
                raise ValueError(f"{args.file} line {i + 1}: {err}") from None
        outputs = engine.generate(prompts, plist, use_tqdm=True)
        sink = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115
        try:
            for rec, out in zip(records, outputs, strict=True):
                sink.write(json.dumps({**rec, **_summary(out)}) + "\n")
        finally:
            if args.out:
                sink.close()
        return 0
    if not args.prompt:
        raise ValueError("prompt: give a PROMPT or --file prompts.jsonl")
    (out,) = engine.generate([_as_prompt(engine, args.prompt, args.raw)], params, use_tqdm=False)
    print(out.text)
    early = f"yes, at step {out.commit_step}" if out.committed_early else "no"
    resolved = engine.resolve_params(params)
    budget = f"/{resolved.steps}"
    if getattr(engine.model, "block_causal", False):  # steps count per block there
        budget = f" ({resolved.steps} steps per block of {resolved.block_length})"
    print(
        f"[forward passes: {out.num_forward_passes}{budget}, committed early: {early}, "
        f"finish: {out.finish_reason}]",
        file=sys.stderr,
    )
    return 0 if out.finish_reason != "error" else 1


def _generate_on_ray(args: argparse.Namespace) -> int:
    """``--file ... --replicas N``: the same job on Ray Data, one engine per replica
    (docs/distributed.md)."""
    import functools

    if not args.file:
        raise ValueError("replicas: needs --file (bulk generation)")
    if args.replicas < 1:
        raise ValueError(f"replicas: must be >= 1, got {args.replicas}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {args.batch_size}")
    try:
        from foretell.distributed.job import auto_batch_size, read_records, run_job
    except ImportError as err:
        raise ValueError(
            f"replicas: needs the ray extra (pip install 'foretell[ray]'): {err}"
        ) from err
    records = read_records(args.file)
    batch_size = args.batch_size or auto_batch_size(len(records), args.replicas, args.max_num_seqs)
    flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k in _DECODE_FLAGS})
    stats = run_job(
        records,
        args.out,
        model=args.model,
        # Built in each replica: the flags apply over the model's own defaults.
        params=functools.partial(_decode_params, flags),
        replicas=args.replicas,
        batch_size=batch_size,
        engine_kwargs={
            "max_num_seqs": args.max_num_seqs,
            "dtype": args.dtype,
            "attention_backend": args.attention_backend,
            "forward_chunk_tokens": args.forward_chunk_tokens,
            "overlap": args.overlap or False,
            "forward_threads": args.forward_threads,
        },
        chat_template=not args.raw,
        threads=args.threads,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        ray_address=args.ray_address,
    )
    print(
        f"[{stats['rows']} rows ({stats['errors']} with errors), "
        f"{stats['generated_tokens']} tokens in {stats['seconds']:.1f}s on {args.replicas} "
        f"replica(s), batches of {batch_size}]",
        file=sys.stderr,
    )
    return 0


# Decoding flags that are DecodeParams fields of the same name; with Prophet's two, every
# decoding flag (what a Ray job takes over to its replicas).
_PARAM_FLAGS = (
    "gen_length",
    "steps",
    "block_length",
    "temperature",
    "remasking",
    "threshold",
    "cfg_scale",
    "seed",
    "stop",
    "kv_cache",
    "stop_token_ids",
    "ignore_eos",
)
_DECODE_FLAGS = (*_PARAM_FLAGS, "early_commit", "thresholds")


def _as_prompt(engine, text: object, raw: bool) -> object:
    """Text goes through the tokenizer's chat template when it has one (instruct models and
    the shipped model were trained on it), unless ``--raw``."""
    has_template = bool(getattr(engine.tokenizer, "chat_template", None))
    if isinstance(text, str) and has_template and not raw:
        return [{"role": "user", "content": text}]
    return text


def _summary(out) -> dict:
    return out.summary()


def cmd_eval(args: argparse.Namespace) -> int:
    from foretell import evaluation
    from foretell.bench.run import parse_kv_caches
    from foretell.models.default import TASK_NAMES

    if args.model is not None:
        raise ValueError("model: eval runs the shipped models' tasks; omit --model")
    kv_caches = parse_kv_caches(args.kv_cache)
    if args.block_default:
        from foretell.models.block_default import BLOCK_DEFAULT_MODEL_DIR
        from foretell.models.block_default import TASK_NAMES as BLOCK_TASKS

        if kv_caches != [None]:
            raise ValueError("kv_cache: the block-diffusion model always caches its blocks")
        args.model = str(BLOCK_DEFAULT_MODEL_DIR)
        tasks = args.task or list(BLOCK_TASKS)
    else:
        tasks = args.task or list(TASK_NAMES)
    engine = _engine(args)
    report = evaluation.evaluate(
        engine,
        tasks,
        n=args.n,
        curve_n=min(args.curve_n, args.n),
        seed=args.seed,
        kv_caches=kv_caches,
    )
    print(evaluation.format_table(report))
    if args.out:
        evaluation.save(report, args.out)
    if args.plot:
        evaluation.plot_convergence(report, args.plot)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Throughput of the scheduling modes side by side (see foretell/bench, docs/benchmarks.md)."""
    from foretell.bench.cli import main as bench_main

    return bench_main(args)


def cmd_serve(args: argparse.Namespace) -> int:
    _set_threads(args)  # before the server imports and loads anything
    try:
        from foretell.server import run_server
    except ImportError as err:
        raise ValueError(
            f"serve: needs the server extra (pip install 'foretell[server]'): {err}"
        ) from err
    run_server(
        args.model,
        host=args.host,
        port=args.port,
        model_name=args.served_model_name,
        graceful_timeout=args.shutdown_grace,
        threads=args.threads,
        api_key=args.api_key or os.environ.get("FORETELL_API_KEY") or None,
        allowed_origins=args.allowed_origins,
        max_body_bytes=_unbounded(args.max_body_bytes),
        max_prompts_per_request=_unbounded(args.max_prompts_per_request),
        request_timeout=_unbounded(args.request_timeout),
        max_queued_requests=_unbounded(args.max_queued_requests),
        max_queued_tokens=_unbounded(args.max_queued_tokens),
        max_gen_length=_unbounded(args.max_gen_length),
        max_model_len=_unbounded(args.max_model_len),
        max_connections=_unbounded(args.max_connections),
        request_read_timeout=_unbounded(args.request_read_timeout),
        keep_alive_timeout=args.keep_alive_timeout,
        enable_docs=not args.disable_docs,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        forward_chunk_tokens=args.forward_chunk_tokens,
        overlap=args.overlap or False,
        forward_threads=args.forward_threads,
    )
    return 0


def _unbounded(value):
    """0 on the command line lifts a limit."""
    return None if value == 0 else value


def build_parser() -> argparse.ArgumentParser:
    from foretell.bench.cli import add_arguments as add_bench_arguments
    from foretell.bench.cli import add_forward_chunk_argument
    from foretell.engine.engine import OVERLAP_MODES

    parser = argparse.ArgumentParser(prog="foretell", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def engine_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="checkpoint directory or hub id (default: shipped model)")
        p.add_argument("--max-num-seqs", type=int, default=64)
        p.add_argument("--dtype", default="float32")
        p.add_argument("--attention-backend", default="auto")
        add_forward_chunk_argument(p)
        p.add_argument(
            "--overlap",
            choices=OVERLAP_MODES,
            help="run one group's forward pass while the other group's step is decoded "
            "(two groups of --max-num-seqs / 2; the same tokens): on a worker thread, or in "
            "a process of its own (CPU only; see --forward-threads)",
        )
        p.add_argument(
            "--forward-threads",
            type=int,
            help="with --overlap process: torch threads of the model's process (default: "
            "--threads); on a CPU give it the cores and this process --threads 1",
        )
        p.add_argument(
            "--threads",
            type=int,
            help="torch intra-op threads, set before the model loads (default: torch's own)",
        )

    gen = sub.add_parser("generate", help="generate text for one prompt or a JSONL file")
    gen.add_argument("prompt", nargs="?")
    gen.add_argument(
        "--file",
        help='JSONL, one {"prompt": ..., "params": {...}} per line (with --replicas also Parquet)',
    )
    gen.add_argument("--out", help="write JSONL results here (default: stdout)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    ray_group = gen.add_argument_group("on Ray Data (pip install 'foretell[ray]')")
    ray_group.add_argument(
        "--replicas",
        type=int,
        help="run --file on N engine replicas with Ray Data (.jsonl or .parquet in and out)",
    )
    ray_group.add_argument("--ray-address", help="an existing Ray cluster (default: start one)")
    ray_group.add_argument(
        "--batch-size", type=int, help="rows per engine batch (default: about 4 per replica)"
    )
    ray_group.add_argument("--num-cpus", type=float, help="CPUs per replica (default 1)")
    ray_group.add_argument("--num-gpus", type=float, help="GPUs per replica (default none)")
    engine_args(gen)
    _add_decode_args(gen)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="Full vs Half vs Prophet accuracy on the shipped tasks")
    ev.add_argument("--task", action="append", help="task name (repeatable; default: all)")
    ev.add_argument("--n", type=int, default=500, help="held-out prompts per task")
    ev.add_argument("--curve-n", type=int, default=100, help="prompts for the convergence curve")
    ev.add_argument("--seed", type=int, help="held-out seed (default: the documented one)")
    ev.add_argument("--out", help="write the report as JSON")
    ev.add_argument("--plot", help="write the convergence curve as PNG")
    ev.add_argument(
        "--block-default",
        action="store_true",
        help="the shipped block-diffusion (SDAR) model on its task: full, half, threshold, "
        "Prophet and one step per block",
    )
    ev.add_argument(
        "--kv-cache",
        default="none",
        help="comma-separated block KV cache modes to evaluate Full, Half and Prophet with "
        "(none,prefix,dual; default none)",
    )
    engine_args(ev)
    ev.set_defaults(func=cmd_eval)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (docs/serving.md)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", help="the id /v1/models reports")
    engine_args(srv)
    from foretell.server.limits import add_serve_arguments

    add_serve_arguments(srv)
    srv.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="throughput of batch-1, static and engine, side by side")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from foretell.engine.forward_process import ForwardProcessError

    try:
        return args.func(args)
    except (ValueError, ForwardProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
