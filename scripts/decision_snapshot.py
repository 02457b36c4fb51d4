"""Kept head units and FFN channels of every method on the reference model for one fixed calibration set.

`python3 scripts/decision_snapshot.py OUT.json [methods...]` writes `{method: [[kept units], [kept channels]] per layer}`,
so two revisions of slimflow can be compared decision by decision (see docs/results.md).
"""

import json
import sys
import time

import torch

import slimflow
from slimflow.data.calibration import calibration_ids
from slimflow.method_options import taylor
from slimflow.models import load_model, load_tokenizer

MODEL = "../shared/models/ref-llama-27m"
TEXT = "../shared/pretrain_corpus/part-007.txt.gz"


def main(out: str, methods: list[str]) -> None:
    torch.manual_seed(0)
    tokenizer = load_tokenizer(MODEL)
    calib = calibration_ids(TEXT, tokenizer, num_samples=16, seqlen=128, sampling="tail")
    snapshot = {}
    for method in methods:
        model = load_model(MODEL, dtype="float32")
        start = time.perf_counter()
        spec = taylor(grad_batch_size=4) if method == "taylor" else method
        report = slimflow.prune(model, calib, ratio=0.3, method=spec, progress=False, device="cpu")
        snapshot[method] = {"layers": [[r.kept_units, r.kept_channels] for r in report.layers],
                            "seconds": round(time.perf_counter() - start, 1)}
        print(method, snapshot[method]["seconds"], flush=True)
    with open(out, "w") as f:
        json.dump(snapshot, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["slimgpt", "magnitude", "wanda-sp", "flap", "taylor", "slimllm"])
