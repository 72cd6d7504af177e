"""Workarounds for upstream libraries, one module each. Each module's docstring names the library and version it was
written for and what breaks without it; tests/test_patches.py fails when the upstream behaviour it relies on changes.

The command line applies its own (`apply_cli`); the Python API leaves the libraries as they are, except inside a
trainer that `delia.training` builds (`trl_label_positions`, `peft_mask_dropout`, `peft_head_bias`,
`token_rows_decay`), where a patch changes that trainer only.
"""

from __future__ import annotations

from delia.patches.quiet_loading import quiet_loading
from delia.patches.typer_usage import plain_argument_help


def apply_cli() -> None:
    """Every workaround the command line needs, before any upstream library is imported."""
    plain_argument_help()
    quiet_loading()
