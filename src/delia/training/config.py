"""The options of `delia train` (`TrainConfig`) and the names of what a training run writes into its folder.

Readers of a training folder (`delia.models.load_trained`, `delia eval`, `delia probe`, `delia run`) import the
names from here; this module imports nothing of the trainer, so it sits below the modules that read the folder.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from delia.artifacts import TRAINER_LOG as TRAINER_LOG  # the trainer's log history, beside the record
from delia.artifacts import TrainRecord
from delia.config import Flags, StageConfig
from delia.errors import DeliaError
from delia.tokens import TokenInit

TRAIN_RECORD = TrainRecord.FILE  # written last: its presence marks a finished run
CHECKPOINTS = "checkpoints"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file of the adapter's weights
TRAIN_KIND = "train"  # the output marker's kind (files.mark_output)
ANCHOR_COLUMN = "anchor"  # per-row flag of diverse_loss kl: trained by KL to the base model, not by CE
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


class TrainConfig(StageConfig):
    """Options of `delia train`. Defaults are the paper's: LoRA r=16, alpha=16, dropout 0.05 on q/k/v/o,
    lr 2e-4 constant with 25 warmup steps, 1 epoch."""

    # the stage identity holds the model by its fingerprint, the new tokens and the eval data apart; resuming,
    # replacing, merging and keeping checkpoints leave the adapter as it is
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"model", "add_token", "eval_data", "resume", "overwrite",
                                                        "merge", "keep_checkpoints", "token_rows_from"})

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
    lora: bool = True
    """Train LoRA. Off (--no-lora): only the new tokens' rows train, the model stays as it is (with `soft_prompt`:
    prompt tuning, ProMoT's first phase)."""
    soft_prompt: int = Field(0, ge=0)
    """ProMoT: N new tokens <soft_0>... put before the first user turn of every task row (not before the mix's
    diverse rows). Trained first alone (LoRA off), then kept frozen while LoRA trains (`token_rows_from`):
    the soft prompt takes up the task's format. `delia eval` puts it before task prompts only."""
    token_rows_from: Path | None = None
    """A training folder with the same new tokens (`add_token`, `soft_prompt`): their rows start from its rows
    (ProMoT's second phase, from the first's folder)."""
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

    def soft_tokens(self) -> list[str]:
        """The soft prompt's tokens ([] for none)."""
        from delia.tokens import soft_prompt_tokens

        return soft_prompt_tokens(self.soft_prompt)

    def trains_soft_prompt(self) -> bool:
        """Whether the soft prompt's rows train (its first phase, without LoRA) or stay frozen (beside LoRA)."""
        return bool(self.soft_prompt) and not self.lora

    def token_problem(self) -> str | None:
        """What is wrong with the new tokens' options together (None: nothing), checked when the run starts: an
        experiment sets them in several sections, and one alone may be incomplete."""
        if not self.lora and not (self.add_token or self.soft_prompt):
            return "LoRA off (`lora: false`, --no-lora) trains only new tokens' rows: give `add_token` or `soft_prompt`"
        if (not self.lora or self.soft_prompt) and self.train_rows == "all":
            return "LoRA off and `soft_prompt` train or freeze only the new tokens' rows: `train_rows` new"
        if self.soft_prompt and self.lora and self.token_rows_from is None:
            return ("a soft prompt beside LoRA stays frozen: train it first (LoRA off: `lora: false`, --no-lora), "
                    "then give that run's folder as `token_rows_from`")
        return None

    @model_validator(mode="after")
    def _kl_rows_apart(self) -> TrainConfig:
        if self.diverse_loss == "kl" and self.batching == "packing":
            raise ValueError("diverse_loss kl needs each row apart (its flag says which loss it gets); "
                             "use batching group_by_length or random, not packing")
        return self
