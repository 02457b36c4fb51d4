"""Magnitude baseline: keep the units whose `o_proj` / `down_proj` input columns have the largest L2 norm."""

from __future__ import annotations

import torch

from slimflow import method_options
from slimflow.methods.base import Decision, PruningMethod, register, unit_columns, zero_columns


@register
class Magnitude(PruningMethod):
    """Weight-norm structured pruning, no calibration statistics used and no compensation."""

    name = "magnitude"
    Options = method_options.magnitude

    def prune_heads(self, weight, stats, unit_size, n_remove):
        norms = weight.norm(dim=0).reshape(-1, unit_size).sum(-1)
        removed = sorted(torch.argsort(norms)[:n_remove].tolist())
        return Decision(removed, zero_columns(weight, unit_columns(removed, unit_size)))

    def prune_channels(self, weight, stats, n_remove):
        removed = sorted(torch.argsort(weight.norm(dim=0))[:n_remove].tolist())
        return Decision(removed, zero_columns(weight, removed))
