"""End-of-run outputs: evaluation of the dense, pruned and finetuned model (`metrics.json`) and export."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer

from slimflow.lightning.access import (
    SlimflowCallback, base_model, get_model, get_tokenizer, run_dir, slimflow_callbacks,
)
from slimflow.lightning.logs import evaluation_metrics, log_metrics, say
from slimflow.errors import InvalidValueError, require_existing


def _to_accelerator(trainer: Trainer, model) -> None:
    """Evaluate on the trainer's device: the dense and pruned models are measured in `setup`, before Lightning
    moves the module, and the final one in `on_fit_end`, after its teardown moved it back to the CPU (a 7B model
    would be scored on the CPU otherwise). Pruning after the dense evaluation then also runs in place there."""
    device = trainer.strategy.root_device
    if device.type != "cpu" and next(model.parameters()).device != device:
        model.to(device)


class Evaluation(SlimflowCallback):
    """Evaluates the model with `slimflow.evaluation.evaluate_model` at the points that matter and writes
    `metrics.json` to the run directory.

    Measured: `dense` (before the first prune), `pruned` (after each prune, before LoRA), `finetuned` (before
    the next prune and at the end of fit, after the LoRA merge). The file holds the final model's
    `evaluate_model` dict at the top level (what `slimflow report` reads), `summary` (perplexity of the first
    spec and parameter count for dense / pruned / finetuned), each full result, and `stages` for iterative
    recipes. Measurements are kept in the callback state, so a resumed run still reports all of them. Each
    measurement also goes to the Trainer's loggers (`eval/dense/ppl`, ...; see `slimflow.lightning.logs`).

    Args:
        ppl: perplexity specs `NAME:WINDOW` (`wikitext2:128`, `path/to/text.txt.gz:128`, ...).
        tasks: zero-shot tasks (lm-eval), e.g. `[boolq, piqa, hellaswag]`; empty for none.
        limit: documents per task (None: all).
        batch_size: windows per forward pass.
        max_windows: score at most this many windows per spec.
        max_tokens: keep only the first tokens of each perplexity text (e.g. 400000).
        dense: also evaluate the dense model before pruning.
        samples: answer this many fixed prompts greedily with the dense, pruned and finetuned model and write
            them side by side to `samples.md` / `samples.json` (0: none).
        sample_tokens: new tokens per generation sample.
        filename: output file name in `dirpath`.
        dirpath: output directory (default: the trainer's `default_root_dir`).
        model_attr: attribute of the LightningModule holding the Hugging Face model.
        progress: print a line when each evaluation starts and ends.
    """

    def __init__(self, ppl: list[str] | None = None, tasks: list[str] | None = None, limit: int | None = None,
                 batch_size: int = 8, max_windows: int | None = None, max_tokens: int | None = None,
                 dense: bool = True, samples: int = 3, sample_tokens: int = 48, filename: str = "metrics.json",
                 dirpath: str | None = None, model_attr: str = "model", progress: bool = True):
        from slimflow.evaluation.perplexity import PRESETS, parse_spec

        self.ppl = list(ppl) if ppl is not None else ["wikitext2:128"]
        self.tasks = list(tasks or [])
        for spec in self.ppl:
            name = parse_spec(spec)[0]
            if name not in PRESETS:
                require_existing(name, "perplexity text")
        self.limit, self.batch_size, self.max_windows, self.max_tokens = limit, batch_size, max_windows, max_tokens
        self.dense, self.filename, self.dirpath, self.model_attr = dense, filename, dirpath, model_attr
        if samples < 0 or sample_tokens < 1:
            raise InvalidValueError(f"samples must be ≥ 0 and sample_tokens ≥ 1, got {samples} and {sample_tokens}")
        self.samples, self.sample_tokens, self.progress = samples, sample_tokens, progress
        self.results: dict = {"stages": []}
        self._texts: dict = {}

    # ------------------------------------------------------------------------------------------- measuring
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        """`evaluate_model` of the module's current model (perplexity texts are tokenised once per run)."""
        from slimflow.evaluation.suite import evaluate_model
        from slimflow.evaluation.perplexity import evaluate_perplexity

        model = get_model(pl_module, self.model_attr)
        tokenizer = get_tokenizer(trainer, pl_module, model)
        hf_model = base_model(model)
        _to_accelerator(trainer, hf_model)
        started = time.perf_counter()
        result = evaluate_model(hf_model, tokenizer, ppl=[], tasks=self.tasks, limit=self.limit,
                                batch_size=self.batch_size, progress=False)
        ppl_started = time.perf_counter()
        for spec in self.ppl:  # evaluate_model has no cache across calls; the run reads each text once
            result["perplexity"][spec] = evaluate_perplexity(
                hf_model, tokenizer, spec, batch_size=self.batch_size, max_windows=self.max_windows,
                max_tokens=self.max_tokens, progress=False, texts_cache=self._texts).to_dict()
        result["protocol"].update(max_windows=self.max_windows, max_tokens=self.max_tokens)
        result["seconds"].update(perplexity=round(time.perf_counter() - ppl_started, 1),
                                 total=round(time.perf_counter() - started, 1))
        return result

    def _generate(self, trainer, pl_module) -> list[dict]:
        from slimflow.evaluation.generation import DEFAULT_PROMPTS, generate_samples

        model = get_model(pl_module, self.model_attr)
        tokenizer = get_tokenizer(trainer, pl_module, model)
        return generate_samples(base_model(model), tokenizer, DEFAULT_PROMPTS[: self.samples],
                                max_new_tokens=self.sample_tokens)

    def _record(self, trainer, pl_module, name: str, stage: int | None = None) -> None:
        from slimflow.lightning.distributed import on_rank_zero

        on_rank_zero(trainer, lambda: self._measure(trainer, pl_module, name, stage))

    def _measure(self, trainer, pl_module, name: str, stage: int | None) -> None:
        if self.progress:
            say(trainer, f"evaluating the {name} model ({', '.join(self.ppl + self.tasks)})")
        result = self.evaluate(trainer, pl_module)
        metrics = evaluation_metrics(name, result, self.ppl)
        log_metrics(trainer, metrics)
        if self.progress and f"eval/{name}/ppl" in metrics:
            say(trainer, f"{name}: perplexity {metrics[f'eval/{name}/ppl']:.2f}, "
                         f"{result['model']['parameters']:,} parameters ({result['seconds']['total']:.0f} s)")
        if self.samples:
            result["samples"] = self._generate(trainer, pl_module)
        self.results[name] = result
        if stage is not None:
            stages = self.results["stages"]
            while len(stages) <= stage:
                stages.append({"stage": len(stages) + 1})
            stages[stage][name] = result
        if trainer.is_global_zero:
            self.write(trainer)

    def on_before_prune(self, trainer, pl_module, stage) -> None:
        if stage == 0 and self.dense:
            self._record(trainer, pl_module, "dense")
        elif stage > 0:  # the previous stage's finetuned model; not the run's final result
            result = self.evaluate(trainer, pl_module)
            self.results["stages"][stage - 1]["finetuned"] = result
            log_metrics(trainer, evaluation_metrics("finetuned", result, self.ppl))

    def on_after_prune(self, trainer, pl_module, stage, report) -> None:
        self._record(trainer, pl_module, "pruned", stage)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from slimflow.lightning.distributed import gather_full_model

        gather_full_model(trainer, pl_module, self.model_attr)
        stages = self.results["stages"]
        self._record(trainer, pl_module, "finetuned", len(stages) - 1 if stages else None)

    # ------------------------------------------------------------------------------------------- output
    def summary(self) -> dict:
        out = {"spec": self.ppl[0] if self.ppl else None}
        for name in ("dense", "pruned", "finetuned"):
            if name in self.results:
                r = self.results[name]
                ppl = r["perplexity"].get(out["spec"], {}).get("value") if out["spec"] else None
                out[name] = {"ppl": ppl, "parameters": r["model"]["parameters"], "average": r.get("average")}
        return out

    def write(self, trainer: Trainer) -> Path:
        final = self.results.get("finetuned", {})
        data = {**final, "summary": self.summary(), **self.results}
        path = run_dir(trainer, self.dirpath) / self.filename
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        if self.samples:
            self.write_samples(path.parent)
        return path

    def write_samples(self, directory: Path) -> None:
        """`samples.json` and `samples.md`: each prompt with the dense, pruned and finetuned completions."""
        names = [n for n in ("dense", "pruned", "finetuned") if "samples" in self.results.get(n, {})]
        if not names:
            return
        rows = []
        for i, first in enumerate(self.results[names[0]]["samples"]):
            rows.append({"prompt": first["prompt"],
                         **{n: self.results[n]["samples"][i]["completion"] for n in names}})
        (directory / "samples.json").write_text(json.dumps(rows, indent=2) + "\n")
        lines = ["# Generation samples (greedy)", ""]
        for row in rows:
            lines += ["## Prompt", "", "> " + row["prompt"].replace("\n", "\n> "), ""]
            for n in names:
                lines += [f"**{n}:** {row[n].strip()}", ""]
        (directory / "samples.md").write_text("\n".join(lines))

    def state_dict(self) -> dict:
        return {"results": json.loads(json.dumps(self.results, default=str))}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = state_dict["results"]


class Export(SlimflowCallback):
    """Exports the run's models under `dirpath` (default: `<default_root_dir>/export`):

    - `model/`: the final merged model as a pruned checkpoint (`slimflow.checkpoint.save_pruned`; reload with
      `slimflow.load_pruned` or `from_pretrained(..., trust_remote_code=True)`), written at the end of fit;
    - `adapter/`: the LoRA adapter of the last stage (PEFT `save_pretrained`, safetensors), written just
      before the final merge;
    - `base/`: the pruned but not finetuned model the adapter belongs to, written right after the last prune.
      `PeftModel.from_pretrained(load_pruned("base"), "adapter")` rebuilds the finetuned model.
    - `model.gguf` (with `gguf` set): the final merged model for llama.cpp / llama-server / Ollama
      (`slimflow.export.write_gguf`, docs/serving.md), written at the end of fit. Whether the model and its
      tokenizer can be written is checked when fit starts, so a run never trains only to fail at the export.

    Args:
        dirpath: export directory.
        merged: write `model/`.
        adapter: write `adapter/`.
        base: write `base/`.
        gguf: also write `model.gguf` with this weight type: f32, f16, bf16 or q8_0 (None: no GGUF file).
        model_attr: attribute of the LightningModule holding the Hugging Face model.
    """

    def __init__(self, dirpath: str | None = None, merged: bool = True, adapter: bool = True, base: bool = True,
                 gguf: str | None = None, model_attr: str = "model"):
        from slimflow.export.gguf import DTYPES, GGUFExportError

        if gguf is not None and gguf not in DTYPES:
            raise GGUFExportError(f"Export(gguf={gguf!r}): choose one of {', '.join(DTYPES)} (or None)")
        self.dirpath, self.merged, self.adapter, self.base, self.model_attr = dirpath, merged, adapter, base, model_attr
        self.gguf = gguf

    def _dir(self, trainer: Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else run_dir(trainer) / "export"

    @staticmethod
    def _pruning(trainer):
        from slimflow.lightning.pruning import StructuredPruning

        found = slimflow_callbacks(trainer, StructuredPruning)
        return found[0] if found else None

    def _save(self, trainer, pl_module, name: str, model) -> None:
        from slimflow.checkpoint import save_pruned

        pruning = self._pruning(trainer)
        tokenizer = get_tokenizer(trainer, pl_module, model)
        save_pruned(base_model(model), self._dir(trainer) / name, tokenizer=tokenizer,
                    report=pruning.last_report if pruning else None, overwrite=True)

    def on_after_prune(self, trainer, pl_module, stage, report) -> None:
        from slimflow.lightning.distributed import on_rank_zero

        if self.base and stage == len(self._pruning(trainer).ratios) - 1:
            on_rank_zero(trainer, lambda: self._save(trainer, pl_module, "base", get_model(pl_module, self.model_attr)))

    def on_before_merge(self, trainer, pl_module, peft_model, final) -> None:
        if final and self.adapter and trainer.is_global_zero:
            peft_model.save_pretrained(str(self._dir(trainer) / "adapter"), safe_serialization=True)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.gguf is None:
            return
        from slimflow.export.gguf import GGUFExportError, check_exportable
        from slimflow.export.gguf_vocab import UnsupportedTokenizerError, vocab_from_tokenizer

        model = base_model(get_model(pl_module, self.model_attr))
        check_exportable(model)
        try:
            vocab_from_tokenizer(get_tokenizer(trainer, pl_module, model), model.get_input_embeddings().num_embeddings)
        except UnsupportedTokenizerError as error:
            raise GGUFExportError(f"Export(gguf=...) cannot write this tokenizer to GGUF: {error}") from error

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from slimflow.lightning.distributed import gather_full_model, on_rank_zero

        gather_full_model(trainer, pl_module, self.model_attr)
        on_rank_zero(trainer, lambda: self._final_exports(trainer, pl_module))

    def _final_exports(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = get_model(pl_module, self.model_attr)
        if self.merged:
            self._save(trainer, pl_module, "model", model)
        if self.gguf is not None:
            from slimflow.export.gguf import write_gguf

            hf_model = base_model(model)
            write_gguf(hf_model, get_tokenizer(trainer, pl_module, hf_model), self._dir(trainer) / "model.gguf",
                       dtype=self.gguf, overwrite=True)
