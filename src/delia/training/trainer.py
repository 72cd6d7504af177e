"""`delia train`: LoRA SFT on a chat mixture with TRL's SFTTrainer, loss on the final assistant turn only.

Each row becomes a conversational prompt/completion pair (prompt = every turn before the last
assistant turn), which TRL turns into completion-only labels. New special tokens are added and
initialised by `delia.tokens`; only their embedding rows are trained and saved, as PEFT trainable tokens
(`delia.training.token_rows` makes them work, at the cost of the rows, under TRL's fused LM head; see README
"Training"). The output folder is a plain PEFT adapter with its tokenizer: transformers + peft load it
without delia. Checkpoints are marked complete and pruned to what `--resume` needs
(`delia.training.checkpoints`).

`TrainStage` is training as a stage (`delia.stage`): `delia run` caches it by its identity, and `--resume` refuses
checkpoints saved with another. `build_trainer` runs the setup as named steps, in order: `_settings` (what
delia_train.json records), `_take_out` (the output folder), `_read_rows`, `_load_base` (tokenizer, model, new
tokens), `_lora_config`, `_sft_args`, `_make_trainer`, `_speedups` (token rows, CPU paths), `_callbacks`
(progress, logs, checkpoints, important-token loss) and `_record` (what delia_train.json will hold).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from delia.artifacts import IMPORTANT_LOSS_FILE, TrainRecord
from delia.errors import DeliaError
from delia.files import check_output, holds_other_files, mark_output, sha256_path, write_jsonl
from delia.models import load_trained, model_identity
from delia.progress import Progress, ProgressCallback, report
from delia.stage import Stage
from delia.tokens import with_soft_prompt
from delia.training.checkpoints import (
    check_resume_key,
    checkpoint_keeper,
    complete_checkpoints,
    drop_checkpoints,
    write_resume_key,
)
from delia.training.config import (
    ADAPTER_WEIGHTS,
    ANCHOR_COLUMN,
    CHECKPOINTS,
    TRAIN_KIND,
    TRAIN_RECORD,
    TRAINER_LOG,
    TrainConfig,
    layer_indices,
)
from delia.versions import library_versions

log = logging.getLogger(__name__)


def train(
    data: Annotated[Path, "Training rows: a `delia mix` output or any chat dataset."],
    out: Annotated[Path, "Output folder: the PEFT adapter, its tokenizer and delia_train.json."],
    config: TrainConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> Path:
    """LoRA SFT of MODEL on DATA; writes a PEFT adapter folder to OUT and returns its path.

    `options` set any TrainConfig field over `config`. Under `accelerate launch` the same command runs
    distributed.

    Examples:\n
      delia train mix.jsonl --out runs/delia --eval-data task_eval.jsonl --add-token "<sep>"\n
      delia train mix.jsonl --out runs/delia --resume\n
      accelerate launch --config_file configs/accelerate/zero2.yaml -m delia train mix.jsonl --out runs/delia
    """
    return build_trainer(data, out, config, progress=progress, **options).fit()


@dataclass
class TrainStage(Stage[str]):
    """Training as a stage: its identity is the base model's fingerprint, the data's and eval data's hashes, the
    new tokens and the options; `delia run` caches it by that, and `--resume` compares it with the checkpoints'."""

    name: ClassVar[str] = "train"
    result: ClassVar[Any] = str  # the adapter folder

    data: Path
    config: TrainConfig
    model: dict[str, Any] | None = None  # {model: as named, fingerprint}; None: `config.model`, once needed
    label: str = ""

    @classmethod
    def of(cls, data: Path, cfg: TrainConfig) -> TrainStage:
        """The stage `delia train` runs: the model as `cfg` names it (resolved once the inputs are checked)."""
        return cls(data, cfg)

    def identity(self) -> dict[str, Any]:
        cfg = self.config
        found = {"model": self._model(), "data": sha256_path(self.data), "tokens": list(cfg.add_token or []),
                 "options": cfg.options()}
        if cfg.token_rows_from is not None:  # the rows it starts from, whatever folder holds them
            found["token_rows_from"] = sha256_path(cfg.token_rows_from / ADAPTER_WEIGHTS)
        return found | ({"eval_data": sha256_path(cfg.eval_data)} if cfg.eval_data else {})

    def run(self, folder: Path, progress: ProgressCallback | None = None) -> str:
        return str(_build(self, folder / "adapter", progress).fit())

    def _resolve_model(self) -> dict[str, Any]:
        return model_identity(self.config.model)


