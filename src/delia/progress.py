"""How a stage reports progress: it calls a callback the caller passes in; the CLI draws it as a bar.

A stage calls `progress(Progress(task, done, total, counts))` as units of work finish. Library callers pass
their own callback (or none); nothing in a stage prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Progress:
    """`done` of `total` units of `task` are finished; `counts` are running totals (e.g. tokens)."""

    task: str
    done: int
    total: int | None
    unit: str = "rows"
    counts: dict[str, int] = field(default_factory=dict)


ProgressCallback = Callable[[Progress], None]


def report(callback: ProgressCallback | None, event: Progress) -> None:
    """Send `event` to `callback`, if there is one."""
    if callback is not None:
        callback(event)
