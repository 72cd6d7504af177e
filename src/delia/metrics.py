"""Task metrics on generated text: pure functions, no torch, no model output ever executed.

A task names its metric with a small `MetricConfig` (YAML in the task config):

- `format`: the output must parse (JSON, else `ast.literal_eval`; never `eval`) into an object with the
  required keys and allowed values. Reports format accuracy and, with `label_key`, label accuracy
  (the output is well-formed and its label equals the reference's).
- `translation`: sacrebleu chrF and BLEU, corpus-level and per sentence; COMET only where the optional
  `unbabel-comet` package is importable and a local checkpoint is given (nothing is ever downloaded).
- `exact` / `contains`: short answers, compared after normalising case, whitespace and punctuation.

`leaks()` applies the same config to answers of *general* prompts: does the answer take the task's shape
(format leakage, what plain SFT on a small task teaches and DELIA exists to prevent)?

`score()` returns per-row scores plus aggregates; `row_means` says which aggregate is the mean of which
per-row key, so a report can bootstrap it over examples.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import json
import re
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from delia.errors import DeliaError
from delia.files import read_yaml
from delia.text import normalize_answer

# Model output longer than this, or nested deeper, is not parsed: `ast.literal_eval` builds a full syntax
# tree first, and a few kB of brackets can exhaust the parser's stack or memory.
MAX_PARSE_CHARS = 100_000
MAX_NESTING = 64
_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)```", re.DOTALL)
_FORMAT_ONLY = ("required_keys", "exact_keys", "allowed_values", "label_key", "extract")
# An answer "in a script" when at least this share of its letters belong to it (translation leakage).
SCRIPT_SHARE = 0.5


MetricKind = Literal["format", "translation", "exact", "contains"]


class MetricConfig(BaseModel):
    """How a task's outputs are scored; `kind` picks the metric, the other fields configure it."""

    model_config = ConfigDict(extra="forbid")

    kind: MetricKind = "format"
    # format
    required_keys: list[str] = []
    exact_keys: bool = False  # the object's keys must be exactly `required_keys`
    allowed_values: dict[str, list[str]] = {}
    label_key: str | None = None
    extract: bool = True  # also accept the object inside ``` fences or the first {...} span of the text
    # translation
    comet_model: Path | None = None  # a local COMET checkpoint (.ckpt); COMET is skipped without it
    # Unicode script names (prefixes of character names: HIRAGANA, KATAKANA, CJK, CYRILLIC, ...) of the
    # target language; an answer to a general prompt mostly in them counts as format leakage.
    target_scripts: list[str] = []

    @model_validator(mode="after")
    def _fields_match_kind(self) -> MetricConfig:
        if self.kind != "format":
            set_ = [f for f in _FORMAT_ONLY if f in self.model_fields_set]
            if set_:
                raise ValueError(f"{', '.join(set_)} only apply to kind 'format', not '{self.kind}'")
        for name in ("comet_model", "target_scripts"):
            if self.kind != "translation" and getattr(self, name):
                raise ValueError(f"{name} only applies to kind 'translation', not '{self.kind}'")
        if self.exact_keys and not self.required_keys:
            raise ValueError("exact_keys needs required_keys")
        return self

    @classmethod
    def delia_format(cls) -> MetricConfig:
        """The authors' `<sep>` task: a dict with exactly `thought` and `hallucination`, the latter yes/no."""
        return cls(kind="format", required_keys=["thought", "hallucination"], exact_keys=True,
                   allowed_values={"hallucination": ["yes", "no"]}, label_key="hallucination")

    @classmethod
    def load(cls, path: str | Path) -> MetricConfig:
        """Read a YAML mapping of the fields above; a bad file raises DeliaError naming it."""
        path = Path(path)
        data = read_yaml(path, "the metric config")
        if not isinstance(data, dict):
            raise DeliaError(f"{path}: the metric config must be a mapping of field names to values")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
            raise DeliaError(f"{path}: invalid metric config: {problems}") from None

    @classmethod
    def chosen(cls, metric: str | None, metric_config: str | Path | None) -> MetricConfig:
        """The metric a stage's `metric` and `metric_config` options choose: the file's (whose kind `metric`, if
        given, must agree with), else `metric`'s by name (default `format`)."""
        if metric_config is None:
            return cls.named(metric or "format")
        cfg = cls.load(metric_config)
        if metric is not None and metric != cfg.kind:
            raise DeliaError(f"`metric` {metric} disagrees with {metric_config} (kind: {cfg.kind})")
        return cfg

    @classmethod
    def named(cls, kind: str) -> MetricConfig:
        """The config for a metric given only by name: `format` means the authors' `<sep>` preset."""
        if kind == "format":
            return cls.delia_format()
        try:
            return cls(kind=kind)  # type: ignore[arg-type]
        except ValidationError:
            raise DeliaError(f"unknown metric {kind!r}; expected format, translation, exact or contains") from None


