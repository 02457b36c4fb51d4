"""Token perplexity over non-overlapping windows (METHODS §10).

Protocol: tokenise `"\\n\\n".join(texts)` once (the tokenizer adds its BOS at the very start, if it has one),
cut `floor(len / T)` windows of `T` tokens (the tail is dropped), score each window on its own over its
`T - 1` next-token positions, and report `PPL = exp(mean NLL)` over all scored tokens. Windows are batched only
for speed: they all have length `T`, nothing is padded, and per-window losses are summed in window order in
float64, so the result does not depend on the batch size.

A spec is `NAME:WINDOW`: `wikitext2:128`, `wikitext2:2048`, `c4:128`, `c4:2048`, `ptb:128`, or
`PATH:WINDOW` for any local `.txt`, `.gz`, `.json`, `.jsonl` or `.parquet` file (read by `slimflow.data.text`). An optional third field keeps only the first
tokens: `../shared/pretrain_corpus/part-007.txt.gz:128:400000` is the reference model's in-domain protocol.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimflow.data.text import read_hub_texts, read_local_text, read_local_texts
from slimflow.evaluation.paths import find_data_file, searched_locations
from slimflow.errors import InvalidValueError, MissingInputError

WIKITEXT2_LOCAL = "wikitext2/wiki.test.raw"
C4_LOCAL = "c4_sample/c4-sample.00000-of-00001.json.gz"
C4_LOCAL_LAST_DOCS = 200
C4_HUB_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_HUB_DOCS = 1100
PTB_LOCAL = "ptb/ptb.valid.txt"
PRESETS = ("wikitext2", "c4", "ptb")
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass
class PerplexityResult:
    """One perplexity measurement and everything needed to compare it with another."""

    spec: str
    dataset: str
    source: str
    window: int
    value: float
    num_windows: int
    num_tokens: int  # tokens scored: num_windows * (window - 1)
    mean_nll: float
    total_tokens: int  # tokens in the whole tokenised text
    max_tokens: int | None  # only the first max_tokens tokens were cut into windows
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def parse_spec(spec: str) -> tuple[str, int, int | None]:
    """`"wikitext2:128"` -> `("wikitext2", 128, None)`; `"books.txt.gz:128:400000"` -> `(..., 128, 400000)`.

    The window is required so protocols are never mixed; the optional third field keeps only the first
    that many tokens of the tokenised text (it overrides the global `max_tokens` for this spec).
    """
    parts = spec.strip().split(":")
    max_tokens = None
    if len(parts) >= 3 and parts[-1].isdigit() and parts[-2].isdigit():
        max_tokens = int(parts.pop())
    name, window = ":".join(parts[:-1]), parts[-1]
    if len(parts) < 2 or not name or not window.isdigit() or int(window) < 2:
        raise InvalidValueError(
            f"perplexity spec {spec!r} must be NAME:WINDOW[:MAX_TOKENS] with WINDOW >= 2, e.g. wikitext2:128, "
            f"wikitext2:2048, c4:128, ptb:128 or path/to/text.txt.gz:128:400000"
        )
    return name, int(window), max_tokens


# ----------------------------------------------------------------------------------------------- text sources
def wikitext2_rows_from_raw(raw: str) -> list[str]:
    """The Hub `wikitext-2-raw-v1` test rows rebuilt from `wiki.test.raw` (see the data folder's README)."""
    return [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]


def _hub_available() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("1", "true", "True") and os.environ.get(
        "HF_HUB_OFFLINE", "0"
    ) not in ("1", "true", "True")


def _load_hub(what: str, loader):
    if not _hub_available():
        raise MissingInputError(f"{what}: no local copy found and the Hub is switched off (HF_*_OFFLINE=1)")
    try:
        return loader()
    except Exception as err:  # no network, dataset moved, ...: say what to do instead
        raise MissingInputError(f"{what}: no local copy found and loading from the Hub failed ({err})") from err


def load_texts(name: str, data_dir=None) -> tuple[list[str], str]:
    """The texts of a preset or a local file, and a string saying where they came from.

    Presets look for the local copy first (offline-friendly) and fall back to the Hub through `datasets`:
    - `wikitext2`: `<data>/wikitext2/wiki.test.raw`, else Hub `Salesforce/wikitext` / `wikitext-2-raw-v1` test.
    - `c4`: `<data>/c4_sample/...json.gz` (its last 200 documents), else Hub `allenai/c4` validation shard 0
      (its first 1100 documents, as SparseGPT). The two are different texts: compare only within one source.
    - `ptb`: `<data>/ptb/ptb.valid.txt` (one sentence per line), else Hub `ptb_text_only` validation, field `sentence`.
    Anything else is a path to a local file. Files and hub datasets are read by `slimflow.data.text`.
    """
    if name == "wikitext2":
        path = find_data_file(WIKITEXT2_LOCAL, data_dir)
        if path is not None:
            return wikitext2_rows_from_raw(read_local_text(path)), str(path)
        return _load_hub(f"wikitext2 (looked for {searched_locations(WIKITEXT2_LOCAL, data_dir)})",
                         lambda: read_hub_texts("Salesforce/wikitext", split="test", config="wikitext-2-raw-v1")), (
            "hub:Salesforce/wikitext/wikitext-2-raw-v1/test"
        )
    if name == "c4":
        path = find_data_file(C4_LOCAL, data_dir)
        if path is not None:
            docs = read_local_texts(path)
            return docs[-C4_LOCAL_LAST_DOCS:], f"{path} (last {C4_LOCAL_LAST_DOCS} documents)"

        def hub():
            texts = read_hub_texts("allenai/c4", split="validation", field="text",
                                   data_files={"validation": C4_HUB_FILE})
            return texts[:C4_HUB_DOCS]

        return _load_hub(f"c4 (looked for {searched_locations(C4_LOCAL, data_dir)})", hub), (
            f"hub:allenai/c4/{C4_HUB_FILE} (first {C4_HUB_DOCS} documents)"
        )
    if name == "ptb":
        path = find_data_file(PTB_LOCAL, data_dir)
        if path is not None:
            return [line.strip() for line in read_local_text(path).splitlines()], str(path)
        return _load_hub(f"ptb (looked for {searched_locations(PTB_LOCAL, data_dir)})",
                         lambda: read_hub_texts("ptb_text_only", split="validation", field="sentence",
                                                config="penn_treebank")), (
            "hub:ptb_text_only/penn_treebank/validation"
        )
    path = Path(name).expanduser()
    if not path.is_file():
        raise MissingInputError(
            f"perplexity data {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file; "
            f"give NAME:WINDOW with a preset name or a path to a .txt/.gz/.json/.jsonl/.parquet file"
        )
    return read_local_texts(path), str(path.resolve())


# ------------------------------------------------------------------------------------------------ computation
def model_context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for attribute in CONTEXT_ATTRIBUTES:
        value = getattr(config, attribute, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_window(model, window: int, name: str = "wikitext2") -> None:
    context = model_context_length(model)
    if context is not None and window > context:
        raise InvalidValueError(
            f"perplexity window {window} is longer than the model's context of {context} tokens; "
            f"use a window <= {context}, e.g. {name}:128"
        )


def tokenize_texts(tokenizer, texts: list[str]) -> torch.Tensor:
    """`"\\n\\n".join(texts)` tokenised once, with the tokenizer's special tokens (one BOS at the start)."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=True, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def window_nll_sums(model, windows: torch.Tensor, batch_size: int = 8, device=None, progress: bool = True,
                    desc: str = "perplexity") -> list[float]:
    """Summed next-token NLL of each window (`[num_windows, T]`), each scored alone, in float64."""
    device = torch.device(device) if device is not None else model_device(model)
    sums = []
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for row in range(batch.shape[0]):
            nll = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum")
            sums.append(float(nll.double()))
    return sums


def perplexity_of_ids(model, ids: torch.Tensor, window: int, batch_size: int = 8, max_windows: int | None = None,
                      device=None, progress: bool = True, desc: str = "perplexity") -> tuple[float, int, int, float]:
    """(ppl, number of windows, tokens scored, mean NLL) of a 1-D token tensor cut into windows of `window`."""
    num_windows = len(ids) // window
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows == 0:
        raise InvalidValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    windows = ids[: num_windows * window].view(num_windows, window)
    sums = window_nll_sums(model, windows, batch_size=batch_size, device=device, progress=progress, desc=desc)
    num_tokens = num_windows * (window - 1)
    mean_nll = math.fsum(sums) / num_tokens
    return math.exp(mean_nll), num_windows, num_tokens, mean_nll


def evaluate_perplexity(model, tokenizer, spec: str, batch_size: int = 8, max_windows: int | None = None,
                        max_tokens: int | None = None, data_dir=None, device=None,
                        progress: bool = True, texts_cache: dict | None = None) -> PerplexityResult:
    """Perplexity of `model` for one spec (`wikitext2:128`, `path/to/file.txt.gz:128`, ...).

    `max_tokens` keeps only the first tokens of the tokenised text (e.g. 400_000 for held-out books);
    `max_windows` keeps only the first windows. `texts_cache` (name -> (ids, source)) avoids re-tokenising.
    """
    name, window, spec_max_tokens = parse_spec(spec)
    max_tokens = spec_max_tokens if spec_max_tokens is not None else max_tokens
    check_window(model, window, name)
    started = time.perf_counter()
    if texts_cache is not None and name in texts_cache:
        ids, source = texts_cache[name]
    else:
        texts, source = load_texts(name, data_dir)
        ids = tokenize_texts(tokenizer, texts)
        if texts_cache is not None:
            texts_cache[name] = (ids, source)
    total_tokens = len(ids)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    was_training = model.training
    model.eval()
    try:
        value, num_windows, num_tokens, mean_nll = perplexity_of_ids(
            model, ids, window, batch_size=batch_size, max_windows=max_windows, device=device,
            progress=progress, desc=f"ppl {spec}",
        )
    finally:
        model.train(was_training)
    dataset = name if name in PRESETS else Path(name).name
    return PerplexityResult(
        spec=spec, dataset=dataset, source=source, window=window, value=value, num_windows=num_windows,
        num_tokens=num_tokens, mean_nll=mean_nll, total_tokens=total_tokens, max_tokens=max_tokens,
        seconds=round(time.perf_counter() - started, 3),
    )
