"""Workarounds for upstream libraries, in one place. Each names the version it was written for and what breaks
without it; tests/test_upstream.py fails when the upstream behaviour it relies on changes.

The command line applies them (`apply_cli`); the Python API leaves the libraries as they are.
"""

from __future__ import annotations

import os
import warnings


def plain_argument_help() -> None:
    """typer 0.29 shows a required argument as `{NAME}` in the usage line, which reads as click's choice syntax,
    and as `NAME <path>` in help, a Python type. Show click's plain `NAME` (and `[NAME]` when optional)."""
    from typer.core import TyperArgument

    def usage_name(self: TyperArgument) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")

    TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]
    TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign, assignment]


def quiet_loading() -> None:
    """transformers 5.24 draws a "Loading weights" progress bar at every model load (through huggingface_hub's
    switch, read when transformers is imported), and TRL 0.2x calls `is_gradient_checkpointing`, which transformers
    5.x deprecates with a FutureWarning on every training run. Neither says anything a user can act on."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def apply_cli() -> None:
    """Every workaround the command line needs, before any upstream library is imported."""
    plain_argument_help()
    quiet_loading()
