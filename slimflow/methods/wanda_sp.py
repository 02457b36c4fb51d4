"""Wanda-sp: structured Wanda. A column's score is `‖X_j‖₂ · mean_r |W_rj|`; a head unit sums its columns."""

from __future__ import annotations

import torch

from slimflow import method_options
from slimflow.methods.base import Decision, PruningMethod, register, unit_columns, zero_columns
from slimflow.methods.common import column_sq_norms, lowest, unit_sum


def column_scores(weight: torch.Tensor, stats) -> torch.Tensor:
    """`‖X_j‖₂ · mean_r |W_rj|`, with `‖X_j‖₂` over all calibration tokens."""
    return column_sq_norms(stats).clamp_min(0).sqrt() * weight.abs().mean(0)


@register
class WandaSP(PruningMethod):
    """Activation-weighted magnitude of the `o_proj` / `down_proj` input columns; no weight update."""

    name = "wanda-sp"
    Options = method_options.wanda_sp

    def prune_heads(self, weight, stats, unit_size, n_remove):
        removed = lowest(unit_sum(column_scores(weight, stats), unit_size), n_remove)
        return Decision(removed, zero_columns(weight, unit_columns(removed, unit_size)))

    def prune_channels(self, weight, stats, n_remove):
        removed = lowest(column_scores(weight, stats), n_remove)
        return Decision(removed, zero_columns(weight, removed))
