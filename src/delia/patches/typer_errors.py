"""typer 0.29 (`typer>=0.29,<1`): usage errors printed as plain text.

typer prints a usage error in a rich panel that folds a long path and cuts text at 80 columns, whatever the
terminal's width. `PlainErrorsGroup` runs typer's own main loop (`typer.core._main`, a private function) told that
there is no rich markup, so errors go through click's plain `show()`. Without it an error message can lose the
part of a path that says which file is wrong.
"""

from __future__ import annotations

from typing import Any

import typer


class PlainErrorsGroup(typer.core.TyperGroup):
    """A typer command group whose usage errors print as click prints them: plain text, never boxed, wrapped
    or cut at any terminal width."""

    def main(self, **kwargs: Any) -> Any:
        # typer's own main loop, told there is no rich markup: errors then go through click's plain `show()`
        return typer.core._main(self, **{**kwargs, "rich_markup_mode": None})
