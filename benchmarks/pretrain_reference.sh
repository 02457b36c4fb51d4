#!/usr/bin/env bash
# Pretrain ref-llama-gqa-12m and ref-qwen2-12m side by side on one GPU, then measure their dense perplexity.
# Usage: benchmarks/pretrain_reference.sh OUTDIR [MINUTES]   (from the repository root; ../shared next to it)
# MINUTES is each model's training budget (default 2.8); the step counts it led to are in OUTDIR/*.log, and
# `train --steps N` (see benchmarks/pretrain_reference.py) reruns a model with exactly that schedule.
set -uo pipefail
out=${1:?output directory}; minutes=${2:-2.8}
mkdir -p "$out"
p="python3 -m benchmarks.pretrain_reference"
tokens=$(mktemp -d)
$p tokenize --out "$tokens" 2>&1 | tee "$out/tokenize.log" || exit 1
pids=()
for m in ref-llama-gqa-12m ref-qwen2-12m; do
  ( $p train --preset $m --tokens "$tokens" --out "$out/models" --minutes "$minutes" \
    && $p evaluate --model "$out/models/$m" ) > "$out/$m.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
rm -rf "$tokens"
exit $status
