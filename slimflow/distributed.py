"""Data-parallel calibration: each process of a `torch.distributed` group feeds its share of the calibration
sequences through the model, the statistics are summed over the group, and every process applies rank 0's
decisions.

`DataParallel` is the one object the engine and the methods talk to. With one process (`DataParallel.local()`,
the default) every step is a no-op, so the single-process path stays bit-for-bit what it was.

The running-mean Hessian `H = (2/n)·Σ_s X_s X_sᵀ` of rank r covers its own `n_r` sequences, so the group's
Hessian is `Σ_r n_r H_r / Σ_r n_r`; sums and token counts add up. Decisions (removed units, compensated weights,
biases) are computed on every rank from the same reduced statistics, then overwritten with rank 0's by a
broadcast, so the ranks end with identical models even where kernels are not bit-deterministic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class DataParallel:
    """The processes that share one calibration set (all of the default group unless `group` is given)."""

    def __init__(self, group=None, *, local: bool = False):
        self.group = group
        self.rank = 0 if local else dist.get_rank(group)
        self.world = 1 if local else dist.get_world_size(group)
        self.backend = None if local else dist.get_backend(group)

    @classmethod
    def local(cls) -> "DataParallel":
        return cls(local=True)

    @property
    def active(self) -> bool:
        return self.world > 1

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world={self.world}, backend={self.backend})"

    # ------------------------------------------------------------------------------------------ data
    def shard(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the rows of `ids` (shares differ by at most one row)."""
        if not self.active:
            return ids
        if ids.shape[0] < self.world:
            raise ValueError(f"{ids.shape[0]} calibration sequences cannot be shared by {self.world} processes: "
                             f"use at least {self.world} sequences")
        return ids.tensor_split(self.world)[self.rank]

    def check_same(self, ids: torch.Tensor) -> None:
        """Refuse calibration sets that differ between ranks (each rank must pass the full, same set)."""
        if not self.active:
            return
        flat = ids.reshape(-1).to(torch.float64)
        digest = (tuple(ids.shape), float(flat.sum()), float((flat * torch.arange(1, flat.numel() + 1,
                                                                                   dtype=torch.float64)).sum()))
        digests = [None] * self.world
        dist.all_gather_object(digests, digest, group=self.group)
        if any(d != digests[0] for d in digests):
            raise ValueError("the calibration sequences differ between processes: draw them with the same source, "
                             "seed and tokenizer on every rank (slimflow shards them itself)")

    # ------------------------------------------------------------------------------------------ collectives
    def _staged(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` where the backend can use it: CUDA for NCCL, CPU for gloo."""
        if self.backend == "nccl" and not tensor.is_cuda:
            return tensor.to(torch.device("cuda", torch.cuda.current_device()))
        if self.backend == "gloo" and tensor.device.type != "cpu":
            return tensor.cpu()
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce `tensor` in place (sum over the ranks)."""
        if self.active:
            staged = self._staged(tensor)
            dist.all_reduce(staged, group=self.group)
            if staged is not tensor:
                tensor.copy_(staged)
        return tensor

    def sum_numbers(self, *values: float) -> list[float]:
        """Sums over the ranks of Python numbers (exact for integers below 2⁵³)."""
        if not self.active:
            return list(values)
        return self.sum_(torch.tensor(values, dtype=torch.float64)).tolist()

    def weighted_mean(self, value: float, weight: float) -> float:
        """The group's mean of a per-rank mean `value` over `weight` items (e.g. a token-mean loss)."""
        if not self.active:
            return value
        total, count = self.sum_numbers(value * weight, weight)
        return total / max(count, 1)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.active:
            staged = self._staged(tensor)
            dist.broadcast(staged, src, group=self.group)
            if staged is not tensor:
                tensor.copy_(staged)
        return tensor

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src, group=self.group)
        return box[0]

    # ------------------------------------------------------------------------------------------ statistics
    def reduce_hessian(self, acc) -> None:
        """Combine a `HessianAccumulator` over the ranks: sequence-weighted mean of H, summed `Σx` and counts."""
        if not self.active:
            return
        acc.hessian.mul_(acc.num_sequences)
        self.sum_(acc.hessian)
        if acc.cross is not None:
            acc.cross.mul_(acc.num_sequences)
            self.sum_(acc.cross)
        self.sum_(acc.sum)
        sequences, tokens = self.sum_numbers(acc.num_sequences, acc.num_tokens)
        acc.num_sequences, acc.num_tokens = int(sequences), int(tokens)
        acc.hessian.div_(max(acc.num_sequences, 1))
        if acc.cross is not None:
            acc.cross.div_(max(acc.num_sequences, 1))

    # ------------------------------------------------------------------------------------------ decisions
    def broadcast_decision(self, decision):
        """Overwrite this rank's `Decision` with rank 0's (removed units, weight, bias, damping, cost)."""
        if not self.active:
            return decision
        meta = (decision.removed, decision.damping_added, getattr(decision, "cost", None),
                decision.bias is not None)
        removed, damping, cost, has_bias = self.broadcast_object(meta)
        if has_bias != (decision.bias is not None):
            raise RuntimeError("ranks disagree on whether the method writes a bias")
        decision.removed, decision.damping_added = list(removed), damping
        if cost is not None:
            decision.cost = cost
        self.broadcast_(decision.weight)
        if decision.bias is not None:
            self.broadcast_(decision.bias)
        return decision

    def broadcast_decisions(self, decisions: dict, weight_of) -> dict:
        """`{layer: (head Decision | None, channel Decision | None)}` of rank 0 on every rank.

        `weight_of(layer, kind)` gives the projection weight (kind 0: o_proj, 1: down_proj), used to allocate a
        receiving Decision where this rank chose none."""
        if not self.active:
            return decisions
        from slimflow.methods.base import Decision

        plan = self.broadcast_object({i: tuple(d is not None for d in pair) for i, pair in decisions.items()})
        out = {}
        for i in sorted(plan):
            pair = list(decisions.get(i, (None, None)))
            for kind, present in enumerate(plan[i]):
                if not present:
                    pair[kind] = None
                    continue
                if pair[kind] is None:
                    pair[kind] = Decision([], torch.empty_like(weight_of(i, kind), dtype=torch.float32))
                pair[kind] = self.broadcast_decision(pair[kind])
            out[i] = tuple(pair)
        return out


def resolve(data_parallel: bool | None = None, group=None) -> DataParallel:
    """The `DataParallel` of a pruning call: None means the (given or default) process group when
    `torch.distributed` is initialised with more than one process, else a single process."""
    initialised = dist.is_available() and dist.is_initialized()
    if data_parallel is None:
        data_parallel = initialised and dist.get_world_size(group) > 1
    if not data_parallel:
        return DataParallel.local()
    if not initialised:
        raise ValueError("data_parallel=True needs an initialised torch.distributed process group: call "
                         "torch.distributed.init_process_group first (torchrun and Lightning's DDP/FSDP do)")
    return DataParallel(group)
