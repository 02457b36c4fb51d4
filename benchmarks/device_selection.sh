#!/usr/bin/env bash
# One device call: `benchmarks.selection_study` over the default grid's cells of ref-llama-27m and the carried
# ref-llama-gqa-12m (20% and 50%, random seeds 0-2 and the tail with sampling seeds 0-2), eight processes side by
# side, three cells each. The rows come back as one JSON file per process (sel_<process>.json, a list of cells).
# Carry .carry/m27 .carry/tok27 .carry/gqa12m .carry/grid_data.safetensors .carry/books.safetensors
source benchmarks/device_lib.sh
export OMP_NUM_THREADS=2
python3 -c "from benchmarks.carry_pack import unpack; unpack(packed='.carry/m27', out='runs/ref-llama-27m', files='.carry/tok27')"
worker() {  # file cells: python list of (model, calibration, ratio, seed)
  python3 -c "
import json
from benchmarks.selection_study import main
rows = []
for model, calibration, ratio, seed in $2:
    rows.append(main(model=model, data='.carry/grid_data.safetensors', books='.carry/books.safetensors', calibration=calibration, ratio=ratio, seed=seed, out='runs/last_$1.json'))
    json.dump(rows, open('$OUT/sel_$1.json', 'w'))
" > runs/sel_$1.log 2>&1
}
M=runs/ref-llama-27m; G=.carry/gqa12m
for model in m27 gqa; do
  path=$M; [[ $model == gqa ]] && path=$G
  for r in 0.2 0.5; do
    worker ${model}_${r}_random "[('$path', 'random-128x512-s0', $r, 0), ('$path', 'random-128x512-s1', $r, 1), ('$path', 'random-128x512-s2', $r, 2)]" &
    worker ${model}_${r}_tail "[('$path', 'tail-128x512-s0', $r, 0), ('$path', 'tail-128x512-s0', $r, 1), ('$path', 'tail-128x512-s0', $r, 2)]" &
  done
done
wait
for f in runs/sel_*.log; do echo "== $f $(grep -c '"picks"' $f)"; grep -v '"picks"' $f | grep -v Loading | tail -n 3; done
ls -l $OUT
