"""General-behaviour evaluation: what tuning did to everything that is not the task.

Plain SFT on a hundred task rows teaches the task's *shape*: the model starts answering everything in it
and drifts away from what it could do. DELIA's diverse rows exist to prevent that, so every model that
`delia eval` scores is also scored on held-out general prompts (none of them in the pool or the task):

- **leakage**: the share of general answers in the task's shape (`metrics.leaks`; for a task with new
  tokens, also any answer that emits one). Lower is better.
- **drift**: the mean per-token KL(base || tuned), teacher-forced on the base model's own greedy answers,
  and the NLL the tuned model gives those answers. The base answers are generated once per base model
  and cached, so a tuned model costs one forward pass per prompt (plus one with its adapter switched off
  for the base distribution: the same weights, no second model in memory). Lower is better.
- **quality** where the prompts carry references: chrF against long references, `contains` for answers of
  at most `SHORT_REFERENCE_WORDS` words.
- **contrast** (optional): prompts that tell the model *not* to use the task's format, scored as the share
  of answers that obey (do not leak).

Each metric is a mean of per-prompt values, so the report bootstraps it over prompts and seeds like the
task metrics.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from delia.errors import DeliaError
from delia.metrics import MetricConfig, leaks, short_answer_match

SHORT_REFERENCE_WORDS = 5
DRIFT_BATCH = 8  # rows per teacher-forced forward pass
BASE_TOP_K = 256  # base log-probabilities kept per answer position (see `drift`)
BASE_ANSWERS = "general-base"  # cache folder of base answers, under $DELIA_CACHE
# metric -> (per-row key, higher is better)
GENERAL_METRICS: dict[str, tuple[str, bool]] = {
    "leakage": ("leak", False),
    "drift_kl": ("kl", False),
    "base_answer_nll": ("nll", False),
    "general_chrf": ("chrf", True),
    "general_contains": ("contains", True),
}
CONTRAST_METRICS: dict[str, tuple[str, bool]] = {"contrast_obey": ("obey", True)}
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a general set's name: part of file and metric names

# One general file (scored as `general`, the layout of a single set) or named sets, each scored apart.
GeneralFiles = Path | list[Path] | dict[str, Path]
T = TypeVar("T")


def general_sets(general: GeneralFiles) -> Path | dict[str, Path]:
    """A single file as it is, else the named sets: a list named by its files' stems (`demo-data:general.jsonl`
    is `general`), a mapping as given. Names must be unique and file-name safe (ValueError)."""
    if isinstance(general, Path | str):
        return Path(general)
    named = general if isinstance(general, dict) else {
        Path(str(f).rpartition(":")[2]).stem: Path(f) for f in general}
    if isinstance(general, list) and len(named) != len(general):
        raise ValueError(f"two general files share a stem ({', '.join(map(str, general))}): name the sets, "
                         "a mapping of names to files")
    if not named:
        raise ValueError("no general sets given")
    for name in named:
        if not SET_NAME.fullmatch(name):
            raise ValueError(f"general set name {name!r}: use letters, digits, '_', '.' and '-'")
    return {name: Path(f) for name, f in named.items()}


def set_files(general: GeneralFiles | None) -> dict[str | None, Path]:
    """Set name -> file: a single file is the set None (scored into scores.json's `general` and general.jsonl,
    as before sets had names)."""
    if general is None:
        return {}
    sets = general_sets(general)
    return {None: sets} if isinstance(sets, Path) else {name: f for name, f in sets.items()}


def map_files(general: Path | dict[str, Path], fn: Callable[[Path], T]) -> T | dict[str, T]:
    """`fn` of the single general file, or of each set's file (to resolve or hash them alike)."""
    return {name: fn(f) for name, f in general.items()} if isinstance(general, dict) else fn(general)


@dataclass
class Prompts:
    """Held-out prompts: the conversation before the last assistant turn, that turn as the reference
    (None for query-only rows), the row ids and each row's `kind` of prompt (None where it has none)."""

    path: Path
    ids: list[str]
    prompts: list[list[dict[str, str]]]
    references: list[str | None]
    kinds: list[str | None]


def read_prompts(path: str | Path, limit: int | None = None) -> Prompts:
    """Read a prompt set in any format `delia data` reads (its first `limit` rows); rows may end on a user turn
    (no reference)."""
    from delia.data import read_chat, row_id

    path = Path(path)
    records = read_chat(path, require_assistant=False).records[:limit]
    if not records:
        raise DeliaError(f"{path}: no prompts")
    prompts, refs = [], []
    for r in records:
        msgs = r["messages"]
        if msgs[-1]["role"] == "assistant":
            prompts.append(msgs[:-1])
            refs.append(msgs[-1]["content"])
        else:
            prompts.append(msgs)
            refs.append(None)
    kinds = [None if r.get("kind") is None else str(r["kind"]) for r in records]
    return Prompts(path, [row_id(r) for r in records], prompts, refs, kinds)


