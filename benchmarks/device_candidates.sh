#!/usr/bin/env bash
# One device call: `benchmarks.candidate_study` side by side on the GPU. ref-llama-27m at 20%, random-s0
# calibration: default damping, damping 0.001 and 0.1, 512 sequences; at 50% the default; ref-llama-gqa-12m at 20%:
# random seeds 0 and 1, the tail. One JSON file each in $OUT, named cand_*.json. With the argument gqa-rest:
# the other three GQA 20% runs (random seed 2, the tail with sampling seeds 1 and 2).
# Carry .carry/m27 .carry/tok27 .carry/gqa12m .carry/grid_data.safetensors .carry/books.safetensors
source benchmarks/device_lib.sh
export OMP_NUM_THREADS=2
python3 -c "from benchmarks.carry_pack import unpack; unpack(packed='.carry/m27', out='runs/ref-llama-27m', files='.carry/tok27')"
study() {  # model calibration ratio damp seed file
  python3 -c "from benchmarks.candidate_study import main; main(model='$1', data='.carry/grid_data.safetensors', books='.carry/books.safetensors', calibration='$2', ratio=$3, damp=$4, seed=$5, out='$OUT/$6.json')" > runs/$6.log 2>&1
}
if [[ ${1:-} == gqa-rest ]]; then  # second call: the other three GQA 20% runs of the plan oracle
  study .carry/gqa12m random-128x512-s2 0.2 0.01 2 cand_gqa_20_random_s2 &
  study .carry/gqa12m tail-128x512-s0 0.2 0.01 1 cand_gqa_20_tail_s1 &
  study .carry/gqa12m tail-128x512-s0 0.2 0.01 2 cand_gqa_20_tail_s2 &
  wait; ls -l $OUT; exit 0
fi
study runs/ref-llama-27m random-128x512-s0 0.2 0.01 0 cand_m27_20_default &
study runs/ref-llama-27m random-128x512-s0 0.2 0.001 0 cand_m27_20_damp0.001 &
study runs/ref-llama-27m random-128x512-s0 0.2 0.1 0 cand_m27_20_damp0.1 &
study runs/ref-llama-27m random-512x512-s0 0.2 0.01 0 cand_m27_20_n512 &
study runs/ref-llama-27m random-128x512-s0 0.5 0.01 0 cand_m27_50_default &
study .carry/gqa12m random-128x512-s0 0.2 0.01 0 cand_gqa_20_random_s0 &
study .carry/gqa12m random-128x512-s1 0.2 0.01 1 cand_gqa_20_random_s1 &
study .carry/gqa12m tail-128x512-s0 0.2 0.01 0 cand_gqa_20_tail_s0 &
wait
for f in runs/cand_*.log; do echo "== $f $(grep -c '"plan"' $f)"; grep -v '"plan"' $f | tail -n 3; done
ls -l $OUT
