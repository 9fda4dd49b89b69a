#!/usr/bin/env bash
# Every number in docs/benchmarks.md, in one go (about 60 minutes on a 2-core CPU; run it with
# nothing else on the machine).
# Usage: bash benchmarks/run_all.sh   (from the repository root, with foretell installed)
set -euo pipefail
out=benchmarks/results
mkdir -p "$out"
# The five modes on the default workload with the default model's Prophet (its 3-token answer
# span, min gap, 5/3/1.5), at B=32 and at B=8.
foretell bench --repeats 3 --out "$out/bench.json" --plot "$out/bench.png" | tee "$out/bench.txt"
foretell bench --batch-size 8 --repeats 3 --out "$out/bench_b8.json" --plot "$out/bench_b8.png" \
  | tee "$out/bench_b8.txt"
# The backfill ratio at B=8 again, alone, on two workload seeds (how much it moves).
for seed in 0 1; do
  foretell bench --batch-size 8 --modes static-prophet,engine-prophet --repeats 3 --seed "$seed" \
    --out "$out/bench_b8_backfill_seed$seed.json"
done
# Prophet's reference rule (mean gap, 7.5/5/2.5) on the same workload.
foretell bench --repeats 3 --modes static,static-prophet,engine,engine-prophet \
  --thresholds 7.5,5,2.5 --prophet-statistic mean \
  --out "$out/bench_reference_rule.json" | tee "$out/bench_reference_rule.txt"
# Only the decoding the model was trained for (blocks of 8, 32 steps, low-confidence).
foretell bench --repeats 3 --modes static,static-prophet,engine,engine-prophet \
  --block-lengths 8 --step-budgets 32 --remaskings low_confidence \
  --out "$out/bench_trained.json" | tee "$out/bench_trained.txt"
# A broader mix: also a single block of 32 and half budgets.
foretell bench --repeats 3 --modes static,static-prophet,engine,engine-prophet \
  --block-lengths 8,16,32 --step-budgets 32,24,16 \
  --out "$out/bench_broad.json" | tee "$out/bench_broad.txt"
# Which Prophet settings keep accuracy, on another workload seed (how 5/3/1.5 was chosen).
python benchmarks/prophet_thresholds.py --seed 1 --out "$out/prophet_thresholds.json" \
  | tee "$out/prophet_thresholds.txt"
python benchmarks/scaling.py --repeats 3 --out "$out/scaling.json" --plot "$out/scaling.png" \
  | tee "$out/scaling.txt"
python benchmarks/overhead.py --profile "$out/overhead_profile.txt" --out "$out/overhead.json" \
  | tee "$out/overhead.txt"
python benchmarks/attention_layout.py --out "$out/attention_layout.json" \
  | tee "$out/attention_layout.txt"
python benchmarks/forward_chunks.py --out "$out/forward_chunks.json" | tee "$out/forward_chunks.txt"
# Host work per step against the batch (issue #24) at this revision, every mix; the A/B
# comparisons in docs/benchmarks.md run the same command in a checkout of each revision.
for mix in issue every-kind-llada every-kind-dream every-kind-block; do
  OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --batch-sizes 16,64 --repeats 3 \
    --attention-backend sdpa_buckets --mix "$mix" --out "$out/host_overhead_$mix.json"
done
# The same, each run also timed overlapped (two groups of B taking turns): the forward on a
# thread, then in the model's own process.
OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --batch-sizes 16,64 --repeats 3 \
  --attention-backend sdpa_buckets --mix issue --overlap thread --out "$out/host_overhead_overlap_issue.json"
OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --batch-sizes 16,64 --repeats 3 \
  --attention-backend sdpa_buckets --mix issue --overlap process \
  --out "$out/host_overhead_overlap_process_issue.json"
# What overlap buys in throughput against the serial engine on one and two torch threads.
OMP_NUM_THREADS=1 python benchmarks/overlap_throughput.py --rounds 3 \
  --out "$out/overlap_throughput.json" | tee "$out/overlap_throughput.txt"
# Where that host time goes, part by part (the issue's mix, B = 16 and 64).
OMP_NUM_THREADS=1 python benchmarks/step_phases.py --batch-sizes 16,64 --repeats 3 \
  --out "$out/step_phases.json" | tee "$out/step_phases.txt"
OMP_NUM_THREADS=1 python benchmarks/step_phases.py --batch-sizes 16,64 --repeats 3 --replay \
  --out "$out/step_phases_replay.json" | tee "$out/step_phases_replay.txt"
# The bucketed attention call alone: its time and ops per bucket group.
OMP_NUM_THREADS=1 python benchmarks/bucketed_attention.py --repeats 8 \
  --out "$out/bucketed_attention.json" | tee "$out/bucketed_attention.txt"
# The pass's row statistics: the default softmax over the rows no variant scores again, at
# LLaDA-8B's vocabulary; and where scoring only the wanted rows pays (the runner's rule).
OMP_NUM_THREADS=1 python benchmarks/row_stats.py --out "$out/row_stats.json" \
  | tee "$out/row_stats.txt"
OMP_NUM_THREADS=1 python benchmarks/row_stats.py --subset --repeats 31 \
  --out "$out/row_stats_subset.json" | tee "$out/row_stats_subset.txt"
