#!/usr/bin/env bash
# One device call: benchmarks/allocation_study.py on all three reference models. The 27M model and the corpus
# travel packed (benchmarks/carry_pack.py); the two 12M models are pretrained here first while the 27M cells run.
# Expects .carry/m27, .carry/tok, .carry/corpus, .carry/grid_data.safetensors, .carry/books.safetensors.
source benchmarks/device_lib.sh
unpack_m27
study() {  # name models ratios budget
  python3 -c "from benchmarks.allocation_study import run; run(data='.carry/grid_data.safetensors', books='.carry/books.safetensors', out='$OUT/$1', models=$2, ratios=$3, budget_s=$4)" > runs/$1.log 2>&1
}
M27="{'ref-llama-27m': 'runs/ref-llama-27m'}"
study s27_20 "$M27" "[0.2]" ${B27:-330} &
study s27_50 "$M27" "[0.5]" ${B27:-330} &
tokenize_corpus runs/ref-llama-27m runs
(train_ref ref-llama-gqa-12m $STEPS_GQA runs/ref-llama-27m runs &&
 study sgqa "{'ref-llama-gqa-12m': 'runs/refmodels/ref-llama-gqa-12m'}" "[0.2, 0.5]" ${B12:-200}) &
(train_ref ref-qwen2-12m $STEPS_QWEN2 runs/ref-llama-27m runs &&
 study sqwen2 "{'ref-qwen2-12m': 'runs/refmodels/ref-qwen2-12m'}" "[0.2, 0.5]" ${B12:-200}) &
wait
tail -n 2 runs/tokenize.log runs/train_*.log
for f in runs/s*.log; do echo "== $f"; grep -v '^{' $f | grep -v Loading | tail -n 4; grep -c '"default"' $f; done
ls -R $OUT
