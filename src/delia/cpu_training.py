"""Training on a CPU without work a CPU need not do: LoRA dropout from a cheaper mask, and an LM head that
scores only the positions that have a label.

**Dropout.** PEFT drops out the input of every LoRA layer (q/k/v/o: 4 per transformer layer) with
`nn.Dropout`, whose CPU kernel draws a float Bernoulli mask (`bernoulli_`), rescales it and multiplies: on
SmolLM2-135M at batch 4 x 256 tokens that is about 11% of a training step (`benchmarks/train_throughput.py`).
Here each element is kept when a uniform 31-bit integer is at least round(p * 2^31), and scaled by 1 / (1 - p):
the same keep probability up to 2^-31, in about half the time. Masks come from torch's seeded default
generator, so a seeded run repeats exactly, but they are other masks than `nn.Dropout` draws with the same
seed. Other devices keep `nn.Dropout`, whose fused kernels are faster there.

**LM head.** TRL's fused LM head projects hidden states onto the vocabulary in tiles. On devices with Triton it
projects only the positions whose next token has a label; elsewhere it projects every position and masks
the result afterwards, because on compiled back ends (Neuron) a changing number of positions would recompile
the tiles. Eager CPU code compiles nothing, so the prompt positions' projections (the whole vocabulary, forward
and backward) are pure waste there: SFT's loss is the same either way.
"""

from __future__ import annotations

from typing import Any

import torch

_SCALE = 2**31  # int32 `random_()` draws uniformly from [0, 2^31 - 1]


class MaskDropout(torch.nn.Dropout):
    """`nn.Dropout` whose CPU training path draws its mask as int32 random bits (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        keep = torch.empty(x.shape, dtype=torch.int32).random_() >= round(self.p * _SCALE)
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), x.new_zeros(()))


def use_mask_dropout(model: Any) -> int:
    """Replace the LoRA dropout modules of a PEFT `model` on CPU by `MaskDropout`; returns how many."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in drops.items():
            if type(drop) is torch.nn.Dropout and drop.p > 0:
                drops[name] = MaskDropout(drop.p)
                replaced += 1
    return replaced


def score_label_positions_only(trainer: Any) -> None:
    """Make TRL's fused LM head take its compact path (label positions only) on CPU too, inside this trainer's
    loss only: other trainers in the process keep TRL's behaviour. TRL decides with
    `trl.trainer.utils._use_triton(device)`, which it uses there for that choice alone."""
    import functools

    import trl.trainer.utils as trl_utils

    original, compute_loss = trl_utils._use_triton, trainer.compute_loss

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    @functools.wraps(compute_loss)
    def loss(*args: Any, **kwargs: Any) -> Any:
        trl_utils._use_triton = compact
        try:
            return compute_loss(*args, **kwargs)
        finally:
            trl_utils._use_triton = original

    trainer.compute_loss = loss
