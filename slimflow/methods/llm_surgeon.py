"""LLM Surgeon (structured): Kronecker-factored curvature of the LM loss, global threshold, multi-shot.

Per owning projection (`o_proj`, `down_proj`) the loss curvature is `F ≈ G ⊗ A`, with `G = E[ggᵀ]` over the
gradients of the summed LM loss w.r.t. the projection's outputs and `A = E[aaᵀ]` over its inputs (each damped
by `damp·mean(diag)`). Removing the input columns `C` of `W` (one head unit or one channel) costs

    E_C = ½ tr(W[:, C]ᵀ G W[:, C] (A⁻¹_CC)⁻¹),      correlated update ΔW = −W[:, C](A⁻¹_CC)⁻¹ A⁻¹[C, :].

The coupled rows (q/k/v rows of a head, gate/up rows of a channel) feed only those columns, so once they are
zero the rows carry no signal and are deleted at no further cost. Costs are in loss units, so one threshold
is comparable across layers: all units of all layers are ranked together by cost per parameter and the
cheapest go until the shot's parameter target is met (widths are allocated by the method). Shot t of T removes up to `t/T` of the
budget, re-estimating G and A on the already pruned model each time.

Cost per shot: one forward + backward over the gradient calibration set (activation gradients only, no weight
gradients), plus per layer the factors `G_o, G_d` (`d×d`), `A_o` (`d_attn×d_attn`), `A_d` (`m×m`).
"""

from __future__ import annotations

import torch

from slimflow.algorithms.obs import invert_hessian, obs_remove
from slimflow import method_options
from slimflow.methods.base import Decision, PruningMethod, register
from slimflow.methods.common import lm_backward_passes, refuse_schedule


