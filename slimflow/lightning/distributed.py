"""slimflow's callbacks under several processes (`--trainer.devices N` with `ddp`, `fsdp` or `fsdp2`).

- Pruning runs on every rank before the strategy wraps the model; `slimflow.prune` shares the calibration
  sequences over the ranks and applies rank 0's decisions everywhere, so all ranks hold the same shapes.
- Evaluation and export run once, on global rank 0; the other ranks wait at a barrier (`on_rank_zero`).
- Under a sharding strategy (Lightning's `fsdp`, slimflow's `fsdp2`) no rank holds the trained weights whole, so
  at the end of training `gather_full_model` assembles them on rank 0 into a plain (unsharded) copy that the
  LoRA merge, the evaluation and the export work on.
- `FSDP2Strategy` (registered as `fsdp2`) shards with torch's `fully_shard`, one unit per decoder layer. Unlike
  Lightning's `fsdp` (FSDP1, CUDA only) it also runs on CPU processes over gloo, which is how CI tests it.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, StrategyRegistry

from slimflow.lightning.access import base_model, get_model, set_model, slimflow_callbacks


def is_sharded(trainer: Trainer) -> bool:
    return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))


def on_rank_zero(trainer: Trainer, work):
    """`work()` on global rank 0 only, the other ranks waiting at a barrier until it is done (one process:
    just `work()`). Every rank must reach this call."""
    result = work() if trainer.is_global_zero else None
    trainer.strategy.barrier("slimflow-rank-zero")
    return result


_GATHERED = "_slimflow_gathered"


def gather_full_model(trainer: Trainer, pl_module: LightningModule, model_attr: str = "model") -> None:
    """After training under a sharding strategy: replace rank 0's model by a plain copy holding the full trained
    weights (the other ranks keep their shards), then merge LoRA there. A collective: every rank calls it (the
    `on_fit_end` of LoRARecovery, Evaluation and Export, whichever comes first); later calls do nothing. It runs
    after `on_train_end`, where ModelCheckpoint may still save the sharded model."""
    if not is_sharded(trainer) or getattr(pl_module, _GATHERED, False):
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(trainer.strategy.model, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    if trainer.is_global_zero:
        prefix = model_attr + "."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        set_model(pl_module, model_attr, plain_copy(get_model(pl_module, model_attr), own))
        from slimflow.lightning.lora import LoRARecovery

        for lora in slimflow_callbacks(trainer, LoRARecovery):
            lora.final_merge(trainer, pl_module)
    setattr(pl_module, _GATHERED, True)


def _clean(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def plain_copy(sharded, state: dict):
    """A new (unsharded, CPU) model of `sharded`'s architecture (pruned widths, LoRA wrapping) with `state`."""
    from transformers import AutoModelForCausalLM

    from slimflow.lightning.restore import lora_settings
    from slimflow.surgery import LayerWidths, apply_widths

    config = base_model(sharded).config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)
    widths = getattr(config, "slimflow_layer_widths", None)
    if widths:
        apply_widths(fresh, [LayerWidths(**w) for w in widths])
    lora = lora_settings(sharded)
    if lora:
        from peft import LoraConfig, get_peft_model

        fresh = get_peft_model(fresh, LoraConfig(**lora, task_type="CAUSAL_LM"))
    fresh.load_state_dict(state, strict=True, assign=True)
    buffers = {_clean(n): b for n, b in sharded.named_buffers()}  # not sharded: every rank has them whole
    for name, _ in list(fresh.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        fresh.get_submodule(owner)._buffers[leaf] = buffers[name].detach().to("cpu").clone()
    if getattr(config, "tie_word_embeddings", False):
        base_model(fresh).tie_weights()
    return fresh.train(sharded.training)


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel with torch's FSDP2 (`fully_shard`) for a module holding a Hugging Face causal LM.

    Each decoder layer of the model at `model_attr` is one sharding unit, the whole model (embeddings, head) the
    root. The trainable (LoRA) parameters start from rank 0's values on every rank. Checkpoints are gathered
    into one file on rank 0. Select it with `--trainer.strategy fsdp2` (or this class path).

    Args:
        model_attr: attribute of the LightningModule holding the Hugging Face model.
        reshard_after_forward: free each layer's gathered weights after its forward (less memory, one more
            all-gather per layer in backward).
        process_group_backend: `nccl`, `gloo`, ... (default: nccl on CUDA, gloo on CPU).
        timeout: collective timeout (rank 0 evaluates and exports while the others wait at a barrier).
    """

    def __init__(self, model_attr: str = "model", reshard_after_forward: bool = True,
                 process_group_backend: str | None = None, timeout: timedelta | None = timedelta(minutes=30)):
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.model_attr, self.reshard_after_forward = model_attr, reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # all ranks shard one model
        super().setup_environment()

    def setup(self, trainer: Trainer) -> None:
        self._shard(self.lightning_module)
        super().setup(trainer)

    def _shard(self, pl_module: LightningModule) -> None:
        from torch.distributed.fsdp import fully_shard

        from slimflow.adapters import get_adapter
        from slimflow.distributed import DataParallel

        model = get_model(pl_module, self.model_attr)
        group = DataParallel()
        for p in model.parameters():
            if p.requires_grad:  # random LoRA init; the frozen (pruned) weights are identical by construction
                group.broadcast_(p.data)
        mesh = self.device_mesh["data_parallel"]
        hf_model = base_model(model)
        for layer in get_adapter(hf_model).layers(hf_model):
            fully_shard(layer, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)


def register_strategies() -> None:
    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy,
                                  description="FSDP2 (fully_shard) per decoder layer, CPU or CUDA (slimflow)")
