#!/usr/bin/env bash
# One device call: ablations of the current adaptive default on ref-llama-27m (quality_grid plan `ablations`):
# damping 0.001 / 0.1, 32 / 512 calibration sequences, 128 / 2048 tokens, against the default; each with the
# sequences the adaptive schedule samples by default and, on the same tensors, uniform and log_increase. One
# process per setting, both ratios; the rows come back merged in one JSON file.
# Expects .carry/m27 (packed, benchmarks/carry_pack.py), .carry/tok27 (its config files), .carry/grid_data.safetensors.
source benchmarks/device_lib.sh
export OMP_NUM_THREADS=2
mkdir -p runs/grids
python3 -c "from benchmarks.carry_pack import unpack; unpack(packed='.carry/m27', out='runs/ref-llama-27m', files='.carry/tok27')"
for g in default damp0.001 damp0.1 n32 n512 L128 L2048; do
  python3 -c "from benchmarks.quality_grid import run; run(data='.carry/grid_data.safetensors', out='runs/grids/abl_$g', models={'ref-llama-27m': 'runs/ref-llama-27m'}, plan='ablations', groups=['ablation:$g'], write_markdown=False)" > runs/grids/abl_$g.log 2>&1 &
done
wait
python3 -c "from benchmarks.quality_grid import merge; merge(out='$OUT/ablations_m27.json', grids='runs/grids', prefix='abl_')"
for f in runs/grids/abl_*.log; do echo "== $f $(grep -c '"ppl"' $f)"; grep -v '"ppl"' $f | grep -v Loading | tail -n 2; done
ls -l $OUT
