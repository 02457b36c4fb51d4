#!/usr/bin/env bash
# One device call: the default adaptive run against the fixed shapes on the two 12M reference models, seeds 0-2
# (quality_grid plan `defaults`), every row also measured on the validation books of part-007. The models are
# pretrained here first; then four processes per model (ratio × seed 0 / seeds 1-2). The rows come back merged,
# one JSON file per model, and the logs in one archive.
# Expects .carry/tok, .carry/corpus (xz parts 000-006), .carry/grid_data.safetensors, .carry/books.safetensors;
# With SCORING="'<file>'" (a Python string literal; quality_grid.prepare_scoring) the adaptive search scores on
# those windows, as `slimflow prune` does.
source benchmarks/device_lib.sh
rm -rf runs/grids; mkdir -p runs/grids
unpack_corpus
grid() {  # name models ratios seeds budget
  python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', books='.carry/books.safetensors', scoring=${SCORING:-None}, out='runs/grids/$1', models=$2, plan='defaults', ratios=$3, seeds=$4, groups=['main', 'seeds'], budget_s=$5, write_markdown=False)" > runs/grids/$1.log 2>&1
}
tokenize_corpus runs/tok runs/grids
twelve() {  # preset steps name
  train_ref $1 $2 runs/tok runs/grids && {
    for r in 0.2 0.5; do
      grid $3_${r}_s0 "{'$1': 'runs/refmodels/$1'}" "[$r]" "[0]" ${B12:-200} &
      grid $3_${r}_s12 "{'$1': 'runs/refmodels/$1'}" "[$r]" "[1, 2]" ${B12:-200} &
    done; wait; }
}
twelve ref-llama-gqa-12m $STEPS_GQA gqa &
twelve ref-qwen2-12m $STEPS_QWEN2 qwen2 &
wait
python3 -c "from benchmarks.quality_grid import merge; merge(out='$OUT/defaults12_gqa.json', grids='runs/grids', prefix='gqa_'); merge(out='$OUT/defaults12_qwen2.json', grids='runs/grids', prefix='qwen2_')"
report_grids runs/grids
