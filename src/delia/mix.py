"""`delia mix`: the task rows plus a seeded draw of the model's own diverse answers, shuffled together.

Every task row is kept once; diverse rows are drawn without replacement. The seed fixes both the
draw and the order, so the same inputs and seed give the same file byte for byte.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field

from delia.artifacts import MixSummary
from delia.config import ConfigError, Flags, StageConfig
from delia.data import ChatData, check_chat_output, describe, read_chat, row_id, write_chat
from delia.errors import DeliaError
from delia.files import check_output, sha256_file
from delia.progress import ProgressCallback
from delia.stage import Stage

SOURCES = ("task", "diverse")
log = logging.getLogger(__name__)


class MixConfig(StageConfig):
    """Options of `delia mix`: how many diverse rows (exactly one of `ratio` and `diverse_count`), and the seed."""

    # the stage identity holds the ratio and seed apart; the tokenizer only counts tokens for the summary
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"ratio", "seed", "tokenizer", "overwrite"})

    ratio: float | None = Field(None, ge=0, allow_inf_nan=False)
    """Diverse rows per task row, e.g. 100 (the paper's)."""
    diverse_count: int | None = Field(None, ge=0)
    """Number of diverse rows (instead of `ratio`)."""
    seed: int = 0
    """Seed of the draw and the shuffle."""
    allow_short: bool = False
    """Take the whole pool when it has fewer rows than asked (with a warning) instead of failing."""
    tokenizer: Annotated[str | None, Flags("--tokenizer", "--model", "-m")] = None
    """Model whose tokenizer counts the tokens in the summary ('' to skip them); by default the bundled model if
    it is installed, else the counts are skipped (nothing is installed just to count)."""
    overwrite: bool = False
    """Replace OUT (and its summary) if it exists; a folder only if delia wrote it."""

    def diverse_asked(self, task_rows: int) -> int:
        """The diverse rows these options ask for beside `task_rows` task rows (exactly one amount is set: an
        experiment's `mix:` section leaves both to the run, which sets the ratio of each arm)."""
        if (self.ratio is None) == (self.diverse_count is None):
            raise ConfigError("set exactly one of `ratio` or `diverse_count`")
        if self.diverse_count is not None:
            return self.diverse_count
        wanted = self.ratio * task_rows  # type: ignore[operator]
        if not math.isfinite(wanted):
            raise DeliaError(f"`ratio` {self.ratio:g} asks for more diverse rows than can be counted")
        return round(wanted)


def summary_path(out: str | Path) -> Path:
    return MixSummary.path(out)


def _tagged(record: dict[str, Any], source: str) -> dict[str, Any]:
    """Keep the conversation, its id and its source; any other fields go under `meta` (one schema for all rows)."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    extra = {k: v for k, v in record.items() if k not in ("messages", "id", "meta", "source")}
    return {"messages": record["messages"], "id": row_id(record), "source": source, "meta": {**extra, **meta}}


def mix(
    task: Annotated[Path, "Task training rows (any format `delia data` reads)."],
    diverse: Annotated[Path, "Diverse rows: the messages JSONL `delia sample` writes."],
    out: Annotated[Path, "Output: .jsonl (messages JSONL) or a folder (saved HF dataset)."],
    config: MixConfig | None = None,
    **options: Any,
) -> MixSummary:
    """Mix task rows with diverse rows; writes OUT and OUT.summary.json, returns the summary.

    Each output row keeps `source` ("task" or "diverse") and `id`. The summary counts rows and
    tokens per source. `options` set any MixConfig field over `config`.

    Examples:\n
      delia mix task.jsonl diverse.jsonl --out mix.jsonl --ratio 100\n
      delia mix task.jsonl diverse.jsonl --out mix.jsonl --diverse-count 5000 --seed 1
    """
    cfg = MixConfig.build(config, **options)
    cfg.diverse_asked(0)  # an amount is set: checked before any file is read or written
    check_chat_output(out, inputs=[task, diverse], overwrite=cfg.overwrite)
    check_output(summary_path(out), inputs=[task, diverse], overwrite=True)  # a sidecar: only never an input
    task_data = read_chat(task)
    pool = read_chat(diverse).records
    if not task_data.records:
        raise DeliaError(f"{task}: no task rows")
    wanted = cfg.diverse_asked(len(task_data.records))
    short = wanted > len(pool)
    if short and not cfg.allow_short:
        raise DeliaError(f"{diverse}: the pool has {len(pool)} rows but {wanted} diverse rows are asked for "
                         f"({len(task_data.records)} task rows); sample more, lower `ratio`, or set `allow_short`")
    if short:
        log.warning("%s has only %d rows of the %d asked for; using all of them (allow_short)", diverse, len(pool),
                    wanted)

    tokenizer = _default_tokenizer() if cfg.tokenizer is None else cfg.tokenizer
    tok = None
    if tokenizer:  # loaded before anything is written: a bad tokenizer leaves no output behind
        from delia.models import load_tokenizer

        tok = load_tokenizer(tokenizer)
    rng = random.Random(cfg.seed)
    picked = rng.sample(range(len(pool)), min(wanted, len(pool)))
    rows = [_tagged(r, "task") for r in task_data.records] + [_tagged(pool[i], "diverse") for i in picked]
    rng.shuffle(rows)
    write_chat(out, rows)

    per_source = {}
    for source in SOURCES:
        info = describe(ChatData(str(out), "messages", [r for r in rows if r["source"] == source]), tok)
        per_source[source] = {k: info[k] for k in ("rows", "prompt_tokens", "response_tokens", "total_tokens")
                              if k in info}
    summary = MixSummary(
        out=str(out), seed=cfg.seed, ratio=cfg.ratio, diverse_count=cfg.diverse_count,
        diverse_asked=wanted, short=short, rows=len(rows), tokenizer=tokenizer or None,
        sources=per_source,
        inputs={"task": {"path": str(task), "sha256": _hash(task), "rows": len(task_data.records)},
                "diverse": {"path": str(diverse), "sha256": _hash(diverse), "rows": len(pool)}},
    )
    summary.write(out)
    return summary


@dataclass
class MixStage(Stage[MixSummary]):
    """Mixing as a stage of `delia run`: its identity is the hashes of the task and diverse rows, the ratio, the
    seed and the other options."""

    name: ClassVar[str] = "mix"
    result: ClassVar[Any] = MixSummary

    task: Path
    diverse: Path
    config: MixConfig
    label: str = ""

    def identity(self) -> dict[str, Any]:
        return {"task": sha256_file(self.task), "diverse": sha256_file(self.diverse), "ratio": self.config.ratio,
                "seed": self.config.seed, "options": self.config.options()}

    def run(self, folder: Path, progress: ProgressCallback | None = None) -> MixSummary:
        return mix(self.task, self.diverse, folder / "mixed.jsonl", self.config)


def _default_tokenizer() -> str | None:
    """The bundled default model when it is installed; otherwise None (no counts), with a note."""
    from delia.models import BUNDLED, DEFAULT_MODEL, bundled_installed

    if DEFAULT_MODEL in BUNDLED and not bundled_installed(DEFAULT_MODEL):
        log.info("note: %s is not installed, so the summary has no token counts (set the tokenizer option to "
                 "count them)", DEFAULT_MODEL)
        return None
    return DEFAULT_MODEL


def _hash(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None
