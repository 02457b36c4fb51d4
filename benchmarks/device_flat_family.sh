#!/usr/bin/env bash
# One device call: the adaptive search with the `flat` candidate family added (families cost, fixed, blend, flat)
# against the default families and the fixed shapes, 256 sampled sequences added as by default:
# ref-llama-gqa-12m at 20% (random windows seeds 0-2, tail windows sampling seeds 0-2) and ref-llama-27m at 20% and
# 50% (random seed 0, tail). Ten processes side by side on the GPU, one JSON file each (`benchmarks.plan_oracle`,
# schedules only).
# Expects .carry/gqa12m (a pretrained ref-llama-gqa-12m), .carry/m27, .carry/tok27 (the 27M config files), .carry/grid_data.safetensors,
# .carry/books.safetensors.
source benchmarks/device_lib.sh
export OMP_NUM_THREADS=1
python3 -c "from benchmarks.carry_pack import unpack; unpack(packed='.carry/m27', out='runs/ref-llama-27m', files='.carry/tok27')"
run() {  # model calibration ratio seed name
  python3 -c "from benchmarks.plan_oracle import main; main(model='$1', data='.carry/grid_data.safetensors', books='.carry/books.safetensors', calibration='$2', ratio=$3, sampled=256, seed=$4, hand=False, families=['cost', 'fixed', 'blend', 'flat'], out='$OUT/$5.json')" > runs/$5.log 2>&1
}
for s in 0 1 2; do
  run .carry/gqa12m random-128x512-s$s 0.2 $s flat_gqa20_random_s$s &
  run .carry/gqa12m tail-128x512-s0 0.2 $s flat_gqa20_tail_s$s &
done
for r in 0.2 0.5; do
  run runs/ref-llama-27m random-128x512-s0 $r 0 flat_m27_${r}_random_s0 &
  run runs/ref-llama-27m tail-128x512-s0 $r 0 flat_m27_${r}_tail_s0 &
done
wait
for f in runs/flat_*.log; do echo "== $f $(grep -c '"ppl"' $f)"; grep -v '"ppl"' $f | tail -n 3; done
ls -l $OUT
