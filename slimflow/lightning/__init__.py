"""Lightning glue: callbacks (calibration, pruning, LoRA recovery, evaluation, export), a causal-LM
LightningModule, DataModules and the `slimflow fit|validate|test` CLI."""

from slimflow.lightning.callbacks import (
    Calibration, Evaluation, Export, LoRARecovery, RatioSchedule, SlimflowCallback, StructuredPruning,
)
from slimflow.lightning.distributed import FSDP2Strategy, register_strategies
from slimflow.lightning.data import CalibrationData, InstructionData, TextEvalData
from slimflow.lightning.module import CausalLMModule
from slimflow.lightning.restore import restore_architecture

__all__ = ["Calibration", "CalibrationData", "CausalLMModule", "Evaluation", "Export", "FSDP2Strategy", "InstructionData",
           "LoRARecovery", "RatioSchedule", "SlimflowCallback", "StructuredPruning", "TextEvalData",
           "restore_architecture"]

register_strategies()
