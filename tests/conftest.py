"""Shared test setup. Tiny models live in `tests/tiny_models.py` (`from tiny_models import tiny_model`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# The test models are tiny: extra intra-op threads only add synchronisation cost, which on a busy machine turns
# a millisecond forward pass into most of a second.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE_MODEL = SHARED / "models" / "ref-llama-27m"
HELD_OUT_TEXT = SHARED / "pretrain_corpus" / "part-007.txt.gz"


def require_shared(path: Path) -> Path:
    """Integration tests need ../shared beside the clone. In CI its absence is a failure, not a skip."""
    import os

    import pytest

    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run with ../shared beside the clone")
        pytest.skip(f"needs {path} (the shared reference data beside the clone)")
    return path
