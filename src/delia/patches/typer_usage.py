"""typer 0.29 (`typer>=0.29,<1`): plain argument names in usage lines and help.

typer shows a required argument as `{NAME}` in the usage line, which reads as click's choice syntax, and as
`NAME <path>` in help, a Python type. `plain_argument_help` replaces `TyperArgument._usage_display_name` and
`TyperArgument.display_type_rich` so that click's plain `NAME` (and `[NAME]` when optional) shows instead.
Without it the help is still correct, only misleading.
"""

from __future__ import annotations


def plain_argument_help() -> None:
    """Show click's plain `NAME` (and `[NAME]` when optional) for arguments, with no Python type beside it."""
    from typer.core import TyperArgument

    def usage_name(self: TyperArgument) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")

    TyperArgument._usage_display_name = usage_name  # type: ignore[method-assign]
    TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign, assignment]
