"""PEFT 0.21 (`peft>=0.21,<1`) on torch's CPU kernels: LoRA dropout from a cheaper mask.

PEFT drops out the input of every LoRA layer (q/k/v/o: 4 per transformer layer) with an `nn.Dropout` kept in the
layer's `lora_dropout` ModuleDict. `nn.Dropout`'s CPU kernel draws a float Bernoulli mask (`bernoulli_`), rescales
it and multiplies: on SmolLM2-135M at batch 4 x 256 tokens that is about 11% of a training step
(`benchmarks/train_throughput.py`). `MaskDropout` keeps each element when a uniform 31-bit integer is at least
round(p * 2^31), and scales by 1 / (1 - p): the same keep probability up to 2^-31, in about half the time. Masks come
from torch's seeded default generator, so a seeded run repeats exactly, but they are other masks than `nn.Dropout`
draws with the same seed. Other devices keep `nn.Dropout`, whose fused kernels are faster there. Without this patch
CPU training is correct, only slower.
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
