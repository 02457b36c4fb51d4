# Shared steps of the device scripts (sourced, not run): the packed 27M model and corpus, the two 12M reference
# models pretrained from parts 000-006 with the exact step counts of docs/reference_models.md.
set -uo pipefail
OUT=${OUT:?}
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=true PYTHONUNBUFFERED=1
mkdir -p runs
STEPS_GQA=2066
STEPS_QWEN2=1781

unpack_m27() {  # the 27M model (with the tokenizer) to runs/ref-llama-27m, the corpus to runs/corpus
  python3 -c "from benchmarks.carry_pack import unpack, corpus_to_gzip; unpack(packed='.carry/m27', out='runs/ref-llama-27m', files='.carry/tok'); corpus_to_gzip(packed='.carry/corpus', out='runs/corpus')"
}

unpack_corpus() {  # the corpus to runs/corpus, the tokenizer to runs/tok
  mkdir -p runs/tok && cp .carry/tok/* runs/tok/
  python3 -c "from benchmarks.carry_pack import corpus_to_gzip; corpus_to_gzip(packed='.carry/corpus', out='runs/corpus')"
}

tokenize_corpus() {  # tokenizer logdir
  python3 -c "from benchmarks.pretrain_reference import tokenize; tokenize(out='runs/tokens', corpus='runs/corpus', tokenizer='$1')" > $2/tokenize.log 2>&1
}

train_ref() {  # preset steps tokenizer logdir: runs/refmodels/<preset>
  python3 -c "from benchmarks.pretrain_reference import train; train(preset='$1', out='runs/refmodels', tokens='runs/tokens', steps=$2, tokenizer='$3')" > $4/train_$1.log 2>&1
}

report_grids() {  # logdir: rows per log, each log's last lines, the logs archived to $OUT
  for f in $1/*.log; do echo "== $f $(grep -c '"ppl"' $f)"; grep -v '"ppl"' $f | tail -n 2; done
  tar czf $OUT/logs.tar.gz $1/*.log
  ls -l $OUT
}
