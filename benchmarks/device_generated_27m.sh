#!/usr/bin/env bash
# One device call: narrow calibration text and sequences sampled from the model (quality_grid plan `generated`)
# on ref-llama-27m; the main cells and the seed cells run as two processes side by side.
# Expects .carry/ref-llama-27m (the shared model) and .carry/grid_data.safetensors.
set -uo pipefail
OUT=${OUT:?}
export PYTHONPATH=$PWD
grid() {  # name groups budget
  python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', out='runs/$1', models={'ref-llama-27m': '.carry/ref-llama-27m'}, plan='generated', groups=$2, budget_s=$3)" > $OUT/$1.log 2>&1
  cp runs/$1/grid.json $OUT/$1.json; cp runs/$1/grid.md $OUT/$1.md
}
grid gen_main "['main', 'damp', 'mix']" ${GRID_BUDGET:-380} &
grid gen_seeds "['seeds']" ${GRID_BUDGET:-380} &
wait
tail -3 $OUT/*.log
