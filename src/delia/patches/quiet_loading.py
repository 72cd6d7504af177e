"""transformers 5.24 (`transformers>=5.24,<5.40`), huggingface_hub and TRL 1.16: no noise at model loads.

transformers draws a "Loading weights" progress bar at every model load (through huggingface_hub's switch
`HF_HUB_DISABLE_PROGRESS_BARS`, read when transformers is imported), and TRL calls `is_gradient_checkpointing`,
which transformers 5.x deprecates with a FutureWarning on every training run. Neither says anything a user can act
on; without this patch both fill the terminal around delia's own progress bars.
"""

from __future__ import annotations

import os
import warnings


def quiet_loading() -> None:
    """Turn off huggingface_hub's progress bars (unless the user set the switch) and TRL's deprecation warning."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
