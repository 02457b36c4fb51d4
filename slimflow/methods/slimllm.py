"""SlimLLM: holistic head selection, PCA-weighted channel importance, regression recovery, layer allocation.

Heads. With `o_i` the output of head unit `i` through `o_proj` and `O = Σ_i o_i`, a kept set `S` scores
`ρ(S) = Σ_k |corr_tokens(Σ_{i∈S} o_i[:, k], O[:, k])|`. Every `ρ` comes from the per-output-channel
covariances `Σ[k, i, j] = cov(o_i[:, k], o_j[:, k]) = W[k, B_i] C[B_i, B_j] W[k, B_j]ᵀ` (C: covariance of the
`o_proj` inputs), so no token is revisited. The heads whose removal leaves the largest `ρ` go first, then a
greedy swap search keeps any pruned/kept exchange that raises `ρ(kept)`.

Channels. `I_c = ‖W_gate[c]⊙a‖ + ‖W_up[c]⊙a‖ + ‖h_c‖·‖|VᵀW_down[:, c]|⊙w‖`, with `a` the per-feature norm of
the FFN input, `h` the `down_proj` input, `V, λ` the principal axes of the FFN output `Y = hW_downᵀ` (from its
covariance `W_down C_h W_downᵀ`) and `w = sigmoid(λ/mean λ)`. The lowest `protect` share is kept, the next
`n_remove` channels go.

Recovery. Per output channel k of `o_proj`/`down_proj`, the least-squares line `y_k ≈ a_k x_k + b_k` from the
pruned output `x_k` to the dense output `y_k` over the calibration tokens: the kept weights of row k are scaled
by `a_k` and `b_k` is added to the bias (llama-family models get zero sibling biases, see `ModelAdapter.add_output_biases`).

Layers. On the dense model `s_l = mean_tokens cos(x_l, layer_l(x_l))`; the `active` share of layers with the
largest `s_l` get ratios `∝ softmax(α s)`, the others are not pruned; the scale meets the parameter budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimflow import method_options
from slimflow.methods.base import Decision, PruningMethod, register, unit_columns, zero_columns
from slimflow.methods.common import (
    column_sq_norms,
    covariance,
    forward_passes,
    plan_from_shape,
    refuse_schedule,
    softmax_shape,
)


# ----------------------------------------------------------------------------------------------------- heads
def head_output_covariances(weight: torch.Tensor, cov: torch.Tensor, unit_size: int) -> torch.Tensor:
    """`Σ[k, i, j] = cov(o_i[:, k], o_j[:, k])` for units of `unit_size` columns: `[d_out, n, n]`."""
    d_out, d_in = weight.shape
    n = d_in // unit_size
    z = weight.reshape(d_out, n, unit_size)
    out = torch.empty(d_out, n, n, dtype=weight.dtype, device=weight.device)
    for i in range(n):
        rows = cov[i * unit_size : (i + 1) * unit_size]  # [u, d_in]
        t = (z[:, i, :] @ rows).reshape(d_out, n, unit_size)
        out[:, i, :] = (t * z).sum(-1)
    return out


def correlation_score(sigma: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """`ρ(S)` for each row of `masks` (`[b, n]`, 1 = unit kept): `Σ_k |cov(S_k, O_k)| / sqrt(var S_k · var O_k)`."""
    masks = masks.to(sigma.dtype)
    row = sigma.sum(-1)  # [k, n]: cov(o_i, O)
    cov_so = masks @ row.t()  # [b, k]
    var_s = torch.einsum("kij,bi,bj->bk", sigma, masks, masks)
    var_o = sigma.sum((1, 2))
    return (cov_so.abs() / (var_s * var_o).clamp_min(1e-30).sqrt()).sum(-1)


def select_heads(sigma: torch.Tensor, n_remove: int, swap: bool = True) -> list[int]:
    """Initial pick by leave-one-out `ρ`, then greedy swaps that raise `ρ(kept)`."""
    n = sigma.shape[1]
    if n_remove == 0:
        return []
    loo = correlation_score(sigma, 1 - torch.eye(n, dtype=sigma.dtype, device=sigma.device))
    removed = torch.argsort(loo, descending=True, stable=True)[:n_remove].tolist()
    if swap:
        keep = torch.ones(n, dtype=sigma.dtype, device=sigma.device)
        keep[removed] = 0
        best = float(correlation_score(sigma, keep[None])[0])
        for slot in range(len(removed)):
            p = removed[slot]
            kept = [i for i in range(n) if keep[i] == 1]
            trials = keep.repeat(len(kept), 1)
            for row, q in enumerate(kept):
                trials[row, p], trials[row, q] = 1, 0
            scores = correlation_score(sigma, trials)
            j = int(torch.argmax(scores))
            if float(scores[j]) > best:
                best = float(scores[j])
                keep = trials[j]
                removed[slot] = kept[j]
    return sorted(removed)


# ------------------------------------------------------------------------------------------------- recovery
def regression_refit(weight: torch.Tensor, stats, kept_cols: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, least squares `y_k ≈ a_k x_k + b_k` of the dense output on the pruned one.

    Returns the new full-width weight (kept columns scaled by `a_k`, others zero) and the bias `b`."""
    cov = covariance(stats).to(weight.dtype)
    mean = stats.mean.to(weight.dtype)
    kept = torch.tensor(kept_cols, dtype=torch.long, device=weight.device)
    w_s = weight[:, kept]
    proj = w_s @ cov[kept]  # [d_out, d_in]
    cov_xy = (proj * weight).sum(1)
    var_x = (proj[:, kept] * w_s).sum(1)
    ok = var_x > 1e-12 * var_x.abs().max().clamp_min(1e-30)
    a = torch.where(ok, cov_xy / torch.where(ok, var_x, torch.ones_like(var_x)), torch.ones_like(var_x))
    b = weight @ mean - a * (w_s @ mean[kept])
    new = torch.zeros_like(weight)
    new[:, kept] = a[:, None] * w_s
    return new, b


