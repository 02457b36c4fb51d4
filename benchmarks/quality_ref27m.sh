#!/usr/bin/env bash
# Core-engine quality check on the shared reference model (CPU): SlimGPT vs the magnitude baseline at the same
# per-layer widths, 20% and 50% of total parameters, 128 x 512 calibration tokens from the end of part-007.
# Perplexity on the first 300 windows of 128 tokens of part-007 and of WikiText-2 test.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quality_ref27m}
MODEL=../shared/models/ref-llama-27m
CAL=../shared/pretrain_corpus/part-007.txt.gz
PPL=../shared/pretrain_corpus/part-007.txt.gz:128,wikitext2:128
mkdir -p "$OUT"
slimflow eval --model "$MODEL" --ppl "$PPL" --max-windows 300 --output "$OUT/dense" --progress false
for ratio in 0.2 0.5; do
  for variant in slimgpt slimgpt-exact magnitude; do
    name="$variant-${ratio/0./}"
    extra=()
    method=$variant
    if [ "$variant" = slimgpt-exact ]; then method=slimgpt; extra=(--method.exact_head_score true); fi
    start=$(date +%s.%N)
    slimflow prune --model "$MODEL" --calibration "$CAL" --sampling tail --num-samples 128 --seqlen 512 \
      --ratio "$ratio" --method "$method" "${extra[@]}" --output "$OUT/$name" --overwrite true --progress false > "$OUT/$name.log"
    echo "$name prune_wall_s $(echo "$(date +%s.%N) - $start" | bc)" | tee -a "$OUT/times.txt"
    slimflow eval --model "$OUT/$name" --ppl "$PPL" --max-windows 300 --output "$OUT/$name" --progress false > "$OUT/$name.eval.log"
  done
done
slimflow report "$OUT"/dense "$OUT"/slimgpt-2 "$OUT"/slimgpt-exact-2 "$OUT"/magnitude-2 \
  "$OUT"/slimgpt-5 "$OUT"/slimgpt-exact-5 "$OUT"/magnitude-5 --output "$OUT/report"
