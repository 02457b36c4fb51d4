#!/usr/bin/env bash
# One device call: the default adaptive run against the fixed shapes on all three reference models, seeds 0-2
# (quality_grid plan `defaults`). The 27M model and the corpus travel packed (benchmarks/carry_pack.py); the two
# 12M models are pretrained here first while the 27M cells run, one process per ratio and seed. The rows come
# back merged, one JSON file per model, and the logs in one archive.
# Expects .carry/m27, .carry/tok, .carry/corpus (xz parts 000-006), .carry/grid_data.safetensors.
source benchmarks/device_lib.sh
mkdir -p runs/grids
unpack_m27
grid() {  # name models ratios seeds budget
  python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', out='runs/grids/$1', models=$2, plan='defaults', ratios=$3, seeds=$4, budget_s=$5, write_markdown=False)" > runs/grids/$1.log 2>&1
}
M27="{'ref-llama-27m': 'runs/ref-llama-27m'}"
for r in 0.2 0.5; do for s in 0 1 2; do grid m27_${r}_s$s "$M27" "[$r]" "[$s]" ${B27:-420} & done; done
tokenize_corpus runs/ref-llama-27m runs/grids
twelve() {  # preset steps name
  train_ref $1 $2 runs/ref-llama-27m runs/grids && {
    grid $3_0.2 "{'$1': 'runs/refmodels/$1'}" "[0.2]" None ${B12:-170} &
    grid $3_0.5 "{'$1': 'runs/refmodels/$1'}" "[0.5]" None ${B12:-170} & wait; }
}
twelve ref-llama-gqa-12m $STEPS_GQA gqa &
twelve ref-qwen2-12m $STEPS_QWEN2 qwen2 &
wait
python3 -c "from benchmarks.quality_grid import merge; merge(out='$OUT/defaults_m27.json', grids='runs/grids', prefix='m27_'); merge(out='$OUT/defaults_gqa.json', grids='runs/grids', prefix='gqa_'); merge(out='$OUT/defaults_qwen2.json', grids='runs/grids', prefix='qwen2_')"
report_grids runs/grids
