#!/usr/bin/env bash
# One device call: the default adaptive run, its search scored on windows of the calibration source
# (`quality_grid.prepare_scoring`, what `slimflow prune` draws), against the fixed shapes on ref-llama-27m and the
# carried ref-llama-gqa-12m, seeds 0-2 of both samplings (quality_grid plan `defaults`, groups main and seeds),
# one process per model × ratio × seed (MODELS: `m27 gqa` by default, or one of them); every row also on the validation books. With `ablations`: instead the
# 27M ablations (plan `ablations`; ABL: which, RATIOS: e.g. [0.2]) with the same windows. The rows come back merged, one JSON file per model.
# Carry .carry/m27 .carry/tok27 .carry/gqa12m .carry/grid_data.safetensors .carry/books.safetensors
#       .carry/scoring.safetensors (or, where the 64 MiB limit binds, SCORING=<a file of the 128 × 512 keys only>)
source benchmarks/device_lib.sh
export OMP_NUM_THREADS=1
mkdir -p runs/grids
MODELS=${MODELS:-m27 gqa}
[[ $MODELS == *m27* && ! -f runs/ref-llama-27m/model.safetensors ]] && python3 -c "from benchmarks.carry_pack import unpack; unpack(packed='.carry/m27', out='runs/ref-llama-27m', files='.carry/tok27')"
grid() {  # name models plan ratios seeds groups budget
  python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', books=${BOOKS:-'.carry/books.safetensors'}, scoring='${SCORING:-.carry/scoring.safetensors}', out='runs/grids/$1', models=$2, plan='$3', ratios=$4, seeds=$5, groups=$6, budget_s=$7, write_markdown=False)" > runs/grids/$1.log 2>&1
}
M27="{'ref-llama-27m': 'runs/ref-llama-27m'}"
GQA="{'ref-llama-gqa-12m': '.carry/gqa12m'}"
if [[ "${1:-}" == ablations ]]; then
  for a in ${ABL:-damp0.001 damp0.1 n512 n32 L128 L2048}; do
    grid abl_$a "$M27" ablations ${RATIOS:-None} None "['ablation:$a']" ${BUDGET:-400} &
  done
  wait
  python3 -c "from benchmarks.quality_grid import merge; merge(out='$OUT/scoring_ablations_m27.json', grids='runs/grids', prefix='abl_')"
else
  for r in 0.2 0.5; do for s in 0 1 2; do
    [[ $MODELS == *m27* ]] && grid m27_${r}_s$s "$M27" defaults "[$r]" "[$s]" "['main', 'seeds']" ${BUDGET:-420} &
    [[ $MODELS == *gqa* ]] && grid gqa_${r}_s$s "$GQA" defaults "[$r]" "[$s]" "['main', 'seeds']" ${BUDGET:-420} &
  done; done
  wait
  python3 -c "from benchmarks.quality_grid import merge; merge(out='$OUT/scoring_m27.json', grids='runs/grids', prefix='m27_'); merge(out='$OUT/scoring_gqa.json', grids='runs/grids', prefix='gqa_')"
fi
report_grids runs/grids
