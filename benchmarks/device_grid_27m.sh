#!/usr/bin/env bash
# One device call: the adaptive schedule's search against the fixed shapes on ref-llama-27m (quality_grid plan
# `search`). Expects .carry/ref-llama-27m (the shared model) and .carry/grid_data.safetensors.
set -uo pipefail
OUT=${OUT:?}
export PYTHONPATH=$PWD
python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', out='runs/grid27', models={'ref-llama-27m': '.carry/ref-llama-27m'}, plan='search', budget_s=${GRID_BUDGET:-420})" > $OUT/grid_27m.log 2>&1
cp runs/grid27/grid.json $OUT/grid_27m.json; cp runs/grid27/grid.md $OUT/grid_27m.md
tail -5 $OUT/grid_27m.log
