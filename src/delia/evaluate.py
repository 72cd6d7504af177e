"""`delia eval`: generate answers to an eval set and score them with the task's metric.

Each eval row is a conversation whose last assistant turn is the reference; everything before it is the
prompt. The model is a base model, a base model plus a `delia train` adapter, or a merged model folder.
Outputs: `OUT/predictions.jsonl` (one row per eval row, with its scores) and `OUT/scores.json`
(aggregates and settings), each written atomically. With `general` (and `contrast`), the model is also
scored on held-out general prompts (`delia.general`: format leakage, drift from the base model, answer
quality, obeying "do not use the format"), written to `OUT/general.jsonl` and `OUT/contrast.jsonl`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator, model_validator

from delia.artifacts import (
    CONTRAST_ROWS,
    PREDICTIONS,
    EvalScores,
    ScoredSet,
    TrainRecord,
    adapter_base,
    general_rows_file,
)
from delia.config import Flags
from delia.data import Format
from delia.errors import DeliaError
from delia.files import check_output, sha256_file, write_jsonl
from delia.general import GeneralFiles, general_sets, map_files, set_files
from delia.metrics import MetricConfig, MetricKind
from delia.models import DEFAULT_MODEL, ModelChoice, load_for_eval
from delia.progress import Progress, ProgressCallback, report
from delia.stage import Stage
from delia.versions import library_versions

log = logging.getLogger(__name__)


class EvalConfig(ModelChoice):
    """Options of `delia eval`. Decoding is greedy unless `temperature` > 0."""

    # the stage identity holds what is evaluated, the metric, the general and contrast sets and the scale apart
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"model", "adapter", "overwrite", "metric", "metric_config",
                                                        "general", "contrast", "adapter_scale"})

    metric: MetricKind | None = None
    """format (the authors' <sep> preset), translation, exact or contains. Default: format, or the kind in
    `metric_config`."""
    metric_config: Path | None = None
    """YAML of MetricConfig fields (kind, required_keys, allowed_values, label_key, ...)."""
    format: Annotated[Format, Flags("--format", "-f")] = "auto"
    """Eval set format: auto, messages, prompt-completion, alpaca or sharegpt."""
    max_new_tokens: int = Field(256, ge=1)
    """Generation length limit per answer."""
    batch_size: int | None = Field(None, ge=1)
    """Rows per generation batch (default: fitted to memory)."""
    temperature: float = Field(0.0, ge=0)
    """0 is greedy decoding."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling (only with temperature > 0)."""
    seed: int = 0
    """Base seed of per-row sampling seeds (temperature > 0)."""
    limit: int | None = Field(None, ge=1)
    """Evaluate only the first N rows."""
    device: str | None = None
    """cpu, cuda, cuda:1 ... (default: cuda if present)."""
    general: GeneralFiles | None = None
    """Held-out general prompts (none in the pool or the task; a last assistant turn is a reference): scores
    format leakage, drift from the base model and answer quality. In Python or an experiment's YAML also several
    sets, each scored apart: a list of files (named by their stems) or a mapping of set names to files."""
    contrast: Path | None = None
    """Prompts that tell the model not to use the task's format: scores the share of answers that obey (needs
    `general`)."""
    general_limit: int | None = Field(None, ge=1)
    """Score only the first N prompts of each general set (the demo data's sets are shuffled)."""
    general_max_new_tokens: int = Field(64, ge=1)
    """Answer length on general and contrast prompts (greedy)."""
    soft_prompt: bool = True
    """An adapter trained with a soft prompt (ProMoT, `train.soft_prompt`) gets it before every task prompt, never
    before general or contrast prompts; off (--no-soft-prompt): never."""
    base_model: str | None = None
    """Base model for drift when `model` is a merged model (default: a `model` is its own base); not with
    `adapter`, whose base is recorded with it."""
    overwrite: bool = False
    """Replace the files of an earlier eval in OUT."""

    @field_validator("general")
    @classmethod
    def _general_sets(cls, general: GeneralFiles | None) -> GeneralFiles | None:
        return None if general is None else general_sets(general)

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        if self.contrast is not None and self.general is None:
            raise ValueError("`contrast` needs `general` (the base answers and leakage rule come with it)")
        if self.base_model is not None and self.adapter is not None:
            raise ValueError("`base_model` is for a merged `model`; an adapter's base is recorded with it")
        return self


@dataclass
class EvalStage(Stage[EvalScores]):
    """Evaluation as a stage of `delia run`: its identity is what is evaluated (`subject`: the base model's
    identity, or the training stage's that made the adapter), the hashes of the eval, general and contrast sets,
    the metric, the options and the adapter's scale."""

    name: ClassVar[str] = "eval"
    result: ClassVar[Any] = EvalScores

    data: Path
    config: EvalConfig
    subject: dict[str, Any]  # {model: model identity} or {adapter: train stage identity}
    metric_options: dict[str, Any] | None  # the metric's config as given
    label: str = ""

    def identity(self) -> dict[str, Any]:
        cfg = self.config
        found = {**self.subject, "data": sha256_file(self.data), "metric": cfg.metric,
                 "metric_config": self.metric_options, "options": cfg.options(),
                 "general": None if cfg.general is None else map_files(cfg.general, sha256_file),
                 "contrast": None if cfg.contrast is None else sha256_file(cfg.contrast)}
        return found | ({"adapter_scale": cfg.adapter_scale} if cfg.adapter_scale != 1.0 else {})

    def run(self, folder: Path, progress: ProgressCallback | None = None) -> EvalScores:
        return evaluate(self.data, folder, self.config, progress=progress)


def evaluate(
    data: Annotated[Path, "Eval set (any format `delia data` reads); the last assistant turn of each row is "
                          "the reference."],
    out: Annotated[Path, "Output folder: predictions.jsonl and scores.json."],
    config: EvalConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> EvalScores:
    """Generate an answer for every eval row and score it; returns what scores.json holds.

    With `general`, also measure what tuning did to everything else: format leakage into general answers,
    drift (KL from the base model on its own greedy answers), answer quality; `contrast` adds prompts that
    say not to use the format. `options` set any EvalConfig field over `config`; `progress` hears of every
    answered row.

    Examples:\n
      delia eval ../shared/data/delia-format/eval.jsonl --out runs/base-eval\n
      delia eval eval.jsonl --out runs/delia-eval --adapter runs/delia-adapter --general general.jsonl\n
      delia eval en-ja.jsonl --out runs/mt --metric translation --max-new-tokens 128
    """
    from delia.backends import SamplingParams
    from delia.backends.hf import HFBackend
    from delia.data import read_chat, row_id
    from delia.metrics import score
    from delia.prompts import prompt_ids
    from delia.tokens import with_soft_prompt

    cfg = EvalConfig.build(config, **options)
    # read after the eval: a missing file must not cost a whole eval first
    for name, path in [*(("general", f) for f in set_files(cfg.general).values()), ("contrast", cfg.contrast)]:
        if path is not None and not Path(path).exists():
            raise DeliaError(f"`{name}` {path}: no such file or folder")
    inputs = [p for p in (data, *set_files(cfg.general).values(), cfg.contrast, cfg.metric_config) if p is not None]
    for name in (PREDICTIONS, EvalScores.FILE, CONTRAST_ROWS, *map(general_rows_file, set_files(cfg.general))):
        check_output(Path(out) / name, inputs=inputs, overwrite=cfg.overwrite)
    metric_cfg = MetricConfig.chosen(cfg.metric, cfg.metric_config)
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed)
    records = read_chat(data, cfg.format).records
    records = records[:cfg.limit] if cfg.limit is not None else records
    if not records:
        raise DeliaError(f"{data}: no eval rows")
    prompts = [r["messages"][:-1] for r in records]
    references = [r["messages"][-1]["content"] for r in records]

    lm, tokenizer, loaded = load_for_eval(cfg.model, cfg.adapter, cfg.device, cfg.adapter_scale)
    soft = ""
    if cfg.adapter is not None:
        lm.merge_adapter()  # LoRA folded into the weights (at its scale): generation at the base model's speed
        if cfg.soft_prompt and (Path(cfg.adapter) / TrainRecord.FILE).exists():  # a plain PEFT adapter has none
            soft = TrainRecord.read(cfg.adapter).soft_prompt
    ids = [prompt_ids(tokenizer, with_soft_prompt(p, soft)) for p in prompts]
    start = time.perf_counter()
    completions: dict[int, Any] = {}
    for i, completion in HFBackend(lm, tokenizer, cfg.batch_size or "auto").generate(ids, params):
        completions[i] = completion
        report(progress, Progress("eval", len(completions), len(ids), unit="rows"))
    wall = time.perf_counter() - start
    outputs = [completions[i].text for i in range(len(records))]

    sources = [next(m["content"] for m in reversed(p) if m["role"] == "user") for p in prompts]
    scores = score(metric_cfg, outputs, references, sources)
    rows = [{"id": row_id(rec), "prompt": prompt, "reference": ref, "output": c.text,
             "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
             "completion_tokens": c.completion_tokens, "scores": s}
            for rec, prompt, ref, c, s in zip(records, prompts, references,
                                              (completions[i] for i in range(len(records))), scores.rows,
                                              strict=True)]
    completion_tokens = sum(r["completion_tokens"] for r in rows)
    summary: dict[str, Any] = {
        **scores.summary(),
        "metric_config": metric_cfg.model_dump(mode="json"),
        "rows": len(rows),
        "data": str(data),
        "data_sha256": sha256_file(data) if Path(data).is_file() else None,
        "model": loaded,
        **({"adapter_scale": cfg.adapter_scale} if cfg.adapter is not None else {}),
        **({"soft_prompt": soft} if soft else {}),
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                     "seed": cfg.seed},
        "finish_reasons": dict(Counter(r["finish_reason"] for r in rows)),
        "tokens": {"prompt": sum(r["prompt_tokens"] for r in rows), "completion": completion_tokens},
        "generation_s": round(wall, 3),
        "tokens_per_s": round(completion_tokens / wall, 2) if wall > 0 else None,
        "versions": library_versions(),
    }
    out = Path(out)
    for name, result in _general(lm, tokenizer, metric_cfg, cfg):
        write_jsonl(out / general_rows_file(name), result.rows)
        if name is None:
            summary["general"] = ScoredSet(**result.summary)
        else:
            summary.setdefault("general_sets", {})[name] = ScoredSet(**result.summary)
        if result.contrast_rows is not None:
            write_jsonl(out / CONTRAST_ROWS, result.contrast_rows)
            summary["contrast"] = ScoredSet(**result.contrast_summary)
    write_jsonl(out / PREDICTIONS, rows)
    record = EvalScores(**summary)
    record.write(out)  # last: its presence marks a finished eval
    log.info("%d rows evaluated (%.1fs generating) -> %s", len(rows), wall, out)
    return record


def _general(lm: Any, tokenizer: Any, metric_cfg: Any, cfg: EvalConfig) -> Iterator[tuple[str | None, Any]]:
    """(set name, `delia.general.general_eval`'s result) per general set, against the base model the evaluated
    one is compared with; the contrast prompts go with the first set."""
    from delia.general import general_eval
    from delia.models import resolve_model

    if cfg.adapter is not None:
        base, same = adapter_base(cfg.adapter), False
    else:
        evaluated = cfg.model or DEFAULT_MODEL
        base = cfg.base_model or evaluated
        same = resolve_model(base) == resolve_model(evaluated)
    for i, (name, path) in enumerate(set_files(cfg.general).items()):
        yield name, general_eval(lm, tokenizer, metric_cfg, path, base=base, same=same, adapter=cfg.adapter,
                                 contrast=cfg.contrast if i == 0 else None, max_new_tokens=cfg.general_max_new_tokens,
                                 batch_size=cfg.batch_size or "auto", device=cfg.device, limit=cfg.general_limit)
