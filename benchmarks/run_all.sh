#!/usr/bin/env bash
# Every number in docs/benchmarks.md, in one go (about 20 minutes on a 2-core CPU).
# Usage: bash benchmarks/run_all.sh   (from the repository root, with foretell installed)
set -euo pipefail
out=benchmarks/results
mkdir -p "$out"
# The five modes on the default workload: Prophet as shipped (the default model's
# default_prophet: the 3-token answer span, mean gap, the reference's 7.5/5/2.5).
foretell bench --repeats 3 --out "$out/bench.json" --plot "$out/bench.png" | tee "$out/bench.txt"
# The same at B=8 (the batch size this CPU ran fastest per request in earlier sweeps).
foretell bench --batch-size 8 --modes static,static-prophet,engine,engine-prophet --repeats 3 \
  --out "$out/bench_b8.json" | tee "$out/bench_b8.txt"
# Only the decoding the model was trained for (blocks of 8, 32 steps, low-confidence).
foretell bench --repeats 3 --block-lengths 8 --step-budgets 32 --remaskings low_confidence \
  --out "$out/bench_trained.json" | tee "$out/bench_trained.txt"
# Which Prophet settings keep accuracy, on another workload seed.
python benchmarks/prophet_thresholds.py --seed 1 --out "$out/prophet_thresholds.json" \
  | tee "$out/prophet_thresholds.txt"
# The most saving setting that kept accuracy on seed 1, reported on seed 0.
foretell bench --repeats 3 --thresholds 5,3,1.5 --prophet-statistic min \
  --out "$out/bench_min.json" --plot "$out/bench_min.png" | tee "$out/bench_min.txt"
python benchmarks/scaling.py --repeats 3 --out "$out/scaling.json" --plot "$out/scaling.png" \
  | tee "$out/scaling.txt"
python benchmarks/overhead.py --profile "$out/overhead_profile.txt" --out "$out/overhead.json" \
  | tee "$out/overhead.txt"
python benchmarks/attention_layout.py --out "$out/attention_layout.json" \
  | tee "$out/attention_layout.txt"