class Training:
    """A prepared training run (`build_trainer`): the TRL trainer, and what goes into delia_train.json; `fit()`
    runs it."""

    def __init__(self, trainer: Any, tokenizer: Any, out: Path, record: dict[str, Any], config: TrainConfig,
                 keeper: Any):
        self.trainer, self.tokenizer, self.out, self.record, self.config = trainer, tokenizer, out, record, config
        self.keeper = keeper  # the checkpoint callback: marks, prunes and measures checkpoints

    def checkpoint(self) -> str | None:
        """The newest complete checkpoint in OUT/checkpoints (None if there is none)."""
        found = complete_checkpoints(self.out / CHECKPOINTS)
        return str(found[-1]) if found else None

    def fit(self) -> Path:
        trainer, out = self.trainer, self.out
        resume_from = self.checkpoint() if self.config.resume else None
        if self.config.resume and trainer.is_world_process_zero():
            drop_checkpoints(out / CHECKPOINTS, keep=resume_from)  # a save a kill cut short, deletions left over
        trainer.accelerator.wait_for_everyone()
        if self.config.resume and resume_from is None:
            log.debug("no checkpoint in %s; starting from the beginning", out / CHECKPOINTS)
        result = trainer.train(resume_from_checkpoint=resume_from)
        main, tmp = trainer.is_world_process_zero(), out / ".adapter.tmp"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            trainer.save_model(str(tmp))  # every process takes part in gathering the sharded weights
        elif main:  # PEFT would add three more copies of a resized embedding matrix ("auto"); its trained copy suffices
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(tmp), save_embedding_layers=False)
        trainer.accelerator.wait_for_everyone()
        if not main:
            return out
        self.tokenizer.save_pretrained(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()
        write_jsonl(out / TRAINER_LOG, trainer.state.log_history)
        if self.config.merge:
            self._merge()
        if not self.config.keep_checkpoints:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        self.record.update(
            steps=trainer.state.global_step, epochs_run=trainer.state.epoch, resumed_from=resume_from,
            # input tokens of one pass over the data times the passes run (pro rata for a partial epoch)
            tokens_trained=round(self.record["data"]["train_tokens"] * (trainer.state.epoch or 0)),
            tokens_forward_only=round(self.record["data"]["anchor_tokens"] * (trainer.state.epoch or 0)),
            metrics=result.metrics, checkpoint_bytes=self.keeper.bytes,
            outputs=sorted(p.name for p in out.iterdir()) + [TRAIN_RECORD],
        )
        TrainRecord.model_validate(self.record).write(out)  # last: its presence marks a finished run
        return out

    def _merge(self) -> None:
        """Merge from the saved adapter (on CPU): works the same after sharded (FSDP/ZeRO-3) training."""
        model, _ = load_trained(self.out, device="cpu")
        merged = model.merge_and_unload()
        tmp, final = self.out / ".merged.tmp", self.out / "merged"
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)


def build_trainer(data: str | Path, out: str | Path, config: TrainConfig | None = None, *,
                  progress: ProgressCallback | None = None, **options: Any) -> Training:
    """Everything up to a ready SFTTrainer, for `train` to run (tests and benchmarks inspect or time it)."""
    cfg = TrainConfig.build(config, **options)
    return _build(TrainStage.of(Path(data), cfg), Path(out), progress)


