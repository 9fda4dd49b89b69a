"""Scaling of the engine: cost per request against N, throughput against max_num_seqs.

    python benchmarks/scaling.py --out benchmarks/results/scaling.json --plot docs/img/scaling.png

The same sweeps as ``foretell bench --scaling``, without the five-mode comparison: one mode
(``engine-prophet`` by default) on prefixes of one seeded workload, so a larger N only adds
requests. Cost per request should stay flat as N grows (the engine does no per-request work that
grows with the queue); throughput against max_num_seqs shows how much batching buys on this
machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from foretell.bench.report import machine_info, model_info, plot_scaling, write_json
from foretell.bench.run import warm_up
from foretell.bench.scaling import format_scaling, run_scaling
from foretell.bench.setup import add_setup_args, setup_from_args


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(p)
    p.add_argument("--mode", default="engine-prophet")
    p.add_argument("--ns", type=_ints, default=[100, 200, 400])
    p.add_argument("--batch-size", type=int, default=32, help="max_num_seqs for the N sweep")
    p.add_argument("--max-num-seqs", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--sweep-n", type=int, default=200, help="requests per max_num_seqs point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="fastest of R runs per point")
    p.add_argument("--out", help="write JSON here")
    p.add_argument("--plot", help="write a PNG here")
    args = p.parse_args(argv)
    setup, prophet = setup_from_args(args)
    pool = setup.workload(max([*args.ns, args.sweep_n]), args.seed)
    warm_up(setup.loaded, pool, args.batch_size)
    scaling = run_scaling(
        setup.loaded,
        lambda n: pool[:n],
        mode=args.mode,
        ns=args.ns,
        batch_size=args.batch_size,
        max_num_seqs=args.max_num_seqs,
        sweep_n=args.sweep_n,
        prophet=prophet,
        repeats=args.repeats,
    )
    print(format_scaling(scaling))
    if args.out:
        result = {
            "scaling": scaling,
            "model": {"name": setup.name, **model_info(setup.loaded.model, setup.loaded.path)},
            "prophet": dataclasses.asdict(prophet),
            "machine": machine_info(),
            "args": vars(args),
        }
        write_json(args.out, result)
    if args.plot:
        plot_scaling(scaling, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
