"""`delia rewrite`: SDFT's self-distillation of the task rows (Yang et al., ACL 2024, arXiv 2402.13669).

The model being tuned rewrites each task row's answer, shown the task prompt and the gold answer as a
reference (SDFT's `alpaca_distill_refer` template, adapted to chat). A rewrite is kept only when it passes
SDFT's ban list and the task's own metric against the reference; otherwise the row keeps its reference.
Training on the rewritten rows then fits targets closer to the model's own distribution.

Built like `delia sample` for long runs, with one difference: OUT appears only when complete. Each finished
row's generation is appended and fsynced to `OUT.partial.jsonl`; a rerun with the same generation settings
after a kill resumes from it (a torn last line is dropped), then OUT and `OUT.summary.json` are written
atomically and the partial file is removed. Other generation settings are refused once a row has been
generated (`overwrite` starts again); the check is applied afresh on every run, so a rerun may change `metric`
or `min_chrf` and resume.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from delia.artifacts import RewriteFacts, SampledTokens
from delia.config import Flags
from delia.errors import DeliaError
from delia.files import beside, check_output, read_yaml, sha256_path
from delia.metrics import MetricConfig, MetricKind
from delia.progress import Progress, ProgressCallback, report
from delia.sample import EngineOptions, auto_or_positive_option
from delia.stage import Stage

if TYPE_CHECKING:
    from delia.backends import Backend

log = logging.getLogger(__name__)

# SDFT's `alpaca_distill_refer` system prompt and reference block (sail-sg/sdft, main.py), word for word.
SDFT_SYSTEM = ("Below are an instruction that describes a task along with a reference answer. "
               "Refer to the reference answer and write your own response.")
REFERENCE_BLOCK = "\n\n### Reference Answer:\n"
# SDFT's `verify` (eval/gen_distilled_data.py): a rewrite containing any of these talks about the prompt
# instead of answering it. Matched case-insensitively, as theirs; the `Your turn` prefix too (theirs: as is).
BANNED_PHRASES = ("reference answer", "your response", "my response", "your own response", "now it's your turn")
BANNED_PREFIX = "your turn"
# Why a row keeps the rewrite (`kept`) or its reference (the rest), in the order they are checked.
REASONS = ("kept", "empty", "truncated", "sdft_banned_phrase", "metric_failed")
PROMPT_VERSION = 1  # bump when the prompt changes: a partial run made with another prompt is not resumed
MIN_AUTO_TOKENS = 32  # `max_new_tokens` auto: twice the longest reference's tokens, at least this


def summary_path(out: str | Path) -> Path:
    """`OUT.summary.json`: the counts of a finished run, beside OUT."""
    return beside(out, ".summary.json")


def partial_path(out: str | Path) -> Path:
    """`OUT.partial.jsonl`: the generations of a run not yet finished, which a rerun resumes."""
    return beside(out, ".partial.jsonl")


# ----------------------------------------------------------------------------- options and summary


class RewriteConfig(EngineOptions):
    """Options of `delia rewrite`. Decoding is greedy by default, SDFT's setting."""

    # the stage identity holds the model by its fingerprint and the metric apart
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"model", "overwrite", "metric", "metric_config"})

    metric: MetricKind | None = None
    """The task's metric, which a rewrite must pass against the reference: format (the authors' <sep> preset),
    translation, exact or contains. Default: format, or the kind in `metric_config`."""
    metric_config: Path | None = None
    """YAML of MetricConfig fields (kind, required_keys, allowed_values, label_key, ...), as `delia eval` takes."""
    min_chrf: float = Field(50.0, ge=0, le=100)
    """translation: a rewrite is kept when its sentence chrF against the reference is at least this."""
    strict_format: bool = True
    """format: when the reference is the object alone, so must the rewrite be (no text or fence around it: the
    metric's strict format)."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature; 0 is greedy (SDFT's)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (only with temperature > 0)."""
    seed: int = 0
    """Base seed; each row's seed derives from it and the row's index."""
    max_new_tokens: int | Literal["auto"] = "auto"
    """Token limit per rewrite, or auto: twice the longest reference's tokens (at least 32). A rewrite cut at the
    limit is rejected."""
    limit: int | None = Field(None, ge=1)
    """Rewrite only the first N rows (OUT then holds those N)."""
    overwrite: bool = False
    """Replace an existing OUT (and its summary), and start again instead of resuming an unfinished run."""

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _auto_tokens(cls, value: Any, info: ValidationInfo) -> int | str:
        return auto_or_positive_option(value, info)

    def token_limit(self, tokenizer: Any, references: Sequence[str]) -> int:
        """`max_new_tokens`, with auto resolved: twice the longest reference's tokens, at least MIN_AUTO_TOKENS."""
        if self.max_new_tokens != "auto":
            return self.max_new_tokens
        return max(MIN_AUTO_TOKENS, 2 * max(len(tokenizer(ref, add_special_tokens=False)["input_ids"])
                                            for ref in references))