def _build(stage: TrainStage, out: Path, progress: ProgressCallback | None) -> Training:
    from delia.tokens import parse_token_specs

    data, cfg = stage.data, stage.config
    if problem := cfg.token_problem():
        raise DeliaError(problem)
    specs = parse_token_specs(cfg.add_token)
    settings = _settings(data, out, cfg)
    _take_out(stage, out, settings)
    records, eval_records, anchors = _read_rows(data, cfg)
    path, tokenizer, base, tokens = _load_base(cfg, specs)
    peft_config, modules_to_save, token_rows = _lora_config(base, tokens, cfg)
    precision = _precision(cfg.precision)
    trainer, dropped = _make_trainer(cfg, base, tokenizer, _sft_args(out, cfg, bool(eval_records), precision),
                                     peft_config, records, eval_records)
    _freeze(trainer, cfg, tokenizer)
    mask_dropout = _speedups(trainer, token_rows)
    chosen = (cfg.important_token or [t for t, _ in specs]) if eval_records else []
    keeper = _callbacks(trainer, out, progress, tokenizer, eval_records, chosen, cfg.max_length)
    record = _record(trainer, data, cfg, settings, path, records, eval_records, anchors, dropped, precision,
                     peft_config, modules_to_save, token_rows, mask_dropout, tokens, chosen)
    if trainer.is_world_process_zero():
        write_resume_key(out / CHECKPOINTS, stage)
    return Training(trainer, tokenizer, out, record, cfg, keeper)


def _settings(data: Path, out: Path, cfg: TrainConfig) -> dict[str, Any]:
    """The settings as recorded: the data, the output, every option and the inputs' hashes (and as a resume compared
    them before the stage protocol)."""
    settings: dict[str, Any] = {"data": str(data), "out": str(out), **cfg.model_dump(mode="json")}
    settings["data_sha256"] = sha256_path(data)
    settings["eval_data_sha256"] = sha256_path(cfg.eval_data) if cfg.eval_data else None
    return settings


def _take_out(stage: TrainStage, out: Path, settings: dict[str, Any]) -> None:
    """Check the output folder and mark it as a training run's. Under `accelerate launch`: one check per process,
    one cleanup, then all go on."""
    from accelerate import PartialState

    state = PartialState()
    _check_out(stage, out, settings, state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:  # after every process's check, which must not see it half-written
        mark_output(out, TRAIN_KIND)  # an interrupted run's folder is recognised as delia's before any checkpoint


def _check_out(stage: TrainStage, out: Path, settings: dict[str, Any], main: bool) -> None:
    """Refuse to mix runs in one folder, or to write into a folder of other files; with --resume, refuse a
    checkpoint made with another identity."""
    data, cfg = stage.data, stage.config
    ckpt = out / CHECKPOINTS
    check_output(out, inputs=[p for p in (data, cfg.eval_data) if p], overwrite=True, folder=True)
    if holds_other_files(out, TRAIN_KIND) and not ((out / TRAIN_RECORD).exists() or ckpt.is_dir()):
        raise DeliaError(f"{out}: holds files that delia's training did not write; choose a new or empty folder")
    if cfg.overwrite:
        if not main:
            return
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out / "merged", ignore_errors=True)
        for name in (TRAIN_RECORD, TRAINER_LOG, IMPORTANT_LOSS_FILE):
            (out / name).unlink(missing_ok=True)
        return
    if (out / TRAIN_RECORD).exists():
        raise DeliaError(f"{out}: holds a finished training run; set `overwrite` to replace it")
    if ckpt.is_dir() and any(ckpt.iterdir()):
        if not cfg.resume:
            raise DeliaError(f"{out}: holds checkpoints of an unfinished run; set `resume` to continue it "
                             "or `overwrite` to start over")
        check_resume_key(ckpt, stage, settings, out)


