"""The tokenizer of a Hugging Face fast tokenizer as llama.cpp's GGUF vocabulary (`tokenizer.ggml.*`).

Two tokenizer kinds are written, both read from the `tokenizers` JSON of the model:

- byte-level BPE (GPT-2, LLaMA-3, Qwen2, the slimflow reference model): `tokenizer.ggml.model = gpt2`, the
  vocabulary in its byte-to-unicode spelling, the merges, and `tokenizer.ggml.pre` naming the pre-tokenizer
  regex llama.cpp must split with (it only knows the ones listed in `_SPLIT_PATTERNS`);
- SentencePiece-style BPE with byte fallback (LLaMA-2, Mistral): `tokenizer.ggml.model = llama`. llama.cpp's
  SPM tokenizer merges the adjacent pair whose merged piece has the highest score, so each piece scores minus
  the rank of the merge that produces it, which reproduces the BPE merge order.

Anything else is refused with a message naming the tokenizer, rather than written and silently mis-tokenised.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from gguf import GGUFWriter, TokenType

from slimflow.errors import SlimflowUserError

# The Split regexes of known byte-level BPE tokenizers -> llama.cpp's pre-tokenizer name (src/llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PATTERNS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_IGNORES_MERGES = ("llama-bpe",)
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class UnsupportedTokenizerError(SlimflowUserError, ValueError):
    pass


@dataclass
class GGUFVocab:
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def vocab_from_tokenizer(tokenizer, n_vocab: int) -> GGUFVocab:
    """The GGUF vocabulary of a `transformers` fast tokenizer, padded to the model's `n_vocab` embedding rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizerError(
            f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer with a tokenizer.json; GGUF export "
            "reads the vocabulary and merges from tokenizer.json")
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedTokenizerError(
            f"GGUF export supports BPE tokenizers only; this tokenizer's model is {model.get('type')!r}")
    if model.get("byte_fallback"):
        kind, pre, add_space_prefix = "llama", "default", _spm_space_prefix(data)
    else:
        kind, pre, add_space_prefix = "gpt2", _byte_level_pre(data), None
        # llama.cpp ties "look a whole pre-tokenized word up before merging" to the pre-tokenizer name
        implied = pre in _IGNORES_MERGES
        if bool(model.get("ignore_merges", False)) != implied:
            raise UnsupportedTokenizerError(
                f"the tokenizer has ignore_merges={bool(model.get('ignore_merges'))}, but llama.cpp's {pre!r} "
                f"pre-tokenizer {'always' if implied else 'never'} looks whole words up before merging")

    pieces: dict[int, str] = {int(i): piece for piece, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in data.get("added_tokens") or []}
    for token_id, token in added.items():
        pieces[token_id] = token["content"]
    if max(pieces) >= n_vocab:
        raise UnsupportedTokenizerError(
            f"the tokenizer has token id {max(pieces)} but the model has only {n_vocab} embedding rows")

    special = {i for i, t in added.items() if t.get("special")}
    unk_id = getattr(tokenizer, "unk_token_id", None)
    tokens, types = [], []
    for token_id in range(n_vocab):
        piece = pieces.get(token_id)
        if piece is None:  # embedding rows beyond the tokenizer (vocab padded to a multiple)
            tokens.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(piece)
        if token_id in special:
            types.append(TokenType.UNKNOWN if token_id == unk_id and kind == "llama" else TokenType.CONTROL)
        elif token_id in added:
            types.append(TokenType.USER_DEFINED)
        elif kind == "llama" and _BYTE_PIECE.fullmatch(piece):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)

    merges = _merge_strings(model.get("merges") or [])
    scores = _spm_scores(tokens, merges) if kind == "llama" else None
    add_bos, add_eos = _added_special_tokens(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    return GGUFVocab(
        model=kind, pre=pre, tokens=tokens, types=[int(t) for t in types], scores=scores,
        merges=merges if kind == "gpt2" else [], special_ids=_special_ids(tokenizer, n_vocab),
        add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix,
        chat_template=template if isinstance(template, str) else None,
    )


def _byte_level_pre(data: dict) -> str:
    normalizer = data.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise UnsupportedTokenizerError(
            f"the byte-level BPE tokenizer has a {normalizer.get('type')} normalizer, which llama.cpp does not apply")
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in _SPLIT_PATTERNS:
            return _SPLIT_PATTERNS[pattern]
        raise UnsupportedTokenizerError(
            f"the tokenizer splits text with a regex llama.cpp has no pre-tokenizer for ({pattern!r}); "
            f"known: GPT-2, LLaMA-3, Qwen2")
    raise UnsupportedTokenizerError(
        f"unsupported pre-tokenizer {kinds} for a byte-level BPE tokenizer; known: GPT-2, LLaMA-3, Qwen2")


def _spm_space_prefix(data: dict) -> bool:
    """Whether the SentencePiece-style tokenizer puts "▁" before the text (normalizer Prepend or Metaspace)."""
    normalizer = data.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    if any(s.get("type") == "Prepend" and s.get("prepend") == "▁" for s in steps):
        return True
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps)


def _merge_strings(merges: list) -> list[str]:
    """Merges as `"left right"` strings; a space inside a piece is written as U+0120 + 256, as llama.cpp reads it."""
    out = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
        else:
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in merge))
    return out


def _spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    rank = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), i)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _special_ids(tokenizer, n_vocab: int) -> dict[str, int]:
    out = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            out[kind] = token_id
    return out


def _added_special_tokens(tokenizer) -> tuple[bool, bool]:
    """(add BOS, add EOS) as the tokenizer itself does it: compare an encoding with and without special tokens."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos
