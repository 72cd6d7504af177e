"""The stage protocol: `identity` (what a stage's output depends on, hashed into its `key`), `done` (its finished
output, if there) and `run` (make it).

`delia run` caches every stage by it, in a folder named by the key; the commands that resume inside a stage
(`train --resume`, `sample`, `rewrite`) save the same identity beside their unfinished work and refuse to resume
work whose saved identity differs. So "is this the same work?" has one answer per stage: its `identity` method.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from delia import __version__
from delia.artifacts import StageRecord
from delia.config import StageConfig
from delia.files import sha256_json
from delia.progress import ProgressCallback

log = logging.getLogger("delia")
R = TypeVar("R")


class Stage(ABC, Generic[R]):
    """One stage's work. Subclasses say what their output depends on and how to make it."""

    name: ClassVar[str]  # the stage's kind: its folder is `<name>-<key>`
    result: ClassVar[Any] = Any  # what stage.json's result is read as
    # Subclasses (dataclasses) also have `label`, which arm and seed for logs and the report, and may have
    # `config`, their options, which a resume compares by value (see `changes`).
    label: str

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """Everything the output depends on, as JSON: hashes of the inputs, the model, the options that matter."""

    @abstractmethod
    def run(self, folder: Path, progress: ProgressCallback | None = None) -> R:
        """Make the output in `folder`; returns what stage.json keeps as the result."""

    def key(self, identity: Mapping[str, Any] | None = None) -> str:
        """The identity's hash (`identity`: the one already computed): a stage folder's name, so equal work is found
        again."""
        inputs = self.identity() if identity is None else identity
        return sha256_json({"stage": self.name, "inputs": inputs, "delia": __version__})[:12]

    def done(self, folder: Path) -> StageRecord[Any] | None:
        """The finished stage's record in `folder`, or None when it did not finish there."""
        record = StageRecord[self.result]  # type: ignore[name-defined]
        return record.read(folder) if record.path(folder).exists() else None

    def resume_identity(self) -> dict[str, Any]:
        """What unfinished work saved beside itself must match to be resumed (default: the whole identity)."""
        return self.identity()

    def _model(self) -> dict[str, Any]:
        """The identity of the model a stage that loads one runs (its `model` field), resolved the first time it is
        needed (`_resolve_model`): bad input is refused before a model is converted."""
        if getattr(self, "model", None) is None:
            self.model = self._resolve_model()
        return self.model  # type: ignore[no-any-return]

    def _resolve_model(self) -> dict[str, Any]:
        """The model's identity as the stage's options name it (default: its config's `model_identity()`)."""
        return self.config.model_identity()  # type: ignore[attr-defined,no-any-return]

    def changes(self, saved: Mapping[str, Any]) -> list[str]:
        """`field: saved -> now` for each difference between a saved resume identity and this stage's. Options
        are compared by value: given or left at their default, `epochs: 1` is the same work."""
        before, now = self._flat(saved), self._flat(self.resume_identity())
        return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted({*before, *now})
                if before.get(k) != now.get(k)]

    def _flat(self, identity: Mapping[str, Any]) -> dict[str, Any]:
        flat = {k: v for k, v in identity.items() if k != "options"}
        options = identity.get("options", {})
        config: StageConfig | None = getattr(self, "config", None)
        if config is not None and isinstance(options, dict):
            with suppress(ValueError):  # options of another version are compared as written
                options = type(config).model_validate(config.CHANGED_DEFAULTS | options).model_dump(mode="json")
        return flat | {f"options.{k}": v for k, v in options.items()}


class StageCache:
    """Runs a stage in the folder its key names, unless that folder holds the stage finished."""

    def __init__(self, root: Path):
        self.root = root
        self.done: list[str] = []
        self.skipped: list[str] = []

    def run(self, stage: Stage[Any], progress: ProgressCallback | None = None) -> tuple[Path, StageRecord[Any]]:
        """(the stage's folder, its stage.json) with the result read as the stage's `result` type."""
        identity = stage.identity()  # once: it hashes the stage's input files
        folder = self.root / f"{stage.name}-{stage.key(identity)}"
        if (record := stage.done(folder)) is not None:
            self.skipped.append(f"{stage.name}:{stage.label}")
            log.info("cached %s %s -> %s", stage.name, stage.label, folder)
            return folder, record
        folder.mkdir(parents=True, exist_ok=True)
        log.info("-- %s %s -> %s", stage.name, stage.label, folder)
        start = time.perf_counter()
        result = stage.run(folder, progress)
        StageRecord(stage=stage.name, label=stage.label, inputs=identity,
                    wall_s=round(time.perf_counter() - start, 2), result=result).write(folder)
        self.done.append(f"{stage.name}:{stage.label}")
        record = stage.done(folder)
        assert record is not None
        return folder, record
