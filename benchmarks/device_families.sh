#!/usr/bin/env bash
# One device call: the adaptive search confirming the best candidate of each family (`{"confirm": "families"}`)
# against confirming its two best (`{"confirm": 2, "confirm_families": false}`); the default, their union, is
# derived from both rows by benchmarks/families_table.py (quality_grid plan `families`).
# - ref-llama-27m: the families rows, seeds 0-2 of both samplings, one two-best row that must repeat
#   benchmarks/results/confirm_m27.json (group `check`) and the 512-sequence ablation at 20%.
# - Meanwhile both 12M models are pretrained again and packed to $OUT (`<name>_lo.bin`, `<name>_rest.tar`), so
#   that a later call can carry the same weights (WITH12=<dir>: no pretraining; the models are unpacked from
#   <dir>/gqa and <dir>/qwen2, each holding lo.bin and what <name>_rest.tar holds). Then uniform, log_increase
#   and both rules, seeds SEEDS12 (default 0 1), one process per ratio × seed × sampling; SKIP12: ratio_seed
#   pairs already measured (e.g. "0.2_s0"); MODELS12: which of gqa, qwen2 (default both); DEADLINE: seconds
#   after the start past which no 12M cell starts. Twenty processes on one 80 GiB card ran out of memory
#   (cusolver errors): eight ran cleanly.
# Run as `timeout 550 bash benchmarks/device_families.sh; bash benchmarks/device_families.sh merge` where the call's
# limit is near: the rows are written as they come, so what ran comes back.
# Carry .carry/m27 .carry/tok .carry/corpus .carry/grid_data.safetensors .carry/books.safetensors
#       .carry/scoring.safetensors (M27=0: skip the 27M rows, and .carry/m27 need not travel)
source benchmarks/device_lib.sh
export OMP_NUM_THREADS=1
START=$SECONDS
[[ ${1:-} == merge ]] || rm -rf runs/grids
mkdir -p runs/grids
merged() {
  python3 -c "from benchmarks.quality_grid import merge; merge(out='$OUT/families_m27.json', grids='runs/grids', prefix='m27_'); merge(out='$OUT/families_gqa.json', grids='runs/grids', prefix='gqa_'); merge(out='$OUT/families_qwen2.json', grids='runs/grids', prefix='qwen2_')"
  report_grids runs/grids
}
[[ ${1:-} == merge ]] && { merged; exit; }
grid() {  # name models ratios seeds groups samplings budget
  python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', books='.carry/books.safetensors', scoring='.carry/scoring.safetensors', out='runs/grids/$1', models=$2, plan='families', ratios=$3, seeds=$4, groups=$5, samplings=$6, budget_s=$7, write_markdown=False)" > runs/grids/$1.log 2>&1
}
if [[ ${M27:-1} == 1 ]]; then
  python3 -c "from benchmarks.carry_pack import unpack; unpack(packed='.carry/m27', out='runs/ref-llama-27m', files='.carry/tok')"
  M="{'ref-llama-27m': 'runs/ref-llama-27m'}"
  for r in 0.2 0.5; do for s in 0 1 2; do
    grid m27_${r}_s$s "$M" "[$r]" "[$s]" "['main', 'seeds']" None 400 &
  done; done
  grid m27_extra "$M" None None "['check', 'ablation:n512']" None 400 &
fi
twelve() {  # preset name: pretrained (or carried) model, packed to $OUT, then its rows
  local dir=runs/refmodels/$1
  if [[ -n ${WITH12:-} ]]; then
    python3 -c "from benchmarks.carry_pack import unpack; unpack(packed='$WITH12/$2', out='$dir', files='.carry/tok')"
    cp $WITH12/$2/config.json $WITH12/$2/generation_config.json $dir/
  else
    train_ref $1 $([[ $2 == gqa ]] && echo $STEPS_GQA || echo $STEPS_QWEN2) runs/tok runs/grids || return
    python3 -c "from benchmarks.carry_pack import pack; pack(model='$dir', out='runs/packed/$2')"
    cp runs/packed/$2/lo.bin $OUT/$2_lo.bin
    tar cf $OUT/$2_rest.tar -C runs/packed/$2 head.bin hi.xz -C $PWD/$dir config.json generation_config.json
  fi
  local budget=$(( ${DEADLINE:-430} - (SECONDS - START) ))
  for r in 0.2 0.5; do for s in ${SEEDS12:-0 1}; do for c in tail random; do
    [[ " ${SKIP12:-} " == *" ${r}_s$s "* ]] && continue
    grid $2_${r}_s${s}_$c "{'$1': '$dir'}" "[$r]" "[$s]" None "['$c']" $budget &
  done; done; done; wait
}
if [[ -z ${WITH12:-} ]]; then unpack_corpus; tokenize_corpus runs/tok runs/grids; fi
[[ " ${MODELS12:-gqa qwen2} " == *" gqa "* ]] && twelve ref-llama-gqa-12m gqa &
[[ " ${MODELS12:-gqa qwen2} " == *" qwen2 "* ]] && twelve ref-qwen2-12m qwen2 &
wait
merged
