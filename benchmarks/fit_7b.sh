#!/usr/bin/env bash
# The full-size managed run on one GPU (see benchmarks/fit_7b.py), from the repository root:
#   benchmarks/fit_7b.sh OUT [SHAPE] [STREAM_SHAPE] [WORK] [CONFIG]
# 1. writes a SHAPE (7b) checkpoint with random bf16 weights to WORK, 2. runs `slimflow fit --config CONFIG`
# on it under the phase probe, 3. the plain PyTorch + PEFT loop on the exported model and the same Alpaca
# batches, 4. writes a STREAM_SHAPE (13b) checkpoint and prunes it with `slimflow prune --streaming true`.
# Every step writes its JSON to OUT; checkpoints are deleted as soon as they are no longer needed.
set -u
OUT=${1:?usage: benchmarks/fit_7b.sh OUT [SHAPE] [STREAM_SHAPE] [WORK] [CONFIG]}
SHAPE=${2:-7b}; STREAM_SHAPE=${3:-13b}; WORK=${4:-${TMPDIR:-/tmp}/slimflow-fit}; CONFIG=${5:-benchmarks/fit_7b.yaml}
SAMPLES=${SAMPLES:-128}; SEQLEN=${SEQLEN:-2048}; MICRO=${MICRO:-128}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
# leftovers of an interrupted run would not leave room for the next checkpoint (7B + 13B + outputs ≈ 70 GB)
rm -rf "$WORK/dense" "$WORK/run" "$WORK/dense_stream" "$WORK/pruned_stream" "$WORK"/.pruned_stream.partial-*
stamp() { echo "[$(date -u +%T)] $*"; }

stamp "write $SHAPE"
python3 -m benchmarks.fit_7b write --shape "$SHAPE" --out "$WORK/dense" --json "$OUT/write_$SHAPE.json"
stamp "slimflow fit"
python3 -m benchmarks.fit_probe "$OUT/fit.json" slimflow fit --config "$CONFIG" \
  --model.init_args.pretrained "$WORK/dense" --trainer.default_root_dir "$WORK/run" > "$OUT/fit.log" 2>&1
stamp "fit rc=$?"
cp "$WORK/run/metrics.json" "$OUT/metrics.json"; cp "$WORK/run/pruning_report.md" "$OUT/pruning_report.md"
rm -rf "$WORK/dense"
stamp "plain loop"
python3 -m benchmarks.fit_7b plain --model "$WORK/run/export/model" --micro-batches "$MICRO" --json "$OUT/plain.json" \
  > "$OUT/plain.log" 2>&1
stamp "plain rc=$?"
rm -rf "$WORK/run"
stamp "write $STREAM_SHAPE"
python3 -m benchmarks.fit_7b write --shape "$STREAM_SHAPE" --out "$WORK/dense_stream" --json "$OUT/write_$STREAM_SHAPE.json"
stamp "streaming prune"
python3 -m benchmarks.fit_probe "$OUT/stream.json" slimflow prune --model "$WORK/dense_stream" \
  --calibration ../shared/pretrain_corpus/part-007.txt.gz --skip_tokens 400000 --sampling random \
  --num_samples "$SAMPLES" --seqlen "$SEQLEN" --ratio 0.2 --streaming true --progress false \
  --output "$WORK/pruned_stream" > "$OUT/stream.log" 2>&1
stamp "stream rc=$?"
cp "$WORK/pruned_stream/pruning.json" "$OUT/stream_pruning.json"
ls -la "$WORK/pruned_stream" | head -5 >> "$OUT/stream.log"
rm -rf "$WORK/dense_stream" "$WORK/pruned_stream"
stamp done