def _read_rows(data: Path, cfg: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(training rows, eval rows, anchor rows: the diverse rows that diverse_loss kl trains by KL)."""
    from delia.data import read_chat

    records = read_chat(data, cfg.format).records  # type: ignore[arg-type]
    eval_records = read_chat(cfg.eval_data, cfg.format).records if cfg.eval_data else []  # type: ignore[arg-type]
    if not records:
        raise DeliaError(f"{data}: no training rows")
    kl = cfg.diverse_loss == "kl"
    anchors = sum(r.get("source") == "diverse" for r in records) if kl else 0
    if kl and not anchors:
        raise DeliaError(f"{data}: diverse_loss kl, but no row has source 'diverse' (a `delia mix` output has them)")
    if cfg.soft_prompt:
        prefix = "".join(cfg.soft_tokens())
        records = [r if r.get("source") == "diverse" else {**r, "messages": with_soft_prompt(r["messages"], prefix)}
                   for r in records]
        eval_records = [{**r, "messages": with_soft_prompt(r["messages"], prefix)} for r in eval_records]
    return records, eval_records, anchors


def _load_base(cfg: TrainConfig, specs: list[tuple[str, str | None]]) -> tuple[str, Any, Any, dict[str, Any] | None]:
    """(resolved model path, tokenizer, base model in fp32, the new tokens as `add_tokens` added them), seeded."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from delia.models import load_tokenizer, resolve_model
    from delia.tokens import add_tokens, joined_tokens
    from delia.training.token_rows import copy_token_rows

    set_seed(cfg.seed)
    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path, resolved=True)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens = add_tokens(base, tokenizer, specs, cfg.token_init, cfg.seed) if specs else None
    if cfg.soft_prompt:  # drawn like a random token's row whatever `token_init` (a soft token has no description)
        soft = add_tokens(base, tokenizer, [(t, None) for t in cfg.soft_tokens()], "random", cfg.seed)
        tokens = soft if tokens is None else joined_tokens(tokens, soft)
    if cfg.token_rows_from is not None:
        copy_token_rows(base, tokenizer, cfg.token_rows_from, [t["token"] for t in tokens["tokens"]] if tokens else [])
    return path, tokenizer, base, tokens


def _lora_config(base: Any, tokens: dict[str, Any] | None, cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """(PEFT LoraConfig, `modules_to_save`, `trainable_token_indices`): LoRA on the chosen modules and layers, and
    the new tokens' embedding rows (`token_rows.embedding_training`)."""
    from peft import LoraConfig

    from delia.training.token_rows import embedding_training

    modules_to_save, token_rows = embedding_training(base, tokens, cfg.train_rows)
    peft_config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
        target_modules=list(cfg.target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]), task_type="CAUSAL_LM",
        layers_to_transform=layer_indices(cfg.layers, base.config.num_hidden_layers),
        modules_to_save=list(modules_to_save) if modules_to_save else None,  # PEFT extends the list it gets
        # tied rows: PEFT ties the head's trainable tokens to the input's by itself; a tied matrix copy needs asking
        trainable_token_indices=token_rows,
        ensure_weight_tying=bool(modules_to_save and tokens and tokens["tied_embeddings"]),
    )
    return peft_config, modules_to_save, token_rows


def _freeze(trainer: Any, cfg: TrainConfig, tokenizer: Any) -> None:
    """`lora` false: LoRA's matrices stay at their init (B = 0: the model unchanged) and out of the optimizer, so
    only the new tokens' rows train. A soft prompt beside LoRA: its rows get no gradient (`freeze_token_rows`)."""
    from delia.training.token_rows import freeze_token_rows

    if not cfg.lora:
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(False)
    elif cfg.soft_prompt:
        freeze_token_rows(trainer.model, tokenizer.convert_tokens_to_ids(cfg.soft_tokens()))


