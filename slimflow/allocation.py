"""The `adaptive` schedule: per-layer, per-kind widths chosen from OBS cost curves measured on the calibration data.

One dense pass walks the layers in order (each layer once over all calibration sequences, hooks on `o_proj` and
`down_proj` collect their input Hessians). For every layer it measures two cost curves with SlimGPT's own
greedy OBS removal: the error after removing 0, 1, … head units, and after removing 0 … max FFN channels on a
grid. Each error is divided by the energy of the residual stream the block writes into (after the attention
block for heads, after the FFN for channels): the next norm divides by that scale, so the quotient is the
relative perturbation the following layers see, comparable across layers and kinds. `slimflow.algorithms.allocation.solve_budget` then picks the widths with one global
threshold on cost per removed parameter. The sequential pruning pass runs afterwards with these widths.
See docs/engine.md ("Adaptive allocation").
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from slimflow.adapters import ModelAdapter
from slimflow.algorithms.allocation import CostCurve, channel_cost_curve, channel_grid, head_cost_curve, solve_budget
from slimflow.algorithms.hessian import HessianAccumulator
from slimflow.algorithms.obs import condition_hessian, invert_hessian
from slimflow.algorithms.schedules import LayerPlan, LayerShape, ScheduleError, _absorb_rounding, layer_limits
from slimflow.pipeline import _propagate, capture_layer_inputs, prune_layers

NORMALIZATIONS = ("gradient", "residual", "none")


OPTIONS = ("normalize", "points", "search", "search_samples", "holdout", "score", "score_on", "score_context",
           "families", "confirm", "confirm_families")
CONFIRM = 2  # best-scored candidates the search prunes again on every calibration row before keeping one
CONFIRM_FAMILIES = True  # also the best-scored candidate of each family
FAMILIES = ("cost", "fixed", "blend")  # candidate families the search scores by default (`candidate_plans`)
ALL_FAMILIES = ("cost", "fixed", "split", "blend", "flat")
SCORES = ("loss", "kl")
SCORE_ON = ("source", "calibration", "text", "generated")


def check_schedule_options(schedule: str | None, options: dict | None) -> None:
    """Refuse options for a schedule that takes none, and unknown option names, before any work."""
    if not options:
        return
    if schedule != "adaptive":
        raise ScheduleError(f"schedule_options {options} apply to the adaptive schedule only, not {schedule!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ScheduleError(f"unknown adaptive schedule option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    if options.get("normalize", "gradient") not in NORMALIZATIONS:
        raise ScheduleError(f"unknown normalize={options['normalize']!r} for the adaptive schedule; choose one of "
                            f"{', '.join(NORMALIZATIONS)}")
    if options.get("score", "loss") not in SCORES:
        raise ScheduleError(f"unknown score={options['score']!r} for the adaptive schedule; choose one of "
                            f"{', '.join(SCORES)}")
    if options.get("score_on", "source") not in SCORE_ON:
        raise ScheduleError(f"unknown score_on={options['score_on']!r} for the adaptive schedule; choose one of "
                            f"{', '.join(SCORE_ON)}")
    families = options.get("families", FAMILIES)
    if (isinstance(families, str) or not families
            or any(not isinstance(f, str) or f not in ALL_FAMILIES for f in families)):
        raise ScheduleError(f"adaptive schedule option families must be a non-empty list of "
                            f"{', '.join(ALL_FAMILIES)}; got {families!r}")
    context = options.get("score_context")
    if context is not None and (not isinstance(context, list) or not context
                                or any(not isinstance(c, int) or isinstance(c, bool) or c < 2 for c in context)):
        raise ScheduleError(f"adaptive schedule option score_context must be a non-empty list of window lengths "
                            f"of at least 2 tokens, e.g. [128, 512]; got {context!r}")
    for name in ("search_samples", "holdout"):
        if name in options and (not isinstance(options[name], int) or options[name] < 1):
            raise ScheduleError(f"adaptive schedule option {name} must be a positive integer, got {options[name]!r}")
    confirm = options.get("confirm", CONFIRM)
    if confirm != "families" and (not isinstance(confirm, int) or isinstance(confirm, bool) or confirm < 1):
        raise ScheduleError(f"adaptive schedule option confirm must be a positive integer or \"families\", got "
                            f"{confirm!r}")
    if not isinstance(options.get("confirm_families", CONFIRM_FAMILIES), bool):
        raise ScheduleError(f"adaptive schedule option confirm_families must be true or false, got "
                            f"{options['confirm_families']!r}")


def residual_gradient_energy(model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor,
                             batch_size: int, device: torch.device | str | None = None) -> list[tuple[float, float]]:
    """Per layer, `mean_t ‖∂L/∂h_t‖²` of the summed next-token loss at the residual stream after the attention
    block and after the FFN block: one forward + backward pass of the dense model on `device` (where it lives
    unless given; a model kept on the CPU is moved there for the pass and back, as every whole-model pass is)."""
    from slimflow.methods.common import lm_backward_passes

    layers = adapter.layers(model)
    sums = [[0.0, 0.0] for _ in layers]
    tokens = [0]

    def watch(index, kind):
        def hook(tensor):
            sums[index][kind] += float(tensor.detach().float().pow(2).sum())
        return hook

    def on_mid(index):
        def hook(module, args):
            if args[0].requires_grad:
                args[0].register_hook(watch(index, 0))
        return hook

    def on_out(index):
        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            if h.requires_grad:
                h.register_hook(watch(index, 1))
        return hook

    def count(module, args, kwargs):
        tokens[0] += (args[0] if args else kwargs["hidden_states"]).shape[:-1].numel()

    handles = [layers[0].register_forward_pre_hook(count, with_kwargs=True)]
    for i, layer in enumerate(layers):
        handles.append(adapter.post_attention_norm(layer).register_forward_pre_hook(on_mid(i)))
        handles.append(layer.register_forward_hook(on_out(i)))
    target = torch.device(device) if device is not None else next(model.parameters()).device
    try:
        with _moved_to(model, target):
            lm_backward_passes(model, calibration, batch_size, target)
    finally:
        for h in handles:
            h.remove()
    return [(a / max(tokens[0], 1), b / max(tokens[0], 1)) for a, b in sums]


def _inverse(weight: torch.Tensor, stats: HessianAccumulator, damp: float):
    weight = weight.detach().to(torch.float32).clone()
    hessian, _ = condition_hessian(stats.hessian.to(torch.float32), weight, damp)
    return weight, invert_hessian(hessian, damp)[0]


@torch.no_grad()
def measure_cost_curves(model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor, shapes: list[LayerShape],
                        channel_multiple: int, max_ratio: float | None, device: torch.device, batch_size: int = 8,
                        damp: float = 0.01, points: int = 64, exact_head_score: bool = False,
                        progress: bool = True) -> tuple[list[CostCurve], list[CostCurve], list[tuple[float, float]]]:
    """Head and channel cost curves of every layer of the (dense) model, and per layer the energy of the residual
    stream after its attention block and after its FFN block (`Σ_tokens ‖h‖²` per sequence, the scale of the
    `½ tr(ΔW H ΔWᵀ)` errors written there)."""
    layers = adapter.layers(model)
    head_dim = adapter.head_dim(model)
    inputs = capture_layer_inputs(model, adapter, calibration, batch_size, device)
    head_curves, channel_curves, energies = [], [], []
    for index, (layer, shape) in enumerate(tqdm(list(zip(layers, shapes)), desc="measuring costs", unit="layer",
                                                disable=not progress)):
        home = next(layer.parameters()).device
        layer.to(device)
        o_proj = adapter.o_proj(layer)
        down = adapter.down_proj(layer)
        stats_o = HessianAccumulator(o_proj.in_features, device)
        stats_d = HessianAccumulator(down.in_features, device)
        mid = [0.0]  # residual stream after the attention block: where the o_proj error lands
        handles = [o_proj.register_forward_pre_hook(lambda m, a: stats_o.add(a[0])),
                   down.register_forward_pre_hook(lambda m, a: stats_d.add(a[0])),
                   adapter.post_attention_norm(layer).register_forward_pre_hook(
                       lambda m, a: mid.__setitem__(0, mid[0] + float(a[0].float().pow(2).sum())))]
        try:
            _propagate(layer, index, inputs, batch_size, adapter)
        finally:
            for h in handles:
                h.remove()
        # ... and after the FFN block (the layer's output), per sequence like the errors ½ tr(ΔW H ΔWᵀ)
        n = inputs.hidden.shape[0]
        energies.append((mid[0] / n, float(inputs.hidden.float().pow(2).sum()) / n))
        stats_o.check_finite(f"layer {index} o_proj")
        stats_d.check_finite(f"layer {index} down_proj")
        max_units, max_channels = layer_limits(shape, channel_multiple, max_ratio)
        heads, kv = adapter.layer_heads(model, layer)
        weight, hinv = _inverse(o_proj.weight, stats_o, damp)
        costs = head_cost_curve(weight, hinv, (heads // kv) * head_dim, max_units, exact=exact_head_score)
        head_curves.append(CostCurve(list(range(max_units + 1)), costs, shape.unit_params))
        counts = channel_grid(shape.channels, max_channels, channel_multiple, points)
        weight, hinv = _inverse(down.weight, stats_d, damp)
        channel_curves.append(CostCurve(counts, channel_cost_curve(weight, hinv, counts), shape.channel_params))
        del stats_o, stats_d, weight, hinv
        layer.to(home)
    return head_curves, channel_curves, energies


def block_scales(energies: list[tuple[float, float]], normalize: str,
                 gradients: list[tuple[float, float]] | None = None) -> list[tuple[float, float]]:
    """Per layer, the factors (attention block, FFN block) that make its OBS errors comparable (`allocate`)."""
    if normalize == "gradient":
        return [tuple(g) for g in gradients]
    if normalize == "residual":
        return [(1 / max(a, 1e-30), 1 / max(f, 1e-30)) for a, f in energies]
    return [(1.0, 1.0) for _ in energies]


def allocate(head_curves: list[CostCurve], channel_curves: list[CostCurve], energies: list[tuple[float, float]],
             shapes: list[LayerShape], target_params: float, normalize: str = "gradient",
             gradients: list[tuple[float, float]] | None = None) -> list[LayerPlan]:
    """Per-layer plans from measured curves: costs scaled per block (`normalize`), then `solve_budget`.

    `gradient`: error × `mean ‖∂L/∂h‖²` at the stream the block writes to (`gradients`): the second-order
    loss increase of an isotropic perturbation, which carries the amplification by all later layers.
    `residual`: error / energy of that stream (relative perturbation). `none`: raw errors."""
    if normalize not in NORMALIZATIONS:
        raise ScheduleError(f"unknown normalize={normalize!r} for the adaptive schedule; choose one of "
                            f"{', '.join(NORMALIZATIONS)}")
    curves = []
    for (s_attn, s_ffn), h, c in zip(block_scales(energies, normalize, gradients), head_curves, channel_curves):
        curves.append(CostCurve(h.counts, [x * s_attn for x in h.costs], h.unit_params))
        curves.append(CostCurve(c.counts, [x * s_ffn for x in c.costs], c.unit_params))
    try:
        chosen = solve_budget(curves, target_params, at_least=False)
    except ValueError:
        raise ScheduleError("the adaptive schedule cannot reach the requested ratio within the per-layer floors: "
                            "lower the ratio") from None
    plans = []
    for i, shape in enumerate(shapes):
        units = curves[2 * i].counts[chosen[2 * i]]
        channels = curves[2 * i + 1].counts[chosen[2 * i + 1]]
        plans.append(LayerPlan((units * shape.unit_params + channels * shape.channel_params) / shape.prunable,
                               units, channels))
    return plans


def _interpolated(curve: CostCurve, count: int) -> float:
    """The curve's cost at `count` units, linear between its measured points."""
    counts = curve.counts
    if count >= counts[-1]:
        return curve.costs[-1]
    k = next(i for i, c in enumerate(counts) if c >= count)
    if counts[k] == count:
        return curve.costs[k]
    a, b = counts[k - 1], counts[k]
    return curve.costs[k - 1] + (curve.costs[k] - curve.costs[k - 1]) * (count - a) / (b - a)


