"""Data-parallel calibration (`slimflow.distributed`): 2 processes over gloo against 1 process on the same data.

The 2-process run shares 7 calibration sequences as 4 + 3 (uneven on purpose: the Hessians must be combined
weighted by sequence count). Every method must keep exactly the units of the single-process run, with weights
equal within float32 summation-order tolerance, and the two ranks must end bit-identical.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tiny_models import VOCAB, tiny_model

METHODS = {
    "slimgpt": {},
    "magnitude": {},
    "wanda-sp": {},
    "flap": {},
    "taylor": {},
    "slimllm": {},
    "llm-surgeon": {"shots": 2},
    "slimgpt+sampled": {},  # slimgpt with 3 sequences sampled from the model (rank 0 samples, all ranks use them)
}
RATIO = 0.3
WORLD = 2


def calibration() -> torch.Tensor:
    return torch.randint(3, VOCAB, (7, 24), generator=torch.Generator().manual_seed(3))


def prune_one(method: str):
    import slimflow

    model = tiny_model("llama_gqa", seed=1)
    sampled = {"generated_samples": 3, "seed": 5} if method.endswith("+sampled") else {}
    report = slimflow.prune(model, calibration(), ratio=RATIO, method=method.removesuffix("+sampled"),
                            method_kwargs=METHODS[method], batch_size=2, device="cpu", progress=False, **sampled)
    kept = [[r.kept_units, r.kept_channels] for r in report.layers]
    return kept, {k: v.detach().clone() for k, v in model.state_dict().items()}, report


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for method in METHODS:
            kept, state, report = prune_one(method)
            assert report.settings["data_parallel"] == WORLD
            save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/{method}.rank{rank}.safetensors")
            with open(f"{out}/{method}.rank{rank}.json", "w") as f:
                json.dump(kept, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    # fork: the children inherit the imported modules (spawn would re-import torch and transformers)
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method="fork")
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_equal_one_process(two_processes, method):
    from safetensors.torch import load_file

    kept, state, report = prune_one(method)
    assert report.settings["data_parallel"] == 1
    ranks = [load_file(two_processes / f"{method}.rank{r}.safetensors") for r in range(WORLD)]
    for r in range(WORLD):
        assert json.loads((two_processes / f"{method}.rank{r}.json").read_text()) == kept, f"rank {r} kept other units"
    assert ranks[0].keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks differ on {name}"
        assert ranks[0][name].shape == value.shape, name
        # float32 sums in another order (4 + 3 sequences in batches of 2 instead of 7 in batches of 2): compare
        # each tensor as a whole, since single elements near zero can differ by a few ulps of the largest ones
        diff = float((ranks[0][name].double() - value.double()).norm() / value.double().norm().clamp_min(1e-30))
        assert diff < 1e-4, (name, diff)


def test_sequence_weighted_hessian_merge():
    """Merging running means of 4 and 3 sequences gives the 7-sequence Hessian (float64, exact to rounding)."""
    from slimflow.algorithms.hessian import HessianAccumulator

    x = torch.randn(7, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    whole = HessianAccumulator(6, dtype=torch.float64)
    whole.add(x)
    parts = [HessianAccumulator(6, dtype=torch.float64) for _ in range(2)]
    parts[0].add(x[:4])
    parts[1].add(x[4:])
    merged = sum(p.hessian * p.num_sequences for p in parts) / sum(p.num_sequences for p in parts)
    assert torch.allclose(merged, whole.hessian, rtol=1e-12, atol=1e-12)
    assert torch.allclose(sum(p.sum for p in parts), whole.sum)


def test_data_parallel_needs_a_process_group():
    import slimflow

    with pytest.raises(ValueError, match="init_process_group"):
        slimflow.prune(tiny_model("llama"), calibration(), ratio=0.2, data_parallel=True, progress=False)