def _precision(precision: str) -> dict[str, bool]:
    import torch

    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _sft_args(out: Path, cfg: TrainConfig, has_eval: bool, precision: dict[str, bool]) -> Any:
    """TRL's SFTConfig for these options: checkpoints under OUT/checkpoints, no reporting or printing of its own."""
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out / CHECKPOINTS), seed=cfg.seed, data_seed=cfg.seed, report_to=[],
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, activation_checkpointing=cfg.gradient_checkpointing,
        dataloader_pin_memory=torch.cuda.is_available(), ddp_find_unused_parameters=False,
        # without a GPU, processes started by `accelerate launch`/torchrun only form one run (gloo) with use_cpu
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        max_length=cfg.max_length, packing=cfg.batching == "packing",
        train_sampling_strategy="group_by_length" if cfg.batching == "group_by_length" else "random",
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        eval_strategy="steps" if has_eval else "no", eval_steps=cfg.eval_steps, eval_on_start=has_eval,
        dataset_num_proc=None, disable_tqdm=True, **precision,  # progress and logs: `_report_to`
    )


def _make_trainer(cfg: TrainConfig, base: Any, tokenizer: Any, args: Any, peft_config: Any,
                  records: list[dict[str, Any]], eval_records: list[dict[str, Any]]) -> tuple[Any, Any]:
    """(the SFTTrainer, or with diverse_loss kl the AnchoredSFTTrainer, over the model wrapped in LoRA; the rows it
    dropped, None when packing). Refuses a trainer without a row to train or evaluate, or without the adapter."""
    import datasets
    from peft import PeftModel
    from trl import SFTTrainer

    datasets.disable_progress_bars()
    kl, has_eval = cfg.diverse_loss == "kl", bool(eval_records)
    trainer_class, extra = SFTTrainer, {}
    if kl:
        from delia.training.anchor import AnchoredSFTTrainer

        trainer_class = AnchoredSFTTrainer
        extra = {"kl_coef": cfg.kl_coef, "kl_temperature": cfg.kl_temperature, "kl_chunk": cfg.kl_chunk}
    trainer = trainer_class(
        model=base, args=args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=datasets.Dataset.from_list(_to_prompt_completion(records, anchor=kl)),
        eval_dataset=datasets.Dataset.from_list(_to_prompt_completion(eval_records)) if has_eval else None, **extra,
    )
    dropped = None if cfg.batching == "packing" else {  # packed datasets count blocks, not rows
        "train": len(records) - len(trainer.train_dataset),
        "eval": len(eval_records) - (len(trainer.eval_dataset) if has_eval else 0)}
    if dropped and any(dropped.values()):
        log.warning("dropped rows whose prompt alone fills max_length %s (no response token left to train on): %s",
                    cfg.max_length, dropped)
        if len(trainer.train_dataset) == 0 or (has_eval and len(trainer.eval_dataset) == 0):
            raise DeliaError(f"no {'training' if len(trainer.train_dataset) == 0 else 'eval'} row fits in "
                             f"`max_length` {cfg.max_length}; raise it")
    if not isinstance(trainer.model, PeftModel):  # never fall back to full-model training silently
        raise DeliaError("the trainer did not wrap the model with the LoRA adapter")
    return trainer, dropped


def _speedups(trainer: Any, token_rows: Any) -> int:
    """The new tokens' rows trained at the cost of the rows (`token_rows`); on CPU, the cheaper LoRA dropout and
    the LM head on label positions only (`delia.patches`). Returns how many dropout layers were replaced."""
    from delia.patches.peft_mask_dropout import use_mask_dropout
    from delia.patches.trl_label_positions import score_label_positions_only
    from delia.training.token_rows import train_token_rows

    if token_rows is not None:
        train_token_rows(trainer)
    if trainer.args.device.type != "cpu":
        return 0
    replaced = use_mask_dropout(trainer.model)
    score_label_positions_only(trainer)
    return replaced


