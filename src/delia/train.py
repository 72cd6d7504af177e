"""`delia train`: LoRA SFT on a chat mixture with TRL's SFTTrainer, loss on the final assistant turn only.

Each row becomes a conversational prompt/completion pair (prompt = every turn before the last
assistant turn), which TRL turns into completion-only labels. New special tokens are added and
initialised by `delia.tokens`; only their embedding rows are trained and saved, as PEFT trainable tokens
(`_train_token_rows` makes them work, at the cost of the rows, under TRL's fused LM head; see README
"Training"). The output folder is a plain PEFT adapter with its tokenizer: transformers + peft load it
without delia. Checkpoints are marked complete and pruned to what `--resume` needs (`_checkpoint_keeper`).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from delia.config import Flags, StageConfig
from delia.errors import DeliaError
from delia.files import (
    changed_settings,
    check_output,
    holds_other_files,
    mark_output,
    sha256_path,
    write_json,
    write_jsonl,
)
from delia.important import IMPORTANT_LOSS_FILE
from delia.models import load_trained
from delia.progress import Progress, ProgressCallback, report
from delia.tokens import TokenInit
from delia.versions import library_versions

TRAIN_RECORD = "delia_train.json"
TRAINER_LOG = "trainer_log.jsonl"
CHECKPOINTS = "checkpoints"
TRAIN_KIND = "train"  # the output marker's kind (files.mark_output)
LAYERS = re.compile(r"upper-half|lower-half|\d+(-\d+)?(,\d+(-\d+)?)*")


def layer_indices(spec: str | None, layers: int) -> list[int] | None:
    """The decoder layers a `layers` option names, for PEFT's `layers_to_transform` (None: every layer)."""
    if spec is None:
        return None
    if spec in ("upper-half", "lower-half"):
        half = layers // 2
        return list(range(half, layers)) if spec == "upper-half" else list(range(half))
    picked = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        picked.update(range(int(first), int(last or first) + 1))
    if not picked or max(picked) >= layers:
        raise DeliaError(f"`layers` {spec}: the model has layers 0 to {layers - 1}")
    return sorted(picked)
RESUME_KEY_FILE = "resume_key.json"  # inside CHECKPOINTS: the settings a --resume must match
CHECKPOINT_DONE = "delia_checkpoint.json"  # inside a checkpoint: written last, marks it complete
LEGACY_RESUME_KEY_FILE = "delia_run.json"  # earlier name, still read on --resume
ANCHOR_COLUMN = "anchor"  # per-row flag of diverse_loss kl: trained by KL to the base model, not by CE
# Settings that may differ between a killed run and its --resume.
_RESUME_FREE = {"resume", "overwrite", "merge", "keep_checkpoints", "out"}
log = logging.getLogger(__name__)