class KroneckerFactors:
    """Running `Σ aaᵀ` (inputs) and `Σ ggᵀ` (output gradients) of one Linear, per token."""

    def __init__(self, linear: torch.nn.Linear):
        self.a = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)
        self.g = torch.zeros(linear.out_features, linear.out_features, device=linear.weight.device)
        self.tokens = 0
        self.grad_tokens = 0
        self.handle = linear.register_forward_hook(self._forward)

    def _forward(self, module, args, out):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.a.addmm_(x.t(), x)
        self.tokens += x.shape[0]
        if out.requires_grad:
            out.register_hook(self._backward)

    def _backward(self, grad):
        g = grad.detach().reshape(-1, grad.shape[-1]).float()
        self.g.addmm_(g.t(), g)
        self.grad_tokens += g.shape[0]

    def factors(self, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`(G, A)` as per-token means, each damped by `damp·mean(diag)`."""
        self.handle.remove()
        out = []
        for m, n in ((self.g, self.grad_tokens), (self.a, self.tokens)):
            m = m / max(n, 1)
            m = m + damp * torch.diagonal(m).mean().clamp_min(1e-30) * torch.eye(m.shape[0], device=m.device)
            out.append(m)
        return out[0], out[1]


def column_costs(weight: torch.Tensor, g: torch.Tensor, ainv: torch.Tensor, unit_size: int = 1) -> torch.Tensor:
    """`½ tr(W_Cᵀ G W_C (A⁻¹_CC)⁻¹)` for every block `C` of `unit_size` contiguous columns."""
    d_out, d_in = weight.shape
    n = d_in // unit_size
    if unit_size == 1:
        return 0.5 * ((g @ weight) * weight).sum(0) / torch.diagonal(ainv)
    m = (weight.t() @ g @ weight).reshape(n, unit_size, n, unit_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    blocks = ainv.reshape(n, unit_size, n, unit_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return 0.5 * torch.linalg.solve(blocks, m).diagonal(dim1=1, dim2=2).sum(-1)


def choose_cheapest(entries: list[tuple], remove_params: float, limits, per_param: bool = True):
    """The cheapest units of all layers until `remove_params` parameters go (closest count, per-layer limits).

    `entries` are `(cost, layer, kind, unit, params)` with kind 0 = head unit, 1 = channel; they are ranked by
    cost per parameter (`per_param`) or by cost. Returns `{layer: (head units, channels)}` and the summed costs."""
    layers = {e[1] for e in entries}
    chosen = {i: ([], []) for i in layers}
    costs = {i: [0.0, 0.0] for i in layers}
    removed = 0.0
    for cost, i, kind, j, size in sorted(entries, key=lambda e: e[0] / e[4] if per_param else e[0]):
        if removed >= remove_params:
            break
        if removed + size / 2 > remove_params or len(chosen[i][kind]) >= limits[i][kind]:
            continue
        chosen[i][kind].append(j)
        costs[i][kind] += cost
        removed += size
    return chosen, costs


def _unit_params(adapter, layer, kv: int) -> tuple[int, int]:
    count = lambda ms: sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in ms)
    return count(adapter.attention_linears(layer)) // kv, count(adapter.mlp_linears(layer)) // adapter.layer_intermediate(layer)


@register
class LLMSurgeon(PruningMethod):
    """Structured LLM Surgeon with physical removal; options: `slimflow.method_options.llm_surgeon`.

    It prunes the whole model at once in shots (`run`), choosing the widths itself; the layer-wise pass and
    the ratio schedules are not used.
    """

    name = "llm-surgeon"
    Options = method_options.llm_surgeon

    def __init__(self, options: method_options.llm_surgeon | None = None, **values):
        super().__init__(options, **values)
        self.losses: list[float] = []

    def resolve_schedule(self, schedule):
        return refuse_schedule(self, schedule)

    def run(self, engine, plans):
        return engine.prune_in_shots(self.options.shots, self.global_shot, self.options.max_layer_ratio)

    def streamable(self) -> bool:
        return False  # gradients of the whole model, every shot

    def gradient_calibration(self, calibration, limit):
        return calibration[:limit] if limit else calibration

    def global_shot(self, model, adapter, calibration, remove_params: float, device, limits) -> dict:
        """One shot: estimate the factors, rank every unit, choose the cheapest, return per-layer decisions.

        `limits[i] = (max head units, max channels)` that layer i may still lose. Returns
        `{layer: (head Decision or None, channel Decision or None)}`; each Decision's `cost` attribute holds
        the summed Kronecker-factored costs of its units.
        """
        layers = adapter.layers(model)
        acc = []
        for layer in layers:
            acc.append((KroneckerFactors(adapter.o_proj(layer)),
                        KroneckerFactors(adapter.down_proj(layer))))
        dp = self.data_parallel
        ids = dp.shard(calibration[: self.options.grad_samples] if self.options.grad_samples else calibration)
        try:
            loss = lm_backward_passes(model, ids, self.options.grad_batch_size, device)
        finally:
            for fo, fd in acc:
                fo.handle.remove()
                fd.handle.remove()
        self.losses.append(dp.weighted_mean(loss, ids[:, 1:].numel()))
        for factors in (f for pair in acc for f in pair):
            dp.sum_(factors.a)
            dp.sum_(factors.g)
            factors.tokens, factors.grad_tokens = map(int, dp.sum_numbers(factors.tokens, factors.grad_tokens))
        head_dim = adapter.head_dim(model)
        entries, inverses = [], []
        with torch.no_grad():
            for i, (layer, (fo, fd)) in enumerate(zip(layers, acc)):
                heads, kv = adapter.layer_heads(model, layer)
                unit = (heads // kv) * head_dim
                unit_p, chan_p = _unit_params(adapter, layer, kv)
                o = adapter.o_proj(layer).weight.float()
                down = adapter.down_proj(layer).weight.float()
                g_o, a_o = fo.factors(self.options.damp)
                g_d, a_d = fd.factors(self.options.damp)
                ainv_o, _ = invert_hessian(a_o, self.options.damp)
                ainv_d, _ = invert_hessian(a_d, self.options.damp)
                inverses.append((unit, ainv_o, ainv_d))
                entries += [(c, i, 0, j, unit_p) for j, c in enumerate(column_costs(o, g_o, ainv_o, unit).tolist())]
                entries += [(c, i, 1, j, chan_p) for j, c in enumerate(column_costs(down, g_d, ainv_d).tolist())]
        chosen, costs = choose_cheapest(entries, remove_params, limits, self.options.per_param)
        out = {}
        with torch.no_grad():
            for i, layer in enumerate(layers):
                units, chans = sorted(chosen[i][0]), sorted(chosen[i][1])
                unit, ainv_o, ainv_d = inverses[i]
                head_d = chan_d = None
                if units:
                    o = adapter.o_proj(layer).weight.float()
                    cols = torch.tensor([c for u in units for c in range(u * unit, (u + 1) * unit)], device=o.device)
                    new, _ = obs_remove(o, ainv_o, cols)
                    head_d = Decision(units, new, cost=costs[i][0])
                if chans:
                    down = adapter.down_proj(layer).weight.float()
                    new, _ = obs_remove(down, ainv_d, torch.tensor(chans, device=down.device))
                    chan_d = Decision(chans, new, cost=costs[i][1])
                if head_d or chan_d:
                    out[i] = (head_d, chan_d)
        return out