class RewriteSummary(BaseModel):
    """What `rewrite` returns and writes to `OUT.summary.json`: counts, the model, the options, tokens, time."""

    model_config = ConfigDict(extra="forbid")

    out: str
    data: str
    data_sha256: str
    rows: int  # rows written to OUT (the input's rows, within `limit`)
    kept: int  # rows whose answer is the model's rewrite
    kept_share: float  # kept / rows
    kept_identical: int  # kept rewrites that equal the reference (after stripping whitespace)
    reasons: dict[str, int]  # rows per reason, every reason in REASONS order (kept included)
    skipped_invalid: int  # unreadable input rows skipped (with `skip_invalid`)
    resumed: int  # rows whose generation an earlier, unfinished run had made
    model: str
    model_path: str | None  # what `model` resolved to (None when every row was resumed)
    backend: str
    metric: dict[str, Any]  # the MetricConfig the check used
    options: dict[str, Any]  # every RewriteConfig field
    max_new_tokens: int  # the limit used (auto resolved)
    finish_reasons: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    generation_s: float  # this run's generation (resumed rows excluded)
    wall_s: float
    tokens_per_s: float | None  # this run's generated tokens per second of generation_s
    versions: dict[str, str]

    def generation(self) -> SampledTokens:
        """What the run generated, as `delia.compute` counts sampling: one answer per row."""
        return SampledTokens(queries=self.rows, generated=self.rows, prompt_tokens=self.prompt_tokens,
                             completion_tokens=self.completion_tokens)

    def facts(self) -> RewriteFacts:
        """What a run's report shows of the rewrite."""
        return RewriteFacts(rows=self.rows, kept=self.kept, kept_share=self.kept_share, reasons=self.reasons)

    def write(self, path: str | Path) -> None:
        """Write the summary as JSON, atomically."""
        from delia.files import write_json

        write_json(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: str | Path) -> RewriteSummary:
        """Read a summary `write` wrote; anything else raises DeliaError naming the file."""
        try:
            return cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:  # ValidationError is a ValueError
            problem = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'summary'}: {err['msg']}" for err in
                                e.errors()[:3]) if isinstance(e, ValidationError) else str(e)
            raise DeliaError(f"{path}: not a delia rewrite summary ({problem})") from None


# ----------------------------------------------------------------------------- the prompt and the check


def rewrite_prompt(messages: Sequence[dict[str, str]], system_role: bool = True) -> list[dict[str, str]]:
    """The conversation the model rewrites a row's answer from: `messages` is the row, whose last (assistant)
    turn is the reference, everything before it the task prompt.

    SDFT's `alpaca_distill_refer` in chat form: system = SDFT's instruction, followed after a blank line by the
    row's own system message if it has one (the task's instructions stay next to the task); then the prompt's
    turns as they are, the last user turn followed by `### Reference Answer:` and the reference. The caller adds
    the generation prompt. Without `system_role` (templates that reject one), the system text opens the first
    user turn instead, so that it is not lost.
    """
    *prompt, last = messages
    if last["role"] != "assistant" or not prompt:
        raise DeliaError("a row to rewrite needs a prompt and a last assistant turn (the reference)")
    system = SDFT_SYSTEM
    if prompt[0]["role"] == "system":
        system += "\n\n" + prompt[0]["content"]
        prompt = prompt[1:]
    turns = [dict(m) for m in prompt]
    turns[-1]["content"] += REFERENCE_BLOCK + last["content"]
    if system_role:
        return [{"role": "system", "content": system}, *turns]
    turns[0]["content"] = f"{system}\n\n{turns[0]['content']}"
    return turns


class Check(NamedTuple):
    """The verdict on one rewrite: `reason` (one of REASONS; `kept` keeps it) and what the metric said."""

    reason: str
    detail: str

    @property
    def kept(self) -> bool:
        return self.reason == "kept"


def banned_phrase(text: str) -> str | None:
    """The phrase of SDFT's ban list `text` contains (or starts with), else None."""
    low = text.strip().lower()
    if low.startswith(BANNED_PREFIX):
        return "Your turn"
    return next((p for p in BANNED_PHRASES if p in low), None)