def new_token_ids(adapter: Path | None) -> list[int]:
    """Ids of the tokens `delia train` added (from the adapter's delia_train.json); [] for none."""
    from delia.training.config import TRAIN_RECORD

    record = adapter / TRAIN_RECORD if adapter is not None else None
    if record is None or not record.exists():
        return []
    tokens = (json.loads(record.read_text(encoding="utf-8")).get("new_tokens") or {}).get("tokens", [])
    return [int(t["id"]) for t in tokens]


def adapter_base(adapter: Path) -> str:
    """The base model an adapter was trained on, as `load_trained` resolves it."""
    from peft import PeftConfig

    from delia.training.config import TRAIN_RECORD

    record = adapter / TRAIN_RECORD
    if record.exists():
        return json.loads(record.read_text(encoding="utf-8"))["model"]["name"]
    return PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path


# ----------------------------------------------------------------------------- base answers


def _cache_paths(base: str, prompts: Prompts, max_new_tokens: int, cache: Path | None) -> tuple[Path, Path]:
    from delia import __version__
    from delia.files import sha256_json
    from delia.models import cache_root, model_fingerprint, resolve_model

    key = sha256_json({"model": model_fingerprint(resolve_model(base)), "ids": prompts.ids,
                       "prompts": prompts.prompts, "max_new_tokens": max_new_tokens, "top_k": BASE_TOP_K,
                       "delia": __version__})[:16]
    folder = cache or cache_root() / BASE_ANSWERS
    return folder / f"{key}.json", folder / f"{key}.npz"


def base_answers(base: str, prompts: Prompts, max_new_tokens: int, *, loaded: tuple[Any, Any] | None = None,
                 device: str | None = None, cache: Path | None = None) -> dict[str, Any]:
    """The base model's greedy answers to `prompts` and its distribution at every answer position, computed
    once per base model and prompt set and cached, so that a tuned model's drift costs one forward pass.

    The distribution is kept as the top `BASE_TOP_K` log-probabilities per position (`top_ids`, `top_logp`:
    [answer positions of all rows, k], rows one after another) in `<key>.npz`; the answers, each row's
    `offset` into those arrays and its own `base_nll` in `<key>.json`, written last (its presence marks a
    complete entry). The key covers the base model's fingerprint, the prompts and the settings. `loaded`
    is the base model and tokenizer when the caller holds them; otherwise they are loaded on a miss.
    """
    import numpy as np

    from delia.files import atomic_writer, write_json

    path, arrays = _cache_paths(base, prompts, max_new_tokens, cache)
    if path.exists() and arrays.exists():
        answers = json.loads(path.read_text(encoding="utf-8"))
        with np.load(arrays) as npz:
            answers["top_ids"], answers["top_logp"] = npz["top_ids"], npz["top_logp"]
        return answers
    import torch

    from delia.backends import SamplingParams
    from delia.backends.hf import HFBackend
    from delia.models import load_model, resolve_model
    from delia.prompts import prompt_ids

    model, tokenizer = loaded or load_model(resolve_model(base), device=device)
    ids = [prompt_ids(tokenizer, p) for p in prompts.prompts]
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    done = dict(HFBackend(model, tokenizer).generate(ids, params))
    rows = [{"id": rid, "prompt_ids": p, "answer_ids": list(done[i].token_ids), "text": done[i].text,
             "finish_reason": done[i].finish_reason} for i, (rid, p) in enumerate(zip(prompts.ids, ids, strict=True))]
    top_ids, top_logp, offset = [], [], 0
    for i, logp in _answer_logprobs(model, [(r["prompt_ids"], r["answer_ids"]) for r in rows]):
        target = torch.tensor(rows[i]["answer_ids"], device=logp.device).unsqueeze(1)
        rows[i]["base_nll"] = float(-logp.gather(1, target).mean())
        rows[i]["offset"] = offset
        offset += len(rows[i]["answer_ids"])
        top = logp.topk(BASE_TOP_K, dim=-1)
        top_ids.append(top.indices.to(torch.int32).cpu().numpy())
        top_logp.append(top.values.cpu().numpy())
    answers = {"model": base, "max_new_tokens": max_new_tokens, "data": str(prompts.path), "top_k": BASE_TOP_K,
               "rows": rows}
    k = BASE_TOP_K
    with atomic_writer(arrays, "wb") as fh:
        np.savez(fh, top_ids=np.concatenate(top_ids) if top_ids else np.zeros((0, k), np.int32),
                 top_logp=np.concatenate(top_logp) if top_logp else np.zeros((0, k), np.float32))
    write_json(path, answers)
    return base_answers(base, prompts, max_new_tokens, cache=cache)


