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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from delia.errors import DeliaError
from delia.metrics import MetricConfig, leaks, normalize_answer

SHORT_REFERENCE_WORDS = 5
DRIFT_BATCH = 8  # rows per teacher-forced forward pass
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


@dataclass
class Prompts:
    """Held-out prompts: the conversation before the last assistant turn, that turn as the reference
    (None for query-only rows), and the row ids."""

    path: Path
    ids: list[str]
    prompts: list[list[dict[str, str]]]
    references: list[str | None]


def read_prompts(path: str | Path) -> Prompts:
    """Read a prompt set in any format `delia data` reads; rows may end on a user turn (no reference)."""
    from delia.data import read_chat, row_id

    path = Path(path)
    records = read_chat(path, require_assistant=False).records
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
    return Prompts(path, [row_id(r) for r in records], prompts, refs)


def new_token_ids(adapter: Path | None) -> list[int]:
    """Ids of the tokens `delia train` added (from the adapter's delia_train.json); [] for none."""
    from delia.train import TRAIN_RECORD

    record = adapter / TRAIN_RECORD if adapter is not None else None
    if record is None or not record.exists():
        return []
    tokens = (json.loads(record.read_text(encoding="utf-8")).get("new_tokens") or {}).get("tokens", [])
    return [int(t["id"]) for t in tokens]


def adapter_base(adapter: Path) -> str:
    """The base model an adapter was trained on, as `load_trained` resolves it."""
    from peft import PeftConfig

    from delia.train import TRAIN_RECORD

    record = adapter / TRAIN_RECORD
    if record.exists():
        return json.loads(record.read_text(encoding="utf-8"))["model"]["name"]
    return PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path


# ----------------------------------------------------------------------------- base answers


def base_answers(base: str, prompts: Prompts, max_new_tokens: int, *, loaded: tuple[Any, Any] | None = None,
                 device: str | None = None, cache: Path | None = None) -> dict[str, Any]:
    """The base model's greedy answers to `prompts` as token ids, generated once and cached.

    The cache key is the base model's fingerprint, the prompts and the generation settings; the file
    (`$DELIA_CACHE/general-base/<key>.json`) is written atomically. `loaded` is the base model and
    tokenizer when the caller holds them already; otherwise they are loaded only on a cache miss.
    Returns {"model", "vocab_size", "rows": [{"id", "prompt_ids", "answer_ids", "text", "finish_reason"}]}.
    """
    from delia import __version__
    from delia.files import sha256_json, write_json
    from delia.models import cache_root, model_fingerprint, resolve_model

    folder = resolve_model(base)
    key = sha256_json({"model": model_fingerprint(folder), "ids": prompts.ids, "prompts": prompts.prompts,
                       "max_new_tokens": max_new_tokens, "delia": __version__})[:16]
    path = (cache or cache_root() / BASE_ANSWERS) / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    from delia.backends import SamplingParams
    from delia.backends.hf import HFBackend
    from delia.chat import prompt_ids
    from delia.models import load_model

    model, tokenizer = loaded or load_model(folder, device=device)
    ids = [prompt_ids(tokenizer, p) for p in prompts.prompts]
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    done = dict(HFBackend(model, tokenizer).generate(ids, params))
    answers = {
        "model": base, "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        "max_new_tokens": max_new_tokens, "data": str(prompts.path),
        "rows": [{"id": rid, "prompt_ids": p, "answer_ids": list(done[i].token_ids), "text": done[i].text,
                  "finish_reason": done[i].finish_reason} for i, (rid, p) in enumerate(zip(prompts.ids, ids,
                                                                                          strict=True))],
    }
    write_json(path, answers)
    return answers


# ----------------------------------------------------------------------------- drift


def _answer_logprobs(model: Any, rows: Sequence[tuple[list[int], list[int]]], vocab: int | None) -> list[Any]:
    """Per row, the float32 log-probabilities [answer length, vocab] the model gives each answer token's
    position, teacher-forced on prompt + answer. Rows are left-padded so every answer ends the sequence and
    only its positions' logits are computed (`logits_to_keep`), never the whole [batch, length, vocab].
    `vocab` restricts the distribution to the first ids (the base model's own vocabulary)."""
    import torch

    width = max(len(p) + len(a) for p, a in rows)
    keep = max(len(a) for _, a in rows) + 1
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, (p, a) in enumerate(rows):
        seq = torch.tensor(p + a, dtype=torch.long)
        ids[j, width - len(seq):] = seq
        mask[j, width - len(seq):] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp_(min=0)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
    if vocab is not None:
        logits = logits[..., :vocab]
    # logits[:, -1] follows the last answer token and predicts nothing we score
    return [logits[j, keep - 1 - len(a):keep - 1].float().log_softmax(dim=-1) for j, (_, a) in enumerate(rows)]


