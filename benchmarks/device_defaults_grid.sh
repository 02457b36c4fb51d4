#!/usr/bin/env bash
# One device call: the default adaptive run against the fixed shapes on all three reference models, seeds 0-2
# (quality_grid plan `defaults`). The 27M model and the corpus travel packed (benchmarks/carry_pack.py); the two
# 12M models are pretrained here first (exact step counts of docs/reference_models.md) while the 27M cells run,
# one process per ratio and seed. The rows come back merged, one JSON file per model, and the logs in one archive.
# Expects .carry/m27, .carry/tok, .carry/corpus (xz parts 000-006), .carry/grid_data.safetensors.
set -uo pipefail
OUT=${OUT:?}
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=true PYTHONUNBUFFERED=1
mkdir -p runs/grids
python3 -c "from benchmarks.carry_pack import unpack, corpus_to_gzip; unpack(packed='.carry/m27', out='runs/ref-llama-27m', files='.carry/tok'); corpus_to_gzip(packed='.carry/corpus', out='runs/corpus')"
grid() {  # name models ratios seeds budget
  python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', out='runs/grids/$1', models=$2, plan='defaults', ratios=$3, seeds=$4, budget_s=$5, write_markdown=False)" > runs/grids/$1.log 2>&1
}
M27="{'ref-llama-27m': 'runs/ref-llama-27m'}"
for r in 0.2 0.5; do for s in 0 1 2; do grid m27_${r}_s$s "$M27" "[$r]" "[$s]" ${B27:-420} & done; done
python3 -c "from benchmarks.pretrain_reference import tokenize; tokenize(out='runs/tokens', corpus='runs/corpus', tokenizer='runs/ref-llama-27m')" > runs/grids/tokenize.log 2>&1
train() {  # preset steps
  python3 -c "from benchmarks.pretrain_reference import train; train(preset='$1', out='runs/refmodels', tokens='runs/tokens', steps=$2, tokenizer='runs/ref-llama-27m')" > runs/grids/train_$1.log 2>&1
}
twelve() {  # preset steps name
  train $1 $2 && { grid $3_0.2 "{'$1': 'runs/refmodels/$1'}" "[0.2]" None ${B12:-170} &
                   grid $3_0.5 "{'$1': 'runs/refmodels/$1'}" "[0.5]" None ${B12:-170} & wait; }
}
twelve ref-llama-gqa-12m 2066 gqa &
twelve ref-qwen2-12m 1781 qwen2 &
wait
python3 -c "from benchmarks.quality_grid import merge; merge(out='$OUT/defaults_m27.json', grids='runs/grids', prefix='m27_'); merge(out='$OUT/defaults_gqa.json', grids='runs/grids', prefix='gqa_'); merge(out='$OUT/defaults_qwen2.json', grids='runs/grids', prefix='qwen2_')"
for f in runs/grids/*.log; do echo "== $f $(grep -c '"ppl"' $f)"; grep -v '"ppl"' $f | tail -n 2; done
tar czf $OUT/logs.tar.gz runs/grids/*.log
ls -l $OUT