def check_rewrite(text: str, finish_reason: str, reference: str, metric: MetricConfig, *, min_chrf: float = 50.0,
                  strict_format: bool = True) -> Check:
    """Whether a rewrite replaces the reference, checked in this order: empty, cut at the token limit
    (`finish_reason` length), SDFT's ban list, then the task's metric against the reference, by `delia.metrics`'
    own scoring (model output is parsed, never executed):

    - format: the rewrite fits the schema (`format_ok`), is the object alone when the reference is (with
      `strict_format`), and its `label_key` value equals the reference's (a reference without a readable label is
      checked for the schema only);
    - translation: sentence chrF against the reference >= `min_chrf`;
    - exact / contains: the metric's match against the reference.
    """
    from delia.metrics import parse_output, score

    if not text.strip():
        return Check("empty", "the rewrite is empty")
    if finish_reason == "length":
        return Check("truncated", "cut at max_new_tokens")
    if phrase := banned_phrase(text):
        return Check("sdft_banned_phrase", f"contains {phrase!r}")
    text = text.strip()
    if metric.kind == "translation":
        chrf = score(metric.model_copy(update={"comet_model": None}), [text], [reference]).rows[0]["chrf"]
        if chrf < min_chrf:
            return Check("metric_failed", f"chrF {chrf:.1f} < {min_chrf:g}")
        return Check("kept", f"chrF {chrf:.1f}")
    row = score(metric, [text], [reference]).rows[0]
    if metric.kind in ("exact", "contains"):
        if not row[metric.kind]:
            return Check("metric_failed", "does not match the reference" if metric.kind == "exact"
                         else "does not contain the reference")
        return Check("kept", metric.kind)
    if not row["format_ok"]:
        return Check("metric_failed", f"invalid format: {row['error']}")
    if strict_format and not row["strict_format_ok"] and score(metric, [reference], [reference]).rows[0][
            "strict_format_ok"]:
        return Check("metric_failed", "text around the object (the reference is the object alone)")
    if row["label_ok"] is None:
        return Check("kept", "format" + (f" (the reference has no readable {metric.label_key!r})"
                                         if metric.label_key else ""))
    if not row["label_ok"]:
        got = parse_output(text, metric.extract)[0].get(metric.label_key)
        want = parse_output(reference, True)[0].get(metric.label_key)
        return Check("metric_failed", f"{metric.label_key}={got!r}, the reference's {want!r}")
    return Check("kept", f"format, same {metric.label_key}")


# ----------------------------------------------------------------------------- resuming


# the options a rewrite's generations depend on; the others only judge them, so a rerun may change them and resume
GENERATION_OPTIONS = ("format", "columns", "skip_invalid", "backend", "served_model", "temperature", "top_p", "seed")


@dataclass
class RewriteStage(Stage[RewriteSummary]):
    """Rewriting as a stage: its identity is the model's fingerprint, the data's hash, the metric and the options;
    `delia run` caches it by that. A rerun resumes an unfinished run's generations when the part of the identity
    they depend on is the same (`resume_identity`)."""

    name: ClassVar[str] = "rewrite"
    result: ClassVar[Any] = RewriteSummary

    data: Path
    config: RewriteConfig
    model: dict[str, Any] | None = None  # {model: as named, fingerprint}; None: `config`'s, once needed
    metric_options: dict[str, Any] | None = None  # the metric's config as given (None: as its file holds it)
    label: str = ""
    token_limit: int | None = None  # max_new_tokens resolved, once the run has read the references

    @classmethod
    def of(cls, data: Path, cfg: RewriteConfig) -> RewriteStage:
        """The stage `delia rewrite` runs: the model as `cfg` names it, the metric's config as its file holds it
        (both read once the inputs are checked)."""
        return cls(data, cfg)

    def identity(self) -> dict[str, Any]:
        metric = self.metric_options
        if metric is None and self.config.metric_config is not None:
            metric = read_yaml(self.config.metric_config, "the metric config") or None
        return {"model": self._model(), "data": sha256_path(self.data), "metric": self.config.metric,
                "metric_config": metric, "options": self.config.options()}

    def resume_identity(self) -> dict[str, Any]:
        options = self.config.options()
        return {"model": self._model(), "data": sha256_path(self.data), "max_new_tokens": self.token_limit,
                "prompt": PROMPT_VERSION, "options": {k: options[k] for k in GENERATION_OPTIONS if k in options}}

    def run(self, folder: Path, progress: ProgressCallback | None = None) -> RewriteSummary:
        return _rewrite(self, folder / "rewritten.jsonl", progress)


