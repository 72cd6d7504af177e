"""Checkpoints of a training run: marked complete, pruned to what `resume` needs, and keyed by the settings a
resumed run must share with the killed one."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from delia.errors import DeliaError
from delia.files import changed_settings, write_json
from delia.stage import Stage

RESUME_KEY_FILE = "resume_key.json"  # inside CHECKPOINTS: the stage identity a --resume must match
CHECKPOINT_DONE = "delia_checkpoint.json"  # inside a checkpoint: written last, marks it complete
LEGACY_RESUME_KEY_FILE = "delia_run.json"  # earlier name, still read on --resume
# Settings of a key written before the stage protocol (delia 0.1.0 before 2026-12-03: every setting) that may
# differ between a killed run and its --resume.
_RESUME_FREE = {"resume", "overwrite", "merge", "keep_checkpoints", "out"}
# Settings added since, at the value that such a key's run had.
_ADDED_SINCE = {"lora": True, "soft_prompt": 0, "token_rows_from": None}


def write_resume_key(folder: Path, stage: Stage[Any]) -> None:
    """Record in the checkpoint folder the identity that a `resume` of this run must match."""
    write_json(folder / RESUME_KEY_FILE, stage.resume_identity())


def check_resume_key(folder: Path, stage: Stage[Any], legacy_settings: dict[str, Any], out: Path) -> None:
    """Refuse to resume the checkpoints in `folder` with settings or data that differ from theirs. A key written
    before the stage protocol holds every setting, and is compared with `legacy_settings`."""
    key_file = next((folder / n for n in (RESUME_KEY_FILE, LEGACY_RESUME_KEY_FILE) if (folder / n).exists()), None)
    saved = json.loads(key_file.read_text()) if key_file else {}
    if "options" in saved:
        diff = stage.changes(saved)
    else:
        diff = changed_settings(*({k: v for k, v in (_ADDED_SINCE | settings).items() if k not in _RESUME_FREE}
                                  for settings in (saved, legacy_settings)))
    if diff:
        raise DeliaError(f"{out}: `resume` with settings or data that differ from the checkpointed run: "
                         f"{', '.join(diff)}")


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete `checkpoint-N` folders in `folder`, oldest first.

    Complete: holds the `CHECKPOINT_DONE` marker, written after everything else the trainer saves. Checkpoints
    of runs from before the marker count as complete when their `trainer_state.json` (saved last) reads.
    """
    if not folder.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    marked = [p for _, p in found if (p / CHECKPOINT_DONE).is_file()]
    if marked or not found:
        return marked
    return [p for _, p in found if _reads(p / "trainer_state.json")]  # a run saved before the marker existed


def _reads(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def drop_checkpoints(folder: Path, keep: str | Path | None) -> None:
    """Remove every checkpoint folder in `folder` but `keep`: renamed away first, so a kill mid-removal leaves no
    half-deleted folder under a checkpoint's name; leftovers of such a kill (`.*.deleting`) are removed too."""
    if not folder.is_dir():
        return
    keep = Path(keep).name if keep else None
    for p in sorted(folder.iterdir()):
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name != keep:
            gone = p.with_name(f".{p.name}.deleting")
            shutil.rmtree(gone, ignore_errors=True)
            os.replace(p, gone)
            shutil.rmtree(gone, ignore_errors=True)
        elif p.is_dir() and p.name.endswith(".deleting"):
            shutil.rmtree(p, ignore_errors=True)


def checkpoint_keeper(folder: Path, trainer: Any) -> Any:
    """A TrainerCallback that keeps exactly what `--resume` needs.

    The trainer writes `checkpoint-N` in place (transformers 5 has no atomic checkpoint save, and its
    `save_total_limit` rotation would delete the previous checkpoint before anything marks the new one
    complete). After the trainer's save returns, every process has written its part (barrier), the main
    process writes the `CHECKPOINT_DONE` marker (atomically, with the checkpoint's size) and only then
    removes the older checkpoints. A kill at any point leaves a complete checkpoint: during a save the previous
    one, after it the new one; `Training.checkpoint()` takes the newest complete one and resume removes the rest.
    Checkpoints hold the adapter without PEFT's extra copies of a resized embedding (the resumed run rebuilds
    the base identically, seeded), so their size is the adapter, its optimizer state and the trainer's state.
    """
    import functools

    from transformers import TrainerCallback

    model = trainer.model
    if hasattr(model, "peft_config"):  # checkpoints: LoRA and trained rows only (like the final adapter)
        model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)

    class CheckpointKeeper(TrainerCallback):
        bytes: int | None = None

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trainer.accelerator.wait_for_everyone()
            if state.is_world_process_zero:
                ckpt = folder / f"checkpoint-{state.global_step}"
                size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
                write_json(ckpt / CHECKPOINT_DONE, {"step": state.global_step, "bytes": size})
                self.bytes = size
                drop_checkpoints(folder, keep=ckpt)
            trainer.accelerator.wait_for_everyone()

    return CheckpointKeeper()