# What slows the host work after a forward on this CPU: other work in the forward's place.
OMP_NUM_THREADS=1 python benchmarks/forward_interference.py --rounds 9 \
  --out "$out/forward_interference.json" | tee "$out/forward_interference.txt"
# Whether a model pass beside each step's host work hides it (an overlapped step, simulated).
OMP_NUM_THREADS=1 python benchmarks/forward_beside.py --rounds 9 \
  --out "$out/forward_beside.json" | tee "$out/forward_beside.txt"
# A full garbage collection in a loaded server, before and after run_server's freeze.
OMP_NUM_THREADS=1 python benchmarks/gc_pause.py --out "$out/gc_pause.json" | tee "$out/gc_pause.txt"
# One block of 32 with low-confidence remasking: where the reference rule's mean lets an open
# letter through, against the default min rule.
foretell bench --modes static,engine-prophet --block-lengths 32 --step-budgets 32,24,16 \
  --remaskings low_confidence --thresholds 7.5,5,2.5 --prophet-statistic mean \
  --out "$out/single_block_reference_rule.json" | tee "$out/single_block_reference_rule.txt"
foretell bench --modes static,engine-prophet --block-lengths 32 --step-budgets 32,24,16 \
  --remaskings low_confidence --out "$out/single_block.json" | tee "$out/single_block.txt"
# Block KV cache (issue #12): the shipped architecture scaled up (random weights, speed only),
# random prompts of 64-256 tokens, gen 256 in blocks of 32 at full steps, with and without
# Prophet (committing at two thirds of the steps in every mode), two torch threads.
foretell bench --model random --n 4 --batch-size 4 --modes engine,engine-prophet \
  --kv-cache none,prefix,dual --thresholds 100,100,0.1 --threads 2 \
  --out "$out/kv_cache.json" | tee "$out/kv_cache.txt"
# The same with Prophet's early threshold at 7.5 (three of the four requests commit at step 1).
foretell bench --model random --n 4 --batch-size 4 --modes engine,engine-prophet \
  --kv-cache none,prefix,dual --thresholds 7.5,5,0.1 --threads 2 \
  --out "$out/kv_cache_thresholds_7.5_5_0.1.json" | tee "$out/kv_cache_thresholds_7.5_5_0.1.txt"
# Gen 512, full steps, no Prophet.
foretell bench --model random --n 2 --batch-size 2 --gen-lengths 512 --modes engine \
  --kv-cache none,prefix,dual --threads 2 \
  --out "$out/kv_cache_gen512.json" | tee "$out/kv_cache_gen512.txt"
# What the cache's approximation costs in accuracy on the shipped model: by block length, and
# on the 2,500 other orders of the held-out letter sets (docs/results.md). kv_cache_accuracy.json
# is the base checkpoint's, measured while it was shipped (`--n 500`, Full, low-confidence).
for rule in low_confidence random; do
  python benchmarks/kv_cache_accuracy.py --n 500 --block-lengths 4,8,16,32 --remasking "$rule" \
    --prophet --out "$out/kv_cache_accuracy_by_block_$rule.json" \
    | tee "$out/kv_cache_accuracy_by_block_$rule.txt"
  python benchmarks/kv_cache_accuracy.py --n 500 --block-lengths 8 --prompts other-orders \
    --remasking "$rule" --prophet --out "$out/kv_cache_accuracy_orders_$rule.json" \
    | tee "$out/kv_cache_accuracy_orders_$rule.txt"
done
# Engine replicas on Ray Data (needs foretell[ray]): 1 and 2 replicas on one workload, next to
# one engine in the benchmark's own process (docs/distributed.md).
foretell bench --replicas 1,2 --n 4000 --batch-size 125 --out "$out/ray_replicas.json" \
  | tee "$out/ray_replicas.txt"
# Block-causal decoders (issue #25): foretell against the re-implemented official SDAR (bd3) and
# LLaDA2 (generate, no cache) decoders on random checkpoints of their shapes scaled down, then
# single-repeat variants (dynamic SDAR schedule, LLaDA2 at gen 128, 48 requests, 32 concurrent,
# and 4x the parameters).
python benchmarks/block_decoders.py --threads 1 --repeats 3 --out "$out/block_decoders.json" \
  | tee "$out/block_decoders.txt"
three=(--threads 1 --modes reference,foretell-b1,foretell)
python benchmarks/block_decoders.py "${three[@]}" --families sdar --sdar-threshold 0.9 \
  --out "$out/block_decoders_sdar_dynamic.json" | tee "$out/block_decoders_sdar_dynamic.txt"
python benchmarks/block_decoders.py "${three[@]}" --families llada2 --gen-length 128 \
  --out "$out/block_decoders_llada2_gen128.json" | tee "$out/block_decoders_llada2_gen128.txt"
python benchmarks/block_decoders.py "${three[@]}" --families llada2 --n 48 \
  --out "$out/block_decoders_llada2_n48.json" | tee "$out/block_decoders_llada2_n48.txt"
python benchmarks/block_decoders.py "${three[@]}" --families llada2 --n 32 --max-num-seqs 32 \
  --out "$out/block_decoders_llada2_b32.json" | tee "$out/block_decoders_llada2_b32.txt"
python benchmarks/block_decoders.py "${three[@]}" --hidden-size 256 --vocab-size 4096 \
  --out "$out/block_decoders_h256.json" | tee "$out/block_decoders_h256.txt"