# ----------------------------------------------------------------------------- drift


def _answer_logprobs(model: Any, rows: Sequence[tuple[list[int], list[int]]]) -> Iterator[tuple[int, Any]]:
    """(row index, float32 log-probabilities [answer length, vocab]) for each row with an answer: what the
    model gives each answer token's position, teacher-forced on prompt + answer, `DRIFT_BATCH` rows per pass
    (similar lengths together). Rows are left-padded so every answer ends its sequence and only answer
    positions get logits (`logits_to_keep`), never the whole [batch, length, vocab]."""
    import torch

    order = sorted((i for i in range(len(rows)) if rows[i][1]), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    device = next(model.parameters()).device
    for start in range(0, len(order), DRIFT_BATCH):
        chunk = order[start:start + DRIFT_BATCH]
        width = max(len(rows[i][0]) + len(rows[i][1]) for i in chunk)
        keep = max(len(rows[i][1]) for i in chunk) + 1
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, i in enumerate(chunk):
            seq = torch.tensor(rows[i][0] + rows[i][1], dtype=torch.long)
            ids[j, width - len(seq):] = seq
            mask[j, width - len(seq):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp_(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        for j, i in enumerate(chunk):  # logits[:, -1] follows the last answer token and predicts nothing we score
            yield i, logits[j, keep - 1 - len(rows[i][1]):keep - 1].float().log_softmax(dim=-1)


def drift(model: Any | None, answers: dict[str, Any]) -> list[dict[str, float | None]]:
    """Per prompt: `kl`, the mean over answer tokens of KL(base || tuned); `nll`, the tuned model's mean NLL of
    the base answer; `base_nll`, the base model's own. One teacher-forced pass of `model`; `model=None`
    means the evaluated model is the base itself (drift 0, no pass).

    The base distribution is the cached top `BASE_TOP_K` tokens per position; the KL is taken over those
    tokens plus one bucket holding all others (for the tuned model that bucket also holds any new token,
    which the base never emits). Grouping outcomes can only lower a KL, so this is a lower bound of the
    full-vocabulary KL, exact where the two models agree on how the rest is split. Empty answers give None.
    """
    import torch

    rows = answers["rows"]
    if model is None:
        return [{"kl": 0.0, "nll": r["base_nll"], "base_nll": r["base_nll"]} if r["answer_ids"] else
                {"kl": None, "nll": None, "base_nll": None} for r in rows]
    out: list[dict[str, float | None]] = [{"kl": None, "nll": None, "base_nll": None} for _ in rows]
    for i, lt in _answer_logprobs(model, [(r["prompt_ids"], r["answer_ids"]) for r in rows]):
        r = rows[i]
        span = slice(r["offset"], r["offset"] + len(r["answer_ids"]))
        top_ids = torch.as_tensor(answers["top_ids"][span], dtype=torch.long, device=lt.device)
        lb = torch.as_tensor(answers["top_logp"][span], device=lt.device)
        lt_top = lt.gather(1, top_ids)
        rest_b = (1 - lb.exp().sum(dim=-1)).clamp(min=1e-12)
        rest_t = (1 - lt_top.exp().sum(dim=-1)).clamp(min=1e-12)
        kl = (lb.exp() * (lb - lt_top)).sum(dim=-1) + rest_b * (rest_b.log() - rest_t.log())
        target = torch.tensor(r["answer_ids"], dtype=torch.long, device=lt.device).unsqueeze(1)
        out[i] = {"kl": float(kl.clamp(min=0).mean()), "nll": float(-lt.gather(1, target).mean()),
                  "base_nll": r["base_nll"]}
    return out


# ----------------------------------------------------------------------------- scoring


def quality(output: str, reference: str | None) -> dict[str, float | bool]:
    """chrF for a long reference; `contains` (the normalised reference as whole words) for a short one."""
    if reference is None:
        return {}
    if len(reference.split()) <= SHORT_REFERENCE_WORDS:
        return {"contains": short_answer_match(output, reference, "contains")}
    from sacrebleu.metrics import CHRF

    return {"chrf": CHRF().sentence_score(output, [reference]).score}


def leak_row(config: MetricConfig, output: str, token_ids: Iterable[int], new_ids: Sequence[int]) -> bool | None:
    """Format leakage of one answer: the task's shape (`metrics.leaks`) or, for new-token tasks, a new token."""
    shape = leaks(config, output)
    if new_ids and any(t in new_ids for t in token_ids):
        return True
    return shape


def summarise_rows(rows: Sequence[dict[str, Any]], metrics: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    """Means of the per-row scores, and which row key each metric averages (for the report's bootstrap)."""
    out: dict[str, Any] = {"metrics": {}, "row_means": {}, "higher_is_better": {}, "n": len(rows)}
    for name, (key, higher) in metrics.items():
        vals = [float(r["scores"][key]) for r in rows if r["scores"].get(key) is not None]
        if vals:
            out["metrics"][name] = sum(vals) / len(vals)
            out["row_means"][name] = key
            out["higher_is_better"][name] = higher
    return out


def leakage_by_kind(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per kind of prompt (a row's `kind`: yes_no, long_form, ...): answers scored for leakage, how many
    leaked and their share; a collapse into the task's format often starts with the prompts closest to it.
    Rows without a kind or a leakage score are left out; {} when none is left."""
    counts: dict[str, list[int]] = {}
    for r in rows:
        if r.get("kind") is not None and r["scores"].get("leak") is not None:
            n_leaked = counts.setdefault(r["kind"], [0, 0])
            n_leaked[0] += 1
            n_leaked[1] += bool(r["scores"]["leak"])
    return {kind: {"n": n, "leaked": leaked, "share": leaked / n} for kind, (n, leaked) in counts.items()}


@dataclass
class GeneralResult:
    """What `general_eval` found: per-row files' contents and the summaries for scores.json."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    contrast_rows: list[dict[str, Any]] | None = None
    contrast_summary: dict[str, Any] | None = None


def general_eval(model: Any, tokenizer: Any, config: MetricConfig, general: Path, *, base: str,
                 same: bool = False, adapter: Path | None = None, contrast: Path | None = None,
                 max_new_tokens: int = 64, batch_size: int | str = "auto", device: str | None = None,
                 limit: int | None = None) -> GeneralResult:
    """Score `model` on general prompts and, optionally, a contrast set, against the base model `base`
    (a name `resolve_model` takes; its answers come from the cache, generated on the first call). `same`:
    `model` is that base itself, so its answers are the cached ones and its drift 0. `adapter` is where the
    model's new tokens are recorded. `limit`: only the first rows of `general`."""
    from delia.backends import SamplingParams
    from delia.backends.hf import HFBackend
    from delia.prompts import prompt_ids

    new_ids = new_token_ids(adapter)
    prompts = read_prompts(general, limit)
    answers = base_answers(base, prompts, max_new_tokens, device=device,
                           loaded=(model, tokenizer) if same else None)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    backend = HFBackend(model, tokenizer, batch_size)
    if same:  # the model is its own base: its greedy answers are the cached ones
        outputs = [(r["text"], r["answer_ids"], r["finish_reason"]) for r in answers["rows"]]
    else:
        done = dict(backend.generate([r["prompt_ids"] for r in answers["rows"]], params))
        outputs = [(done[i].text, done[i].token_ids, done[i].finish_reason) for i in range(len(prompts.ids))]
    contrast_rows = None
    if contrast is not None:
        cp = read_prompts(contrast)
        done = dict(backend.generate([prompt_ids(tokenizer, p) for p in cp.prompts], params))
        contrast_rows = []
        for i, rid in enumerate(cp.ids):
            leaked = leak_row(config, done[i].text, done[i].token_ids, new_ids)
            contrast_rows.append({"id": rid, "prompt": cp.prompts[i], "output": done[i].text,
                                  "finish_reason": done[i].finish_reason,
                                  "scores": {"obey": None if leaked is None else not leaked}})
    drifts = drift(None if same else model, answers)
    rows = []
    for i, rid in enumerate(prompts.ids):
        text, ids, finish = outputs[i]
        scores = {"leak": leak_row(config, text, ids, new_ids), **drifts[i], **quality(text, prompts.references[i])}
        kind = {} if prompts.kinds[i] is None else {"kind": prompts.kinds[i]}
        rows.append({"id": rid, **kind, "prompt": prompts.prompts[i], "reference": prompts.references[i],
                     "output": text, "finish_reason": finish, "base_output": answers["rows"][i]["text"],
                     "scores": scores})
    summary = {**summarise_rows(rows, GENERAL_METRICS), "data": str(general), "base_model": base,
               "max_new_tokens": max_new_tokens, "new_token_ids": new_ids}
    if by_kind := leakage_by_kind(rows):
        summary["leakage_by_kind"] = by_kind
    result = GeneralResult(rows, summary)
    if contrast_rows is not None:
        result.contrast_rows = contrast_rows
        result.contrast_summary = {**summarise_rows(contrast_rows, CONTRAST_METRICS), "data": str(contrast)}
    return result
