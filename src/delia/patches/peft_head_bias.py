"""PEFT 0.21 (`peft>=0.21,<1`) under TRL 1.16's fused LM head: trainable tokens on the output head.

TRL's fused head (`trl.trainer.utils.add_fused_lm_head`) reads `lm_head.weight` and `lm_head.bias` directly.
PEFT's `TrainableTokensWrapper` answers `.weight` with the merged matrix (base rows plus the trained rows,
differentiable in the rows) but has no `bias` attribute. PEFT wraps the output head for `train_rows new` whether
it is tied to the input embedding or not, so without this patch TRL's fused forward fails with an AttributeError
at the first training step. `give_head_a_bias` sets the wrapper's
`bias` to its base layer's bias, which is None for the heads delia supports; a head with a bias is refused.
"""

from __future__ import annotations

from typing import Any

from delia.errors import DeliaError


def give_head_a_bias(trainer: Any) -> None:
    """Set `bias` (None) on the trainer's output head when PEFT wrapped it for trainable tokens."""
    from peft.utils.other import TrainableTokensWrapper

    head = trainer.model.get_output_embeddings()
    if isinstance(head, TrainableTokensWrapper) and "bias" not in vars(head):
        bias = getattr(head.token_adapter.get_base_layer(), "bias", None)
        if bias is not None:
            raise DeliaError("`train_rows` new: the model's output head has a bias, which TRL's fused LM head "
                             "cannot read through PEFT trainable tokens; set `train_rows` all")
        object.__setattr__(head, "bias", None)