def drift(model: Any, answers: dict[str, Any], base_model: Any = None) -> list[dict[str, float | None]]:
    """Per prompt: `kl`, the mean over answer tokens of KL(base || tuned); `nll`, the tuned model's mean NLL of
    the base answer; `base_nll`, the base model's own. The base distribution comes from `base_model`, else
    from `model` with its PEFT adapter disabled, else (a plain model) from `model` itself: drift 0.

    Only ids the base model knows (`answers["vocab_size"]`) carry base probability; a tuned model's mass
    on new tokens counts as drift, since the base would never emit them. Empty answers give None.
    """
    import torch

    vocab = int(answers["vocab_size"])
    rows = [(r["prompt_ids"], r["answer_ids"]) for r in answers["rows"]]
    order = sorted((i for i in range(len(rows)) if rows[i][1]), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    out: list[dict[str, float | None]] = [{"kl": None, "nll": None, "base_nll": None} for _ in rows]
    for start in range(0, len(order), DRIFT_BATCH):
        chunk = order[start:start + DRIFT_BATCH]
        batch = [rows[i] for i in chunk]
        tuned = _answer_logprobs(model, batch, None)
        if base_model is not None:
            base = _answer_logprobs(base_model, batch, vocab)
        elif hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                base = _answer_logprobs(model, batch, vocab)
        else:
            base = [lp[:, :vocab].log_softmax(dim=-1) for lp in tuned]
        for i, (_, a), lt, lb in zip(chunk, batch, tuned, base, strict=True):
            target = torch.tensor(a, dtype=torch.long, device=lt.device).unsqueeze(1)
            kl = (lb.exp() * (lb - lt[:, :vocab])).sum(dim=-1).clamp_(min=0)
            out[i] = {"kl": float(kl.mean()), "nll": float(-lt.gather(1, target).mean()),
                      "base_nll": float(-lb.gather(1, target).mean())}
    return out


# ----------------------------------------------------------------------------- scoring


def quality(output: str, reference: str | None) -> dict[str, float | bool]:
    """chrF for a long reference; `contains` (the normalised reference as whole words) for a short one."""
    if reference is None:
        return {}
    if len(reference.split()) <= SHORT_REFERENCE_WORDS:
        ref, out = normalize_answer(reference), normalize_answer(output)
        return {"contains": bool(ref) and f" {ref} " in f" {out} "}
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


@dataclass
class GeneralResult:
    """What `general_eval` found: per-row files' contents and the summaries for scores.json."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    contrast_rows: list[dict[str, Any]] | None = None
    contrast_summary: dict[str, Any] | None = None


def general_eval(model: Any, tokenizer: Any, config: MetricConfig, general: Path, *, base: str,
                 adapter: Path | None = None, base_model: Any = None, contrast: Path | None = None,
                 max_new_tokens: int = 64, batch_size: int | str = "auto", device: str | None = None
                 ) -> GeneralResult:
    """Score `model` (the tuned model, or the base itself) on general prompts and, optionally, a contrast set.

    `base` names the base model (for the cached base answers); `base_model` is that model loaded apart,
    needed only for a merged model (an adapter's base is the adapter switched off; a plain model that is
    its own base has drift 0).
    """
    from delia.backends import SamplingParams
    from delia.backends.hf import HFBackend
    from delia.chat import prompt_ids

    new_ids = new_token_ids(adapter)
    prompts = read_prompts(general)
    same = adapter is None and base_model is None
    answers = base_answers(base, prompts, max_new_tokens, device=device,
                           loaded=(model, tokenizer) if same else None)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    backend = HFBackend(model, tokenizer, batch_size)
    if same:  # the model is its own base: its greedy answers are the cached ones
        outputs = [(r["text"], r["answer_ids"], r["finish_reason"]) for r in answers["rows"]]
    else:
        done = dict(backend.generate([r["prompt_ids"] for r in answers["rows"]], params))
        outputs = [(done[i].text, done[i].token_ids, done[i].finish_reason) for i in range(len(prompts.ids))]
    drifts = drift(model, answers, base_model)
    rows = []
    for i, rid in enumerate(prompts.ids):
        text, ids, finish = outputs[i]
        scores = {"leak": leak_row(config, text, ids, new_ids), **drifts[i], **quality(text, prompts.references[i])}
        rows.append({"id": rid, "prompt": prompts.prompts[i], "reference": prompts.references[i], "output": text,
                     "finish_reason": finish, "base_output": answers["rows"][i]["text"], "scores": scores})
    summary = {**summarise_rows(rows, GENERAL_METRICS), "data": str(general), "base_model": base,
               "max_new_tokens": max_new_tokens, "new_token_ids": new_ids}
    result = GeneralResult(rows, summary)
    if contrast is not None:
        cp = read_prompts(contrast)
        done = dict(backend.generate([prompt_ids(tokenizer, p) for p in cp.prompts], params))
        crows = []
        for i, rid in enumerate(cp.ids):
            leaked = leak_row(config, done[i].text, done[i].token_ids, new_ids)
            crows.append({"id": rid, "prompt": cp.prompts[i], "output": done[i].text,
                          "finish_reason": done[i].finish_reason,
                          "scores": {"obey": None if leaked is None else not leaked}})
        result.contrast_rows = crows
        result.contrast_summary = {**summarise_rows(crows, CONTRAST_METRICS), "data": str(contrast)}
    return result
