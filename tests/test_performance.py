"""CPU checks of the engine's fast paths: attention replay and the sync-free greedy loops."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import slimflow
from slimflow.algorithms.obs import SingularHessianError, downdate_inverse, obs_remove, remove_and_downdate
from slimflow.algorithms.slimgpt import prune_channels_dgs



@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
def test_attention_replay_gives_the_recomputed_result(family):
    ids = torch.randint(3, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    a, b = tiny_model(family), tiny_model(family)
    ra = slimflow.prune(a, ids, 0.3, schedule="linear", progress=False)
    rb = slimflow.prune(b, ids, 0.3, schedule="linear", replay_attention=False, progress=False)
    assert [(r.kept_units, r.kept_channels) for r in ra.layers] == [(r.kept_units, r.kept_channels) for r in rb.layers]
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=name)


def test_remove_and_downdate_equals_the_two_public_steps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64)
    w = torch.randn(5, 16, generator=g, dtype=torch.float64)
    hinv = torch.linalg.inv(2 * x.t() @ x / 300)
    cols = torch.tensor([2, 3, 9])
    new_w, err, new_g, info = remove_and_downdate(w, hinv, cols)
    ref_w, ref_err = obs_remove(w, hinv, cols)
    torch.testing.assert_close(new_w, ref_w)
    torch.testing.assert_close(new_g, downdate_inverse(hinv, cols))
    assert float(err) == pytest.approx(ref_err) and int(info) == 0


def test_loss_of_definiteness_in_the_loop_is_reported():
    w = torch.randn(4, 6, dtype=torch.float64)
    hinv = -torch.eye(6, dtype=torch.float64)  # not positive definite
    with pytest.raises(SingularHessianError, match="damping"):
        prune_channels_dgs(w, hinv, 2, floor=1)
