"""First-order Taylor importance per head unit and FFN channel (LLM-Pruner style), from LM-loss gradients.

One gradient pass over the calibration data on the dense model accumulates `g = ∂L/∂W` for every projection
(`L` = summed next-token loss). A weight's importance is `|w·g|` (`param_first`); a head unit sums it over
its q/k/v rows and `o_proj` columns, a channel over its gate/up rows and its `down_proj` column. `vectorize`
takes `|Σ w·g|` per coupled group instead. Selection then follows the ratio schedule, layer by layer; no
weight update.

Cost: one forward + backward per calibration micro-batch and a gradient buffer as large as the seven
projection weights (fp32: 4 bytes per decoder parameter).
"""

from __future__ import annotations

import torch

from slimflow import method_options
from slimflow.methods.base import Decision, PruningMethod, register, unit_columns, zero_columns
from slimflow.methods.common import lm_backward_passes, lowest


def _reduce(products: list[torch.Tensor], mode: str) -> torch.Tensor:
    """Sum per group: each tensor is `[groups, ...]`."""
    if mode == "param_first":
        return sum(p.abs().flatten(1).sum(1) for p in products)
    if mode == "vectorize":
        return sum(p.flatten(1).sum(1) for p in products).abs()
    raise ValueError(f"taylor mode must be 'param_first' or 'vectorize', got {mode!r}")


def head_importance(q, k, v, o, head_dim: int, groups: int, mode: str = "param_first") -> torch.Tensor:
    """Importance of each KV-group unit from `(weight, grad)` pairs of q/k/v/o."""
    n_kv = k[0].shape[0] // head_dim
    unit = groups * head_dim
    parts = [
        (q[0] * q[1]).reshape(n_kv, unit, -1),
        (k[0] * k[1]).reshape(n_kv, head_dim, -1),
        (v[0] * v[1]).reshape(n_kv, head_dim, -1),
        (o[0] * o[1]).reshape(o[0].shape[0], n_kv, unit).transpose(0, 1),
    ]
    return _reduce(parts, mode)


def channel_importance(gate, up, down, mode: str = "param_first") -> torch.Tensor:
    """Importance of each FFN channel from `(weight, grad)` pairs of gate/up/down."""
    parts = [gate[0] * gate[1], up[0] * up[1], (down[0] * down[1]).t()]
    return _reduce(parts, mode)


@register
class Taylor(PruningMethod):
    """Gradient-based (first-order Taylor) structured importance; options: `slimflow.method_options.taylor`."""

    name = "taylor"
    Options = method_options.taylor

    def __init__(self, options: method_options.taylor | None = None, **values):
        super().__init__(options, **values)
        self.loss = None
        self._heads: list[torch.Tensor] = []
        self._channels: list[torch.Tensor] = []
        self._index = 0

    def prepare(self, model, adapter, calibration, budget, device, batch_size):
        layers = adapter.layers(model)
        weights = [m.weight for l in layers for m in (*adapter.attention_linears(l), *adapter.mlp_linears(l))]
        home = next(model.parameters()).device
        model.to(device)
        try:
            self.loss = lm_backward_passes(model, calibration, self.options.grad_batch_size, device, weights)
            for w in weights:
                self.data_parallel.sum_(w.grad)
            self.loss = self.data_parallel.weighted_mean(self.loss, calibration[:, 1:].numel())
            head_dim = adapter.head_dim(model)
            self._heads, self._channels = [], []
            with torch.no_grad():
                for layer in layers:
                    heads, kv = adapter.layer_heads(model, layer)
                    pairs = [(w.detach().float(), g.float()) for w, g in
                             zip(adapter.attention_weights(model, layer), adapter.attention_weights(model, layer, grad=True))]
                    self._heads.append(head_importance(*pairs, head_dim, heads // kv, self.options.mode).cpu())
                    pairs = [(w.detach().float(), g.float()) for w, g in
                             zip(adapter.mlp_weights(layer), adapter.mlp_weights(layer, grad=True))]
                    self._channels.append(channel_importance(*pairs, self.options.mode).cpu())
        finally:
            for w in weights:
                w.grad = None
            model.to(home)

    def streamable(self) -> bool:
        return False  # gradients of the whole model

    def gradient_calibration(self, calibration, limit):
        return calibration[:limit] if limit else calibration

    def begin_layer(self, index, layer, adapter):
        self._index = index

    def prune_heads(self, weight, stats, unit_size, n_remove):
        removed = lowest(self._heads[self._index], n_remove)
        return Decision(removed, zero_columns(weight, unit_columns(removed, unit_size)))

    def prune_channels(self, weight, stats, n_remove):
        removed = lowest(self._channels[self._index], n_remove)
        return Decision(removed, zero_columns(weight, removed))
