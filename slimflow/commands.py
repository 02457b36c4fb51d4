"""Function commands of the `slimflow` CLI. Signatures and docstrings are the command-line schema."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import yaml

from slimflow import method_options as known_options
from slimflow.errors import InvalidValueError, OutputExistsError
from slimflow.method_options import MethodOptions, MethodSpec


def prune_command(
    *,
    model: str,
    calibration: str,
    output: str,
    ratio: float = 0.2,
    schedule: str | None = None,
    method: MethodSpec = known_options.slimgpt(),
    num_samples: int = 128,
    seqlen: int = 2048,
    sampling: str = "random",
    skip_tokens: int = 0,
    seed: int = 0,
    generated_samples: int | None = None,
    method_kwargs: dict | None = None,
    spread: float = 4.0,
    max_layer_ratio: float | None = None,
    channel_multiple: int | None = None,
    schedule_options: dict | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    save_dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    streaming: bool | None = None,
) -> dict:
    """Prune a causal LM with layer-wise structured pruning and save a reloadable checkpoint.

    Args:
        model: local model directory or hub id (e.g. meta-llama/Llama-2-7b-hf).
        calibration: local .txt/.json/.jsonl (optionally .gz) file, or a hub dataset name (e.g. c4, wikitext2).
        output: directory to write the pruned checkpoint to (must not exist unless --overwrite).
        ratio: fraction of the model's total parameters to remove, in (0, 1).
        schedule: per-layer widths: adaptive (from OBS cost curves measured on the calibration data), uniform,
            linear or log_increase (default: log_increase). Methods that allocate widths themselves (flap,
            llm-surgeon, slimllm) refuse a schedule.
        method: pruning method and its options: a name (slimgpt, magnitude, wanda-sp, taylor, flap, slimllm,
            llm-surgeon) then `--method.OPTION VALUE`, e.g. `--method llm-surgeon --method.shots 8`;
            `--method.help NAME` describes a method's options. Options (defaults): {options}.
        num_samples: number of calibration sequences.
        seqlen: tokens per calibration sequence.
        sampling: random (seeded windows) or tail (consecutive windows from the end of the text).
        skip_tokens: ignore this many leading tokens of the calibration text (random sampling, and the windows
            the adaptive schedule scores its candidates on).
        seed: seed of the calibration sampling (and of the sampled sequences); pruning is deterministic for a
            given seed.
        generated_samples: add this many sequences sampled from the model itself (from its BOS token, seqlen
            tokens each) to the calibration set: recommended where the calibration text is narrow (one book,
            one domain), see docs/results.md; sampling needs the whole model on the device and is not possible
            with --streaming. Default: with --schedule adaptive 256 (fewer beyond 512 tokens: 256 × 512 tokens
            in all, e.g. 64 at --seqlen 2048), part of its quality setting; else 0.
        method_kwargs: deprecated: method options as a mapping; use `--method.OPTION VALUE`.
        spread: r_max / r_min of the linear and log_increase schedules.
        max_layer_ratio: optional cap on any single layer's ratio.
        channel_multiple: keep each FFN width a multiple of this (default: 64 for FFNs of 4096+ channels, else 1).
        schedule_options: options of the adaptive schedule: search (default true), search_samples (32), holdout
            (16), score (loss or kl), normalize (gradient, residual, none), points (64), families (candidate
            plans: cost, fixed, blend by default; split, flat), score_on (source: other windows of the
            calibration text, 128 × 512 tokens, that no calibration sequence overlaps, the default;
            calibration: held-out calibration sequences; text, generated),
            score_context (window lengths to score at, e.g. [128, 512]), confirm (2: the two best candidates
            are pruned again on every calibration sequence before one is kept; 1 with confirm_families
            false: keep the search's best; "families": the best of each family only), confirm_families
            (true: the best candidate of each family is pruned again too; false: the `confirm` best only);
            e.g. '{"search": false}'.
        batch_size: calibration sequences per forward pass.
        device: where layers are processed: auto (CUDA if present), cpu, cuda, cuda:1, ...
        dtype: dtype used while pruning: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.
        save_dtype: dtype of the saved weights: auto (the source checkpoint's dtype), float32, bfloat16, float16.
        overwrite: replace an existing output directory.
        progress: show progress bars.
        streaming: read, prune and write one decoder layer at a time (host memory: about two layers plus the
            embeddings; for models larger than memory; identical weights, sharded per layer). Default: stream
            when the weights would take more than half the available host memory. Needs a local safetensors
            directory and a layer-wise method (slimgpt, magnitude, wanda-sp). See docs/scale.md.
    """
    arguments = dict(locals()) | {"method": known_options.as_config(method)}
    import contextlib

    import torch

    from slimflow.algorithms.schedules import ADAPTIVE, SCHEDULES, ScheduleError
    from slimflow.api import default_generated_samples, plan, scoring_windows, searches
    from slimflow.api import prune as run_prune
    from slimflow.checkpoint import save_pruned
    from slimflow.data.calibration import calibration_ids, check_calibration_options, scoring_ids
    from slimflow.device_memory import weight_bytes
    from slimflow.errors import require_existing
    from slimflow.methods import get_method
    from slimflow.models import check_model_source, load_model, load_tokenizer, resolve_device, resolve_dtype
    from slimflow.models import source_dtype
    from slimflow.reporting import plot_widths
    from slimflow.streaming import check_streamable, should_stream, streaming_checkpoint

    # every option is checked before any work: nothing is loaded until all of them are usable
    out = Path(output)
    check_output(out, overwrite, PRUNE_MARKERS, "slimflow prune output")
    if not 0 < ratio < 1:
        raise InvalidValueError(f"--ratio must be in (0, 1) (the fraction of parameters to remove), got {ratio}")
    dev = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, dev)
    if save_dtype != "auto":
        resolve_dtype(save_dtype, dev)
    if batch_size < 1:
        raise InvalidValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    check_calibration_options(num_samples, seqlen, sampling, skip_tokens)
    if generated_samples is not None and generated_samples < 0:
        raise InvalidValueError(f"--generated-samples must be ≥ 0, got {generated_samples}")
    if schedule is not None and schedule not in (ADAPTIVE, *SCHEDULES):
        raise ScheduleError(f"unknown schedule {schedule!r}; choose one of {', '.join((ADAPTIVE, *SCHEDULES))}")
    # unknown method, bad method option or a schedule the method refuses
    pruner = get_method(method, **(method_kwargs or {}))
    planned_schedule = pruner.resolve_schedule(schedule) or "uniform"
    check_model_source(model, prunable=True)
    require_existing(calibration, "calibration text")
    max_pos = _max_positions(model)
    if max_pos and seqlen > max_pos:
        raise InvalidValueError(f"--seqlen {seqlen} exceeds the model's {max_pos} positions: use --seqlen {max_pos} "
                                "or less")
    target_dtype = source_dtype(model) if save_dtype == "auto" else resolve_dtype(save_dtype, dev)
    stream = should_stream(model, compute_dtype) if streaming is None else streaming
    if stream:
        if not Path(model).is_dir():
            raise InvalidValueError(f"--streaming reads a local model directory, but {model!r} is not one: download "
                                    "the model first or pass --streaming false")
        check_streamable(pruner)
        if pruner.resolve_schedule(schedule) == ADAPTIVE:
            raise InvalidValueError("--schedule adaptive measures the whole model on the calibration data, which "
                                    "streaming pruning never holds in memory: pass --schedule log_increase or "
                                    "--streaming false")
        if generated_samples:
            raise InvalidValueError("--generated-samples samples from the whole model, which streaming pruning never "
                                    "holds in memory: pass --generated-samples 0 or --streaming false")

    if generated_samples is None:
        generated_samples = default_generated_samples(pruner.resolve_schedule(schedule), stream, seqlen)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if stream:
            session = stack.enter_context(streaming_checkpoint(model, out, compute_dtype, target_dtype, overwrite))
            net = session.model
        else:
            net = load_model(model, dtype=compute_dtype, device="cpu", progress=progress)
        tokenizer = load_tokenizer(model)
        plan(net, ratio, planned_schedule, spread=spread, max_layer_ratio=max_layer_ratio,
             channel_multiple=channel_multiple)
        ids = calibration_ids(calibration, tokenizer, num_samples, seqlen, seed, sampling, skip_tokens)
        scoring = None
        if searches(pruner.resolve_schedule(schedule), schedule_options):
            scoring = scoring_ids(calibration, tokenizer, scoring_windows(seqlen), seqlen, seed, skip_tokens,
                                  avoid=ids)
        if not stream and dev.type == "cuda" and torch.cuda.mem_get_info(dev)[0] > 2 * weight_bytes(net):
            net.to(dev)  # room for the model and the adaptive search's copy; else it stays on the CPU
        report = run_prune(net, ids, ratio, schedule, pruner, spread=spread, max_layer_ratio=max_layer_ratio,
                           channel_multiple=channel_multiple, batch_size=batch_size, device=dev, progress=progress,
                           schedule_options=schedule_options, generated_samples=generated_samples, seed=seed,
                           layer_store=session.layers if stream else None, scoring=scoring)
        info = report.to_dict()
        info["calibration"] = {"source": calibration, "sampling": sampling, "seed": seed, "skip_tokens": skip_tokens,
                               "generated_samples": generated_samples,
                               "scoring_windows": 0 if scoring is None else int(scoring.shape[0])}
        info["source_model"] = model
        info["streaming"] = bool(stream)
        info["save_dtype"] = str(target_dtype).removeprefix("torch.")
        info["total_wall_time_s"] = round(time.perf_counter() - start, 3)

        def extras(directory: Path) -> None:  # inside the atomic rename: a final-named output is always complete
            (directory / "pruning_report.md").write_text(report.to_markdown())
            plot_widths(info, directory / "widths.png")
            (directory / "slimflow_prune.yaml").write_text(yaml.safe_dump({"prune": arguments}, sort_keys=False))

        if stream:
            session.finish(tokenizer, info)
            extras(session.directory)  # the streaming block renames its directory into place when it closes
        else:
            net.to(device="cpu", dtype=target_dtype)
            save_pruned(net, out, tokenizer=tokenizer, report=info, overwrite=overwrite, extras=extras)
    print(report.to_markdown())
    print(f"saved pruned model to {out} ({info['total_wall_time_s']:.1f} s)")
    return {"output": str(out), "params_before": report.params_before, "params_after": report.params_after}


prune_command.__doc__ = prune_command.__doc__.replace("{options}", known_options.options_help())
prune = prune_command  # the CLI loads `prune_command`: a lookup of `slimflow.prune` would import torch


# files that mark a directory as an output of `prune` / `compare` (only such directories may be overwritten)
PRUNE_MARKERS = ("pruning.json", "config.json")
COMPARE_MARKERS = ("comparison.json",)


def check_output(out: Path, overwrite: bool, markers: tuple[str, ...], kind: str) -> None:
    """Refuse an existing output unless `overwrite`, and even then one that is not an earlier `kind`."""
    if not out.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"output directory {out} already exists: choose another --output or pass "
                                "--overwrite to replace it")
    if out.is_dir() and (not any(out.iterdir()) or all((out / m).is_file() for m in markers)):
        return
    raise OutputExistsError(f"--overwrite refuses to replace {out}: it is not a {kind} (no "
                            f"{' / '.join(markers)}). Choose another --output, or delete it yourself")


@contextlib.contextmanager
def staged_directory(out: Path):
    """Write into a hidden sibling of `out` and rename it to `out` at the end (replacing an old `out` then)."""
    from slimflow.checkpoint import staged_output

    with staged_output(out) as staging:
        yield staging


def _max_positions(model: str) -> int | None:
    from slimflow.models import read_config

    return read_config(model).get("max_position_embeddings")


def compare(
    *,
    model: str,
    calibration: str,
    output: str,
    methods: list[MethodSpec] = ["slimgpt", "magnitude", "wanda-sp", "flap", "taylor", "slimllm", "llm-surgeon"],
    ratios: list[float] = [0.2, 0.5],
    num_samples: int = 128,
    seqlen: int = 512,
    sampling: str = "tail",
    seed: int = 0,
    generated_samples: int = 0,
    grad_samples: int | None = None,
    method_options: dict | None = None,
    perplexity: list[str] = ["wikitext2:128"],
    max_windows: int | None = 300,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Prune one model with several methods on the same calibration data and compare their perplexity.

    Every (method, ratio) pair starts from a fresh copy of the model, uses the method's default allocation
    (log_increase for layer-wise methods), and is evaluated with the same perplexity protocol. Writes
    `comparison.md` (one table), `comparison.png` (perplexity per method and ratio) and `comparison.json`.

    Args:
        model: local model directory or hub id.
        calibration: calibration text (local .txt/.json/.jsonl, optionally .gz, or a hub dataset name).
        output: directory for the table, plot and JSON (must not exist unless --overwrite).
        methods: methods to compare, each a name or a `{class_path: NAME, init_args: {OPTION: VALUE}}` mapping,
            e.g. '[slimgpt, {class_path: llm_surgeon, init_args: {shots: 8}}]' (see docs/methods.md). Options
            (defaults): {options}.
        ratios: fractions of the total parameters to remove.
        num_samples: calibration sequences.
        seqlen: tokens per calibration sequence.
        sampling: random or tail (consecutive windows from the end of the text).
        seed: seed of random sampling and of the sampled sequences.
        generated_samples: add this many sequences sampled from the dense model (once, the same for every method)
            to the calibration set, as `slimflow prune --generated-samples` does.
        grad_samples: calibration sequences for the gradient methods (taylor, llm-surgeon); default all.
        method_options: deprecated: options per method name, e.g. '{"llm-surgeon": {"shots": 8}}'; give them in
            --methods instead.
        perplexity: perplexity specs NAME:WINDOW[:MAX_TOKENS], e.g. wikitext2:128 or path.txt.gz:128:400000.
        max_windows: score only the first windows of each text.
        batch_size: sequences per forward pass (pruning and evaluation).
        device: auto, cpu, cuda, ...
        dtype: dtype of the model while pruning and evaluating: auto (float32 on CPU), float32, bfloat16.
        overwrite: replace an existing output directory.
        progress: show progress bars.
    """
    arguments = dict(locals()) | {"methods": [known_options.as_config(m) for m in methods]}
    from slimflow.api import prune as run_prune
    from slimflow.data.calibration import calibration_ids, check_calibration_options
    from slimflow.errors import require_existing
    from slimflow.evaluation.perplexity import PRESETS, evaluate_perplexity, parse_spec
    from slimflow.methods import get_method
    from slimflow.models import check_model_source, load_model, load_tokenizer, resolve_device, resolve_dtype

    out = Path(output)
    check_output(out, overwrite, COMPARE_MARKERS, "slimflow compare output")
    options = method_options or {}
    # unknown method or option: fail before any work
    pruners = [get_method(spec, **options.get(_name_of(spec), {})) for spec in methods]
    unknown = sorted(set(options) - {p.name for p in pruners})
    if unknown:
        raise InvalidValueError(f"--method-options names {', '.join(unknown)}, which --methods does not list")
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise InvalidValueError(f"--ratios must be fractions in (0, 1), got {ratios}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_calibration_options(num_samples, seqlen, sampling)
    if generated_samples < 0:
        raise InvalidValueError(f"--generated-samples must be ≥ 0, got {generated_samples}")
    for spec in perplexity:
        name = parse_spec(spec)[0]
        if name not in PRESETS:
            require_existing(name, "perplexity text")
    check_model_source(model, prunable=True)
    require_existing(calibration, "calibration text")
    tokenizer = load_tokenizer(model)
    ids = calibration_ids(calibration, tokenizer, num_samples, seqlen, seed, sampling)
    cache: dict = {}

    def evaluate(net) -> dict:
        return {spec: round(evaluate_perplexity(net, tokenizer, spec, batch_size=batch_size, max_windows=max_windows,
                                                device=dev, progress=progress, texts_cache=cache).value, 3)
                for spec in perplexity}

    net = load_model(model, dtype=dt, device=dev, progress=progress)
    rows = [{"method": "dense", "ratio": 0.0, "realised": 0.0, "params": sum(p.numel() for p in net.parameters()),
             "seconds": 0.0, "samples": 0, "ppl": evaluate(net)}]
    if generated_samples:  # sampled once from the dense model: every method prunes with the same sequences
        import torch

        from slimflow.data.generated import sample_sequences

        ids = torch.cat([ids, sample_sequences(net, generated_samples, seqlen, seed=seed, progress=progress)])
    del net
    for ratio in ratios:
        for built in pruners:
            net = load_model(model, dtype=dt, device=dev, progress=progress)
            pruner = get_method(built.options)  # a fresh method per run: its state starts empty
            name = pruner.name
            calib = pruner.gradient_calibration(ids, grad_samples)
            start = time.perf_counter()
            report = run_prune(net, calib, ratio, None, pruner, batch_size=batch_size, device=dev, progress=progress)
            seconds = time.perf_counter() - start
            rows.append({"method": name, "ratio": ratio, "realised": round(report.realised_fraction, 4),
                         "params": report.params_after, "seconds": round(seconds, 1), "samples": int(calib.shape[0]),
                         "ppl": evaluate(net), "widths": [w.to_dict() for w in report.widths]})
            print(f"{name} @ {ratio}: {rows[-1]['ppl']} ({seconds:.0f} s)", flush=True)
            del net
    table = _comparison_table(rows, perplexity)
    with staged_directory(out) as staging:
        (staging / "comparison.md").write_text(table)
        (staging / "comparison.json").write_text(json.dumps({"arguments": arguments, "rows": rows}, indent=2,
                                                            default=str))
        _comparison_plot(rows, perplexity, ratios, staging / "comparison.png")
    print(table)
    return {"output": str(out), "rows": len(rows)}


def _name_of(spec: MethodSpec) -> str:
    if isinstance(spec, MethodOptions):
        return spec.method
    return {cls.__name__: cls.method for cls in known_options.BUILTIN}.get(spec, spec)


compare.__doc__ = compare.__doc__.replace("{options}", known_options.options_help())


def _comparison_table(rows: list[dict], specs: list[str]) -> str:
    head = "| method | target | removed | params | " + " | ".join(f"PPL {s}" for s in specs) + " | prune s | calib seqs |"
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(specs) + "---:|---:|"]
    for r in rows:
        ppl = " | ".join(f"{r['ppl'][s]:.2f}" for s in specs)
        lines.append(f"| {r['method']} | {r['ratio']:.0%} | {r['realised']:.2%} | {r['params']:,} | {ppl} "
                     f"| {r['seconds']:.1f} | {r['samples']} |")
    return "\n".join(lines) + "\n"


def _comparison_plot(rows: list[dict], specs: list[str], ratios: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r["method"] for r in rows if r["ratio"] == ratios[0]]
    dense = rows[0]["ppl"]
    fig, axes = plt.subplots(1, len(specs), figsize=(6 * len(specs), 4), squeeze=False)
    width = 0.8 / len(ratios)
    for ax, spec in zip(axes[0], specs):
        for k, ratio in enumerate(ratios):
            values = [next(r["ppl"][spec] for r in rows if r["method"] == m and r["ratio"] == ratio) for m in methods]
            ax.bar([i + k * width for i in range(len(methods))], values, width, label=f"{ratio:.0%} removed")
        ax.axhline(dense[spec], color="grey", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xticks([i + width * (len(ratios) - 1) / 2 for i in range(len(methods))], methods, rotation=30)
        ax.set_title(f"perplexity, {Path(spec.split(':')[0]).name}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
