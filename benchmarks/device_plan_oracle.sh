#!/usr/bin/env bash
# One device call: `benchmarks.plan_oracle` with the 256 sampled sequences the adaptive default adds. On
# ref-llama-gqa-12m at 20%: random calibration windows (seeds 0-2) and the tail windows (sampling seeds 0-2), six
# processes side by side on the GPU, one JSON file each, named NAME_gqa20_{random,tail}_s{0,1,2}.json. With
# MODELS containing m27, also ref-llama-27m at 20% and 50%, random-s0 and tail windows, sampling seed 0:
# NAME_m27{20,50}_{random,tail}_s0.json.
# Usage: benchmarks/device_plan_oracle.sh [NAME] [MORE] [MODELS]   (NAME default plan_oracle; MORE: further
# keyword arguments of plan_oracle.main, e.g. "hand=False, families=['cost', 'fixed', 'blend', 'flat'],
# options={'holdout': 64}" or "hand=False, variants=[{'score_on': 'text'}]"; MODELS default "gqa", or "gqa m27")
# Expects .carry/gqa12m (a pretrained ref-llama-gqa-12m), .carry/grid_data.safetensors, .carry/books.safetensors;
# for m27 also .carry/m27 (packed, benchmarks/carry_pack.py) and .carry/tok27 (its config files).
source benchmarks/device_lib.sh
export OMP_NUM_THREADS=2
name=${1:-plan_oracle}; more=${2:+, $2}; models=${3:-gqa}
oracle() {  # model ratio calibration seed file
  python3 -c "from benchmarks.plan_oracle import main; main(model='$1', data='.carry/grid_data.safetensors', books='.carry/books.safetensors', calibration='$3', ratio=$2, sampled=256, seed=$4, out='$OUT/$5.json'$more)" > runs/$5.log 2>&1
}
if [[ $models == *m27* ]]; then
  python3 -c "from benchmarks.carry_pack import unpack; unpack(packed='.carry/m27', out='runs/ref-llama-27m', files='.carry/tok27')"
  for r in 20 50; do
    oracle runs/ref-llama-27m 0.$r random-128x512-s0 0 ${name}_m27${r}_random_s0 &
    oracle runs/ref-llama-27m 0.$r tail-128x512-s0 0 ${name}_m27${r}_tail_s0 &
  done
fi
if [[ $models == *gqa* ]]; then
  for s in 0 1 2; do
    oracle .carry/gqa12m 0.2 random-128x512-s$s $s ${name}_gqa20_random_s$s &
    oracle .carry/gqa12m 0.2 tail-128x512-s0 $s ${name}_gqa20_tail_s$s &
  done
fi
wait
for f in runs/${name}_*.log; do echo "== $f $(grep -c '"ppl"' $f)"; grep -v '"ppl"' $f | tail -n 3; done
ls -l $OUT
