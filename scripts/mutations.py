"""Apply one-line mutations to slimflow, one at a time, run the engine tests against each and restore the file.

`python3 scripts/mutations.py` prints a markdown table: mutation, file, caught (the first failing test) or
SURVIVED. Run from the repository root with PYTHONPATH set to it; the working tree is restored after each run.
"""

import subprocess
import sys
from pathlib import Path

TESTS = ["tests/test_method_decisions.py", "tests/test_methods.py", "tests/test_algorithms.py",
         "tests/test_pipeline.py", "tests/test_performance.py", "tests/test_surgery.py"]

MUTATIONS = [
    ("SlimLLM head ranking reversed", "slimflow/methods/slimllm.py",
     "torch.argsort(loo, descending=True, stable=True)", "torch.argsort(loo, descending=False, stable=True)"),
    ("SlimLLM channel ranking reversed", "slimflow/methods/slimllm.py",
     "order = torch.argsort(scores, stable=True)", "order = torch.argsort(scores, descending=True, stable=True)"),
    ("SlimLLM layer allocation reversed", "slimflow/methods/slimllm.py",
     "softmax_shape(self.layer_similarity, alpha, k)", "softmax_shape([-s for s in self.layer_similarity], alpha, k)"),
    ("no propagation between layers", "slimflow/pipeline.py",
     "            _propagate(job.layer, job.index, job.inputs, job.batch_size, job.adapter, job.replay, job.dense_layer)",
     "            pass"),
    ("LLM Surgeon removes the most expensive units", "slimflow/methods/llm_surgeon.py",
     "key=lambda e: e[0] / e[4] if per_param else e[0])", "key=lambda e: e[0] / e[4] if per_param else e[0], reverse=True)"),
    ("LLM Surgeon without its correlated update", "slimflow/methods/llm_surgeon.py",
     "new, _ = obs_remove(down, ainv_d, torch.tensor(chans, device=down.device))",
     "new = down.clone(); new[:, chans] = 0"),
    ("Taylor removes the most important units", "slimflow/methods/taylor.py",
     "removed = lowest(self._heads[self._index], n_remove)", "removed = lowest(-self._heads[self._index], n_remove)"),
    ("Taylor removes the most important channels", "slimflow/methods/taylor.py",
     "removed = lowest(self._channels[self._index], n_remove)", "removed = lowest(-self._channels[self._index], n_remove)"),
    ("Wanda-sp removes the most important units", "slimflow/methods/wanda_sp.py",
     "removed = lowest(unit_sum(column_scores(weight, stats), unit_size), n_remove)",
     "removed = lowest(-unit_sum(column_scores(weight, stats), unit_size), n_remove)"),
    ("Wanda-sp removes the most important channels", "slimflow/methods/wanda_sp.py",
     "removed = lowest(column_scores(weight, stats), n_remove)", "removed = lowest(-column_scores(weight, stats), n_remove)"),
    ("bias compensation with the wrong sign (pipeline)", "slimflow/pipeline.py",
     "linear.bias.data.add_(bias.to(linear.bias.dtype))", "linear.bias.data.sub_(bias.to(linear.bias.dtype))"),
    ("bias compensation with the wrong sign (FLAP)", "slimflow/methods/flap.py",
     "return weight[:, cols] @ stats.mean.to(weight.dtype)[cols]", "return -(weight[:, cols] @ stats.mean.to(weight.dtype)[cols])"),
    ("every layer replayed with layer 0's arguments", "slimflow/pipeline.py",
     "        return self.calls[index][batch_size]", "        return self.calls[0][batch_size]"),
    ("attention replay patches attn.forward", "slimflow/pipeline.py",
     "        original = adapter.replace_attn(layer, self)\n        try:\n            yield self\n        finally:\n"
     "            adapter.replace_attn(layer, original)",
     "        attn = adapter.attn(layer)\n        attn.forward = self.forward\n        try:\n            yield self\n"
     "        finally:\n            del attn.forward"),
    ("SlimGPT without OBS compensation", "slimflow/methods/slimgpt.py",
     "return Decision(sorted(removed), new, extra)\n\n    def prune_channels",
     "return Decision(sorted(removed), zero_columns(weight, [c for u in removed for c in range(u * unit_size, (u + 1) * unit_size)]), extra)\n\n    def prune_channels"),
    ("magnitude ranking reversed", "slimflow/methods/magnitude.py",
     "removed = sorted(torch.argsort(weight.norm(dim=0))[:n_remove].tolist())",
     "removed = sorted(torch.argsort(-weight.norm(dim=0))[:n_remove].tolist())"),
    ("FLAP global ranking reversed", "slimflow/methods/flap.py",
     "entries.sort(key=lambda e: e[0])", "entries.sort(key=lambda e: -e[0])"),
    ("attention replay on the wrong kept columns", "slimflow/pipeline.py",
     "_unit_columns(job.result.kept_units, job.unit_size, job.device))",
     "_unit_columns(list(range(len(job.result.kept_units))), job.unit_size, job.device))"),
    # (name, file, old, new, tests): the last field names the tests when they are not the engine tests above
    ("adaptive search keeps the worst allocation", "slimflow/allocation.py",
     "best = min(scores, key=lambda k: (scores[k], list(scores).index(k)))",
     "best = max(scores, key=lambda k: (scores[k], list(scores).index(k)))", ["tests/test_allocation_search.py"]),
    ("adaptive search prunes on its held-out sequences", "slimflow/allocation.py",
     "    train = calibration[train_rows]", "    train = calibration", ["tests/test_allocation_search.py"]),
    ("adaptive search holds out the last rows, not rows spread over the set", "slimflow/allocation.py",
     "held_rows = [] if generated else _spaced(held, rows)",
     "held_rows = [] if generated else rows[num_samples - held:]", ["tests/test_allocation_search.py"]),
    ("sampled sequences dropped from the calibration set", "slimflow/api.py",
     "return torch.cat([calibration, sampled.to(calibration.device, calibration.dtype)])",
     "return calibration", ["tests/test_generated.py"]),
    ("sampling forgets the key/value cache", "slimflow/data/generated.py",
     "result = model(input_ids=ids, use_cache=True, **{cache_arg: cache})",
     "result = model(input_ids=ids, use_cache=True, **{cache_arg: DynamicCache(config=model.config)})",
     ["tests/test_generated.py"]),
    ("sampling ignores the temperature", "slimflow/data/generated.py",
     "probs = torch.softmax(result.logits[:, -1].float() / temperature, dim=-1)",
     "probs = torch.softmax(result.logits[:, -1].float(), dim=-1)", ["tests/test_generated.py"]),
    ("drift correction's cross term from the pruned inputs", "slimflow/algorithms/hessian.py",
     "self.cross.addmm_(d.t(), x.to(self.dtype), alpha=2.0 / total)",
     "self.cross.addmm_(x.to(self.dtype).t(), x.to(self.dtype), alpha=2.0 / total)", ["tests/test_drift.py"]),
    ("drift correction without the dense hidden states' propagation", "slimflow/pipeline.py",
     "                inputs.dense[start:stop] = out[0] if isinstance(out, tuple) else out",
     "                pass", ["tests/test_drift.py"]),
    ("blend keeps the first plan's head units", "slimflow/allocation.py",
     "units = min(max_units, int((pa.remove_units + pb.remove_units + 1) // 2))",
     "units = min(max_units, pa.remove_units)", ["tests/test_candidate_plans.py"]),
    ("split takes the most expensive heads/channels pair", "slimflow/allocation.py",
     "s_attn * h.costs[units] + s_ffn * _interpolated(c, ch), units)",
     "-(s_attn * h.costs[units] + s_ffn * _interpolated(c, ch)), units)", ["tests/test_candidate_plans.py"]),
    ("flat cuts the same number of channels from every layer", "slimflow/allocation.py",
     "keep = channel_multiple * round(shape.channels * (1 - fraction) / channel_multiple)",
     "keep = channel_multiple * round((shape.channels - rest / sum(x.channel_params for x in shapes)"
     " / len(shapes)) / channel_multiple)", ["tests/test_candidate_plans.py"]),
    ("flat drops the head units it was given", "slimflow/allocation.py",
     "units = [min(p.remove_units, lim[0]) for p, lim in zip(heads_from, limits)]",
     "units = [0 for p, lim in zip(heads_from, limits)]", ["tests/test_candidate_plans.py"]),
    ("adaptive samples nothing by default", "slimflow/api.py",
     "return max(1, min(ADAPTIVE_SAMPLES, ADAPTIVE_SAMPLED_TOKENS // max(seqlen, 1)))",
     "return 0", ["tests/test_allocation_search.py"]),
    ("the search's scoring rows inform the cost plans", "slimflow/allocation.py",
     "    if searching and not elsewhere:", "    if False:", ["tests/test_allocation_search.py"]),
    ("text scoring holds out among every row", "slimflow/allocation.py",
     "_spaced(held, rows if text_rows is None else rows[:text_rows])", "_spaced(held, rows)",
     ["tests/test_allocation_search.py"]),
    ("text scoring ignored by the adaptive schedule", "slimflow/allocation.py",
     'pool = text_rows if score_on == "text" and text_rows', 'pool = None if score_on == "text" and text_rows',
     ["tests/test_allocation_search.py"]),
    ("score_context ignored by the scoring", "slimflow/allocation.py",
     "    if context:\n        return sum(", "    if False:\n        return sum(", ["tests/test_allocation_search.py"]),
    ("device check ignores the sampling cache", "slimflow/device_memory.py",
     '"total": resident + max(cache, copy)}', '"total": resident + copy}', ["tests/test_device_memory.py"]),
    ("device check counts weights already on the device", "slimflow/device_memory.py",
     "resident = 0 if _same_device(home, device) else weights", "resident = weights",
     ["tests/test_device_memory.py"]),
    ("prune skips the device check", "slimflow/api.py",
     "    _check_whole_model_passes(model, dev, schedule,", "    (lambda *a: None)(model, dev, schedule,",
     ["tests/test_device_memory.py"]),
    ("out-of-memory errors keep their traceback", "slimflow/cli.py",
     "user_error_in(error) or out_of_memory_in(error)", "user_error_in(error)", ["tests/test_device_memory.py"]),
    ("selection study: domains weighed by their row counts", "benchmarks/selection_study.py",
     "value = [(_mean(scores[n], text) + _mean(scores[n], sampled)) / 2 for n in names]",
     "value = [_mean(scores[n], text + sampled) for n in names]", ["tests/test_selection_rules.py"]),
    ("selection study: worst rank sum kept", "benchmarks/selection_study.py",
     "value = [x + y for x, y in zip(a, b)]", "value = [-(x + y) for x, y in zip(a, b)]",
     ["tests/test_selection_rules.py"]),
    ("scoring windows may overlap the calibration rows", "slimflow/data/calibration.py",
     "for row in (avoid.tolist() if avoid is not None else []):", "for row in []:",
     ["tests/test_scoring_windows.py"]),
    ("source scoring still holds out calibration rows", "slimflow/allocation.py",
     "elsewhere = generated or source is not None", "elsewhere = generated", ["tests/test_scoring_windows.py"]),
    ("source scoring windows ignored", "slimflow/allocation.py",
     'source = scoring if score_on == "source" and scoring is not None',
     'source = None if score_on == "source" and scoring is not None', ["tests/test_scoring_windows.py"]),
    ("confirmation prunes on the search's rows only", "slimflow/allocation.py",
     "got = trial_scores(candidates[name], final, dense)", "got = trial_scores(candidates[name], train, dense)",
     ["tests/test_search_confirm.py"]),
    ("confirmation keeps the search's best", "slimflow/allocation.py",
     "best = ranked(finals)[0] if finals else ranked(scores)[0]", "best = ranked(scores)[0]",
     ["tests/test_search_confirm.py"]),
    ("confirmation takes the worst-scored candidates", "slimflow/allocation.py",
     "_finalists(ranked(scores), confirm, confirm_families)", "_finalists(ranked(scores)[::-1], confirm, confirm_families)",
     ["tests/test_search_confirm.py"]),
    ("family confirmation keeps the worst of each family", "slimflow/allocation.py",
     "firsts.setdefault(family(name), name)", "firsts[family(name)] = name", ["tests/test_search_confirm.py"]),
    ("family confirmation ignores the families", "slimflow/allocation.py",
     "    if families:\n        firsts", "    if False:\n        firsts", ["tests/test_search_confirm.py"]),
    ("family confirmation drops the best-scored candidates", "slimflow/allocation.py",
     "out += [name for name in firsts.values() if name not in out]", "out = list(firsts.values())",
     ["tests/test_search_confirm.py"]),
    ("confirm_families not passed to the search", "slimflow/allocation.py",
     "confirm, confirmed, seconds, confirm_families)", "confirm, confirmed, seconds)",
     ["tests/test_search_confirm.py"]),
    ("confirmation prunes on the held-out rows too", "slimflow/allocation.py",
     "final = calibration[[r for r in range(calibration.shape[0]) if r not in held]]", "final = calibration",
     ["tests/test_search_confirm.py"]),
]


def run(selected: list[str]) -> None:
    print("| mutation | file | result |\n|---|---|---|")
    for name, path, old, new, *tests in MUTATIONS:
        if selected and not any(s in name for s in selected):
            continue
        file = Path(path)
        source = file.read_text()
        if source.count(old) != 1:
            print(f"| {name} | `{path}` | mutation does not apply |")
            continue
        if "zero_columns" in new and "import" in source and "zero_columns" not in source.split("class")[0]:
            new_source = source.replace("from slimflow.methods.base import Decision,", "from slimflow.methods.base import zero_columns, Decision,")
        else:
            new_source = source
        file.write_text(new_source.replace(old, new))
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *(tests[0] if tests else TESTS)],
                                  capture_output=True, text=True)
        finally:
            file.write_text(source)
        failed = [l.split(" ")[1] for l in proc.stdout.splitlines() if l.startswith("FAILED ")]
        result = f"caught by `{failed[0].split('::', 1)[1]}`" if failed else ("SURVIVED" if proc.returncode == 0 else f"caught (exit {proc.returncode})")
        print(f"| {name} | `{path}` | {result} |", flush=True)


if __name__ == "__main__":
    run(sys.argv[1:])