class TrainConfig(StageConfig):
    """Options of `delia train`. Defaults are the paper's: LoRA r=16, alpha=16, dropout 0.05 on q/k/v/o,
    lr 2e-4 constant with 25 warmup steps, 1 epoch."""

    model: Annotated[str, Flags("--model", "-m")] = "smollm2-135m"
    """Base model: bundled name, folder or .gguf."""
    eval_data: Path | None = None
    """Task eval rows: eval loss and important-token loss at every evaluation."""
    format: Annotated[str, Flags("--format", "-f")] = "auto"
    """Format of the data and the eval data (auto-detected)."""
    lora_r: int = Field(16, ge=1)
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha."""
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """LoRA dropout."""
    target_modules: Annotated[list[str] | None, Flags("--target-module")] = None
    """Module adapted by LoRA, repeatable (default: q/k/v/o projections)."""
    layers: str | None = Field(None, pattern=LAYERS.pattern)
    """Decoder layers that get LoRA: upper-half, lower-half, or indices and ranges such as 6-11 or 0,2,4
    (default: all). Adapting only the upper layers spares the lower ones that task alignment would move."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: str = "constant_with_warmup"
    """transformers scheduler name (linear, cosine, constant_with_warmup, ...)."""
    warmup_steps: int = Field(25, ge=0)
    """Linear warmup steps."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the data."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run the epochs)."""
    batch_size: int = Field(8, ge=1)
    """Rows per device per step."""
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation steps."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    max_length: int = Field(1024, ge=1)
    """Tokens per row (longer rows are cut at the end)."""
    batching: Literal["group_by_length", "random", "packing"] = "group_by_length"
    """group_by_length (least padding on DELIA mixtures, see benchmarks/train_throughput.py), random, or packing."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto (bf16 on a GPU that supports it, else fp32), fp32, bf16 or fp16."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory."""
    add_token: list[str] | None = None
    """New special token, repeatable: TOKEN or TOKEN=DESCRIPTION (what it stands for)."""
    token_init: TokenInit = "random"
    """Init of new token rows: random (normal, std of the matrix, seeded), mean, mean-noise, description."""
    train_rows: Literal["new", "all"] = "new"
    """Embedding rows trained with `add_token`: new (only the added tokens' rows) or all."""
    diverse_loss: Literal["ce", "kl"] = "ce"
    """Loss of the mixture's diverse rows (source 'diverse'): ce (their text, as DELIA) or kl (the base model's
    next-token distribution at every answer position: KL(base || tuned), adapter off)."""
    kl_coef: float = Field(1.0, ge=0)
    """Weight of the KL of diverse rows against the task's CE."""
    kl_temperature: float = Field(1.0, gt=0)
    """Temperature of both distributions in the KL."""
    kl_chunk: int = Field(1024, ge=1)
    """Positions per chunk of the KL (memory: chunk x vocab logits)."""
    important_token: list[str] | None = None
    """Token whose loss is tracked on the eval data, repeatable (default: the added tokens)."""
    eval_steps: int = Field(25, ge=1)
    """Evaluate every N steps (with `eval_data`)."""
    logging_steps: int = Field(5, ge=1)
    """Log the training loss every N steps."""
    save_steps: int = Field(100, ge=1)
    """Checkpoint every N steps (for `resume`)."""
    seed: int = 0
    """Seed of LoRA init, token init, data order and dropout."""
    resume: bool = False
    """Continue from the last checkpoint in OUT/checkpoints."""
    overwrite: bool = False
    """Replace a finished or unfinished run in OUT."""
    merge: bool = False
    """Also write the merged full model to OUT/merged."""
    keep_checkpoints: bool = False
    """Keep OUT/checkpoints after a successful run."""

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        from transformers import SchedulerType

        names = [t.value for t in SchedulerType]
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            raise ValueError(f"unknown scheduler {name!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                               f"; expected one of {', '.join(names)}"))
        return name

    @model_validator(mode="after")
    def _kl_rows_apart(self) -> TrainConfig:
        if self.diverse_loss == "kl" and self.batching == "packing":
            raise ValueError("diverse_loss kl needs each row apart (its flag says which loss it gets); "
                             "use batching group_by_length or random, not packing")
        return self


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


class Training:
    """A prepared training run (`build_trainer`): the TRL trainer, and what goes into delia_train.json; `fit()`
    runs it."""

    def __init__(self, trainer: Any, tokenizer: Any, out: Path, record: dict[str, Any], settings: dict[str, Any],
                 keeper: Any):
        self.trainer, self.tokenizer, self.out, self.record, self.settings = trainer, tokenizer, out, record, settings
        self.keeper = keeper  # the checkpoint callback: marks, prunes and measures checkpoints

    def checkpoint(self) -> str | None:
        """The newest complete checkpoint in OUT/checkpoints (None if there is none)."""
        found = complete_checkpoints(self.out / CHECKPOINTS)
        return str(found[-1]) if found else None

    def fit(self) -> Path:
        trainer, out = self.trainer, self.out
        resume_from = self.checkpoint() if self.settings["resume"] else None
        if self.settings["resume"] and trainer.is_world_process_zero():
            _drop_checkpoints(out / CHECKPOINTS, keep=resume_from)  # a save a kill cut short, deletions left over
        trainer.accelerator.wait_for_everyone()
        if self.settings["resume"] and resume_from is None:
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
        if self.settings["merge"]:
            self._merge()
        if not self.settings["keep_checkpoints"]:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        self.record.update(
            steps=trainer.state.global_step, epochs_run=trainer.state.epoch, resumed_from=resume_from,
            # input tokens of one pass over the data times the passes run (pro rata for a partial epoch)
            tokens_trained=round(self.record["data"]["train_tokens"] * (trainer.state.epoch or 0)),
            tokens_forward_only=round(self.record["data"]["anchor_tokens"] * (trainer.state.epoch or 0)),
            metrics=result.metrics, checkpoint_bytes=self.keeper.bytes,
            outputs=sorted(p.name for p in out.iterdir()) + [TRAIN_RECORD],
        )
        write_json(out / TRAIN_RECORD, self.record)  # last: its presence marks a finished run
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


def _to_prompt_completion(records: list[dict[str, Any]], anchor: bool = False) -> list[dict[str, Any]]:
    """Conversational prompt/completion rows: TRL masks the prompt, so only the last assistant turn is trained.

    With `anchor`, each row also says whether it is a diverse row, trained by KL to the base model.
    """
    rows = [{"prompt": r["messages"][:-1], "completion": [r["messages"][-1]]} for r in records]
    if anchor:
        for row, r in zip(rows, records, strict=True):
            row[ANCHOR_COLUMN] = r.get("source") == "diverse"
    return rows


def _check_out(out: Path, settings: dict[str, Any], main: bool) -> None:
    """Refuse to mix runs in one folder, or to write into a folder of other files; with --resume, refuse a
    checkpoint made with other settings."""
    ckpt = out / CHECKPOINTS
    check_output(out, inputs=[p for p in (settings["data"], settings["eval_data"]) if p], overwrite=True, folder=True)
    if holds_other_files(out, TRAIN_KIND) and not ((out / TRAIN_RECORD).exists() or ckpt.is_dir()):
        raise DeliaError(f"{out}: holds files that delia's training did not write; choose a new or empty folder")
    if settings["overwrite"]:
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
        if not settings["resume"]:
            raise DeliaError(f"{out}: holds checkpoints of an unfinished run; set `resume` to continue it "
                             "or `overwrite` to start over")
        key_file = next((ckpt / n for n in (RESUME_KEY_FILE, LEGACY_RESUME_KEY_FILE) if (ckpt / n).exists()), None)
        saved = json.loads(key_file.read_text()) if key_file else {}
        now = _resume_key(settings)
        diff = changed_settings(saved, now)
        if diff:
            raise DeliaError(f"{out}: `resume` with settings or data that differ from the checkpointed run: "
                             f"{', '.join(diff)}")


def _resume_key(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in _RESUME_FREE}



def _precision(precision: str) -> dict[str, bool]:
    import torch

    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def build_trainer(data: str | Path, out: str | Path, config: TrainConfig | None = None, *,
                  progress: ProgressCallback | None = None, **options: Any) -> Training:
    """Everything up to a ready SFTTrainer, for `train` to run (tests and benchmarks inspect or time it)."""
    import datasets
    import torch
    from accelerate import PartialState
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    from delia.cpu_training import score_label_positions_only, use_mask_dropout
    from delia.data import read_chat
    from delia.important import encode_rows, important_ids, make_callback
    from delia.models import load_tokenizer, resolve_model
    from delia.tokens import add_tokens, parse_token_specs

    cfg = TrainConfig.build(config, **options)
    data, out = Path(data), Path(out)
    # the settings as recorded and compared on resume: the data, the output and every option
    s: dict[str, Any] = {"data": str(data), "out": str(out), **cfg.model_dump(mode="json")}
    kl = cfg.diverse_loss == "kl"
    precision = _precision(s["precision"])
    specs = parse_token_specs(s["add_token"])
    s["data_sha256"] = sha256_path(data)
    s["eval_data_sha256"] = sha256_path(Path(s["eval_data"])) if s["eval_data"] else None
    state = PartialState()  # under `accelerate launch`: one check per process, one cleanup, then all go on
    _check_out(out, s, state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:  # after every process's check, which must not see it half-written
        mark_output(out, TRAIN_KIND)  # an interrupted run's folder is recognised as delia's before any checkpoint

    records = read_chat(data, s["format"]).records  # type: ignore[arg-type]
    eval_records = read_chat(s["eval_data"], s["format"]).records if s["eval_data"] else []  # type: ignore[arg-type]
    if not records:
        raise DeliaError(f"{data}: no training rows")
    anchors = sum(r.get("source") == "diverse" for r in records) if kl else 0
    if kl and not anchors:
        raise DeliaError(f"{data}: diverse_loss kl, but no row has source 'diverse' (a `delia mix` output has them)")

    set_seed(s["seed"])
    path = resolve_model(s["model"])
    tokenizer = load_tokenizer(path, resolved=True)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens = add_tokens(base, tokenizer, specs, s["token_init"], s["seed"]) if specs else None

    modules_to_save, token_rows = _embedding_training(base, tokens, s["train_rows"])
    peft_config = LoraConfig(
        r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"], bias="none",
        target_modules=s["target_modules"] or ["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM",
        layers_to_transform=layer_indices(s["layers"], base.config.num_hidden_layers),
        modules_to_save=list(modules_to_save) if modules_to_save else None,  # PEFT extends the list it gets
        # tied rows: PEFT ties the head's trainable tokens to the input's by itself; a tied matrix copy needs asking
        trainable_token_indices=token_rows, ensure_weight_tying=bool(modules_to_save and tokens["tied_embeddings"]),
    )
    has_eval = bool(eval_records)
    args = SFTConfig(
        output_dir=str(out / CHECKPOINTS), seed=s["seed"], data_seed=s["seed"], report_to=[],
        learning_rate=s["learning_rate"], lr_scheduler_type=s["lr_scheduler"], warmup_steps=s["warmup_steps"],
        num_train_epochs=s["epochs"], max_steps=s["max_steps"], weight_decay=s["weight_decay"],
        per_device_train_batch_size=s["batch_size"], per_device_eval_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"], activation_checkpointing=s["gradient_checkpointing"],
        dataloader_pin_memory=torch.cuda.is_available(), ddp_find_unused_parameters=False,
        # without a GPU, processes started by `accelerate launch`/torchrun only form one run (gloo) with use_cpu
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        max_length=s["max_length"], packing=s["batching"] == "packing",
        train_sampling_strategy="group_by_length" if s["batching"] == "group_by_length" else "random",
        logging_steps=s["logging_steps"], save_strategy="steps", save_steps=s["save_steps"],
        eval_strategy="steps" if has_eval else "no", eval_steps=s["eval_steps"], eval_on_start=has_eval,
        dataset_num_proc=None, disable_tqdm=True, **precision,  # progress and logs: `_reporter`
    )
    datasets.disable_progress_bars()
    trainer_class, extra = SFTTrainer, {}
    if kl:
        from delia.anchor import AnchoredSFTTrainer

        trainer_class = AnchoredSFTTrainer
        extra = {"kl_coef": s["kl_coef"], "kl_temperature": s["kl_temperature"], "kl_chunk": s["kl_chunk"]}
    trainer = trainer_class(
        model=base, args=args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=datasets.Dataset.from_list(_to_prompt_completion(records, anchor=kl)),
        eval_dataset=datasets.Dataset.from_list(_to_prompt_completion(eval_records)) if has_eval else None, **extra,
    )
    dropped = None if s["batching"] == "packing" else {  # packed datasets count blocks, not rows
        "train": len(records) - len(trainer.train_dataset),
        "eval": len(eval_records) - (len(trainer.eval_dataset) if has_eval else 0)}
    if dropped and any(dropped.values()):
        log.warning("dropped rows whose prompt alone fills max_length %s (no response token left to train on): %s",
                    s["max_length"], dropped)
        if len(trainer.train_dataset) == 0 or (has_eval and len(trainer.eval_dataset) == 0):
            raise DeliaError(f"no {'training' if len(trainer.train_dataset) == 0 else 'eval'} row fits in "
                             f"`max_length` {s['max_length']}; raise it")
    if not isinstance(trainer.model, PeftModel):  # never fall back to full-model training silently
        raise DeliaError("the trainer did not wrap the model with the LoRA adapter")

    if token_rows is not None:
        if trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and
                                       trainer.accelerator.state.deepspeed_plugin.zero_stage == 3):
            raise DeliaError("`train_rows` new (PEFT trainable tokens) is not supported with FSDP or ZeRO-3, "
                             "which shard the embedding; set `train_rows` all with these")
        _train_token_rows(trainer)

    mask_dropout = 0
    if trainer.args.device.type == "cpu":
        mask_dropout = use_mask_dropout(trainer.model)
        score_label_positions_only(trainer)
    _report_to(trainer, progress)
    keeper = _checkpoint_keeper(out / CHECKPOINTS, trainer)
    trainer.add_callback(keeper)

    chosen = s["important_token"] or [t for t, _ in specs]
    if has_eval and chosen:
        trainer.add_callback(make_callback(encode_rows(tokenizer, eval_records, s["max_length"]),
                                           important_ids(tokenizer, chosen), out / IMPORTANT_LOSS_FILE))

    trainable, total = trainer.model.get_nb_trainable_parameters()
    record = {
        "settings": {k: v for k, v in s.items() if not k.endswith("_sha256")},
        "model": {"name": str(Path(s["model"]).resolve()) if Path(s["model"]).exists() else s["model"],
                  "path": path},
        "seed": s["seed"],
        "data": {"path": str(data), "sha256": s["data_sha256"], "rows": len(records),
                 "train_tokens": sum(len(x) for x in trainer.train_dataset["input_ids"]),
                 "anchor_rows": anchors,
                 "anchor_tokens": sum(len(x) for x, a in zip(trainer.train_dataset["input_ids"],
                                                             trainer.train_dataset[ANCHOR_COLUMN], strict=True) if a)
                 if kl else 0,
                 "sources": _sources(records), "dropped_too_long": dropped},
        "eval_data": {"path": s["eval_data"], "sha256": s["eval_data_sha256"], "rows": len(eval_records)},
        "versions": library_versions(),
        "device": str(trainer.args.device), "processes": trainer.args.world_size,
        "precision": next((k for k, on in precision.items() if on), "fp32"),
        "peft": {"target_modules": sorted(peft_config.target_modules), "layers": peft_config.layers_to_transform,
                 "modules_to_save": modules_to_save,
                 "trainable_token_indices": token_rows, "mask_dropout_layers": mask_dropout,
                 "trainable_params": trainable, "total_params": total},
        "new_tokens": tokens,
        "important_tokens": chosen if has_eval else [],
    }
    if trainer.is_world_process_zero():
        write_json(out / CHECKPOINTS / RESUME_KEY_FILE, _resume_key(s))
    return Training(trainer, tokenizer, out, record, s, keeper)


def _embedding_training(base: Any, tokens: dict[str, Any] | None,
                        train_rows: str) -> tuple[list[str] | None, list[int] | dict[str, list[int]] | None]:
    """(PEFT `modules_to_save`, PEFT `trainable_token_indices`) that train the embedding rows of `tokens`.

    `new`: only the tokens' rows are parameters (PEFT trainable tokens): on the input embedding, and on the
    output embedding too when untied (tied: PEFT ties the head's rows to the input's). `all`: a trainable
    copy of the whole matrix (and of the untied head).
    """
    from delia.tokens import embedding_module_names

    if not tokens:
        return None, None
    in_name, out_name = embedding_module_names(base)
    untied_head = [out_name] if out_name and not tokens["tied_embeddings"] else []
    if train_rows == "all":
        return [in_name] + untied_head, None
    rows = [t["id"] for t in tokens["tokens"]]
    return None, ({in_name: rows, out_name: rows} if untied_head else rows)


def _train_token_rows(trainer: Any) -> None:
    """Make PEFT trainable-token rows train under TRL's fused LM head, and keep them out of weight decay.

    TRL's fused head (`trl.trainer.utils.add_fused_lm_head`) reads `lm_head.weight` and `lm_head.bias`
    directly. PEFT's `TrainableTokensWrapper` answers `.weight` with the merged matrix (base rows plus the
    trained rows, differentiable in the rows), but has no `bias` attribute: the wrapper gets its base layer's
    bias (None for the heads delia supports). The rows are left out of weight decay like the rest of the
    embedding in `--train-rows all` (decoupled decay would pull them towards zero, not towards their init).
    """
    from peft.utils.other import TrainableTokensWrapper

    head = trainer.model.get_output_embeddings()
    if isinstance(head, TrainableTokensWrapper) and "bias" not in vars(head):
        bias = getattr(head.token_adapter.get_base_layer(), "bias", None)
        if bias is not None:
            raise DeliaError("`train_rows` new: the model's output head has a bias, which TRL's fused LM head "
                             "cannot read through PEFT trainable tokens; set `train_rows` all")
        object.__setattr__(head, "bias", None)
    decay = trainer.get_decay_parameter_names
    trainer.get_decay_parameter_names = lambda model: [n for n in decay(model) if "trainable_tokens_delta" not in n]
    _fast_token_rows(trainer)


def _fast_token_rows(trainer: Any) -> None:
    """Train the token rows at the cost of the rows: same values, same gradients, without whole-matrix work.

    PEFT's trainable tokens compute with the merged matrix (a copy of the whole embedding with the rows
    written in). Its gradient is a whole matrix too: a dense embedding gradient on the input side, and on
    the output side TRL's fused head, seeing a `weight` that requires grad, computes the gradient of every
    head row (one more tokens x vocab x hidden matmul per step) to keep the new rows' part of it. Here:

    - input: the base embedding's lookup (frozen), with the new tokens' positions replaced by their rows;
    - output, in TRL's fused forward: the head is handed the merged matrix detached (the fused kernel then
      computes only the hidden-state gradient, with the trained rows' values in the softmax), and the new
      rows' gradient is added through a term that is exactly zero in value, `sum_r (1[target = r] - p_r)
      (z_r - sg(z_r))` per position, with z_r = sg(h) . row_r and p_r from the kernel's own log-normaliser
      (target logit - log-prob): the gradient of the log-probability with respect to row r.

    Log-probabilities and loss keep their values bit for bit. Used for plain heads only (no logit scale or
    softcap, TRL's temperature 1, no bias), otherwise PEFT's path runs unchanged; outside training
    (no grad, merged or disabled adapters) too. `entropy` from the fused head carries no gradient to the
    rows (SFT's loss does not use it).
    """
    import functools

    import torch
    from peft.utils.other import TrainableTokensWrapper

    base = trainer.model.get_base_model()
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if not isinstance(emb, TrainableTokensWrapper):
        return

    def active(layer: Any) -> list[str]:
        if layer.disable_adapters or layer.merged or not torch.is_grad_enabled():
            return []
        return [a for a in layer.active_adapters if a in layer.trainable_tokens_delta]

    layer_in = emb.token_adapter
    if type(layer_in.base_layer) is torch.nn.Embedding and layer_in._get_embed_scale() is None:
        peft_forward = layer_in.forward

        def embed(x: Any, *args: Any, **kwargs: Any) -> Any:
            names = active(layer_in)
            if not names or args or kwargs:
                return peft_forward(x, *args, **kwargs)
            out = layer_in.base_layer(x)
            for name in names:
                for j, i in enumerate(layer_in.token_indices[name]):
                    row = layer_in.trainable_tokens_delta[name][j].to(out.dtype)
                    out = torch.where((x == i).unsqueeze(-1), row, out)
            return out

        layer_in.forward = embed

    text = base.config.get_text_config()
    plain_head = (isinstance(head, TrainableTokensWrapper) and getattr(head, "bias", None) is None
                  and not any(getattr(text, k, None) is not None for k in (
                      "final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                      "logits_scaling")))
    if not plain_head or "forward" not in vars(base):  # TRL sets its fused forward on the model instance
        return
    fused, backbone, layer_out = base.forward, getattr(base, base.base_model_prefix), head.token_adapter

    @functools.wraps(fused)
    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        names = active(layer_out) if fused_lm_head else []
        call = dict(fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                    num_items_in_batch=num_items_in_batch)
        if not names:
            return fused(*args, **call, **kwargs)
        seen: list[Any] = []
        hook = backbone.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state))
        weight = layer_out.get_merged_weights(names).detach()
        object.__setattr__(head, "weight", weight)  # what the fused head reads, for this call only
        try:
            out = fused(*args, **call, **kwargs)
        finally:
            hook.remove()
            del head.__dict__["weight"]
        h = seen[-1][:, :-1] if shift_labels is None else seen[-1]
        targets = (labels[:, 1:] if shift_labels is None else shift_labels).to(weight.device)
        mask = out.label_mask
        hm, tm = h.to(weight.device)[mask].detach().float(), targets[mask]
        log_norm = (hm * weight[tm].float()).sum(-1) - out.log_probs[mask].detach().float()
        term = hm.new_zeros(hm.shape[0])
        for name in names:
            ids = torch.tensor(layer_out.token_indices[name], device=weight.device)
            z = hm @ layer_out.trainable_tokens_delta[name].float().t()
            p = torch.exp(z.detach() - log_norm.unsqueeze(-1))
            term = term + (((tm.unsqueeze(-1) == ids).float() - p) * (z - z.detach())).sum(-1)
        zero = out.log_probs.new_zeros(out.log_probs.shape).masked_scatter(mask, term.to(out.log_probs.dtype))
        out.log_probs = out.log_probs + zero
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        out.loss = out.loss - zero.sum() / count
        return out

    base.forward = forward


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


def _drop_checkpoints(folder: Path, keep: str | Path | None) -> None:
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


def _checkpoint_keeper(folder: Path, trainer: Any) -> Any:
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
                _drop_checkpoints(folder, keep=ckpt)
            trainer.accelerator.wait_for_everyone()

    return CheckpointKeeper()


def _report_to(trainer: Any, progress: ProgressCallback | None) -> None:
    """The trainer's progress to `progress` (optimizer steps) and its logs (loss, learning rate, ...) to the
    `delia.train` logger, in place of transformers' own printing."""
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
