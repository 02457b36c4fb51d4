#!/usr/bin/env bash
# One device call: `benchmarks.plan_oracle` on ref-llama-gqa-12m at 20%, with the 256 sampled sequences the
# adaptive default adds, for random calibration windows (seeds 0-2) and the tail windows (sampling seeds 0-2):
# six processes side by side on the GPU, one JSON file each, named NAME_gqa20_{random,tail}_s{0,1,2}.json.
# Usage: benchmarks/device_plan_oracle.sh [NAME] [MORE]   (NAME default plan_oracle; MORE: further keyword
# arguments of plan_oracle.main, e.g. "hand=False, families=['cost', 'fixed', 'blend', 'flat'], options={'holdout': 64}")
# Expects .carry/gqa12m (a pretrained ref-llama-gqa-12m), .carry/grid_data.safetensors, .carry/books.safetensors.
source benchmarks/device_lib.sh
export OMP_NUM_THREADS=2
name=${1:-plan_oracle}; more=${2:+, $2}
oracle() {  # calibration seed file
  python3 -c "from benchmarks.plan_oracle import main; main(model='.carry/gqa12m', data='.carry/grid_data.safetensors', books='.carry/books.safetensors', calibration='$1', ratio=0.2, sampled=256, seed=$2, out='$OUT/$3.json'$more)" > runs/$3.log 2>&1
}
for s in 0 1 2; do
  oracle random-128x512-s$s $s ${name}_gqa20_random_s$s &
  oracle tail-128x512-s0 $s ${name}_gqa20_tail_s$s &
done
wait
for f in runs/${name}_*.log; do echo "== $f $(grep -c '"ppl"' $f)"; grep -v '"ppl"' $f | tail -n 3; done
ls -l $OUT
