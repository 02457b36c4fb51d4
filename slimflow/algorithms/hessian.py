"""Streaming input statistics of a linear layer: H = (2/n)·Σ_s X_s X_sᵀ as a running mean over sequences."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates `H = (2/n) Σ_s X_s X_sᵀ` (n = sequences seen), `Σ x` and the token count.

    Inputs of shape `[batch, seq, d]` (or `[batch, d]`) count `batch` sequences. Accumulation is in
    `dtype` (fp32 by default). `tf32=False` keeps the products in full fp32 on GPUs; see docs/performance.md.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.dim = dim
        self.dtype = dtype
        self.hessian = torch.zeros(dim, dim, device=device, dtype=dtype)
        self.sum = torch.zeros(dim, device=device, dtype=dtype)
        self.num_sequences = 0
        self.num_tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected inputs with last dim {self.dim}, got {tuple(x.shape)}")
        batch = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, self.dim).to(device=self.hessian.device, dtype=self.dtype)
        total = self.num_sequences + batch
        self.hessian.mul_(self.num_sequences / total)
        self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.sum += x.sum(0)
        self.num_sequences = total
        self.num_tokens += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.num_tokens, 1)

    def check_finite(self, where: str = "") -> None:
        if not torch.isfinite(self.hessian).all():
            raise FloatingPointError(
                f"non-finite values in the input Hessian{' of ' + where if where else ''}: the calibration "
                "activations overflowed. Run the model in float32 or bfloat16 instead of float16, or check "
                "the model weights for inf/nan."
            )
