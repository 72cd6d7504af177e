"""`delia eval`: generate answers to an eval set and score them with the task's metric.

Each eval row is a conversation whose last assistant turn is the reference; everything before it is the
prompt. The model is a base model, a base model plus a `delia train` adapter, or a merged model folder.
Outputs: `OUT/predictions.jsonl` (one row per eval row, with its scores) and `OUT/scores.json`
(aggregates and settings), each written atomically. With `general` (and `contrast`), the model is also
scored on held-out general prompts (`delia.general`: format leakage, drift from the base model, answer
quality, obeying "do not use the format"), written to `OUT/general.jsonl` and `OUT/contrast.jsonl`.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from delia.errors import DeliaError
from delia.models import DEFAULT_MODEL, load_for_eval
from delia.versions import library_versions

PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"
GENERAL_ROWS = "general.jsonl"
CONTRAST_ROWS = "contrast.jsonl"


def _metric_config(metric: str | None, metric_config: Path | None):
    from delia.metrics import MetricConfig

    if metric_config is None:
        return MetricConfig.named(metric or "format")
    cfg = MetricConfig.load(metric_config)
    if metric is not None and metric != cfg.kind:
        raise DeliaError(f"--metric {metric} disagrees with {metric_config} (kind: {cfg.kind})")
    return cfg



def evaluate(
    data: Annotated[Path, typer.Argument(help="Eval set (any format `delia data` reads); the last assistant "
                                               "turn of each row is the reference.")],
    out: Annotated[Path, typer.Argument(help="Output folder: predictions.jsonl and scores.json.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base or merged model (default "
                                              f"{DEFAULT_MODEL}); not with --adapter.")] = None,
    adapter: Annotated[Path | None, typer.Option(help="Adapter folder written by `delia train` "
                                                  "(loads its recorded base model).")] = None,
    metric: Annotated[str | None, typer.Option(help="format (the authors' <sep> preset), translation, exact or "
                                               "contains. Default: format, or the kind in --metric-config.")] = None,
    metric_config: Annotated[Path | None, typer.Option(help="YAML of MetricConfig fields (kind, required_keys, "
                                                       "allowed_values, label_key, ...).", exists=True,
                                                       dir_okay=False)] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="Eval set format: auto, messages, "
                                        "prompt-completion, alpaca or sharegpt.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(help="Generation length limit per answer.")] = 256,
    batch_size: Annotated[int | None, typer.Option(help="Rows per generation batch (default: fitted to "
                                                   "memory).")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling (only with temperature > 0).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Base seed of per-row sampling seeds (temperature > 0).")] = 0,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N rows.", min=1)] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if present).")] = None,
    general: Annotated[Path | None, typer.Option(help="Held-out general prompts (none in the pool or the task; "
                                                 "a last assistant turn is a reference): scores format leakage, "
                                                 "drift from the base model and answer quality.",
                                                 exists=True)] = None,
    contrast: Annotated[Path | None, typer.Option(help="Prompts that tell the model not to use the task's "
                                                  "format: scores the share of answers that obey.",
                                                  exists=True)] = None,
    general_max_new_tokens: Annotated[int, typer.Option(help="Answer length on general and contrast prompts "
                                                        "(greedy).", min=1)] = 64,
    base_model: Annotated[str | None, typer.Option(help="Base model for drift when --model is a merged model "
                                                   "(default: an adapter's own base; a --model is its own base).")
                          ] = None,
) -> dict[str, Any]:
    """Generate an answer for every eval row and score it; returns what scores.json holds.

    With --general, also measure what tuning did to everything else: format leakage into general answers,
    drift (KL from the base model on its own greedy answers), answer quality; --contrast adds prompts that
    say not to use the format.

    Examples:\n
      delia eval ../shared/data/delia-format/eval.jsonl runs/base-eval\n
      delia eval eval.jsonl runs/delia-eval --adapter runs/delia-adapter --general general.jsonl\n
      delia eval en-ja.jsonl runs/mt --metric translation --max-new-tokens 128
    """
    from rich.console import Console

    from delia.backends import SamplingParams
    from delia.backends.hf import HFBackend
    from delia.data import read_chat, row_id
    from delia.files import sha256_file, write_json, write_jsonl
    from delia.metrics import score
    from delia.prompts import prompt_ids

    if contrast is not None and general is None:
        raise DeliaError("--contrast needs --general (the base answers and leakage rule come with it)")
    cfg = _metric_config(metric, metric_config)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    records = read_chat(data, format).records  # type: ignore[arg-type]
    records = records[:limit] if limit is not None else records
    if not records:
        raise DeliaError(f"{data}: no eval rows")
    prompts = [r["messages"][:-1] for r in records]
    references = [r["messages"][-1]["content"] for r in records]

    lm, tokenizer, loaded = load_for_eval(model, adapter, device)
    if adapter is not None:
        lm.merge_adapter()  # LoRA folded into the weights: generation at the base model's speed
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    start = time.perf_counter()
    completions: dict[int, Any] = dict(HFBackend(lm, tokenizer, batch_size or "auto").generate(ids, params))
    wall = time.perf_counter() - start
    outputs = [completions[i].text for i in range(len(records))]

    sources = [next(m["content"] for m in reversed(p) if m["role"] == "user") for p in prompts]
    scores = score(cfg, outputs, references, sources)
    rows = [{"id": row_id(rec), "prompt": prompt, "reference": ref, "output": c.text,
             "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
             "completion_tokens": c.completion_tokens, "scores": s}
            for rec, prompt, ref, c, s in zip(records, prompts, references,
                                              (completions[i] for i in range(len(records))), scores.rows,
                                              strict=True)]
    completion_tokens = sum(r["completion_tokens"] for r in rows)
    summary = {
        **scores.summary(),
        "metric_config": cfg.model_dump(mode="json"),
        "rows": len(rows),
        "data": str(data),
        "data_sha256": sha256_file(data) if Path(data).is_file() else None,
        "model": loaded,
        "sampling": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed},
        "finish_reasons": dict(Counter(r["finish_reason"] for r in rows)),
        "tokens": {"prompt": sum(r["prompt_tokens"] for r in rows), "completion": completion_tokens},
        "generation_s": round(wall, 3),
        "tokens_per_s": round(completion_tokens / wall, 2) if wall > 0 else None,
        "versions": library_versions(),
    }
    out = Path(out)
    if general is not None:
        result = _general(lm, tokenizer, cfg, general, contrast, model, adapter, base_model, general_max_new_tokens,
                          batch_size, device)
        write_jsonl(out / GENERAL_ROWS, result.rows)
        summary["general"] = result.summary
        if result.contrast_rows is not None:
            write_jsonl(out / CONTRAST_ROWS, result.contrast_rows)
            summary["contrast"] = result.contrast_summary
    write_jsonl(out / PREDICTIONS, rows)
    write_json(out / SCORES, summary)  # last: its presence marks a finished eval
    console = Console(stderr=True)
    for name, metrics in (("eval", scores.metrics), *((k, summary[k]["metrics"]) for k in ("general", "contrast")
                                                      if k in summary)):
        shown = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        console.print(f"[green]{name}[/] {shown}", highlight=False)
    console.print(f"({len(rows)} rows, {wall:.1f}s) -> {out}", highlight=False)
    for note in scores.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    return summary


def _general(lm: Any, tokenizer: Any, cfg: Any, general: Path, contrast: Path | None, model: str | None,
             adapter: Path | None, base_model: str | None, max_new_tokens: int, batch_size: int | None,
             device: str | None) -> Any:
    """Run `delia.general.general_eval` with the base model the evaluated one is compared with."""
    from delia.general import adapter_base, general_eval
    from delia.models import resolve_model

    if adapter is not None:
        if base_model is not None:
            raise DeliaError("--base-model is for a merged --model; an adapter's base is recorded with it")
        base, same = adapter_base(adapter), False
    else:
        evaluated = model or DEFAULT_MODEL
        base = base_model or evaluated
        same = resolve_model(base) == resolve_model(evaluated)
    return general_eval(lm, tokenizer, cfg, general, base=base, same=same, adapter=adapter, contrast=contrast,
                        max_new_tokens=max_new_tokens, batch_size=batch_size or "auto", device=device)
