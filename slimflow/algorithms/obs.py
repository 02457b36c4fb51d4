"""Optimal-Brain-Surgeon removal of input columns of a linear layer, and the matching inverse downdate.

Conventions: `W` is `[d_out, d_in]` (`y = W x`), `H` the `[d_in, d_in]` input Hessian, `G = H⁻¹`.
Removing the column set M with joint compensation of the survivors:

    ΔW = −W[:, M] (G_MM)⁻¹ G[M, :]          error E_M = ½ tr(W[:, M] (G_MM)⁻¹ W[:, M]ᵀ)

After removal the inverse Hessian of the survivors is the Schur complement
`G_SS − G_SM (G_MM)⁻¹ G_MS = (H_SS)⁻¹`, so no fresh inversion is needed.
"""

from __future__ import annotations

import torch


class SingularHessianError(RuntimeError):
    pass


def condition_hessian(hessian: torch.Tensor, weight: torch.Tensor | None = None, damp: float = 0.01):
    """Dead inputs get unit diagonal (and a zero weight column); then `H += damp·mean(diag H)·I`.

    Returns the conditioned copy of H and the boolean mask of dead inputs. `weight` is edited in place.
    """
    h = hessian.clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    if dead.any():
        diag[dead] = 1.0
        if weight is not None:
            weight[:, dead] = 0
    if damp > 0:
        diag += damp * diag.mean()
    return h, dead


def invert_hessian(hessian: torch.Tensor, damp: float = 0.01, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """`H⁻¹` through Cholesky, raising the damping tenfold (from at least 1e-4) while H is not positive definite.

    Returns `(G, damping_added)`. `hessian` should already carry the base damping from `condition_hessian`.
    """
    extra = 0.0
    mean_diag = torch.diagonal(hessian).mean()
    for attempt in range(max_tries):
        h = hessian if extra == 0 else hessian + extra * mean_diag * torch.eye(
            hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return torch.cholesky_inverse(chol), extra
        extra = max(damp, 1e-4) * 10 ** (attempt + 1)
    raise SingularHessianError(
        "the input Hessian stays singular even after raising the damping to "
        f"{extra:g}·mean(diag H): use more or longer calibration sequences (--num-samples / --seqlen) "
        "or a larger --damp."
    )


def refit_to_dense(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
                   damp: float = 0.01) -> torch.Tensor:
    """The weight that best reproduces the dense model's outputs from the pruned model's inputs.

    Minimises `‖W' X − W X̂‖²` (+ damping) over `W'`, where `X` are this projection's inputs in the partly
    pruned model and `X̂` the dense model's inputs for the same tokens: `W' = W C (H + λ·mean(diag H)·I)⁻¹` with
    `H = XᵀX`, `C = X̂ᵀX` (both with the accumulator's 2/n scale). With `X = X̂` it returns `W` up to the damping.
    OBS removal then starts from `W'`: its quadratic error around `W'` is exactly the increase of that objective.
    """
    h, dead = condition_hessian(hessian, None, damp)
    rhs = (weight @ cross).t()  # [d_in, d_out]
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            refit = torch.cholesky_solve(rhs, chol).t()
            refit[:, dead] = 0
            return refit
        h = h + max(damp, 1e-4) * 10 ** (attempt + 1) * torch.diagonal(h).mean() * torch.eye(
            h.shape[0], device=h.device, dtype=h.dtype)
    raise SingularHessianError("the input Hessian stays singular while refitting to the dense outputs: use more or "
                               "longer calibration sequences or turn correct_drift off")


def obs_remove(weight: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Remove input columns `cols` of `weight` with joint OBS compensation.

    Returns `(new_weight, error)` where `new_weight[:, cols] == 0` and
    `error = ½ tr(W_M (G_MM)⁻¹ W_Mᵀ)` is the increase of `½ tr(ΔW H ΔWᵀ)`.
    """
    w_m = weight[:, cols]
    g_mm = hinv[cols][:, cols]
    chol = torch.linalg.cholesky(g_mm)
    # coef = W_M (G_MM)⁻¹, via two triangular solves on the transposed system
    coef = torch.cholesky_solve(w_m.t(), chol).t()
    new_weight = weight - coef @ hinv[cols, :]
    new_weight[:, cols] = 0
    error = 0.5 * float((coef * w_m).sum())
    return new_weight, error


def downdate_inverse(hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The inverse Hessian after deleting `cols`: Schur complement on the survivors, unit rows/cols at `cols`.

    Equals re-inverting H with rows/columns `cols` replaced by the identity (tested).
    """
    g_mm = hinv[cols][:, cols]
    chol = torch.linalg.cholesky(g_mm)
    g_m = hinv[cols, :]
    new = hinv - g_m.t() @ torch.cholesky_solve(g_m, chol)
    new[cols, :] = 0
    new[:, cols] = 0
    new[cols, cols] = 1
    return new


def remove_and_downdate(weight: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor):
    """`obs_remove` and `downdate_inverse` in one step, for the greedy loops: one Cholesky of `G_MM` serves both,
    and nothing is read back to the host (no device sync), so GPU loops run without stalls.

    Returns `(new_weight, error, new_hinv, info)`: `error` is a 0-dim tensor, `info` the Cholesky status
    (non-zero: `G_MM` not positive definite; check it once after the loop with `check_cholesky`).
    """
    g_m = hinv[cols, :]
    chol, info = torch.linalg.cholesky_ex(g_m[:, cols])
    w_m = weight[:, cols]
    coef = torch.cholesky_solve(w_m.t(), chol).t()
    new_weight = weight - coef @ g_m
    new_weight[:, cols] = 0
    error = 0.5 * (coef * w_m).sum()
    new = hinv - g_m.t() @ torch.cholesky_solve(g_m, chol)
    new[cols, :] = 0
    new[:, cols] = 0
    new[cols, cols] = 1
    return new_weight, error, new, info


def check_cholesky(info: torch.Tensor, what: str = "inverse Hessian block") -> None:
    """Raise if any Cholesky status collected by a loop is non-zero (one host sync for the whole loop)."""
    if bool((info != 0).any()):
        raise SingularHessianError(
            f"the {what} lost positive definiteness during removal: raise the damping (--damp) or use more "
            "calibration data (--num-samples / --seqlen)."
        )


def obs_remove_sequential(weight: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Column-by-column elimination with the upper Cholesky factor of the permuted G (reference form).

    Mathematically equal to `obs_remove`; kept as an independent check in the tests.
    """
    d = weight.shape[1]
    rest = torch.tensor([i for i in range(d) if i not in set(cols.tolist())], dtype=torch.long, device=cols.device)
    perm = torch.cat([cols, rest])
    w = weight[:, perm].clone()
    g = hinv[perm][:, perm]
    u = torch.linalg.cholesky(g, upper=True)
    k = len(cols)
    e = torch.zeros(w.shape[0], k, dtype=w.dtype, device=w.device)
    for i in range(k):
        e[:, i] = w[:, i] / u[i, i]
        w[:, i:k] -= torch.outer(e[:, i], u[i, i:k])
    w[:, k:] -= e @ u[:k, k:]
    w[:, :k] = 0
    out = torch.empty_like(w)
    out[:, perm] = w
    return out, 0.5 * float((e * e).sum())


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """`½ tr(ΔW H ΔWᵀ)`: the mean squared output change per calibration sequence for `H = (2/n) Σ XXᵀ`."""
    return 0.5 * float(((delta @ hessian) * delta).sum())
