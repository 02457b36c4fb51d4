"""SlimGPT structured selection with OBS compensation: greedy head units, Dynamic Group Size FFN channels.

All functions take the fp32/fp64 weight of the *owning* projection (`o_proj` for heads, `down_proj` for
channels) and the inverse Hessian of its inputs, and return the compensated weight (removed columns zero),
the removed indices in removal order, the updated inverse, and the summed OBS error.
"""

from __future__ import annotations

import torch

from slimflow.algorithms.obs import check_cholesky, remove_and_downdate


def diagonal_blocks(matrix: torch.Tensor, block: int) -> torch.Tensor:
    """The `[n, block, block]` diagonal blocks of a `[n·block, n·block]` matrix."""
    n = matrix.shape[0] // block
    return matrix.reshape(n, block, n, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def head_scores(weight: torch.Tensor, hinv: torch.Tensor, unit_size: int, exact: bool = True) -> torch.Tensor:
    """OBS error of removing each unit (a block of `unit_size` contiguous input columns) on its own.

    One batched Cholesky `C_h Cₕᵀ = G[B_h, B_h]` over all units. `exact=True` gives the true joint error
    `½‖C_h⁻¹ W[:, B_h]ᵀ‖²`; `exact=False` the grouped-Cholesky diagonal approximation
    `½ Σ_j ‖W[:, j]‖² / (C_h)_jj²` of the SlimGPT paper.
    """
    scores, info = _head_scores(weight, hinv, unit_size, exact)
    check_cholesky(info, "inverse Hessian head block")
    return scores


def _head_scores(weight: torch.Tensor, hinv: torch.Tensor, unit_size: int, exact: bool):
    """`head_scores` and the batched Cholesky status, without a host sync."""
    d_out, d_in = weight.shape
    n = d_in // unit_size
    chol, info = torch.linalg.cholesky_ex(diagonal_blocks(hinv, unit_size))
    w_blocks = weight.reshape(d_out, n, unit_size).permute(1, 2, 0)  # [n, unit, d_out]
    if exact:
        solved = torch.linalg.solve_triangular(chol, w_blocks, upper=False)
        return 0.5 * solved.pow(2).sum(dim=(1, 2)), info
    denom = torch.diagonal(chol, dim1=1, dim2=2).pow(2)  # [n, unit]
    return 0.5 * (w_blocks.pow(2).sum(-1) / denom).sum(-1), info


def prune_head_units(
    weight: torch.Tensor, hinv: torch.Tensor, unit_size: int, n_remove: int, exact: bool = True
) -> tuple[torch.Tensor, list[int], torch.Tensor, float]:
    """Greedy: score all live units, remove the cheapest with joint OBS compensation, downdate, repeat."""
    n_units = weight.shape[1] // unit_size
    if not 0 <= n_remove < n_units:
        raise ValueError(f"cannot remove {n_remove} of {n_units} head units (at least one must stay)")
    # Everything stays on the device inside the loop (no host syncs); one read-back at the end.
    alive = torch.ones(n_units, dtype=torch.bool, device=weight.device)
    offsets = torch.arange(unit_size, device=weight.device)
    units, total, info = [], weight.new_zeros(()), torch.zeros((), dtype=torch.int32, device=weight.device)
    for _ in range(n_remove):
        scores, bad = _head_scores(weight, hinv, unit_size, exact=exact)
        unit = torch.argmin(scores.masked_fill(~alive, float("inf")))
        weight, err, hinv, bad_m = remove_and_downdate(weight, hinv, unit * unit_size + offsets)
        alive[unit] = False
        units.append(unit)
        total = total + err
        info = info | bad.abs().amax() | bad_m.abs()
    check_cholesky(info)
    removed = torch.stack(units).tolist() if units else []
    return weight, removed, hinv, float(total)


def dgs_group_sizes(total: int, floor: int = 64, cap: int = 1024) -> list[int]:
    """Dynamic Group Size: big groups first, halving towards `floor` (sizes sum to `total`)."""
    sizes, done, b = [], 0, (total - 512) // 2
    while done < total:
        cnt = min(total - done, max(b, floor), cap)
        sizes.append(cnt)
        done += cnt
        b = (b - 512) // 2
    return sizes


def prune_channels_dgs(
    weight: torch.Tensor, hinv: torch.Tensor, n_remove: int, floor: int = 64, cap: int = 1024
) -> tuple[torch.Tensor, list[int], torch.Tensor, float]:
    """Remove `n_remove` input columns in Dynamic-Group-Size steps; each step drops the `cnt` columns with the
    smallest single-column OBS error `½‖W[:, j]‖² / G_jj` jointly, then downdates G."""
    d_in = weight.shape[1]
    if not 0 <= n_remove < d_in:
        raise ValueError(f"cannot remove {n_remove} of {d_in} channels (at least one must stay)")
    alive = torch.ones(d_in, dtype=torch.bool, device=weight.device)
    groups, total, info = [], weight.new_zeros(()), torch.zeros((), dtype=torch.int32, device=weight.device)
    for cnt in dgs_group_sizes(n_remove, floor, cap) if n_remove else []:
        scores = 0.5 * weight.pow(2).sum(0) / torch.diagonal(hinv)
        scores.masked_fill_(~alive, float("inf"))
        cols = torch.topk(scores, cnt, largest=False).indices.sort().values
        weight, err, hinv, bad = remove_and_downdate(weight, hinv, cols)
        alive[cols] = False
        groups.append(cols)
        total = total + err
        info = info | bad.abs()
    check_cholesky(info)
    removed = torch.cat(groups).tolist() if groups else []
    return weight, removed, hinv, float(total)
