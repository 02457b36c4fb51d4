"""DataModules: Alpaca-style instruction data, calibration text and held-out evaluation text."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from slimflow.data.text import read_records
from slimflow.errors import InvalidValueError, require_existing

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(record: dict) -> str:
    """The Alpaca prompt of one record, up to and including `### Response:\\n` (the output follows it)."""
    template = PROMPT_WITH_INPUT if (record.get("input") or "").strip() else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input") or "")


def load_tokenizer(tokenizer):
    """A tokenizer object as it is, a name or path through slimflow's one tokenizer loader."""
    from slimflow.models import load_tokenizer as load

    return load(tokenizer, pad_with_eos=False)


class EpochSeededSampler(Sampler[int]):
    """A random order that depends only on `seed` and the epoch (Lightning calls `set_epoch`), so a resumed
    run sees the same batches as an uninterrupted one."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def pad_collate(pad_id: int):
    """Right-pad `input_ids` with `pad_id` and `labels` with -100; build the attention mask. Fixed-length
    `distill_input_ids` windows (distillation text), if the examples carry them, are stacked alongside."""

    def collate(examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            mask[row, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "distill_input_ids" in examples[0]:
            batch["distill_input_ids"] = torch.stack([torch.as_tensor(e["distill_input_ids"]) for e in examples])
        return batch

    return collate


class InstructionData(LightningDataModule):
    """Instruction-tuning data in the Alpaca format (`instruction`, `input`, `output`).

    Each example is the Alpaca prompt followed by the output and EOS, cut to `cutoff_len` tokens. With
    `train_on_inputs=False` the loss covers the response tokens only (prompt labels are -100).

    With `distill_text`, each training example also carries one window of `distill_seqlen` tokens of that
    generic text (`distill_input_ids`, drawn like calibration data) for `CausalLMModule`'s distillation loss.

    Args:
        path: a local `.json`/`.jsonl` (optionally gzipped) or `.parquet` file, or a hub dataset name (e.g.
            `yahma/alpaca-cleaned`); read by `slimflow.data.text.read_records`.
        tokenizer: tokenizer name or path (the CLI links it to the model's `pretrained`).
        cutoff_len: maximum tokens per example.
        train_on_inputs: also train on the prompt tokens.
        add_eos_token: append EOS to examples that fit within `cutoff_len`.
        val_size: examples held out for validation (drawn at random with `seed`). Examples whose prompt alone
            fills `cutoff_len` are dropped first (they have no response token to learn from).
        batch_size: micro-batch size (use the Trainer's `accumulate_grad_batches` for the effective batch).
        eval_batch_size: validation batch size (default: `batch_size`).
        limit: use only the first `limit` records (quick runs).
        seed: seed of the train/validation split and of the per-epoch shuffling.
        split: hub dataset split.
        num_workers: DataLoader workers.
        distill_text: local text/.gz/.json/.jsonl/.parquet file (or hub dataset) of the distillation windows;
            None: none.
        distill_seqlen: tokens per distillation window.
        distill_sampling: `random` (seeded offsets after `distill_skip_tokens`) or `tail` (the text's last tokens).
        distill_skip_tokens: tokens skipped at the start of `distill_text` (keep clear of an evaluation prefix).
    """

    def __init__(self, path: str = "yahma/alpaca-cleaned", tokenizer: str | None = None, cutoff_len: int = 256,
                 train_on_inputs: bool = False, add_eos_token: bool = True, val_size: int = 2000,
                 batch_size: int = 4, eval_batch_size: int | None = None, limit: int | None = None, seed: int = 42,
                 split: str = "train", num_workers: int = 0, distill_text: str | None = None,
                 distill_seqlen: int = 128, distill_sampling: str = "random", distill_skip_tokens: int = 0):
        super().__init__()
        require_existing(path, "instruction data file")
        if distill_text is not None:
            require_existing(distill_text, "distillation text")
        self.distill_text, self.distill_seqlen = distill_text, distill_seqlen
        self.distill_sampling, self.distill_skip_tokens = distill_sampling, distill_skip_tokens
        self.path, self.tokenizer_name, self.cutoff_len = path, tokenizer, cutoff_len
        self.train_on_inputs, self.add_eos_token, self.val_size = train_on_inputs, add_eos_token, val_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.limit, self.seed, self.split, self.num_workers = limit, seed, split, num_workers
        self.tokenizer = None
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []

    def encode(self, record: dict) -> dict:
        """Token ids and labels of one record (see the class docstring)."""
        tok = self.tokenizer
        prompt = alpaca_prompt(record)
        full = tok(prompt + record["output"], truncation=True, max_length=self.cutoff_len)["input_ids"]
        if self.add_eos_token and len(full) < self.cutoff_len and full[-1] != tok.eos_token_id:
            full = full + [tok.eos_token_id]
        labels = list(full)
        if not self.train_on_inputs:
            n_prompt = min(len(tok(prompt)["input_ids"]), len(full))
            labels[:n_prompt] = [-100] * n_prompt
        return {"input_ids": full, "labels": labels}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set or self.val_set:
            return
        if self.tokenizer_name is None:
            raise InvalidValueError("InstructionData needs a tokenizer (name or path)")
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        records = read_records(self.path, self.split)[: self.limit]
        if self.val_size >= len(records):
            raise InvalidValueError(f"val_size={self.val_size} leaves no training data out of {len(records)} records")
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.seed)).tolist()
        encoded = [self.encode(records[i]) for i in order]
        # an example whose prompt fills cutoff_len has no response token to learn from (its loss would be 0/0)
        encoded = [e for e in encoded if any(label != -100 for label in e["labels"])]
        if len(encoded) <= self.val_size:
            raise InvalidValueError(f"only {len(encoded)} of {len(records)} examples keep response tokens within "
                             f"cutoff_len={self.cutoff_len}: raise cutoff_len or lower val_size")
        self.val_set, self.train_set = encoded[: self.val_size], encoded[self.val_size:]
        if self.distill_text is not None:
            from slimflow.data.calibration import calibration_ids

            windows = calibration_ids(self.distill_text, self.tokenizer, num_samples=len(self.train_set),
                                      seqlen=self.distill_seqlen, seed=self.seed, sampling=self.distill_sampling,
                                      skip_tokens=self.distill_skip_tokens)
            self.train_set = [e | {"distill_input_ids": w} for e, w in zip(self.train_set, windows)]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=EpochSeededSampler(len(self.train_set), self.seed),
                          collate_fn=pad_collate(self.pad_id), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, collate_fn=pad_collate(self.pad_id),
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class CalibrationData(LightningDataModule):
    """Calibration sequences `[num_samples, seqlen]` drawn with `slimflow.data.calibration.calibration_ids`.

    Args:
        source: local text/.gz/.json/.jsonl/.parquet path or hub dataset name (`allenai/c4`, alias `c4`, ...).
        tokenizer: tokenizer name or path (or a tokenizer object).
        num_samples: number of sequences.
        seqlen: tokens per sequence.
        seed: seed of the window offsets.
        skip_tokens: tokens skipped at the start of the text (keep clear of an evaluation prefix).
        batch_size: sequences per batch of `train_dataloader`.
    """

    def __init__(self, source: str = "c4", tokenizer: str | None = None, num_samples: int = 128, seqlen: int = 2048,
                 seed: int = 0, skip_tokens: int = 0, batch_size: int = 8):
        super().__init__()
        require_existing(source, "calibration source")
        self.source, self.tokenizer = source, tokenizer
        self.num_samples, self.seqlen, self.seed, self.skip_tokens = num_samples, seqlen, seed, skip_tokens
        self.batch_size = batch_size
        self._ids: torch.Tensor | None = None
        self._scoring: torch.Tensor | None = None

    def ids(self, tokenizer=None) -> torch.Tensor:
        """The calibration tensor (drawn once, then cached)."""
        if self._ids is None:
            from slimflow.data.calibration import calibration_ids

            tokenizer = load_tokenizer(tokenizer if tokenizer is not None else self.tokenizer)
            self._ids = calibration_ids(self.source, tokenizer, num_samples=self.num_samples, seqlen=self.seqlen,
                                        seed=self.seed, skip_tokens=self.skip_tokens)
        return self._ids

    def scoring_ids(self, tokenizer=None) -> torch.Tensor | None:
        """Windows of the source that no calibration sequence overlaps (`slimflow.api.scoring_windows`; drawn
        once; None where the source has none): what the adaptive schedule scores its candidates on."""
        if self._scoring is None:
            from slimflow.api import scoring_windows
            from slimflow.data.calibration import scoring_ids

            calibration = self.ids(tokenizer)
            tokenizer = load_tokenizer(tokenizer if tokenizer is not None else self.tokenizer)
            self._scoring = scoring_ids(self.source, tokenizer, scoring_windows(self.seqlen), self.seqlen, self.seed,
                                        self.skip_tokens, avoid=calibration)
        return self._scoring

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ids(), batch_size=self.batch_size)


class TextEvalData(LightningDataModule):
    """Held-out text cut into non-overlapping windows (the perplexity protocol of `slimflow.evaluation`), for
    `slimflow validate` / `slimflow test`: each batch is `{"input_ids": [B, seqlen]}`.

    Args:
        source: a local text file (.txt/.gz/.json/.jsonl/.parquet) or a preset (`wikitext2`, `c4`, `ptb`).
        tokenizer: tokenizer name or path.
        seqlen: window length.
        max_tokens: keep only the first tokens of the tokenised text (e.g. 400000).
        max_windows: keep only the first windows.
        batch_size: windows per batch.
    """

    def __init__(self, source: str = "wikitext2", tokenizer: str | None = None, seqlen: int = 128,
                 max_tokens: int | None = None, max_windows: int | None = None, batch_size: int = 8):
        super().__init__()
        require_existing(source, "evaluation text")
        self.source, self.tokenizer = source, tokenizer
        self.seqlen, self.max_tokens, self.max_windows, self.batch_size = seqlen, max_tokens, max_windows, batch_size
        self.windows: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.windows is not None:
            return
        from slimflow.evaluation.perplexity import load_texts, tokenize_texts

        self.tokenizer = load_tokenizer(self.tokenizer)
        ids = tokenize_texts(self.tokenizer, load_texts(self.source)[0])[: self.max_tokens]
        n = len(ids) // self.seqlen if self.max_windows is None else min(len(ids) // self.seqlen, self.max_windows)
        self.windows = ids[: n * self.seqlen].view(n, self.seqlen)

    def _loader(self) -> DataLoader:
        return DataLoader([{"input_ids": w} for w in self.windows], batch_size=self.batch_size)

    val_dataloader = test_dataloader = _loader
