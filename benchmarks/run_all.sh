#!/usr/bin/env bash
# Every number in docs/benchmarks.md, in one go (about 20 minutes on a 2-core CPU).
# Usage: bash benchmarks/run_all.sh   (from the repository root, with foretell installed)
set -euo pipefail
out=benchmarks/results
mkdir -p "$out"
# Prophet as shipped (the default model's default_prophet: answer span, mean gap, 7.5/5/2.5).
foretell bench --repeats 3 --out "$out/bench.json" --plot "$out/bench.png" | tee "$out/bench.txt"
# Prophet tuned for accuracy on a separate workload seed (benchmarks/prophet_thresholds.py).
foretell bench --repeats 3 --thresholds 5,3,1.5 --prophet-statistic min \
  --out "$out/bench_min.json" --plot "$out/bench_min.png" | tee "$out/bench_min.txt"
python benchmarks/prophet_thresholds.py --seed 1 --out "$out/prophet_thresholds.json" \
  | tee "$out/prophet_thresholds.txt"
python benchmarks/scaling.py --repeats 3 --thresholds 5,3,1.5 --prophet-statistic min \
  --out "$out/scaling.json" --plot "$out/scaling.png" | tee "$out/scaling.txt"
python benchmarks/overhead.py --out "$out/overhead.json" | tee "$out/overhead.txt"
python benchmarks/overhead.py --thresholds 5,3,1.5 --prophet-statistic min \
  --profile "$out/overhead_profile.txt" --out "$out/overhead_min.json" | tee "$out/overhead_min.txt"
python benchmarks/attention_layout.py --out "$out/attention_layout.json" \
  | tee "$out/attention_layout.txt"
# The batch size this CPU runs best (see the max_num_seqs sweep in scaling.json).
foretell bench --batch-size 8 --modes static,static-prophet,engine,engine-prophet --repeats 3 \
  --thresholds 5,3,1.5 --prophet-statistic min --out "$out/bench_min_b8.json" \
  | tee "$out/bench_min_b8.txt"