def _channel_counts(shape: LayerShape, max_channels: int, multiple: int) -> list[int]:
    """Every removable channel count that leaves a multiple of `multiple` channels (and 0)."""
    return [0] + [c for c in range(1, max_channels + 1) if (shape.channels - c) % multiple == 0]


def split_within_layers(head_curves: list[CostCurve], channel_curves: list[CostCurve],
                        scales: list[tuple[float, float]], shapes: list[LayerShape], layer_plans: list[LayerPlan],
                        channel_multiple: int, max_ratio: float | None) -> list[LayerPlan]:
    """Keep each layer's removed parameters from `layer_plans` (a fixed shape) and choose how many of them are
    head units and how many FFN channels from the layer's own cost curves, weighted by `scales` (attention,
    FFN): per layer the pair of least weighted cost whose removed parameters are closest to the layer's share
    (channel costs between the measured grid points are interpolated)."""
    out = []
    for h, c, (s_attn, s_ffn), shape, fixed in zip(head_curves, channel_curves, scales, shapes, layer_plans):
        max_units, max_channels = layer_limits(shape, channel_multiple, max_ratio)
        budget = fixed.remove_units * shape.unit_params + fixed.remove_channels * shape.channel_params
        channels = _channel_counts(shape, max_channels, channel_multiple)
        best = None
        for units in range(min(max_units, len(h.counts) - 1) + 1):
            want = (budget - units * shape.unit_params) / shape.channel_params
            ch = min(channels, key=lambda n: (abs(n - want), n))
            miss = abs(units * shape.unit_params + ch * shape.channel_params - budget)
            key = (round(miss / (channel_multiple * shape.channel_params)),
                   s_attn * h.costs[units] + s_ffn * _interpolated(c, ch), units)
            if best is None or key < best[0]:
                best = (key, units, ch)
        _, units, ch = best
        out.append(LayerPlan((units * shape.unit_params + ch * shape.channel_params) / shape.prunable, units, ch))
    return out


