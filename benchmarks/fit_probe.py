"""Measurement helpers for the full-size managed run (`benchmarks/fit_7b.py`).

`PhaseProbe` is a callback listed twice in the benchmark config (first and last), so that the slimflow events
(`on_before_prune`, `on_after_prune`, `on_stage_start`, fit end) are seen before and after the other callbacks
act: the gaps between consecutive events are the phases (load, dense evaluation, calibration + pruning, pruned
evaluation, LoRA injection, training, final evaluation, export). At every event it records the wall time, the
peak GPU memory since the previous event and the peak host RSS since the previous event (VmHWM, reset through
/proc/self/clear_refs). During training it times the micro-batches after `warmup` (device synchronised) and
counts their tokens. `python -m benchmarks.fit_probe OUT.json slimflow ARGS...` runs the slimflow CLI in this
process and adds the whole command's wall time and peaks.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from slimflow.lightning.access import SlimflowCallback

EVENTS: list[dict] = []
TRAIN: dict = {}
_START = time.perf_counter()


def host_peak_gib(reset: bool = False) -> float:
    peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    return round(peak / 2**30, 3)


def gpu_peak_gib(reset: bool = False) -> float:
    if not torch.cuda.is_available():
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(peak, 3)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mark(name: str) -> None:
    _sync()
    EVENTS.append({"event": name, "t_s": round(time.perf_counter() - _START, 3),
                   "gpu_peak_gib": gpu_peak_gib(reset=True), "host_peak_gib": host_peak_gib(reset=True)})


class PhaseProbe(SlimflowCallback):
    """Records phase boundaries (see the module docstring); `position` is `first` or `last`.

    Args:
        position: where this instance sits in the callback list.
        warmup: micro-batches not timed at the start of training.
    """

    def __init__(self, position: str = "first", warmup: int = 16):
        self.position, self.warmup = position, warmup
        self._t0 = None

    def _mark(self, event: str) -> None:
        mark(f"{event}:{self.position}")

    def setup(self, trainer, pl_module, stage):
        self._mark("setup")

    def on_before_prune(self, trainer, pl_module, stage):
        self._mark("before_prune")

    def on_after_prune(self, trainer, pl_module, stage, report):
        self._mark("after_prune")

    def on_stage_start(self, trainer, pl_module, stage):
        self._mark("stage_start")

    def on_train_start(self, trainer, pl_module):
        self._mark("train_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.position != "last":
            return
        if batch_idx == self.warmup:
            _sync()
            self._t0 = time.perf_counter()
            TRAIN.update(tokens=0, nonpad_tokens=0, micro_batches=0)
        if self._t0 is not None:
            TRAIN["tokens"] += int(batch["input_ids"].numel())
            TRAIN["nonpad_tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
            TRAIN["micro_batches"] += 1

    def on_train_end(self, trainer, pl_module):
        if self.position == "first" and self._probe_last(trainer)._t0 is not None:
            _sync()
            last = self._probe_last(trainer)
            TRAIN["seconds"] = round(time.perf_counter() - last._t0, 3)
            TRAIN["tok_per_s"] = round(TRAIN["tokens"] / TRAIN["seconds"], 1)
            TRAIN["optimizer_steps"] = trainer.global_step
        self._mark("train_end")

    @staticmethod
    def _probe_last(trainer) -> "PhaseProbe":
        return [cb for cb in trainer.callbacks if isinstance(cb, PhaseProbe) and cb.position == "last"][0]

    def on_fit_end(self, trainer, pl_module):
        self._mark("fit_end")


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    from benchmarks import fit_probe as probe  # the module the CLI imports for the callbacks (not __main__)
    from slimflow.cli import main as slimflow_main

    start = time.perf_counter()
    host_peak_gib(reset=True)
    rc = slimflow_main(argv[1:] if argv and argv[0] == "slimflow" else argv)
    _sync()
    events = probe.EVENTS
    result = {"argv": argv, "rc": rc, "wall_s": round(time.perf_counter() - start, 2),
              "gpu_peak_gib_since_last_event": gpu_peak_gib(), "host_peak_gib_since_last_event": host_peak_gib(),
              "events": events, "train": probe.TRAIN}
    gpu_total = max([e["gpu_peak_gib"] for e in events] + [result["gpu_peak_gib_since_last_event"]])
    host_total = max([e["host_peak_gib"] for e in events] + [result["host_peak_gib_since_last_event"]])
    result |= {"gpu_peak_gib": gpu_total, "host_peak_gib": host_total}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result)[-2000:])


if __name__ == "__main__":
    main()