def _header(path: Path) -> dict[str, Any] | None:
    """The settings line that opens a partial file of ours, else None."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = json.loads(fh.readline())
    except (OSError, ValueError):
        return None
    return first.get("settings") if isinstance(first, dict) and first.get("delia") == "rewrite-partial" else None


def _pick_up(partial: Path, stage: RewriteStage, overwrite: bool) -> dict[int, dict[str, Any]]:
    """The generations of an unfinished run with the same resume identity, by row index (a torn last line dropped),
    and the partial file ready to append to. A file there that is not ours is refused, even with `overwrite`."""
    from delia.files import JsonlAppender, read_complete_jsonl

    if os.path.lexists(partial):
        previous = _header(partial)
        if previous is None and partial.stat().st_size > 0:
            raise DeliaError(f"{partial}: exists and is not an unfinished delia rewrite; move it away or choose "
                             "another output path")
        rows = read_complete_jsonl(partial)[1:] if previous is not None else []
        if rows and not overwrite:
            if "options" not in (previous or {}):
                raise DeliaError(f"{partial}: an unfinished rewrite of an earlier delia version, which this one "
                                 "cannot resume; set `overwrite` to start again")
            if changed := stage.changes(previous or {}):
                raise DeliaError(f"{partial}: an unfinished rewrite with other settings ({', '.join(changed)}); "
                                 "rerun with the same settings to resume it, or set `overwrite` to start again")
            return {r["index"]: r for r in rows}
        partial.unlink()  # ours, and holding no generation (or `overwrite` starts again)
    with JsonlAppender(partial) as fh:
        fh.write([{"delia": "rewrite-partial", "settings": stage.resume_identity()}])
    return {}


def _check_summary(path: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to replace a summary that is not ours (with `overwrite`) or any file there (without)."""
    check_output(path, inputs=inputs, overwrite=overwrite)
    if overwrite and path.exists():
        RewriteSummary.read(path)  # raises, naming the file, when it is not a summary delia wrote


# ----------------------------------------------------------------------------- the stage


def _open_backend(cfg: RewriteConfig, tokenizer: Any) -> Backend:
    """The back end through `get_backend` (looked up at call time), with the options of its kind."""
    from delia import backends

    options: dict[str, Any]
    if cfg.backend == "hf":
        options = {"batch_size": cfg.batch_size, "batch_tokens": cfg.batch_tokens, "device": cfg.device,
                   "dtype": cfg.dtype}
    elif cfg.backend == "vllm":
        options = {"tokenizer": tokenizer, "tensor_parallel_size": cfg.tensor_parallel, "dtype": cfg.dtype}
    else:
        options = {"tokenizer": tokenizer, "base_url": cfg.base_url, "concurrency": cfg.concurrency,
                   "timeout": cfg.timeout, "max_retries": cfg.max_retries}
    model = cfg.served_model or cfg.model if cfg.backend == "openai" else cfg.model
    return backends.get_backend(cfg.backend, model, **options)


