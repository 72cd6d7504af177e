"""TRL 1.16 (`trl>=1.16,<2`): on CPU, the fused LM head scores only the positions that have a label.

TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) projects hidden states onto the vocabulary in tiles. On
devices with Triton it projects only the positions whose next token has a label; elsewhere it projects every
position and masks the result afterwards, because on compiled back ends (Neuron) a changing number of positions
would recompile the tiles. It decides with `trl.trainer.utils._use_triton(device)`, a private module global that it
uses there for that choice alone. Eager CPU code compiles nothing, so the prompt positions' projections (the whole
vocabulary, forward and backward) are pure waste there: SFT's loss is the same either way. Without this patch CPU
training gives the same loss and gradients, slower (see `benchmarks/train_throughput.py`).
"""

from __future__ import annotations

from typing import Any


def score_label_positions_only(trainer: Any) -> None:
    """Make TRL's fused LM head take its compact path (label positions only) on CPU too, inside this trainer's
    loss only: other trainers in the process keep TRL's behaviour."""
    import functools

    import trl.trainer.utils as trl_utils

    original, compute_loss = trl_utils._use_triton, trainer.compute_loss

    def compact(device: Any) -> bool:
        return device.type == "cpu" or original(device)

    @functools.wraps(compute_loss)
    def loss(*args: Any, **kwargs: Any) -> Any:
        trl_utils._use_triton = compact
        try:
            return compute_loss(*args, **kwargs)
        finally:
            trl_utils._use_triton = original

    trainer.compute_loss = loss
