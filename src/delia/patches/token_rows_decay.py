"""transformers 5.24 (`transformers>=5.24,<5.40`) with PEFT 0.21 trainable tokens: no weight decay on the rows.

`Trainer.get_decay_parameter_names` decays every parameter but biases and norms, so it decays PEFT's
`trainable_tokens_delta` (the new tokens' embedding rows, `train_rows new`): decoupled decay pulls them towards zero,
not towards their init, and a new token's row shrinks a little at every step whatever its gradient says. The rows
are left out of weight decay like the rest of the embedding in `train_rows all`. Without this patch training runs,
with rows that drift towards zero under `weight_decay`.
"""

from __future__ import annotations

from typing import Any

TOKEN_ROWS = "trainable_tokens_delta"  # PEFT's name of the trained rows' parameter


def keep_token_rows_out_of_decay(trainer: Any) -> None:
    """Make `trainer` leave PEFT's trainable-token rows out of its weight-decay parameter group."""
    decay = trainer.get_decay_parameter_names
    trainer.get_decay_parameter_names = lambda model: [n for n in decay(model) if TOKEN_ROWS not in n]
