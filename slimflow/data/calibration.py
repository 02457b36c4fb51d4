"""Calibration sequences: fixed-length token windows drawn from a text source."""

from __future__ import annotations

import warnings

import torch

from slimflow.data.text import DataSourceError, read_texts

# random windows may reuse each token of the text this many times on average before the request is refused
MAX_REPEATS = 16
SCORING_SEED = 7_919  # added to the calibration seed: the adaptive search's scoring windows are other draws
SHARED_RUN = 16  # two windows that share a run of this many tokens overlap


class CalibrationError(DataSourceError):
    pass


class CalibrationRepeatWarning(UserWarning):
    """The calibration windows overlap: the text has fewer tokens than `num_samples × seqlen`."""


def check_calibration_options(num_samples: int, seqlen: int, sampling: str, skip_tokens: int = 0) -> None:
    """The sampling options alone (no data read): fails with the option to fix."""
    if num_samples < 1 or seqlen < 2:
        raise CalibrationError(f"need --num-samples ≥ 1 and --seqlen ≥ 2, got {num_samples} and {seqlen}")
    if sampling not in ("random", "tail"):
        raise CalibrationError(f"--sampling must be 'random' or 'tail', got {sampling!r}")
    if skip_tokens < 0:
        raise CalibrationError(f"--skip-tokens must be ≥ 0, got {skip_tokens}")


def _check_repeats(source: str, distinct: int, num_samples: int, seqlen: int) -> None:
    """Random windows from a text of `distinct` tokens: warn when they must overlap, refuse when mostly copies."""
    requested = num_samples * seqlen
    if requested <= distinct:
        return
    repeats = requested / distinct
    advice = (f"Use a longer text, fewer samples (--num-samples {max(1, distinct // seqlen)} fits without "
              f"repeats) or shorter sequences (--seqlen)")
    if repeats > MAX_REPEATS:
        raise CalibrationError(
            f"calibration text {source!r} has {distinct} distinct tokens but {num_samples} × {seqlen} = {requested} "
            f"are requested: each token would be reused {repeats:.0f} times on average (more than {MAX_REPEATS}), "
            f"so the calibration statistics would mostly be copies. {advice}.")
    warnings.warn(
        f"calibration text {source!r} has {distinct} distinct tokens but {num_samples} × {seqlen} = {requested} "
        f"are requested, so the random windows overlap (each token reused {repeats:.1f} times on average). "
        f"{advice}.", CalibrationRepeatWarning, stacklevel=3)


def _tail_text(texts: list[str], chars: int) -> str:
    out, n = [], 0
    for t in reversed(texts):
        out.append(t)
        n += len(t)
        if n >= chars:
            break
    return "\n\n".join(reversed(out))[-chars:]


def calibration_ids(
    source: str,
    tokenizer,
    num_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    sampling: str = "random",
    skip_tokens: int = 0,
    split: str | None = None,
    field: str | None = None,
) -> torch.Tensor:
    """`[num_samples, seqlen]` token windows from `source` (local .txt/.json/.jsonl(.gz) file or hub dataset).

    Texts are joined with blank lines and tokenised without special tokens. `sampling="random"` draws windows
    at seeded random offsets (after `skip_tokens`, e.g. to stay clear of an evaluation prefix); `"tail"` takes
    `num_samples` consecutive windows from the very end of the text.
    """
    check_calibration_options(num_samples, seqlen, sampling, skip_tokens)
    texts = [t for t in read_texts(source, split=split, field=field) if t and t.strip()]
    if not texts:
        raise CalibrationError(f"calibration source {source!r} contains no text")
    needed = num_samples * seqlen if sampling == "tail" else seqlen
    if sampling == "tail":
        chars = needed * 8
        while True:
            text = _tail_text(texts, chars)
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) >= needed + 1 or len(text) < chars:
                break
            chars *= 2
        ids = ids[1:]  # the first token may be a word cut in half
    else:
        ids = _random_stream(texts, tokenizer, seed, num_samples, seqlen, skip_tokens)
    if len(ids) < needed:
        raise CalibrationError(
            f"calibration text {source!r} has {len(ids)} tokens (after skipping {skip_tokens}), but "
            f"{num_samples} × {seqlen} {'consecutive ' if sampling == 'tail' else ''}tokens need at least "
            f"{needed}. Use a longer text, fewer samples (--num-samples) or shorter sequences (--seqlen)."
        )
    if sampling == "random":
        _check_repeats(source, len(ids), num_samples, seqlen)
    ids = torch.tensor(ids, dtype=torch.long)
    if sampling == "tail":
        return ids[-needed:].reshape(num_samples, seqlen)
    return _windows(ids, num_samples, seqlen, seed)


def _random_stream(texts: list[str], tokenizer, seed: int, num_samples: int, seqlen: int,
                   skip_tokens: int) -> list[int]:
    """The tokens random windows are drawn from: the texts in a seeded order, joined, tokenised up to four
    times the tokens asked for, after `skip_tokens`."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=gen).tolist() if len(texts) > 1 else [0]
    budget = skip_tokens + max(4 * num_samples * seqlen, seqlen)
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i] + "\n\n", add_special_tokens=False, verbose=False)["input_ids"])
        if len(ids) >= budget:
            break
    return ids[skip_tokens:]


def _windows(ids: torch.Tensor, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (num_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def scoring_ids(
    source: str,
    tokenizer,
    num_samples: int = 32,
    seqlen: int = 2048,
    seed: int = 0,
    skip_tokens: int = 0,
    avoid: torch.Tensor | None = None,
    split: str | None = None,
    field: str | None = None,
) -> torch.Tensor | None:
    """Up to `num_samples` random windows of `source` (after `skip_tokens`) that overlap neither each other nor
    any row of `avoid` (the calibration sequences; no shared run of `SHARED_RUN` tokens): the text the adaptive
    schedule scores its candidate allocations on (`slimflow.allocation.adaptive_plan(scoring=...)`).

    They are drawn at random whatever the calibration's sampling, so that a calibration set from one document's
    end (`tail`) is judged on the rest of the source, from the region random calibration of `4 × num_samples`
    windows would read. Fewer where a short source has no more, None where it has none (the search then holds
    out calibration rows instead)."""
    check_calibration_options(num_samples, seqlen, "random", skip_tokens)
    texts = [t for t in read_texts(source, split=split, field=field) if t and t.strip()]
    seed += SCORING_SEED
    ids = _random_stream(texts, tokenizer, seed, 4 * num_samples, seqlen, skip_tokens) if texts else []
    if len(ids) < seqlen:
        return None
    pool = _windows(torch.tensor(ids, dtype=torch.long), 4 * num_samples, seqlen, seed)
    seen = set()
    for row in (avoid.tolist() if avoid is not None else []):
        seen.update(_runs(row))
    keep = []
    for row in pool.tolist():
        runs = _runs(row)
        if seen.isdisjoint(runs):
            keep.append(row)
            seen.update(runs)
            if len(keep) == num_samples:
                break
    return torch.tensor(keep, dtype=torch.long) if keep else None


def _runs(row: list[int]) -> set[int]:
    return {hash(tuple(row[i : i + SHARED_RUN])) for i in range(max(len(row) - SHARED_RUN + 1, 1))}
