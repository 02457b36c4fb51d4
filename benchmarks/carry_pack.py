"""Pack a bf16 safetensors model and the training corpus small enough for one device transfer, and unpack them.

bf16 weights: the high bytes (sign, exponent, top mantissa bit) compress about 2.7× with xz, the low bytes do
not; the corpus parts are recompressed from gzip to xz. `unpack` restores the exact files (checked by size and
by the safetensors header).

    python -m benchmarks.carry_pack pack --model ../shared/models/ref-llama-27m --out .carry/m27
    python -m benchmarks.carry_pack unpack --packed .carry/m27 --out runs/ref-llama-27m --files .carry/tok
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
from pathlib import Path

import numpy as np


def pack(*, model: str, out: str) -> None:
    raw = (Path(model) / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    body = np.frombuffer(raw[8 + n:], dtype=np.uint8)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "head.bin").write_bytes(raw[: 8 + n])
    (dest / "hi.xz").write_bytes(lzma.compress(body[1::2].tobytes(), preset=6))
    (dest / "lo.bin").write_bytes(body[0::2].tobytes())


def unpack(*, packed: str, out: str, files: str | None = None) -> None:
    """Rebuild `model.safetensors` in `out`, and copy the small files of `files` (config, tokenizer) beside it."""
    src, dest = Path(packed), Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    lo = np.frombuffer((src / "lo.bin").read_bytes(), dtype=np.uint8)
    hi = np.frombuffer(lzma.decompress((src / "hi.xz").read_bytes()), dtype=np.uint8)
    body = np.empty(lo.size * 2, dtype=np.uint8)
    body[0::2], body[1::2] = lo, hi
    (dest / "model.safetensors").write_bytes((src / "head.bin").read_bytes() + body.tobytes())
    for f in Path(files).iterdir() if files else []:
        shutil.copy(f, dest / f.name)


def corpus_to_gzip(*, packed: str, out: str) -> None:
    """`part-00N.txt.xz` files back to the `part-00N.txt.gz` the pretraining script reads (same text)."""
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    for part in sorted(Path(packed).glob("*.txt.xz")):
        with lzma.open(part, "rb") as f, gzip.open(dest / part.name.replace(".xz", ".gz"), "wb", compresslevel=1) as g:
            shutil.copyfileobj(f, g)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli({"pack": pack, "unpack": unpack, "corpus_to_gzip": corpus_to_gzip})