def rewrite(
    data: Annotated[Path, "Task rows in any format `delia data inspect` reads; the last assistant turn of each row "
                          "is the reference, every turn before it the prompt."],
    out: Annotated[Path, Flags("--out", "-o"), "Output messages JSONL: the rows with their kept answers. "
                                                "OUT.summary.json goes beside it."],
    config: RewriteConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> RewriteSummary:
    """Have the model rewrite each task row's answer, shown the reference (SDFT's self-distillation); keep a
    rewrite only when it passes SDFT's ban list and the task's metric against the reference, else the reference.

    Every row of DATA comes out in OUT, in order: its prompt turns, the kept answer, its other fields, and
    `rewrite: {kept, reason, detail}`. OUT appears only when complete; a killed run resumes from
    OUT.partial.jsonl when rerun with the same settings. `options` set any RewriteConfig field over `config`;
    `progress` hears of every row rewritten. Returns the summary, also written to OUT.summary.json.

    Examples:\n
      delia rewrite task_train.jsonl --out rewritten.jsonl --metric format --metric-config metric.yaml\n
      delia rewrite en-ja.jsonl --out rewritten.jsonl --metric translation --min-chrf 60
    """
    cfg = RewriteConfig.build(config, **options)
    return _rewrite(RewriteStage.of(Path(data), cfg), Path(out), progress)


def _rewrite(stage: RewriteStage, out: Path, progress: ProgressCallback | None) -> RewriteSummary:
    from delia.backends import SamplingParams, derive_seed
    from delia.data import parse_columns, read_chat
    from delia.files import JsonlAppender, write_jsonl
    from delia.models import load_tokenizer
    from delia.prompts import prompt_ids, supports_system
    from delia.versions import library_versions

    start = time.monotonic()
    cfg, data = stage.config, stage.data
    inputs = [p for p in (data, cfg.metric_config) if p is not None]
    check_output(out, inputs=inputs, overwrite=cfg.overwrite)
    _check_summary(summary_path(out), inputs, cfg.overwrite)
    check_output(partial_path(out), inputs=inputs, overwrite=True)  # ours or refused in _pick_up
    metric = MetricConfig.chosen(cfg.metric, cfg.metric_config)
    chat = read_chat(data, cfg.format, columns=parse_columns(cfg.columns), skip_invalid=cfg.skip_invalid)
    records = chat.records[:cfg.limit]
    if not records:
        raise DeliaError(f"{data}: no rows to rewrite")
    references = [r["messages"][-1]["content"] for r in records]

    tokenizer = load_tokenizer(cfg.model)  # for the token limit; prompts are rendered by the back end's
    max_new_tokens = stage.token_limit = cfg.token_limit(tokenizer, references)
    partial = partial_path(out)
    done = _pick_up(partial, stage, cfg.overwrite)
    done = {i: r for i, r in done.items() if i < len(records)}
    resumed = len(done)
    todo = [i for i in range(len(records)) if i not in done]

    model_path, generation_s, tokens = None, 0.0, 0
    report(progress, Progress("rewrite", len(done), len(records), unit="rows", counts={"tok": 0}))
    if todo:
        engine = _open_backend(cfg, tokenizer)
        model_path = str(getattr(engine.tokenizer, "name_or_path", "")) or None
        system_role = supports_system(engine.tokenizer)
        prompts = [prompt_ids(engine.tokenizer, rewrite_prompt(records[i]["messages"], system_role)) for i in todo]
        params = SamplingParams(cfg.temperature, cfg.top_p, max_new_tokens, cfg.seed)
        seeds = [derive_seed(cfg.seed, i) for i in todo]
        t0 = time.monotonic()
        with JsonlAppender(partial) as fh:
            for k, c in engine.generate(prompts, params, seeds):
                row = {"index": todo[k], "text": c.text, "finish_reason": c.finish_reason,
                       "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
                fh.write([row])
                done[todo[k]] = row
                tokens += c.completion_tokens
                report(progress, Progress("rewrite", len(done), len(records), unit="rows", counts={"tok": tokens}))
        generation_s = time.monotonic() - t0
        if len(done) != len(records):
            raise DeliaError(f"the {cfg.backend} back end answered {len(done)} of {len(records)} rows")

    rows, reasons, identical = [], Counter[str](), 0
    for i, (record, ref) in enumerate(zip(records, references, strict=True)):
        g = done[i]
        verdict = check_rewrite(g["text"], g["finish_reason"], ref, metric, min_chrf=cfg.min_chrf,
                                strict_format=cfg.strict_format)
        reasons[verdict.reason] += 1
        answer = g["text"].strip() if verdict.kept else ref
        identical += int(verdict.kept and answer == ref.strip())
        note = {"kept": verdict.kept, "reason": verdict.reason, "detail": verdict.detail,
                **({"reference": ref} if verdict.kept else {"output": g["text"]})}
        rows.append({**record, "messages": [*record["messages"][:-1], {"role": "assistant", "content": answer}],
                     "rewrite": note})

    completion_tokens = sum(g["completion_tokens"] for g in done.values())
    summary = RewriteSummary(
        out=str(out), data=str(data), data_sha256=sha256_path(data), rows=len(rows), kept=reasons["kept"],
        kept_share=reasons["kept"] / len(rows), kept_identical=identical, reasons={r: reasons[r] for r in REASONS},
        skipped_invalid=len(chat.rejects), resumed=resumed, model=cfg.model, model_path=model_path,
        backend=cfg.backend, metric=metric.model_dump(mode="json"), options=cfg.model_dump(mode="json"),
        max_new_tokens=max_new_tokens, finish_reasons=dict(Counter(g["finish_reason"] for g in done.values())),
        prompt_tokens=sum(g["prompt_tokens"] for g in done.values()), completion_tokens=completion_tokens,
        generation_s=round(generation_s, 3), wall_s=round(time.monotonic() - start, 3),
        tokens_per_s=round(tokens / generation_s, 2) if generation_s > 0 else None,
        versions=library_versions("vllm") if cfg.backend == "vllm" else library_versions())
    write_jsonl(out, rows)
    summary.write(summary_path(out))
    partial.unlink(missing_ok=True)  # last: until OUT and its summary are in place, a rerun can resume
    log.info("%d rows rewritten, %d kept (%.0f%%) -> %s", len(rows), summary.kept, 100 * summary.kept_share, out)
    return summary
