"""`delia train`: LoRA SFT on a chat mixture (`train`), its options (`TrainConfig`) and its output folder.

- `config`: `TrainConfig` and the names of what a run writes (`TRAIN_RECORD`, `TRAINER_LOG`, `CHECKPOINTS`, ...).
- `trainer`: `train`, `build_trainer` (the setup as named steps), `Training` (a prepared run; `fit()`) and
  `TrainStage` (training as a stage of `delia.stage`).
- `checkpoints`: complete checkpoints, their pruning and the resume key.
- `anchor`: diverse rows trained by KL to the base model (`diverse_loss kl`).
- `token_rows`: the new tokens' embedding rows as the only trained part of the embedding.

Workarounds for TRL, PEFT and transformers that training applies live in `delia.patches`.
"""

from delia.training.checkpoints import complete_checkpoints
from delia.training.config import ANCHOR_COLUMN, CHECKPOINTS, TRAIN_RECORD, TRAINER_LOG, TrainConfig, layer_indices
from delia.training.trainer import Training, TrainStage, build_trainer, train

__all__ = [
    "ANCHOR_COLUMN",
    "CHECKPOINTS",
    "TRAINER_LOG",
    "TRAIN_RECORD",
    "TrainConfig",
    "TrainStage",
    "Training",
    "build_trainer",
    "complete_checkpoints",
    "layer_indices",
    "train",
]
