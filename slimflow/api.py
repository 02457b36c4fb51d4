"""`slimflow.prune(model, calibration, ratio=...)`: the engine's one Python entry point."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from slimflow import surgery
from slimflow import distributed
from slimflow.adapters import ModelAdapter, get_adapter
from slimflow.allocation import adaptive_plan, check_schedule_options
from slimflow.algorithms.schedules import ADAPTIVE, LayerShape, Plan, ScheduleError, plan_layers
from slimflow.method_options import MethodOptions
from slimflow.methods import get_method
from slimflow.methods.base import Budget, PruningMethod
from slimflow.pipeline import Engine, LayerResult, PhaseTimes


@dataclass
class PruneReport:
    """What a pruning run did: settings, parameter counts, per-layer widths, kept units and errors."""

    settings: dict
    params_before: int
    params_after: int
    reference_params: int
    target_fraction: float
    layers: list[LayerResult]
    wall_time: float = 0.0
    phase_times: dict = field(default_factory=dict)

    @property
    def realised_fraction(self) -> float:
        """Fraction of the reference model's total parameters removed so far."""
        return 1 - self.params_after / self.reference_params

    @property
    def widths(self) -> list[surgery.LayerWidths]:
        return [r.widths for r in self.layers]

    def to_dict(self) -> dict:
        return {
            "slimflow_version": _version(),
            "settings": self.settings,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "reference_params": self.reference_params,
            "target_fraction": self.target_fraction,
            "realised_fraction": round(self.realised_fraction, 6),
            "wall_time_s": round(self.wall_time, 3),
            "phase_times_s": self.phase_times,
            "layers": [
                asdict(r) | {"widths": r.widths.to_dict()} for r in self.layers
            ],
        }

    def to_markdown(self) -> str:
        rows = [
            "| layer | ratio | heads | KV heads | FFN channels | attn error (OBS / none) | FFN error (OBS / none) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.layers:
            w = r.widths
            rows.append(
                f"| {r.index} | {r.ratio:.3f} | {r.heads_before} → {w.num_attention_heads} | {w.num_key_value_heads} "
                f"| {r.channels_before} → {w.intermediate_size} | {r.attn_error:.4g} / {r.attn_error_uncompensated:.4g} "
                f"| {r.ffn_error:.4g} / {r.ffn_error_uncompensated:.4g} |"
            )
        head = (
            f"Parameters: {self.params_before:,} → {self.params_after:,} "
            f"({self.realised_fraction:.2%} of {self.reference_params:,} removed; target {self.target_fraction:.2%})\n\n"
        )
        return head + "\n".join(rows) + "\n"


def _version() -> str:
    from slimflow import __version__

    return __version__


def layer_shapes(model: nn.Module, adapter: ModelAdapter) -> list[LayerShape]:
    """Current widths of every layer and the parameter cost of one head unit / one channel there."""
    shapes = []
    for layer in adapter.layers(model):
        heads, kv = adapter.layer_heads(model, layer)
        channels = adapter.layer_intermediate(layer)
        # per unit: its q/k/v rows (with biases) and o_proj columns; o_proj's bias is shared and never removed
        attn, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
        unit_params = sum(_rows_params(m) for m in attn[:-1]) // kv + attn[-1].weight.numel() // kv
        channel_params = sum(_rows_params(m) for m in mlp[:-1]) // channels + mlp[-1].weight.numel() // channels
        shapes.append(LayerShape(kv, unit_params, channels, channel_params))
    return shapes


def _rows_params(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


def resolve_channel_multiple(model: nn.Module, adapter: ModelAdapter, channel_multiple: int | None) -> int:
    """`None` means: 64 for FFNs of 4096 channels or more (odd GEMM widths fall off the fast GPU kernels and
    can make a pruned model slower than the dense one; see docs/performance.md), else 1."""
    if channel_multiple is not None:
        if channel_multiple < 1:
            raise ValueError(f"channel_multiple must be ≥ 1, got {channel_multiple}")
        return channel_multiple
    widest = max(adapter.layer_intermediate(layer) for layer in adapter.layers(model))
    return 64 if widest >= 4096 else 1


def plan(model: nn.Module, ratio: float, schedule: str = "log_increase", reference_params: int | None = None,
         spread: float = 4.0, max_layer_ratio: float | None = None, channel_multiple: int | None = None) -> Plan:
    """Check a ratio/schedule against a model and return the per-layer plan, without any calibration work.

    Raises `ScheduleError` with the fix for an impossible request."""
    adapter = get_adapter(model)
    channel_multiple = resolve_channel_multiple(model, adapter, channel_multiple)
    current = surgery.count_parameters(model)
    reference_params = reference_params or current
    # the adaptive widths need calibration data; its floors and feasibility are those of every schedule
    shape_schedule = "uniform" if schedule == ADAPTIVE else schedule
    return plan_layers(layer_shapes(model, adapter), ratio, reference_params, shape_schedule, spread, max_layer_ratio,
                       channel_multiple, already_removed=reference_params - current)


# The fixed shapes the adaptive schedule's search also scores (name, spread).
SEARCHED_SHAPES = (("uniform", 1.0), ("log_increase", 2.0), ("log_increase", 4.0), ("log_increase", 8.0))


def _fixed_shape_plans(model, ratio, reference_params, max_layer_ratio, channel_multiple) -> dict:
    """The fixed shapes of `SEARCHED_SHAPES` at the requested budget (those the floors allow)."""
    plans = {}
    for name, spread in SEARCHED_SHAPES:
        try:
            layers = plan(model, ratio, name, reference_params, spread, max_layer_ratio, channel_multiple).layers
        except ScheduleError:
            continue
        plans[name if name == "uniform" else f"{name}:{spread:g}"] = layers
    return plans


def _resolve_device(device, model) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else next(model.parameters()).device
    return torch.device(device)


def prune(
    model: nn.Module,
    calibration: torch.Tensor,
    ratio: float = 0.2,
    schedule: str | None = None,
    method: str | MethodOptions | PruningMethod = "slimgpt",
    *,
    reference_params: int | None = None,
    spread: float = 4.0,
    max_layer_ratio: float | None = None,
    channel_multiple: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    method_kwargs: dict | None = None,
    replay_attention: bool = True,
    data_parallel: bool | None = None,
    process_group=None,
    schedule_options: dict | None = None,
    layer_store=None,
    correct_drift: bool = False,
    generated_samples: int | None = None,
    seed: int = 0,
    scoring: torch.Tensor | None = None,
) -> PruneReport:
    """Physically remove head units and FFN channels from `model`, in place.

    Args:
        model: a Hugging Face causal LM of a supported family (llama, mistral, qwen2).
        calibration: `[num_samples, seqlen]` token ids (see `slimflow.data.calibration.calibration_ids`).
        ratio: fraction of the reference model's **total** parameters to remove (embeddings included in the
            count, never pruned).
        schedule: per-layer widths: `adaptive` (chosen from OBS cost curves measured on the calibration data,
            heads and channels separately; docs/engine.md), or a fixed shape `uniform`, `linear` or
            `log_increase` (SlimGPT's incremental ratio).
            None (default): `log_increase`, or the method's own allocation for methods that allocate widths
            (flap, llm-surgeon, slimllm); giving a schedule to those is refused (see docs/methods.md).
        method: a registered method name (`slimgpt`, `magnitude`, `wanda-sp`, `flap`, `taylor`, `slimllm`,
            `llm-surgeon`: default options), its options (`slimflow.method_options.slimgpt(damp=0.02)`, ...) or a
            `PruningMethod`.
        reference_params: parameter count the ratio refers to (default: the model as passed). Iterative
            recipes pass the original dense count so that `ratio=0.35` means 35% of the original model.
        spread: `r_max / r_min` of the non-uniform schedules.
        max_layer_ratio: optional cap on any layer's ratio.
        channel_multiple: keep FFN widths a multiple of this. Default: 64 for FFNs of ≥ 4096 channels (fast GPU
            GEMM shapes), 1 for smaller models.
        batch_size: calibration sequences per forward pass.
        device: where each layer is processed (default: CUDA if available, else where the model is). The
            model may stay on the CPU; only the current layer is moved.
        progress: show a progress bar per layer.
        method_kwargs: deprecated: options of a method given by name, as a mapping (use its options class).
        replay_attention: reuse each layer's stored attention outputs after head removal instead of
            recomputing attention (default; False gives the same result up to rounding, slower).
        data_parallel: share the calibration work over the processes of `process_group` (every rank passes
            the same model and the same full `calibration`; each feeds its share of the sequences, statistics
            are summed, all ranks apply rank 0's decisions). None (default): when `torch.distributed` is
            initialised with more than one process. See docs/scale.md.
        process_group: the group to share over (default: the default group).
        schedule_options: options of the `adaptive` schedule (`search`, `search_samples`, `holdout`, `score`,
            `normalize`, `points`, `confirm`, ...), see `slimflow.allocation.adaptive_plan` and docs/engine.md.
        layer_store: where each decoder layer comes from and goes to (default: the layers in `model`, moved to
            `device` one at a time); `slimflow.streaming` passes one that reads and writes checkpoint shards.
        correct_drift: each pruned projection starts from its least-squares refit to the dense model's
            outputs (computed from the dense model's hidden states, carried through the layers alongside), so
            each layer also compensates the error of the layers pruned before it. Layer-wise methods only.
            Costs about two more forwards of every layer, a copy of the layer being pruned and a second copy
            of the calibration hidden states. Measured worse at 50% (docs/results.md), so off by default.
        generated_samples: add this many sequences sampled from the dense model itself (ancestral sampling from
            its BOS token, `seqlen` tokens each, `seed`) to the calibration set, after the given ones: text that
            follows the model's own distribution instead of one corpus (docs/engine.md, "Sampled calibration
            sequences"). Needs the whole model on `device` while sampling; not with `layer_store`. None
            (default): with the adaptive schedule 256 sequences (fewer beyond 512 tokens: 256 × 512 tokens in
            all, `default_generated_samples`), part of its quality setting; else 0.
        seed: seed of the sampled sequences.
        scoring: `[n, seqlen]` token ids of held-out text from the calibration source, none of it in
            `calibration`, that the adaptive schedule scores its candidate allocations on
            (`slimflow.data.calibration.scoring_ids`; `slimflow prune` and the `Calibration` callback draw
            `scoring_windows(seqlen)` of them: 128 × 512 tokens). None: the search holds out calibration rows
            instead. Other schedules ignore it.
    """
    start = time.perf_counter()
    adapter = get_adapter(model)
    if calibration.dim() != 2 or calibration.shape[0] + max(generated_samples or 0, 0) < 1:
        raise ValueError(f"calibration must be a [num_samples, seqlen] tensor of token ids, got {tuple(calibration.shape)}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and calibration.shape[1] > max_pos:
        raise ValueError(f"calibration sequences have {calibration.shape[1]} tokens but the model supports "
                         f"{max_pos} positions: lower seqlen to at most {max_pos}")
    params_before = surgery.count_parameters(model)
    reference_params = reference_params or params_before
    pruner = get_method(method, **(method_kwargs or {}))
    dp = distributed.resolve(data_parallel, process_group)
    dp.check_same(calibration)
    if scoring is not None:
        if scoring.dim() != 2:
            raise ValueError(f"scoring must be a [n, seqlen] tensor of token ids, got {tuple(scoring.shape)}")
        dp.check_same(scoring)
    pruner.data_parallel = dp
    progress = progress and dp.rank == 0
    schedule = pruner.resolve_schedule(schedule)
    check_schedule_options(schedule, schedule_options)
    if schedule == ADAPTIVE and layer_store is not None:
        raise ValueError("the adaptive schedule measures the whole model on the calibration data, which a "
                         "layer_store (streaming) never holds: use a fixed schedule such as log_increase")
    generated_samples = default_generated_samples(schedule, layer_store is not None, calibration.shape[1]) \
        if generated_samples is None else generated_samples
    if generated_samples < 0:
        raise ValueError(f"generated_samples must be ≥ 0, got {generated_samples}")
    if calibration.shape[0] + generated_samples < 1:
        raise ValueError("calibration has no sequences and no sampled sequences were asked for: pass calibration "
                         "text or generated_samples > 0")
    channel_multiple = resolve_channel_multiple(model, adapter, channel_multiple)

    def schedule_widths() -> Plan:
        return plan(model, ratio, schedule or "uniform", reference_params, spread, max_layer_ratio, channel_multiple)

    schedule_widths()  # an impossible request fails here, before the method changes the model
    dev = _resolve_device(device, model)
    _check_whole_model_passes(model, dev, schedule, schedule_options, generated_samples, calibration.shape[1],
                              layer_store is not None)
    times = PhaseTimes()
    if generated_samples:
        calibration = _with_sampled(model, calibration, generated_samples, seed, dev, dp, layer_store, progress, times)
    pruner.prepare_model(model, adapter)
    layer_plan = schedule_widths()  # of the model as the method prepared it (added biases count)
    was_training = model.training
    model.eval()
    use_cache = getattr(model.config, "use_cache", None)
    allocation: dict = {}
    try:
        budget = Budget(layer_shapes(model, adapter), ratio * reference_params - (reference_params -
                        surgery.count_parameters(model)), ratio, reference_params, channel_multiple, max_layer_ratio)
        engine = Engine(model, adapter, pruner, calibration, dp.shard(calibration), budget.target_params, dev,
                        batch_size, progress, times, replay_attention, dp, layer_store,
                        max_layer_ratio, correct_drift)
        results = _run_hooks(pruner, engine, budget, layer_plan, schedule, schedule_options, allocation,
                             int(calibration.shape[0]) - generated_samples, scoring)
    finally:
        model.train(was_training)
    if use_cache is not None:
        model.config.use_cache = use_cache
    record_widths(model, [r.widths for r in results])
    allocation_info = allocation.get("info")
    settings = {
        "method": pruner.name, "method_options": pruner.options.to_dict(), "ratio": ratio, "schedule": schedule,
        "spread": spread, "max_layer_ratio": max_layer_ratio, "channel_multiple": channel_multiple,
        "num_samples": int(calibration.shape[0]) - generated_samples, "generated_samples": generated_samples,
        "seed": seed, "seqlen": int(calibration.shape[1]), "batch_size": batch_size,
        "device": str(dev), "model_type": model.config.model_type,
        "decoder_ratio": layer_plan.decoder_ratio if schedule and schedule != ADAPTIVE else None,
        "data_parallel": dp.world, "correct_drift": correct_drift,
    }
    if allocation_info is not None:
        settings["schedule_options"] = schedule_options or {}
        settings["allocation"] = allocation_info
    return PruneReport(settings, params_before, surgery.count_parameters(model), reference_params, ratio, results,
                       time.perf_counter() - start, times.as_dict())


SCORING_TOKENS = 128 * 512  # tokens of the calibration source the adaptive search scores on (docs/results.md)


def scoring_windows(seqlen: int) -> int:
    """How many windows of `seqlen` tokens of the calibration source the adaptive search scores its candidates
    on: `SCORING_TOKENS` in all (128 of 512 tokens, 32 of 2048), 16 at least."""
    return max(16, SCORING_TOKENS // max(seqlen, 1))


def searches(schedule: str | None, options: dict | None) -> bool:
    """Whether the adaptive schedule with these options scores candidates on windows of the calibration source
    (so the caller that reads the source should draw them: `slimflow.data.calibration.scoring_ids`)."""
    options = options or {}
    return schedule == ADAPTIVE and options.get("search", True) and options.get("score_on", "source") == "source"


ADAPTIVE_SAMPLES = 256  # sequences of up to 512 tokens the adaptive schedule samples by default (docs/results.md)
ADAPTIVE_SAMPLED_TOKENS = ADAPTIVE_SAMPLES * 512
SAMPLING_BATCH = 64  # sequences sampled at once (part of what a seed gives: another batch gives other sequences)


def default_generated_samples(schedule: str | None, streaming: bool = False, seqlen: int = 512) -> int:
    """What `generated_samples=None` means: with the adaptive schedule `ADAPTIVE_SAMPLES` sequences, fewer for
    sequences longer than 512 tokens so that the sampled tokens (and the sampling time, one model step per token
    per batch of 64) stay at 256 × 512 — 64 sequences of 2048 tokens; 0 for streaming pruning, which cannot
    sample, and for every other schedule."""
    if schedule != ADAPTIVE or streaming:
        return 0
    return max(1, min(ADAPTIVE_SAMPLES, ADAPTIVE_SAMPLED_TOKENS // max(seqlen, 1)))


def _check_whole_model_passes(model, device, schedule, schedule_options, generated_samples, seqlen,
                              streaming) -> None:
    """Fail before any work if the device cannot hold the passes that run the whole model there: sampling
    (weights and key/value cache) and the adaptive schedule's gradient pass and candidate scoring."""
    from slimflow.device_memory import check_whole_model_fits

    adaptive = schedule == ADAPTIVE and not streaming
    if not (adaptive or generated_samples):
        return
    options = schedule_options or {}
    what = "the adaptive schedule" if adaptive else "sampling calibration sequences"
    search = adaptive and options.get("search", True)
    if adaptive and not search and not generated_samples and options.get("normalize", "gradient") != "gradient":
        return  # the cost curves are measured one layer at a time
    check_whole_model_fits(model, device, what, sampling_batch=min(SAMPLING_BATCH, generated_samples or 0),
                           seqlen=seqlen, search_copy=bool(search), adaptive=adaptive)


def _with_sampled(model, calibration, count, seed, device, dp, layer_store, progress, times) -> torch.Tensor:
    """`calibration` followed by `count` sequences sampled from the dense `model` (rank 0 samples, every rank
    gets its sequences)."""
    from slimflow.data.generated import sample_sequences

    if layer_store is not None:
        raise ValueError("generated_samples needs the whole model in memory to sample from it; streaming pruning "
                         "cannot: set generated_samples to 0")
    t = time.perf_counter()
    sampled = sample_sequences(model, count, calibration.shape[1], seed=seed, device=device,
                               batch_size=SAMPLING_BATCH, progress=progress) if dp.rank == 0 else None
    sampled = dp.broadcast_object(sampled)
    times.extra["sampling"] = round(time.perf_counter() - t, 4)
    return torch.cat([calibration, sampled.to(calibration.device, calibration.dtype)])


def _run_hooks(pruner: PruningMethod, engine: Engine, budget: Budget, layer_plan: Plan, schedule: str | None,
               schedule_options: dict | None, allocation: dict, text_rows: int,
               scoring: torch.Tensor | None = None) -> list[LayerResult]:
    """The method's `prepare`, `allocate` and `run`; the schedule's widths are computed only if `allocate` asks.
    `text_rows`: how many leading calibration rows are the caller's text (the rest sampled from the model);
    `scoring`: the held-out text the adaptive search scores on."""
    times = engine.times
    t = time.perf_counter()
    pruner.prepare(engine.model, engine.adapter, engine.shard, budget, engine.device, engine.batch_size)
    times.extra["prepare"] = round(time.perf_counter() - t, 4)

    def schedule_plan():
        if schedule != ADAPTIVE:
            return layer_plan.layers
        settings = {"damp": 0.01, "exact_head_score": False} | pruner.allocation_settings()
        fixed = _fixed_shape_plans(engine.model, budget.fraction, budget.reference_params, budget.max_layer_ratio,
                                   budget.channel_multiple)
        layers, allocation["info"] = adaptive_plan(
            engine.model, engine.adapter, engine.calibration, budget.shapes, budget.target_params,
            budget.channel_multiple, budget.max_layer_ratio, engine.device, engine.batch_size, progress=engine.progress,
            times=times.extra, fixed_plans=fixed, method=pruner if engine.store is None else None,
            text_rows=text_rows, scoring=scoring, **settings,
            **(schedule_options or {}))
        return layers

    plans = engine.data_parallel.broadcast_object(pruner.allocate(budget, schedule_plan))  # one width plan everywhere
    return pruner.run(engine, plans)


def record_widths(model: nn.Module, widths: list[surgery.LayerWidths]) -> None:
    """Write per-layer widths into the model config, so `save_pretrained`-style exports carry them."""
    model.config.slimflow_layer_widths = [w.to_dict() for w in widths]
