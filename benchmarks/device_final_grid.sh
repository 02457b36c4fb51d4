#!/usr/bin/env bash
# One device call: the final comparison (quality_grid plan `final`) on all three reference models. The 27M model
# and the corpus travel packed (benchmarks/carry_pack.py); the two 12M models are pretrained here first while the
# 27M cells run. Last (with SPEED set): sampling speed at 7B shape.
# Expects .carry/m27, .carry/tok, .carry/corpus (xz parts 000-006), .carry/grid_data.safetensors.
source benchmarks/device_lib.sh
unpack_m27
grid() {  # name models ratios budget
  python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', out='$OUT/$1', models=$2, plan='final', ratios=$3, budget_s=$4, write_markdown=False)" > runs/$1.log 2>&1
}
M27="{'ref-llama-27m': 'runs/ref-llama-27m'}"
grid g27_20 "$M27" "[0.2]" ${B27:-360} &
grid g27_50 "$M27" "[0.5]" ${B27:-360} &
tokenize_corpus runs/ref-llama-27m runs
(train_ref ref-llama-gqa-12m $STEPS_GQA runs/ref-llama-27m runs &&
 grid gqa "{'ref-llama-gqa-12m': 'runs/refmodels/ref-llama-gqa-12m'}" None ${B12:-200}) &
(train_ref ref-qwen2-12m $STEPS_QWEN2 runs/ref-llama-27m runs &&
 grid qwen2 "{'ref-qwen2-12m': 'runs/refmodels/ref-qwen2-12m'}" None ${B12:-200}) &
wait
[ -n "${SPEED:-}" ] && timeout 60 python3 -m benchmarks.sample_speed llama-7b 64 512 > runs/speed.log 2>&1
tail -n 3 runs/tokenize.log runs/train_*.log runs/speed.log
for f in runs/*.log; do echo "== $f"; grep -c '"ppl"' $f; grep -v '"ppl"' $f | tail -n 3; done
cp runs/train_*.log runs/speed.log $OUT/ 2>/dev/null; ls -R $OUT
