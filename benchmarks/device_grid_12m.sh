#!/usr/bin/env bash
# One device call: quality_grid plan `search` on the two 12M reference models (rebuilt by
# benchmarks/pretrain_reference.py; expected in .carry/refmodels) and the default 50% run on the GQA model.
set -uo pipefail
OUT=${OUT:?}
export PYTHONPATH=$PWD
for m in ref-llama-gqa-12m ref-qwen2-12m; do
  python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', out='runs/grid_$m', models={'$m': '.carry/refmodels/$m'}, reference='$m', plan='search', budget_s=${GRID_BUDGET:-200})" > $OUT/grid_$m.log 2>&1 &
done
wait
for m in ref-llama-gqa-12m ref-qwen2-12m; do cp runs/grid_$m/grid.json $OUT/grid_$m.json; done
tail -2 $OUT/*.log | cut -c1-400