@dataclass
class Scores:
    """Per-row scores and aggregates. `metrics[m]` is the mean of `rows[i][row_means[m]]` over rows where
    that value is not None (booleans count as 0/1); `primary`, the headline metric, is always such a mean so
    it can be bootstrapped over rows (for translation the corpus-level chrF and BLEU are in `metrics` too)."""

    kind: str
    primary: str
    metrics: dict[str, float | int | None]
    rows: list[dict[str, Any]]
    row_means: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-row scores, for scores.json."""
        d = asdict(self)
        d.pop("rows")
        return d


# ----------------------------------------------------------------------------- parsing


def _nesting(text: str) -> int:
    """Deepest bracket nesting, counting brackets inside strings too (a cheap, conservative bound)."""
    depth = deepest = 0
    for c in text:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth = max(0, depth - 1)
    return deepest


def parse_literal(text: str) -> tuple[Any, str | None]:
    """(value, None) when `text` is one JSON or Python literal, else (None, why not). Never executes code."""
    text = text.strip()
    if not text:
        return None, "empty output"
    if len(text) > MAX_PARSE_CHARS:
        return None, f"longer than {MAX_PARSE_CHARS} characters"
    if _nesting(text) > MAX_NESTING:
        return None, f"brackets nested deeper than {MAX_NESTING}"
    try:
        return json.loads(text), None
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text), None
    # literal_eval raises ValueError/SyntaxError/TypeError/MemoryError/RecursionError and more on odd input;
    # any failure just means "not a literal".
    except Exception as e:
        return None, f"not a literal ({type(e).__name__})"


def parse_output(text: str, extract: bool = True) -> tuple[Any, bool, str | None]:
    """(value, strict, error): parse the whole output; with `extract`, else the body of the first ``` fence,
    else the first `{` to the last `}`. `strict` says the whole output parsed as is."""
    value, err = parse_literal(text)
    if err is None:
        return value, True, None
    if extract:
        candidates = []
        if fence := _FENCE.search(text):
            candidates.append(fence.group(1))
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            candidates.append(text[start:end + 1])
        for c in candidates:
            value, cerr = parse_literal(c)
            if cerr is None:
                return value, False, None
    return None, False, err


def check_format(obj: Any, config: MetricConfig) -> str | None:
    """Why `obj` breaks the config's schema, or None when it fits."""
    if not isinstance(obj, dict):
        return f"parsed to {type(obj).__name__}, not an object"
    keys = set(obj)
    missing = [k for k in config.required_keys if k not in keys]
    if missing:
        return f"missing keys {missing}"
    if config.exact_keys and keys != set(config.required_keys):
        return f"unexpected keys {sorted(map(str, keys - set(config.required_keys)))}"
    for k, allowed in config.allowed_values.items():
        if k in obj and obj[k] not in allowed:
            return f"{k}={obj[k]!r} not in {allowed}"
    return None


# ----------------------------------------------------------------------------- metrics


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _score_format(outputs: Sequence[str], references: Sequence[str], config: MetricConfig) -> Scores:
    rows = []
    for out, ref in zip(outputs, references, strict=True):
        obj, strict, err = parse_output(out, config.extract)
        parsed = err is None
        if parsed:
            err = check_format(obj, config)
        format_ok = err is None
        label_ok = None
        if config.label_key is not None:
            ref_obj, _, _ = parse_output(ref, extract=True)
            if isinstance(ref_obj, dict) and config.label_key in ref_obj:
                label_ok = format_ok and obj.get(config.label_key) == ref_obj[config.label_key]
        rows.append({"parsed": parsed, "strict": parsed and strict, "format_ok": format_ok,
                     "strict_format_ok": format_ok and strict, "label_ok": label_ok, "error": err})
    row_means = {"format_accuracy": "format_ok", "strict_format_accuracy": "strict_format_ok",
                 "parse_rate": "parsed"}
    notes = []
    if config.label_key is not None:
        row_means["label_accuracy"] = "label_ok"
        missing = sum(r["label_ok"] is None for r in rows)
        if missing:
            notes.append(f"{missing} reference(s) have no parseable '{config.label_key}': left out of label_accuracy")
    metrics: dict[str, float | int | None] = {m: _mean([r[k] for r in rows]) for m, k in row_means.items()}
    metrics["n"] = len(rows)
    return Scores("format", "format_accuracy", metrics, rows, row_means, notes)


def _comet(config: MetricConfig, sources: Sequence[str] | None, outputs: Sequence[str],
           references: Sequence[str]) -> tuple[list[float] | None, float | None, str | None]:
    """(per-row scores, system score, skip note). Loads only a local checkpoint, never a hub name."""
    if config.comet_model is None:
        return None, None, "COMET skipped: no local checkpoint given (set comet_model in the metric config)"
    if importlib.util.find_spec("comet") is None:
        return None, None, "COMET skipped: the optional package unbabel-comet is not installed"
    if sources is None:
        return None, None, "COMET skipped: it needs the source sentences"
    path = Path(config.comet_model).expanduser()
    if not path.is_file():
        raise DeliaError(f"{path}: COMET checkpoint not found (comet_model must be a local .ckpt file)")
    import torch
    from comet import load_from_checkpoint

    kwargs = {"local_files_only": True} if "local_files_only" in inspect.signature(load_from_checkpoint).parameters \
        else {}
    model = load_from_checkpoint(str(path), **kwargs)
    data = [{"src": s, "mt": o, "ref": r} for s, o, r in zip(sources, outputs, references, strict=True)]
    pred = model.predict(data, batch_size=16, gpus=1 if torch.cuda.is_available() else 0, progress_bar=False)
    return [float(x) for x in pred.scores], float(pred.system_score), None


def _score_translation(outputs: Sequence[str], references: Sequence[str], config: MetricConfig,
                       sources: Sequence[str] | None) -> Scores:
    from sacrebleu.metrics import BLEU, CHRF

    chrf, bleu, sent_bleu = CHRF(), BLEU(), BLEU(effective_order=True)
    rows = [{"chrf": chrf.sentence_score(o, [r]).score, "bleu": sent_bleu.sentence_score(o, [r]).score}
            for o, r in zip(outputs, references, strict=True)]
    metrics: dict[str, float | int | None] = {
        "chrf": chrf.corpus_score(list(outputs), [list(references)]).score,
        "bleu": bleu.corpus_score(list(outputs), [list(references)]).score,
        "chrf_sentence_mean": _mean([r["chrf"] for r in rows]),
        "bleu_sentence_mean": _mean([r["bleu"] for r in rows]),
    }
    row_means = {"chrf_sentence_mean": "chrf", "bleu_sentence_mean": "bleu"}
    notes = []
    comet_rows, comet_system, skipped = _comet(config, sources, outputs, references)
    if skipped:
        notes.append(skipped)
    else:
        for row, c in zip(rows, comet_rows or [], strict=True):
            row["comet"] = c
        metrics["comet"] = comet_system
        row_means["comet"] = "comet"
    metrics["n"] = len(rows)
    return Scores("translation", "chrf_sentence_mean", metrics, rows, row_means, notes)


def short_answer_match(output: str, reference: str, kind: str) -> bool:
    """`exact`: equal after `normalize_answer`; `contains`: the normalised reference occurs as whole words of the
    normalised output ("no" is not in "not"), and an empty reference never matches."""
    o, r = normalize_answer(output), normalize_answer(reference)
    return o == r if kind == "exact" else bool(r) and f" {r} " in f" {o} "


def _score_short(outputs: Sequence[str], references: Sequence[str], kind: str) -> Scores:
    rows = [{kind: short_answer_match(out, ref, kind)} for out, ref in zip(outputs, references, strict=True)]
    name = "exact_match" if kind == "exact" else "contains"
    return Scores(kind, name, {name: _mean([r[kind] for r in rows]), "n": len(rows)}, rows, {name: kind})


def score(config: MetricConfig, outputs: Sequence[str], references: Sequence[str],
          sources: Sequence[str] | None = None) -> Scores:
    """Score model outputs against references; `sources` (the prompts' text) feed COMET only."""
    if len(outputs) != len(references):
        raise DeliaError(f"{len(outputs)} outputs but {len(references)} references")
    if config.kind == "format":
        return _score_format(outputs, references, config)
    if config.kind == "translation":
        return _score_translation(outputs, references, config, sources)
    return _score_short(outputs, references, config.kind)


# ----------------------------------------------------------------------------- leakage into general answers

_FENCE_OPEN = re.compile(r"^```[A-Za-z0-9_+-]*[ \t]*\n?")