def blend_plans(a: list[LayerPlan], b: list[LayerPlan], shapes: list[LayerShape], target_params: float,
                channel_multiple: int, max_ratio: float | None) -> list[LayerPlan]:
    """Per layer and kind, the mean of two plans' removals (head units rounded, channels to `channel_multiple`),
    then FFN channels shifted to meet `target_params` as closely as whole steps allow."""
    plans, limits = [], []
    for pa, pb, shape in zip(a, b, shapes):
        max_units, max_channels = layer_limits(shape, channel_multiple, max_ratio)
        units = min(max_units, int((pa.remove_units + pb.remove_units + 1) // 2))
        keep = shape.channels - (pa.remove_channels + pb.remove_channels) / 2
        keep = channel_multiple * round(keep / channel_multiple)
        ch = min(max_channels, max(0, shape.channels - keep))
        plans.append(LayerPlan((units * shape.unit_params + ch * shape.channel_params) / shape.prunable, units, ch))
        limits.append((max_units, max_channels))
    removed = sum(p.remove_units * s.unit_params + p.remove_channels * s.channel_params for p, s in zip(plans, shapes))
    _absorb_rounding(plans, shapes, limits, channel_multiple, target_params - removed)
    return plans


def flat_channel_plan(heads_from: list[LayerPlan], shapes: list[LayerShape], target_params: float,
                      channel_multiple: int, max_ratio: float | None) -> list[LayerPlan] | None:
    """`heads_from`'s head units per layer, and FFN channels removed in one proportion of every layer's width
    (rounded to `channel_multiple`, then shifted to meet `target_params` as closely as whole steps allow); None
    when those head units and the channels the floors allow cannot meet the budget to half a channel step."""
    limits = [layer_limits(s, channel_multiple, max_ratio) for s in shapes]
    units = [min(p.remove_units, lim[0]) for p, lim in zip(heads_from, limits)]
    rest = target_params - sum(u * s.unit_params for u, s in zip(units, shapes))
    if rest < 0:
        return None
    fraction = rest / sum(s.channels * s.channel_params for s in shapes)
    plans = []
    for u, shape, (_, max_channels) in zip(units, shapes, limits):
        keep = channel_multiple * round(shape.channels * (1 - fraction) / channel_multiple)
        ch = min(max_channels, max(0, shape.channels - keep))
        plans.append(LayerPlan((u * shape.unit_params + ch * shape.channel_params) / shape.prunable, u, ch))
    removed = sum(p.remove_units * s.unit_params + p.remove_channels * s.channel_params for p, s in zip(plans, shapes))
    removed = _absorb_rounding(plans, shapes, limits, channel_multiple, target_params - removed)
    if abs(removed - target_params) > max(channel_multiple * s.channel_params for s in shapes) / 2:
        return None
    return plans


def context_windows(ids: torch.Tensor, window: int) -> torch.Tensor:
    """The rows of `ids` cut into consecutive windows of `window` tokens, each a sequence of its own (a row's
    remainder shorter than the window is dropped; a window as long as the rows or longer: the rows)."""
    if window >= ids.shape[1]:
        return ids
    usable = ids.shape[1] // window * window
    return ids[:, :usable].reshape(-1, window)


@torch.no_grad()
def holdout_score(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, dense: nn.Module | None = None,
                  context: list[int] | None = None) -> float:
    """Per token on the sequences `ids`: the next-token loss of `model`, or with `dense` the KL divergence
    `KL(p_dense ‖ p_model)` of its next-token distributions from the dense model's. With `context`, the mean
    of that score over the listed window lengths, each scoring the rows cut into windows of that many tokens
    (`context_windows`: how the pruned model predicts from that much context). Both models run where they
    are."""
    if context:
        return sum(holdout_score(model, context_windows(ids, w), batch_size, dense) for w in context) / len(context)
    rows = row_scores(model, ids, batch_size, dense)
    return sum(rows) / max(len(rows), 1)


@torch.no_grad()
def row_scores(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, dense: nn.Module | None = None) -> list[float]:
    """`holdout_score` of each row of `ids` alone (rows of one length: their mean is the score of all)."""
    home = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(home)
        logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits[:, :-1].float(), dim=-1)
        if dense is None:
            per_token = -logp.gather(-1, batch[:, 1:, None])[..., 0]
        else:
            ref = dense(input_ids=batch.to(next(dense.parameters()).device), use_cache=False).logits[:, :-1]
            ref = torch.log_softmax(ref.float().to(home), dim=-1)
            per_token = (ref.exp() * (ref - logp)).sum(-1)
        out += per_token.double().mean(-1).tolist()
    return out


def search_split(num_samples: int, search_samples: int = 32, holdout: int = 16,
                 generated: bool = False, text_rows: int | None = None) -> tuple[int, int] | None:
    """How many calibration sequences prune and how many score each candidate (held out from its pruning);
    None when the calibration set is too small to hold any out (fewer than 4 sequences). With `generated`
    the candidates are scored on other sequences (sampled from the model, or windows of the source), and every
    calibration sequence may prune. `text_rows`:
    hold out only among the first `text_rows` rows (the real text before sampled sequences), a quarter at most."""
    if generated:
        return min(search_samples, num_samples), holdout
    held = min(holdout, (num_samples if text_rows is None else text_rows) // 4)
    if held < 1:
        return None
    return min(search_samples, num_samples - held), held


def _spaced(count: int, among: list[int]) -> list[int]:
    """`count` entries of `among`, evenly spaced (the centres of `count` equal slices)."""
    return [among[(2 * k + 1) * len(among) // (2 * count)] for k in range(count)]


def search_rows(num_samples: int, search_samples: int = 32, holdout: int = 16,
                generated: bool = False, text_rows: int | None = None) -> tuple[list[int], list[int]]:
    """Which calibration rows prune each candidate and which score it: both evenly spread over the set, so that
    each represents the whole of it (contiguous windows of one text, real text followed by sampled sequences),
    and disjoint. With `generated` no row is held out (the scored sequences come from elsewhere); with `text_rows` the
    scoring rows are spread over the first `text_rows` rows only (the pruning rows still over all the rest)."""
    pruning, held = search_split(num_samples, search_samples, holdout, generated, text_rows)
    rows = list(range(num_samples))
    held_rows = [] if generated else _spaced(held, rows if text_rows is None else rows[:text_rows])
    held_set = set(held_rows)
    rest = [r for r in rows if r not in held_set]
    return _spaced(pruning, rest), held_rows


def copy_to(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are on `device`, made there directly (no copy of the
    weights where the model lives first: a candidate of a model kept on the CPU is pruned and scored on the
    device without host copies or per-layer transfers). Shared tensors stay shared."""
    device = torch.device(device)
    memo: dict[int, torch.Tensor] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in memo or tensor.device == device:
            continue
        moved = tensor.detach().to(device, copy=True)
        memo[id(tensor)] = nn.Parameter(moved, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else moved
    return copy.deepcopy(model, memo)


@contextmanager
def _moved_to(model: nn.Module, device: torch.device | None):
    """`model` moved to `device` for a whole-model pass (the gradient pass, the KL scoring) and home afterwards
    (None: not needed, yields None)."""
    if device is None:
        yield None
        return
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def family(name: str) -> str:
    """The family of a candidate plan's name (`candidate_plans`): `cost`, `blend`, `split`, `flat`, else `fixed`."""
    head = name.split(":", 1)[0]
    return head if head in ALL_FAMILIES else "fixed"


def search_plans(model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor,
                 candidates: dict[str, list[LayerPlan]], method, device: torch.device, batch_size: int = 8,
                 search_samples: int = 32, holdout: int = 16, score: str = "loss",
                 progress: bool = True, scored: torch.Tensor | None = None,
                 text_rows: int | None = None, context: list[int] | None = None,
                 per_row: dict | None = None, confirm: int | str = 1, confirmed: dict | None = None,
                 seconds: dict | None = None, confirm_families: bool = False) -> tuple[str, dict[str, float]]:
    """The candidate plan whose pruned model predicts held-out calibration sequences best.

    Each candidate prunes a copy of `model` with `search_samples` calibration sequences (the same method,
    sequentially, as the final pass) and is scored on `holdout` others, which no candidate saw (both spread
    evenly over the set, `search_rows`): by its next-token loss (`score="loss"`, default) or by the KL
    divergence of its next-token distributions from the dense model's (`"kl"`; on the 27M reference model it
    prefers the cost plans, which perturb the dense model least, where held-out perplexity prefers a fixed
    shape: docs/results.md). Ties keep the earlier candidate. Returns the name and every score. For `kl` the
    dense model is moved to `device` for the scoring and back. `scored`: score on these sequences instead (windows
    of the calibration source, or sequences sampled from the dense model); then no calibration sequence is held
    out. `text_rows`: hold out only among
    the first `text_rows` calibration rows (`search_rows`). `context`: score at these window lengths
    (`holdout_score`; default the whole rows). `per_row`: filled with each candidate's score of every scored
    row (not with `context`).

    `confirm`: the search's prunes see `search_samples` sequences, the final pass every one, and a plan that
    scores well pruned on few sequences can score worse pruned on all of them (docs/results.md). So the
    `confirm` best-scored candidates (when more than one, and when the search pruned on fewer sequences than
    the final pass will) are pruned again on every calibration sequence that is not held out and scored on the
    same sequences; the best of those is kept. `confirm_families`: the best-scored candidate of each family
    (`family`) is confirmed too, so that a family whose plans score well only when pruned on few sequences
    cannot fill every place (`confirm="families"`: those alone, as `confirm=1, confirm_families=True`).
    `confirmed`: filled with those scores; `seconds`: with the
    time of the search's prunes and scoring (`search`) and of the confirmation (`confirm`).
    """
    train_rows, held_rows = search_rows(calibration.shape[0], search_samples, holdout, scored is not None, text_rows)
    train = calibration[train_rows]
    held = set(held_rows)
    final = calibration[[r for r in range(calibration.shape[0]) if r not in held]]
    if scored is None:
        scored = calibration[held_rows]
    order = list(candidates)

    def ranked(table: dict[str, float]) -> list[str]:
        return sorted(table, key=lambda k: (table[k], order.index(k)))  # ties keep the earlier candidate

    def trial_scores(plans, rows_in, dense) -> list[float] | float:
        trial = copy_to(model, device)
        prune_layers(trial, adapter, rows_in, plans, method, device, batch_size, progress=False)
        out = holdout_score(trial, scored, batch_size, dense, context) if context else \
            row_scores(trial, scored, batch_size, dense)
        del trial
        return out

    scores, rows, finals = {}, {}, {}
    started = time.perf_counter()
    with _moved_to(model, device if score == "kl" else None) as dense:
        for name in tqdm(order, desc="scoring allocations", unit="plan", disable=not progress):
            got = trial_scores(candidates[name], train, dense)
            if not context:
                rows[name], got = got, sum(got) / len(got)
            scores[name] = got
        searched = time.perf_counter()
        finalists = _finalists(ranked(scores), confirm, confirm_families) \
            if final.shape[0] > train.shape[0] else []
        if len(finalists) > 1:
            for name in tqdm(finalists, desc="confirming allocations", unit="plan", disable=not progress):
                got = trial_scores(candidates[name], final, dense)
                finals[name] = got if context else sum(got) / len(got)
    best = ranked(finals)[0] if finals else ranked(scores)[0]
    if seconds is not None:
        seconds.update(search=round(searched - started, 4), confirm=round(time.perf_counter() - searched, 4))
    if per_row is not None:
        per_row.update(rows)
    if confirmed is not None:
        confirmed.update(finals)
    return best, scores


def _finalists(ranked: list[str], confirm: int | str, families: bool = False) -> list[str]:
    """The `confirm` best of `ranked`, then (with `families`) the best of each family not among them."""
    if confirm == "families":
        confirm, families = 1, True
    out = ranked[:confirm]
    if families:
        firsts: dict[str, str] = {}
        for name in ranked:
            firsts.setdefault(family(name), name)
        out += [name for name in firsts.values() if name not in out]
    return out


def candidate_plans(heads: list[CostCurve], channels: list[CostCurve], energies: list[tuple[float, float]],
                    gradients: list[tuple[float, float]] | None, shapes: list[LayerShape], target_params: float,
                    normalize: str, fixed_plans: dict[str, list[LayerPlan]], channel_multiple: int,
                    max_ratio: float | None, families=FAMILIES,
                    cost_plan: list[LayerPlan] | None = None) -> dict[str, list[LayerPlan]]:
    """The plans the search scores, by family: `cost` (the cost plans of both weightings, `normalize`'s first),
    `fixed` (`fixed_plans`: the fixed shapes at the same budget), `split` (each fixed shape's per-layer budget,
    split between heads and channels by the layer's weighted costs: `split_within_layers`), `blend` (the
    mean of `normalize`'s cost plan and each fixed shape: `blend_plans`) and `flat` (the head units of the cost
    plan and of each non-uniform fixed shape, FFN channels in one proportion everywhere: `flat_channel_plan`)."""
    own = cost_plan or allocate(heads, channels, energies, shapes, target_params, normalize, gradients)
    out: dict[str, list[LayerPlan]] = {}
    if "cost" in families:
        out[f"cost:{normalize}"] = own
        for other in ("gradient", "residual"):
            if other != normalize and (other != "gradient" or gradients is not None):
                out[f"cost:{other}"] = allocate(heads, channels, energies, shapes, target_params, other, gradients)
    if "fixed" in families:
        out |= fixed_plans
    if "split" in families:
        scales = block_scales(energies, normalize, gradients)
        for name, layers in fixed_plans.items():
            out[f"split:{name}"] = split_within_layers(heads, channels, scales, shapes, layers, channel_multiple,
                                                       max_ratio)
    if "blend" in families:
        for name, layers in fixed_plans.items():
            out[f"blend:{name}"] = blend_plans(own, layers, shapes, target_params, channel_multiple, max_ratio)
    if "flat" in families:
        for name, layers in ({f"cost:{normalize}": own} | fixed_plans).items():
            if name != "uniform" and (plans := flat_channel_plan(layers, shapes, target_params, channel_multiple,
                                                                  max_ratio)) is not None:
                out[f"flat:{name}"] = plans
    return out


def adaptive_plan(model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor, shapes: list[LayerShape],
                  target_params: float, channel_multiple: int, max_ratio: float | None, device: torch.device,
                  batch_size: int = 8, damp: float = 0.01, normalize: str = "gradient", points: int = 64,
                  exact_head_score: bool = False, progress: bool = True,
                  times: dict | None = None, search: bool = True, search_samples: int = 32, holdout: int = 16,
                  score: str = "loss", score_on: str = "source", score_context: list[int] | None = None,
                  families=FAMILIES,
                  fixed_plans: dict[str, list[LayerPlan]] | None = None,
                  method=None, text_rows: int | None = None,
                  scoring: torch.Tensor | None = None, confirm: int | str = CONFIRM,
                  confirm_families: bool = CONFIRM_FAMILIES) -> tuple[list[LayerPlan], dict]:
    """The adaptive schedule's per-layer plan for `target_params` parameters, and what it measured.

    With `search` (default) the plans of `families` (`candidate_plans`: by default those from the measured costs,
    both normalisations, and `fixed_plans`, the fixed shapes at the same budget) are candidates, and
    `search_plans` keeps the one that scores best on text no candidate saw. With `score_on="source"` (default)
    that is `scoring`, windows of the calibration source that no calibration row overlaps
    (`slimflow.data.calibration.scoring_ids`), and every calibration row informs the candidates; without
    `scoring` (a caller who passes only a tensor) and with `"calibration"`, `holdout` calibration rows are held
    out instead, and the cost curves and gradient energies are measured without them. Without the search (or
    without a method to prune the candidates with) the cost plan of `normalize`, measured on every row, is the
    answer.

    `text_rows`: how many leading calibration rows are real text (the rest sampled from the model); with
    `score_on="text"` the scoring rows are held out among those only. Where every row or none is text,
    `"text"` scores as `"calibration"` does. `"generated"`: score on `holdout` sequences sampled from the model.
    `score_context`: window lengths the candidates are scored at (`holdout_score`; default: whole rows).
    `confirm`: how many of the best-scored candidates are pruned again on every calibration row and scored again
    before one is kept (`search_plans`; 1 with `confirm_families=False`: keep the search's best; `"families"`:
    the best of each family instead); `confirm_families`: the best of each family too."""
    t = time.perf_counter()
    generated = score_on == "generated"
    source = scoring if score_on == "source" and scoring is not None and scoring.shape[0] > 0 else None
    elsewhere = generated or source is not None  # scored on other sequences: no calibration row is held out
    pool = text_rows if score_on == "text" and text_rows and text_rows < calibration.shape[0] else None
    split = search_split(calibration.shape[0], search_samples, holdout, elsewhere, pool)
    searching = search and method is not None and split is not None
    measured = calibration
    if searching and not elsewhere:  # the rows that score the candidates inform none of them, cost plans included
        held = set(search_rows(calibration.shape[0], search_samples, holdout, text_rows=pool)[1])
        measured = calibration[[r for r in range(calibration.shape[0]) if r not in held]]
    want_gradients = normalize == "gradient" or searching
    gradients = residual_gradient_energy(model, adapter, measured, batch_size, device) if want_gradients else None
    heads, channels, energies = measure_cost_curves(model, adapter, measured, shapes, channel_multiple, max_ratio,
                                                    device, batch_size, damp, points, exact_head_score, progress)
    plans = allocate(heads, channels, energies, shapes, target_params, normalize, gradients)
    info = {"normalize": normalize, "residual_energy": energies, "gradient_energy": gradients,
            "head_curves": [h.costs for h in heads], "channel_counts": [c.counts for c in channels],
            "channel_curves": [c.costs for c in channels], "measured_rows": int(measured.shape[0])}
    if searching:
        candidates = candidate_plans(heads, channels, energies, gradients, shapes, target_params, normalize,
                                     fixed_plans or {}, channel_multiple, max_ratio, families, plans)
        candidates = candidates or {f"cost:{normalize}": plans}  # no fixed shape fits the floors
        scored = source
        if generated:
            from slimflow.data.generated import sample_sequences
            scored = sample_sequences(model, holdout, calibration.shape[1], device=device, batch_size=batch_size,
                                      progress=progress)
        per_row: dict[str, list[float]] = {}
        confirmed: dict[str, float] = {}
        seconds: dict[str, float] = {}
        chosen, scores = search_plans(model, adapter, calibration, candidates, method, device, batch_size,
                                      search_samples, holdout, score, progress, scored, pool, score_context, per_row,
                                      confirm, confirmed, seconds, confirm_families)
        plans = candidates[chosen]
        used = score_on if score_on != "source" or source is not None else "calibration"
        info["search"] = {"chosen": chosen, "score": score, "scores": scores, "confirmed": confirmed,
                          "seconds": seconds,
                          "score_on": used, "score_context": score_context, "families": list(families),
                          "split": [split[0], int(source.shape[0]) if source is not None else split[1]],
                          "row_scores": {k: [round(x, 5) for x in v] for k, v in per_row.items()}}
    if times is not None:
        times["allocation"] = round(time.perf_counter() - t, 4)
    return plans, info
