"""slimflow's Lightning callbacks, in one import: `from slimflow.lightning.callbacks import StructuredPruning, ...`.

Add them to any Trainer whose LightningModule holds a Hugging Face causal LM (see `slimflow.lightning.access`
for the contract and `docs/lightning.md` for a walk-through).
"""

from slimflow.lightning.access import SlimflowCallback
from slimflow.lightning.lora import LoRARecovery
from slimflow.lightning.outputs import Evaluation, Export
from slimflow.lightning.pruning import Calibration, RatioSchedule, StructuredPruning

__all__ = ["Calibration", "Evaluation", "Export", "LoRARecovery", "RatioSchedule", "SlimflowCallback",
           "StructuredPruning"]