@functools.cache
def unicode_scripts() -> frozenset[str]:
    """The script names `script_share` can match: the first word of every letter's Unicode name (LATIN, CJK...)."""
    return frozenset(unicodedata.name(c).split()[0] for c in map(chr, range(sys.maxunicode + 1))
                     if c.isalpha() and unicodedata.name(c, ""))


def script_share(text: str, scripts: Sequence[str]) -> float:
    """Share of the letters of `text` whose Unicode name starts with one of `scripts` (0 for no letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    prefixes = tuple(s.upper() for s in scripts)
    return sum(unicodedata.name(c, "").startswith(prefixes) for c in letters) / len(letters)


def leaks(config: MetricConfig, output: str) -> bool | None:
    """Whether an answer to a general prompt takes the task's shape; None where the metric defines no shape.

    - `format`: the answer is, or begins with (after an optional ``` fence), an object: `{`, even a broken
      one; or it writes one of the task's keys in key position (`"sarcastic":`) anywhere. A prose answer
      that merely mentions braces does not count.
    - `translation` with `target_scripts`: at least half of the answer's letters are in the target scripts.
    - otherwise (exact, contains, translation without scripts): None.
    """
    if config.kind == "format":
        head = _FENCE_OPEN.sub("", output.lstrip(), count=1).lstrip()
        if head.startswith("{"):
            return True
        keys = config.required_keys or ([config.label_key] if config.label_key else [])
        return any(re.search(rf"""["']{re.escape(k)}["']\s*:""", output) for k in keys)
    if config.kind == "translation" and config.target_scripts:
        return script_share(output, config.target_scripts) >= SCRIPT_SHARE
    return None
