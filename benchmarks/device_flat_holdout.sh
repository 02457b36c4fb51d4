#!/usr/bin/env bash
# One device call: as device_flat_family.sh on ref-llama-gqa-12m at 20% only, with the search scoring on 64
# held-out rows instead of 16 (families cost, fixed, blend, flat).
# Expects .carry/gqa12m, .carry/grid_data.safetensors, .carry/books.safetensors.
source benchmarks/device_lib.sh
export OMP_NUM_THREADS=2
run() {  # calibration seed name
  python3 -c "from benchmarks.plan_oracle import main; main(model='.carry/gqa12m', data='.carry/grid_data.safetensors', books='.carry/books.safetensors', calibration='$1', ratio=0.2, sampled=256, seed=$2, hand=False, families=['cost', 'fixed', 'blend', 'flat'], options={'holdout': 64}, out='$OUT/$3.json')" > runs/$3.log 2>&1
}
for s in 0 1 2; do
  run random-128x512-s$s $s flat64_gqa20_random_s$s &
  run tail-128x512-s0 $s flat64_gqa20_tail_s$s &
done
wait
for f in runs/flat64_*.log; do echo "== $f"; grep '"ppl"' $f | cut -c1-120; done
