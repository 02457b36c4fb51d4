"""Streaming input statistics of a linear layer: H = (2/n)·Σ_s X_s X_sᵀ as a running mean over sequences."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates `H = (2/n) Σ_s X_s X_sᵀ` (n = sequences seen), `Σ x` and the token count.

    Inputs of shape `[batch, seq, d]` (or `[batch, d]`) count `batch` sequences. Accumulation is in
    `dtype` (fp32 by default). bf16/fp16 inputs on CUDA with an fp32 accumulator go through one bf16/fp16
    tensor-core GEMM with fp32 output: products of 8/11-bit mantissas are exact in fp32 and the sums are fp32,
    so this equals the fp32 GEMM on the upcast inputs up to summation order (docs/performance.md). Everything
    else is upcast to `dtype` first; fp32 GEMMs follow torch's TF32 setting (off by default).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.dim = dim
        self.dtype = dtype
        self.hessian = torch.zeros(dim, dim, device=device, dtype=dtype)
        self.sum = torch.zeros(dim, device=device, dtype=dtype)
        self.num_sequences = 0
        self.num_tokens = 0
        # `C = (2/n) Σ_s X̂_sᵀ X_s` with X̂ the dense model's inputs of the same tokens (drift correction only)
        self.cross: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """Add the inputs `x` of a batch; `dense` (same shape) are the dense model's inputs for the same tokens."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected inputs with last dim {self.dim}, got {tuple(x.shape)}")
        batch = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, self.dim).to(device=self.hessian.device)
        total = self.num_sequences + batch
        if dense is not None:
            d = dense.reshape(-1, self.dim).to(device=self.hessian.device, dtype=self.dtype)
            if self.cross is None:
                self.cross = torch.zeros_like(self.hessian)
            self.cross.mul_(self.num_sequences / total)
            self.cross.addmm_(d.t(), x.to(self.dtype), alpha=2.0 / total)
        if _tensor_core_exact(x, self.hessian):
            self.hessian = torch.addmm(self.hessian, x.t(), x, out_dtype=self.dtype,
                                       beta=self.num_sequences / total, alpha=2.0 / total)
            self.sum += x.sum(0, dtype=self.dtype)
        else:
            x = x.to(self.dtype)
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


def _tensor_core_exact(x: torch.Tensor, acc: torch.Tensor) -> bool:
    """True where a half-precision GEMM with fp32 output gives the fp32 result (inputs already bf16/fp16)."""
    return (x.is_cuda and acc.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)
            and hasattr(torch.ops.aten.addmm, "dtype"))
