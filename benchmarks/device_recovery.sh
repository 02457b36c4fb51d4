#!/usr/bin/env bash
# One device call: recovery comparison on ref-llama-27m (none / Alpaca LoRA / distillation LoRA / both), held-out
# perplexity only (lm-eval is not on the device). Expects .carry/ref-llama-27m, .carry/part-007.txt.gz and
# .carry/alpaca_5000.json.
set -uo pipefail
OUT=${OUT:?}
export PYTHONPATH=$PWD
for seed in ${SEEDS:-0 1 2}; do
  python3 -c "from benchmarks.recovery_distill import main; main(out='runs/recovery_s$seed', model='.carry/ref-llama-27m', steps=${STEPS:-300}, batch=8, seqlen=256, seed=$seed, zero_shot=False, accelerator='gpu', heldout='.carry/part-007.txt.gz', alpaca='.carry/alpaca_5000.json')" > $OUT/recovery_s$seed.log 2>&1
  cp runs/recovery_s$seed/recovery.json $OUT/recovery_s$seed.json
done
grep '^{' $OUT/*.log | cut -c1-200
