"""Shared test setup. Tiny models live in `tests/tiny_models.py` (`from tiny_models import tiny_model`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# The test models are tiny: extra intra-op threads only add synchronisation cost, which on a busy machine turns
# a millisecond forward pass into most of a second.
torch.set_num_threads(1)
