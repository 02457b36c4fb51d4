"""Lightning glue: callbacks (calibration, pruning, LoRA recovery, evaluation, export), a causal-LM
LightningModule, DataModules and the `slimflow fit|validate|test` CLI."""

from slimflow.lightning.callbacks import (
    Calibration, Evaluation, Export, LoRARecovery, RatioSchedule, SlimflowCallback, StructuredPruning,
)
from slimflow.lightning.data import CalibrationData, InstructionData, TextEvalData
from slimflow.lightning.module import CausalLMModule
from slimflow.lightning.restore import restore_architecture

__all__ = ["Calibration", "CalibrationData", "CausalLMModule", "Evaluation", "Export", "InstructionData",
           "LoRARecovery", "RatioSchedule", "SlimflowCallback", "StructuredPruning", "TextEvalData",
           "restore_architecture"]