def _callbacks(trainer: Any, out: Path, progress: ProgressCallback | None, tokenizer: Any,
               eval_records: list[dict[str, Any]], chosen: list[str], max_length: int) -> Any:
    """Progress and logs (`_report_to`), the checkpoint keeper (returned) and, with eval rows and chosen tokens,
    the important-token loss."""
    from delia.important import encode_rows, important_ids, make_callback

    _report_to(trainer, progress)
    keeper = checkpoint_keeper(out / CHECKPOINTS, trainer)
    trainer.add_callback(keeper)
    if eval_records and chosen:
        trainer.add_callback(make_callback(encode_rows(tokenizer, eval_records, max_length),
                                           important_ids(tokenizer, chosen), out / IMPORTANT_LOSS_FILE))
    return keeper


def _record(trainer: Any, data: Path, cfg: TrainConfig, settings: dict[str, Any], path: str,
            records: list[dict[str, Any]], eval_records: list[dict[str, Any]], anchors: int, dropped: Any,
            precision: dict[str, bool], peft_config: Any, modules_to_save: Any, token_rows: Any, mask_dropout: int,
            tokens: dict[str, Any] | None, chosen: list[str]) -> dict[str, Any]:
    """What delia_train.json (`delia.artifacts.TrainRecord`) holds, before `Training.fit` adds what the run did."""
    trainable, total = trainer.model.get_nb_trainable_parameters()
    train_ids = trainer.train_dataset["input_ids"]
    return {
        "settings": {k: v for k, v in settings.items() if not k.endswith("_sha256")},
        "model": {"name": str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model, "path": path},
        "seed": cfg.seed,
        "data": {"path": str(data), "sha256": settings["data_sha256"], "rows": len(records),
                 "train_tokens": sum(len(x) for x in train_ids),
                 "anchor_rows": anchors,
                 "anchor_tokens": sum(len(x) for x, a in zip(train_ids, trainer.train_dataset[ANCHOR_COLUMN],
                                                             strict=True) if a)
                 if cfg.diverse_loss == "kl" else 0,
                 "sources": _sources(records), "dropped_too_long": dropped},
        "eval_data": {"path": settings["eval_data"], "sha256": settings["eval_data_sha256"], "rows": len(eval_records)},
        "versions": library_versions(),
        "device": str(trainer.args.device), "processes": trainer.args.world_size,
        "precision": next((k for k, on in precision.items() if on), "fp32"),
        "peft": {"target_modules": sorted(peft_config.target_modules), "layers": peft_config.layers_to_transform,
                 "modules_to_save": modules_to_save,
                 "trainable_token_indices": token_rows, "mask_dropout_layers": mask_dropout,
                 "trainable_params": trainable, "total_params": total},
        "new_tokens": tokens,
        "soft_prompt": "".join(cfg.soft_tokens()),
        "important_tokens": chosen,
    }


def _to_prompt_completion(records: list[dict[str, Any]], anchor: bool = False) -> list[dict[str, Any]]:
    """Conversational prompt/completion rows: TRL masks the prompt, so only the last assistant turn is trained.

    With `anchor`, each row also says whether it is a diverse row, trained by KL to the base model.
    """
    rows = [{"prompt": r["messages"][:-1], "completion": [r["messages"][-1]]} for r in records]
    if anchor:
        for row, r in zip(rows, records, strict=True):
            row[ANCHOR_COLUMN] = r.get("source") == "diverse"
    return rows


def _report_to(trainer: Any, progress: ProgressCallback | None) -> None:
    """The trainer's progress to `progress` (optimizer steps) and its logs (loss, learning rate, ...) to the
    `delia.training.trainer` logger, in place of transformers' own printing."""
    from transformers import PrinterCallback, TrainerCallback

    class Reporter(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                report(progress, Progress("training", state.global_step, state.max_steps, unit="steps"))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if state.is_world_process_zero and logs:
                log.info("step %d: %s", state.global_step,
                         "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()))

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Reporter())


def _sources(records: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        key = str(r.get("source", "unknown"))
        counts[key] = counts.get(key, 0) + 1
    return counts
