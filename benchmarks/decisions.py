"""Pruning decisions of `slimflow.prune` on a real checkpoint, as JSON: kept units/channels and errors per layer.

Run before and after an engine change and diff the two files (`--compare`). CPU, fp32, small calibration.

    python benchmarks/decisions.py --model PATH --text FILE.txt.gz --out after.json [--compare before.json]
"""

from __future__ import annotations

import argparse
import gzip
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import slimflow


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    with gzip.open(args.text, "rt") as f:
        text = f.read()[-2_000_000:]
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    need = args.samples * args.seqlen
    calib = ids[-need:].reshape(args.samples, args.seqlen)
    out = {}
    for ratio in (0.2, 0.5):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        report = slimflow.prune(model, calib, ratio=ratio, device="cpu", progress=False)
        out[str(ratio)] = [
            {"kept_units": r.kept_units, "kept_channels": r.kept_channels, "attn_error": r.attn_error,
             "attn_error_uncompensated": r.attn_error_uncompensated, "ffn_error": r.ffn_error,
             "ffn_error_uncompensated": r.ffn_error_uncompensated}
            for r in report.layers
        ]
        print(ratio, report.wall_time, report.phase_times)
    with open(args.out, "w") as f:
        json.dump(out, f)
    if args.compare:
        with open(args.compare) as f:
            ref = json.load(f)
        for ratio, layers in out.items():
            for i, (a, b) in enumerate(zip(layers, ref[ratio])):
                same = a["kept_units"] == b["kept_units"] and a["kept_channels"] == b["kept_channels"]
                errs = {k: (a[k], b[k]) for k in a if k.endswith("error") or k.endswith("uncompensated")}
                worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in errs.values())
                print(f"ratio {ratio} layer {i}: decisions {'same' if same else 'DIFFER'}, max rel error change {worst:.2e}")


if __name__ == "__main__":
    main()
