#!/usr/bin/env bash
# One device call: how many sampled sequences to add (quality_grid plan `generated2`) on ref-llama-27m; three
# processes side by side (20% cells, 50% cells, seeds). Expects .carry/ref-llama-27m and .carry/grid_data.safetensors.
set -uo pipefail
OUT=${OUT:?}
export PYTHONPATH=$PWD
grid() {  # name groups ratios budget
  python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', out='runs/$1', models={'ref-llama-27m': '.carry/ref-llama-27m'}, plan='generated2', groups=$2, ratios=$3, budget_s=$4)" > $OUT/$1.log 2>&1
  cp runs/$1/grid.json $OUT/$1.json
}
B=${GRID_BUDGET:-400}
grid g2_20 "['main']" "[0.2]" $B &
grid g2_50 "['main']" "[0.5]" $B &
grid g2_seeds "['seeds']" None $B &
wait
tail -n 2 $OUT/*.log
