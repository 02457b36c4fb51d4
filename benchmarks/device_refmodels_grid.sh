#!/usr/bin/env bash
# One device call: pretrain the two 12M reference models (exact step counts of docs/reference_models.md) side by
# side, run the drift-correction grid on each, and pack the models into $OUT in pieces the transfer accepts.
# Expects .carry/tokens/train.npy (benchmarks.pretrain_reference tokenize), .carry/grid_data.safetensors, the
# shared tokenizer in .carry/tokenizer and part-007 in .carry/part-007.txt.gz.
set -uo pipefail
OUT=${OUT:?}
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=true
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
train() {  # preset steps
  python3 -c "from benchmarks.pretrain_reference import train, evaluate; train(preset='$1', out='runs/refmodels', tokens='.carry/tokens', steps=$2, tokenizer='.carry/tokenizer'); evaluate(model='runs/refmodels/$1', heldout='.carry/part-007.txt.gz', wikitext=False)"
}
grid() {  # name
  python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', out='runs/grid_$1', models={'$1': 'runs/refmodels/$1'}, reference='$1', plan='drift', budget_s=${GRID_BUDGET:-260})"
}
(train ref-llama-gqa-12m 2066 > $OUT/train_gqa.log 2>&1 && grid ref-llama-gqa-12m > $OUT/grid_gqa.log 2>&1) &
(train ref-qwen2-12m 1781 > $OUT/train_qwen2.log 2>&1 && grid ref-qwen2-12m > $OUT/grid_qwen2.log 2>&1) &
wait
cp runs/grid_ref-llama-gqa-12m/grid.json $OUT/grid_gqa.json 2>/dev/null
cp runs/grid_ref-qwen2-12m/grid.json $OUT/grid_qwen2.json 2>/dev/null
tar cf - -C runs refmodels | split -b 15M - $OUT/refmodels.tar.
ls -la $OUT; tail -3 $OUT/*.log