# ------------------------------------------------------------------------------------------------- channels
def channel_scores(w_gate, w_up, w_down, input_norm: torch.Tensor, stats) -> torch.Tensor:
    """`I_c` for every channel (see module docstring); `input_norm` = per-feature L2 norm of the FFN input."""
    cov_y = w_down @ covariance(stats).to(w_down.dtype) @ w_down.t()
    lam, vec = torch.linalg.eigh((cov_y + cov_y.t()) / 2)
    lam = lam.clamp_min(0)
    weights = torch.sigmoid(lam / lam.mean().clamp_min(1e-30))
    h_norm = column_sq_norms(stats).to(w_down.dtype).clamp_min(0).sqrt()
    pca = ((vec.t() @ w_down).abs() * weights[:, None]).norm(dim=0)
    a = input_norm.to(w_gate.dtype)
    return (w_gate * a).norm(dim=1) + (w_up * a).norm(dim=1) + h_norm * pca


@register
class SlimLLM(PruningMethod):
    """Holistic structured pruning with linear-regression recovery; options: `slimflow.method_options.slimllm`."""

    name = "slimllm"
    Options = method_options.slimllm

    def __init__(self, options: method_options.slimllm | None = None, **values):
        super().__init__(options, **values)
        self.layer_similarity: list[float] = []
        self._layer = None
        self._adapter = None
        self._sq = None
        self._handle = None

    def resolve_schedule(self, schedule):
        if self.options.layer_allocation:
            return refuse_schedule(self, schedule, " or pass layer_allocation=False to use a schedule")
        return super().resolve_schedule(schedule)

    def prepare_model(self, model, adapter):
        if self.options.regression:
            adapter.add_output_biases(model)

    def streamable(self) -> bool:
        return False  # the allocation's dense-model passes and the added biases

    @torch.no_grad()
    def prepare(self, model, adapter, calibration, budget, device, batch_size):
        if not self.options.layer_allocation:
            return
        layers = adapter.layers(model)
        sums = [[0.0, 0] for _ in layers]

        def hook(module, args, kwargs, out, acc):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
            acc[0] += float(cos.sum())
            acc[1] += cos.numel()

        handles = [l.register_forward_hook(lambda m, a, k, o, acc=acc: hook(m, a, k, o, acc), with_kwargs=True)
                   for l, acc in zip(layers, sums)]
        try:
            forward_passes(model, calibration, batch_size, device)
        finally:
            for h in handles:
                h.remove()
        totals = self.data_parallel.sum_numbers(*(v for pair in sums for v in pair))
        sums = [totals[i : i + 2] for i in range(0, len(totals), 2)]
        self.layer_similarity = [s / max(n, 1) for s, n in sums]

    def allocate(self, budget, schedule_plan):
        if not self.options.layer_allocation:
            return schedule_plan()
        high = budget.fraction > 0.35
        alpha = self.options.alpha if self.options.alpha is not None else (7.0 if high else 10.0)
        active = self.options.active if self.options.active is not None else (30 / 32 if high else 26 / 32)
        n_layers = len(self.layer_similarity)
        k = max(1, min(n_layers, round(active * n_layers)))
        return plan_from_shape(softmax_shape(self.layer_similarity, alpha, k), budget, self.options.max_layer_ratio)

    def begin_layer(self, index, layer, adapter):
        self._layer, self._adapter, self._sq = layer, adapter, None
        gate = adapter.mlp_linears(layer)[0]

        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq = x.pow(2).sum(0)
            self._sq = sq if self._sq is None else self._sq + sq

        self._handle = gate.register_forward_pre_hook(hook)

    def end_layer(self, index, layer):
        if self._handle is not None:
            self._handle.remove()
        self._handle = self._layer = None

    def _finish(self, weight, stats, removed, cols):
        if not self.options.regression or not cols:
            return Decision(removed, zero_columns(weight, cols))
        drop = set(cols)
        new, bias = regression_refit(weight, stats, [c for c in range(weight.shape[1]) if c not in drop])
        return Decision(removed, new, bias=bias)

    def prune_heads(self, weight, stats, unit_size, n_remove):
        sigma = head_output_covariances(weight, covariance(stats).to(weight.dtype), unit_size)
        removed = select_heads(sigma, n_remove, self.options.swap)
        return self._finish(weight, stats, removed, unit_columns(removed, unit_size))

    def prune_channels(self, weight, stats, n_remove):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        gate, up, _ = self._adapter.mlp_weights(self._layer)
        self.data_parallel.sum_(self._sq)
        scores = channel_scores(gate.float(), up.float(), weight, self._sq.sqrt(), stats)
        order = torch.argsort(scores, stable=True)
        start = min(round(self.options.protect * weight.shape[1]), weight.shape[1] - 1 - n_remove)
        removed = sorted(order[start : start + n_remove].tolist())
        return self._finish(weight, stats, removed, removed)
