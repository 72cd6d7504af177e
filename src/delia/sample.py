"""`delia sample`: the model answers a pool of diverse queries; its own answers become DELIA's diverse data.

Built for long runs: every finished query is appended and fsynced at once, a rerun on the same output
skips what is done (a torn last line from a crash is dropped, a half-written query redone), every
sample has its own seed derived from the base seed and the query id (so shards and reruns never
repeat each other), and bad answers go to `OUT.rejects.jsonl` with their reason (see `delia.filters`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import Field, ValidationInfo, field_validator, model_validator
from typing_extensions import Self

from delia.artifacts import MergeManifest, MergeSummary, SampleManifest, SampleSummary
from delia.backends import BackendName, derive_seed
from delia.config import Flags, StageConfig
from delia.data import ReadOptions
from delia.errors import DataError, DeliaError
from delia.files import changed_settings, check_output, sha256_path
from delia.filters import REASONS, Filters
from delia.general import SHORT_REFERENCE_WORDS
from delia.progress import Progress, ProgressCallback, report
from delia.prompts import Mode
from delia.stage import Stage
from delia.text import normalise
from delia.versions import library_versions

if TYPE_CHECKING:
    from delia.backends import Backend, Completion, SamplingParams

Query = tuple[str, str, str | None]  # (query id, query, reference answer or None)
ShortReference = Literal["one-shot", "zero-shot", "other-example"]
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- files and shards


def manifest_path(out: str | Path) -> Path:
    return SampleManifest.path(out)


def _read_manifest(path: Path, unreadable: str) -> SampleManifest:
    """The manifest at `path`; one that is not JSON or lacks a field raises DeliaError: `PATH: UNREADABLE (why)`."""
    try:
        return SampleManifest.read(path)
    except DataError as e:
        why = f"field '{e.field}': {e.message}" if e.field else e.message
        raise DeliaError(f"{path}: {unreadable} ({why})") from None


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N; None -> (0, 1)."""
    if shard is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not m or not int(m[1]) < int(m[2]):
        raise DeliaError(f"`shard` expects i/N with 0 <= i < N (e.g. 0/4), got {shard!r}")
    return int(m[1]), int(m[2])


def in_shard(query_id: str, index: int, count: int) -> bool:
    """Deterministic split by a hash of the id: the same query lands in the same shard on every machine."""
    return int(hashlib.sha256(query_id.encode()).hexdigest()[:15], 16) % count == index


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _load_queries(pool: Path, format: str, columns: list[str] | None, skip_invalid: bool
                  ) -> tuple[list[tuple[str, str, str | None]], Counter[str]]:
    """[(query id, query, reference)] in pool order, and counts of pool rows left out (and why)."""
    from delia.data import first_turns, parse_columns, read_chat, row_id

    data = read_chat(pool, format, columns=parse_columns(columns), require_assistant=False,  # type: ignore[arg-type]
                     skip_invalid=skip_invalid)
    skipped: Counter[str] = Counter({"invalid_query": len(data.rejects)} if data.rejects else {})
    queries, ids = [], set()
    for record in data.records:
        qid = row_id(record)
        if qid in ids:
            skipped["duplicate_query"] += 1
            continue
        ids.add(qid)
        queries.append((qid, *first_turns(record)))
    return queries, skipped


def _resume(out: Path, rejects: Path, n: int) -> tuple[list[dict], list[dict]]:
    """Rows already written (kept, rejected), without queries that have fewer than `n` samples: a crash
    between two appends leaves such a query, and it is dropped from both files to be sampled again.
    """
    from delia.files import read_complete_jsonl, write_jsonl

    kept, rejected = read_complete_jsonl(out), read_complete_jsonl(rejects)
    per_query = Counter(r["meta"]["query_id"] for r in (*kept, *rejected))
    partial = {q for q, c in per_query.items() if c < n}
    if partial:
        kept = [r for r in kept if r["meta"]["query_id"] not in partial]
        rejected = [r for r in rejected if r["meta"]["query_id"] not in partial]
        write_jsonl(out, kept)
        write_jsonl(rejects, rejected)
    return kept, rejected


def _check_resumable(out: Path, stage: SampleStage, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume a file that is not ours or was sampled with another identity (with `overwrite`, start
    again). A manifest from before the stage protocol has no identity, and is compared by its settings."""
    from delia.data import rejects_path

    paths = (out, rejects_path(out), manifest_path(out))
    if overwrite:
        for p in paths:
            p.unlink(missing_ok=True)
        return
    mpath = manifest_path(out)
    if not mpath.exists():
        if out.exists() and out.stat().st_size > 0:
            raise DeliaError(f"{out} exists but has no {mpath.name}, so it is not a delia sample output to resume; "
                             "set `overwrite` to replace it or choose another path")
        return
    previous = _read_manifest(mpath, "unreadable manifest; set `overwrite` to start again")
    if previous.identity is not None:
        diff = ", ".join(stage.changes(previous.identity))
    else:
        diff = ", ".join(f"{k}: {previous.settings.get(k)!r} -> {settings.get(k)!r}"
                         for k in changed_settings(previous.settings, settings))
    if diff:
        raise DeliaError(f"{out} was sampled with other settings ({diff}); resuming would mix them. "
                         "Rerun with the same settings, set `overwrite`, or choose another output path")


# ----------------------------------------------------------------------------- the stage's steps


@dataclass
class _Tally:
    """The counts behind the summary, carried from the rows already written through this run's loop."""

    kept: int
    rejected: Counter[str]
    seen: set[str]  # normalised kept answers, which the duplicate filter checks against
    by_prompt: defaultdict[str, Counter[str]]  # rows per way of prompting (Shot.prompt), see _by_prompt
    generated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Shot(NamedTuple):
    """How a query is prompted: `prompt` names the way, `example` is the (id, query, reference) shown before the
    query (None: zero-shot), `check` the reference the copy filter compares answers with, and `meta` what each
    of the query's rows records of it."""

    prompt: str  # one-shot, zero-shot or other-example
    example: Query | None
    check: str | None
    meta: dict[str, Any]


def plan_shots(queries: list[Query], pool: list[Query], cfg: SampleConfig) -> dict[str, Shot]:
    """Each query's Shot, by query id. `mode` decides (one-shot: the query's own reference is shown and
    checked), except that with `short_reference` other than one-shot, a query whose reference has at most
    `short_reference_words` words is asked alone (zero-shot) or after another `pool` row whose reference is
    longer (other-example), drawn by `seed` and the query id, so that shards and reruns agree.

    A small model shown a short reference tends to copy it, and the copy filter rejects the copy: the other
    two ways give up the query's own example for yield. The copy filter then checks the reference the prompt
    showed (none for zero-shot: an answer that matches a reference never shown is right, not copied), and
    every row records the way (`prompt`, and `example_id`); at the default nothing changes, rows included.
    """
    if cfg.mode == "zero-shot":  # the reference, if any, is still checked: as before this option
        return {q[0]: Shot("zero-shot", None, q[2], {}) for q in queries}

    def short(ref: str | None) -> bool:
        return ref is not None and len(ref.split()) <= cfg.short_reference_words

    examples = [q for q in pool if q[2] is not None and not short(q[2])]
    shots = {}
    for q in queries:
        example: Query | None = q
        if cfg.short_reference == "one-shot" or not short(q[2]):
            prompt = "one-shot"
        elif cfg.short_reference == "zero-shot":
            prompt, example = "zero-shot", None
        elif examples:
            prompt, example = "other-example", examples[derive_seed(cfg.seed, "example", q[0]) % len(examples)]
        else:
            raise DeliaError(f"`short_reference` other-example needs a pool row whose reference has more than "
                             f"{cfg.short_reference_words} words to show as the example; the pool has none")
        meta = {} if cfg.short_reference == "one-shot" else {"prompt": prompt}
        if prompt == "other-example":
            meta["example_id"] = example[0]
        shots[q[0]] = Shot(prompt, example, None if example is None else example[2], meta)
    return shots


def _select_queries(pool: Path, cfg: SampleConfig) -> tuple[list[Query], dict[str, Shot], Counter[str], int]:
    """(queries of this shard within `limit`, their shots, counts of those skipped and why, rows in the pool).
    One-shot mode skips queries without a reference, and refuses a pool where none has one.
    """
    everything, skipped = _load_queries(pool, cfg.format, cfg.columns, cfg.skip_invalid)
    if not everything:
        raise DeliaError(f"{pool}: no queries to sample" + (f" ({sum(skipped.values())} rows skipped: "
                         + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")" if skipped else ""))
    pool_rows = len(everything) + sum(skipped.values())
    queries = [q for q in everything if in_shard(q[0], *parse_shard(cfg.shard))][:cfg.limit]
    if cfg.mode == "one-shot":
        no_ref = sum(ref is None for _, _, ref in queries)
        if queries and no_ref == len(queries):
            raise DeliaError(f"{pool}: no query has a reference answer, which `mode` one-shot needs; "
                             "use `mode` zero-shot")
        if no_ref:
            skipped["no_reference"] = no_ref
            queries = [q for q in queries if q[2] is not None]
    return queries, plan_shots(queries, everything, cfg), skipped, pool_rows


def _pick_up(out: Path, queries: list[Query], n: int, filters: Filters, mode: str) -> tuple[list[Query], _Tally]:
    """The queries not yet sampled into `out`, and the tally of the rows already there (their kept answers
    seed the duplicate filter), so that a rerun goes on where the last one stopped. A row that does not
    record how it was prompted was prompted the `mode` way.
    """
    from delia.data import rejects_path

    kept_rows, rejected_rows = _resume(out, rejects_path(out), n)
    done = {r["meta"]["query_id"] for r in (*kept_rows, *rejected_rows)}
    seen = {normalise(r["messages"][-1]["content"]) for r in kept_rows} if filters.duplicates else set()
    tally = _Tally(kept=len(kept_rows), rejected=Counter(r["reason"] for r in rejected_rows), seen=seen,
                   by_prompt=_by_prompt((*kept_rows, *rejected_rows), mode))
    return [q for q in queries if q[0] not in done], tally


def _by_prompt(rows: Iterable[dict[str, Any]], mode: str) -> defaultdict[str, Counter[str]]:
    """Rows per way of prompting (the row's meta `prompt`; a row without one was prompted the `mode` way):
    "kept" and each reason to reject."""
    counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        counts[r["meta"].get("prompt", mode)][r.get("reason", "kept")] += 1
    return counts


def _yield(counts: Counter[str]) -> dict[str, Any]:
    """One way of prompting's rows kept and rejected (per reason), as summaries give them."""
    return {"kept": counts["kept"], "rejected": {r: counts[r] for r in REASONS if counts[r]}}


def _open_backend(cfg: SampleConfig) -> Backend:
    """The back end through `get_backend`, given the options of its kind: hf loads `model`'s tokenizer with
    the model; vllm and openai get it here, so that every back end renders prompts with `model`'s template.
    """
    from delia.backends import get_backend

    options: dict[str, Any]
    if cfg.backend == "hf":
        options = {"batch_size": cfg.batch_size, "batch_tokens": cfg.batch_tokens, "device": cfg.device,
                   "dtype": cfg.dtype}
    else:
        from delia.models import load_tokenizer

        options = {"tokenizer": load_tokenizer(cfg.model)}
        if cfg.backend == "vllm":
            options |= {"tensor_parallel_size": cfg.tensor_parallel, "dtype": cfg.dtype}
        else:
            options |= {"base_url": cfg.base_url, "concurrency": cfg.concurrency, "timeout": cfg.timeout,
                        "max_retries": cfg.max_retries}
    model = cfg.served_model or cfg.model if cfg.backend == "openai" else cfg.model
    return get_backend(cfg.backend, model, **options)


def sampled_prompts(pool: Path, tokenizer: Any, config: SampleConfig | None = None,
                    **options: Any) -> tuple[list[Query], list[list[int]]]:
    """(queries, their prompt ids): what `sample` with these options answers in a fresh run (for cost plans)."""
    cfg = SampleConfig.build(config, **options)
    queries, shots, skipped, _ = _select_queries(pool, cfg)
    return _render_prompts(queries, shots, tokenizer, cfg.system, cfg.max_prompt_tokens, skipped)


def _render_prompts(todo: list[Query], shots: dict[str, Shot], tokenizer: Any, system: str | None,
                    max_prompt_tokens: int | None, skipped: Counter[str]) -> tuple[list[Query], list[list[int]]]:
    """(queries, their prompt ids): with `max_prompt_tokens`, longer prompts are left out and counted in `skipped`."""
    from delia.prompts import delia_prompt, prompt_ids

    def messages(qid: str, query: str) -> list[dict[str, str]]:
        example = shots[qid].example
        if example is None:
            return delia_prompt(query, None, "zero-shot", system)
        return delia_prompt(query, example[2], "one-shot", system, example_query=example[1])

    prompts = [prompt_ids(tokenizer, messages(qid, q)) for qid, q, _ in todo]
    if max_prompt_tokens is not None:
        fits = [len(p) <= max_prompt_tokens for p in prompts]
        if not all(fits):
            skipped["prompt_too_long"] = fits.count(False)
            todo = [q for q, ok in zip(todo, fits, strict=True) if ok]
            prompts = [p for p, ok in zip(prompts, fits, strict=True) if ok]
    return todo, prompts


def _generate_and_write(engine: Backend, todo: list[Query], prompts: list[list[int]], params: SamplingParams,
                        out: Path, filters: Filters, tally: _Tally, meta: dict[str, Any], shots: dict[str, Shot],
                        progress: ProgressCallback | None) -> None:
    """Generate, filter and append: each query's rows go to OUT or its rejects (and are fsynced) as soon as
    its last sample arrives, so a crash loses at most the queries in flight. `progress` hears of each query
    finished.
    """
    from delia.backends import derive_seed
    from delia.data import rejects_path
    from delia.files import JsonlAppender

    seeds = [derive_seed(params.seed, qid) for qid, _, _ in todo]
    pending: dict[int, list[Completion]] = {}
    done = 0
    report(progress, Progress("sampling", done, len(todo), unit="queries", counts={"tok": 0}))
    with JsonlAppender(out) as kept_file, JsonlAppender(rejects_path(out)) as reject_file:
        for i, completion in engine.generate(prompts, params, seeds):
            pending.setdefault(i, []).append(completion)
            tally.prompt_tokens += completion.prompt_tokens
            tally.completion_tokens += completion.completion_tokens
            if len(pending[i]) < params.n:
                continue
            good, bad = _judge(todo[i], pending.pop(i), params.n, filters, tally, meta, shots[todo[i][0]])
            if good:
                kept_file.write(good)
            if bad:
                reject_file.write(bad)
            done += 1
            report(progress, Progress("sampling", done, len(todo), unit="queries",
                                      counts={"tok": tally.completion_tokens}))


def _judge(query: Query, completions: list[Completion], n: int, filters: Filters, tally: _Tally,
           meta: dict[str, Any], shot: Shot) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A finished query's samples as rows, in sample order, split into kept and rejected (with the reason),
    and counted in `tally`; the copy filter checks the reference `shot` says.
    """
    qid, text, _ = query
    good, bad = [], []
    for c in sorted(completions, key=lambda c: c.sample):
        row = _row(qid, text, c, n, {**meta, **shot.meta})
        reason = filters.check_and_record(c.text, c.finish_reason, shot.check, tally.seen)
        tally.by_prompt[shot.prompt][reason or "kept"] += 1
        if reason is None:
            good.append(row)
        else:
            bad.append({**row, "reason": reason})
            tally.rejected[reason] += 1
    tally.kept += len(good)
    tally.generated += len(good) + len(bad)
    return good, bad


def _row(qid: str, query: str, c: Completion, n: int, meta: dict[str, Any]) -> dict[str, Any]:
    """One output row: query and answer as messages, id `qid` (`qid#k` for sample k when n > 1), and meta."""
    return {"messages": [{"role": "user", "content": query}, {"role": "assistant", "content": c.text}],
            "id": qid if n == 1 else f"{qid}#{c.sample}",
            "meta": {"query_id": qid, **meta, "sample": c.sample, "finish_reason": c.finish_reason,
                     "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}}


def _summary(out: Path, pool_rows: int, skipped: Counter[str], shard: str, queries: dict[str, int], resumed: int,
             tally: _Tally, wall: float) -> SampleSummary:
    """What `sample` returns, the manifest keeps and the table shows. `queries` counts this run's queries per
    way of prompting; `by_prompt` gives each way's queries and rows kept and rejected (total in the file):
    the yield of each."""
    by_prompt = {p: {"queries": queries.get(p, 0), **_yield(tally.by_prompt[p])}
                 for p in sorted({*queries, *tally.by_prompt})}
    return SampleSummary(out=str(out), pool_rows=pool_rows, skipped=dict(skipped), shard=shard,
                         queries=sum(queries.values()), resumed=resumed, generated=tally.generated,
                         kept=tally.kept, rejected={r: tally.rejected[r] for r in REASONS if tally.rejected[r]},
                         by_prompt=by_prompt, prompt_tokens=tally.prompt_tokens,
                         completion_tokens=tally.completion_tokens, wall_s=round(wall, 2),
                         tokens_per_s=round(tally.completion_tokens / wall, 2) if wall else 0.0)


# ----------------------------------------------------------------------------- the stage


def auto_or_positive_option(value: Any, info: ValidationInfo) -> int | str:
    """An option that is 'auto' or a positive integer, also given as text (the command line's form)."""
    from delia.backends.hf import auto_or_positive

    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    try:
        return auto_or_positive(f"`{info.field_name}`", value)
    except DeliaError as e:
        raise ValueError(str(e)) from None


class EngineOptions(ReadOptions):
    """How a stage that generates with the model being tuned (`sample`, `rewrite`) reaches it: the back end, and
    how that back end batches, places and serves the model."""

    model: Annotated[str, Flags("--model", "-m")] = "smollm2-135m"
    """Model (bundled name, folder, .gguf or hub id); with `backend` openai, the tokenizer's model."""
    backend: BackendName = "hf"
    """hf (transformers, CPU/GPU), vllm (offline engine) or openai (any OpenAI-compatible server)."""
    batch_size: int | Literal["auto"] = "auto"
    """hf: rows per batch at most, or auto (64 on CPU, 512 on GPU)."""
    batch_tokens: int | Literal["auto"] = "auto"
    """hf: token budget of a batch: each row in flight reserves its prompt plus `max_new_tokens` of KV cache
    (padded to the widest row); auto fits it to memory (at most 65536 on CPU). Bounds memory and the work a kill
    loses; never changes the answers."""
    device: str | None = None
    """hf: cpu, cuda, cuda:1 (default: cuda if present)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """hf/vllm: auto, float32, bfloat16 or float16."""
    tensor_parallel: int = Field(1, ge=1)
    """vllm: GPUs to split the model across."""
    base_url: str | None = None
    """openai: server URL, e.g. http://127.0.0.1:8000/v1 (API key from $OPENAI_API_KEY)."""
    served_model: str | None = None
    """openai: model name on the server (default: `model`)."""
    concurrency: int = Field(8, ge=1)
    """openai: requests in flight."""
    timeout: float = Field(300.0, gt=0)
    """openai: seconds per request before it is retried."""
    max_retries: int = Field(5, ge=0)
    """openai: retries per request, with exponential backoff."""

    @field_validator("batch_size", "batch_tokens", mode="before")
    @classmethod
    def _auto_or_positive(cls, value: Any, info: ValidationInfo) -> int | str:
        return auto_or_positive_option(value, info)

    def model_identity(self) -> dict[str, Any]:
        """The model as a stage's identity holds it: by its fingerprint, or behind a server by its name only."""
        from delia.models import model_identity

        if self.backend == "openai":
            return {"model": self.served_model or self.model, "fingerprint": None}
        return model_identity(self.model)

    @model_validator(mode="after")
    def _openai_needs_a_server(self) -> Self:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("`backend` openai needs `base_url` (e.g. http://127.0.0.1:8000/v1)")
        return self


class SampleConfig(EngineOptions):
    """Options of `delia sample`. Sampling defaults are the paper's: temperature 0.7, top-p 0.95, one answer of
    at most 512 tokens per query; but a query with a short reference is asked alone (`short_reference`)."""

    # one-shot until 2026-12-03: a stage identity without it stands for that
    CHANGED_DEFAULTS: ClassVar[dict[str, Any]] = {"short_reference": "one-shot"}

    mode: Mode = "one-shot"
    """one-shot (query, reference, query: the paper's) or zero-shot (query alone, for pools without references)."""
    short_reference: ShortReference = "zero-shot"
    """With `mode` one-shot, how a query whose reference is short is prompted: zero-shot (asked alone), one-shot
    (the paper's: its own reference shown, which a small model tends to copy, and the copy filter rejects), or
    other-example (after another pool row with a longer reference, drawn by `seed`). The summary's `by_prompt`
    gives each way's yield. The default keeps 3x the rows of the paper's one-shot and drifts less
    (docs/results/sampling-yield.md)."""
    short_reference_words: int = Field(SHORT_REFERENCE_WORDS, ge=0)
    """A reference of at most this many words is short (for `short_reference`)."""
    system: str | None = None
    """System message (left out for templates that reject one)."""
    temperature: float = Field(0.7, ge=0)
    """Sampling temperature; 0 is greedy."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus sampling mass."""
    max_new_tokens: int = Field(512, ge=1)
    """Token limit per answer."""
    samples_per_query: Annotated[int, Flags("--samples-per-query", "-n")] = Field(1, ge=1)
    """Answers per query."""
    seed: int = 0
    """Base seed; each sample's seed derives from it and the query id."""
    shard: str | None = None
    """i/N: sample only shard i of N (split by query-id hash)."""
    limit: int | None = Field(None, ge=0)
    """Sample only the first N queries of the pool (of this shard)."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Skip (and count) queries whose rendered prompt is longer: keeps prompts inside the context and caps prefill
    cost on CPU."""
    drop_empty: bool = True
    """Reject empty or whitespace answers."""
    drop_truncated: bool = True
    """Reject answers cut at `max_new_tokens`."""
    drop_repetitive: bool = True
    """Reject degenerate repetition loops."""
    drop_reference_copies: bool = True
    """Reject answers that copy the reference or talk about 'the reference answer'."""
    drop_duplicates: bool = True
    """Reject exact duplicate answers."""
    overwrite: bool = False
    """Start again instead of resuming an existing OUT."""

    @field_validator("shard")
    @classmethod
    def _shard(cls, shard: str | None) -> str | None:
        try:
            parse_shard(shard)
        except DeliaError as e:
            raise ValueError(str(e)) from None
        return shard

    @model_validator(mode="after")
    def _short_reference_needs_one_shot(self) -> SampleConfig:
        if self.short_reference == "other-example" and self.mode != "one-shot":
            raise ValueError(f"`short_reference` {self.short_reference} changes one-shot prompts, and `mode` is "
                             f"{self.mode}")
        return self

    def options(self) -> dict[str, Any]:
        """As for every stage; `short_reference` only where it changes prompts (`mode` one-shot)."""
        options = super().options()
        if self.mode != "one-shot" and "short_reference" not in self.model_fields_set:
            options.pop("short_reference", None)
        return options


def sample(
    pool: Annotated[Path, "Query pool in any format `delia data inspect` reads; the first user turn is the query, "
                          "the first assistant turn (if any) the reference."],
    out: Annotated[Path, "Output messages JSONL; OUT.rejects.jsonl and OUT.manifest.json go beside it. An existing "
                         "OUT is resumed."],
    config: SampleConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> SampleSummary:
    """Sample the model's own answers to a query pool (DELIA's diverse data), resumably.

    `options` set any SampleConfig field over `config`; `progress` hears of every query finished. Returns the
    summary (counts, tokens, wall time), which the command shows as a table.

    Examples:\n
      delia sample pool.jsonl --out diverse.jsonl\n
      delia sample pool.jsonl --out diverse.jsonl --mode zero-shot -n 2 --seed 1\n
      delia sample pool.jsonl --out part0.jsonl --shard 0/4 --backend vllm --tensor-parallel 2\n
      delia sample pool.jsonl --out diverse.jsonl --backend openai --base-url http://127.0.0.1:8000/v1
    """
    cfg = SampleConfig.build(config, **options)
    return _sample(SampleStage.of(Path(pool), cfg), Path(out), progress)


# the options each query's rows depend on (a resume must match them)
GENERATION_OPTIONS = ("mode", "system", "temperature", "top_p", "max_new_tokens", "samples_per_query", "seed",
                      "shard", "max_prompt_tokens", "drop_empty", "drop_truncated", "drop_repetitive",
                      "drop_reference_copies", "drop_duplicates", "short_reference", "short_reference_words",
                      "served_model")


@dataclass
class SampleStage(Stage[SampleSummary]):
    """Sampling as a stage: its identity is the model's fingerprint, the pool's hash and the options; `delia run`
    caches it by that, and a rerun of `delia sample` resumes only an output whose manifest holds the same."""

    name: ClassVar[str] = "sample"
    result: ClassVar[Any] = SampleSummary

    pool: Path
    config: SampleConfig
    model: dict[str, Any] | None = None  # {model: as named, fingerprint}; None: `config`'s, once needed
    label: str = ""

    @classmethod
    def of(cls, pool: Path, cfg: SampleConfig) -> SampleStage:
        """The stage `delia sample` runs: the model as `cfg` names it (resolved once the inputs are checked)."""
        return cls(pool, cfg)

    def identity(self) -> dict[str, Any]:
        return {"model": self._model(), "pool": sha256_path(self.pool), "options": self.config.options()}

    def resume_identity(self) -> dict[str, Any]:
        """The identity without the options that leave each query's rows as they are (how many queries, the back
        end and its batching): a rerun may change those and resume."""
        options = self.config.options()
        return {"model": self._model(), "pool": sha256_path(self.pool),
                "options": {k: options[k] for k in GENERATION_OPTIONS if k in options}}

    def run(self, folder: Path, progress: ProgressCallback | None = None) -> SampleSummary:
        return _sample(self, folder / "samples.jsonl", progress)


def _sample(stage: SampleStage, out: Path, progress: ProgressCallback | None) -> SampleSummary:
    from delia.backends import SamplingParams

    start = time.monotonic()
    cfg, pool = stage.config, stage.pool
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed, cfg.samples_per_query)
    shard_i, shard_n = parse_shard(cfg.shard)
    filters = Filters(cfg.drop_empty, cfg.drop_truncated, cfg.drop_repetitive, cfg.drop_reference_copies,
                      cfg.drop_duplicates)
    settings = {"pool": str(pool), "model": cfg.model, "mode": cfg.mode, "system": cfg.system,
                "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                "samples_per_query": cfg.samples_per_query, "seed": cfg.seed, "shard": f"{shard_i}/{shard_n}",
                "max_prompt_tokens": cfg.max_prompt_tokens,
                "filters": {k: getattr(filters, k) for k in Filters.__dataclass_fields__}}
    if cfg.short_reference != "one-shot":  # absent at one-shot, so that runs from before the option resume
        settings |= {"short_reference": cfg.short_reference, "short_reference_words": cfg.short_reference_words}

    check_output(out, inputs=[pool], overwrite=True)  # an existing OUT is resumed or refused below
    queries, shots, skipped, pool_rows = _select_queries(pool, cfg)
    _check_resumable(out, stage, settings, cfg.overwrite)
    todo, tally = _pick_up(out, queries, cfg.samples_per_query, filters, cfg.mode)
    resumed = len(queries) - len(todo)

    versions = library_versions("vllm") if cfg.backend == "vllm" else library_versions()
    manifest = SampleManifest(stage="sample", status="running", settings=settings, identity=stage.resume_identity(),
                              limit=cfg.limit,
                              backend=cfg.backend, versions=versions, started=_now())
    manifest.write(out)
    model_path = None
    if todo:
        engine = _open_backend(cfg)
        model_path = engine.tokenizer.name_or_path
        todo, prompts = _render_prompts(todo, shots, engine.tokenizer, cfg.system, cfg.max_prompt_tokens, skipped)
        _generate_and_write(engine, todo, prompts, params, out, filters, tally,
                            {"backend": cfg.backend, "model": cfg.model, "seed": cfg.seed}, shots, progress)

    summary = _summary(out, pool_rows, skipped, f"{shard_i}/{shard_n}", Counter(s.prompt for s in shots.values()),
                       resumed, tally, time.monotonic() - start)
    manifest.model_copy(update={"status": "complete", "finished": _now(), "model_path": model_path,
                                "query_ids_sha256": _ids_digest(q[0] for q in queries), "summary": summary}).write(out)
    return summary


def _ids_digest(ids: Iterable[str]) -> str:
    """A fingerprint of a set of query ids, so that sample-merge can check a shard's rows cover its queries."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


# ----------------------------------------------------------------------------- merging shards


class MergeConfig(StageConfig):
    """Options of `delia sample-merge`."""

    overwrite: bool = False
    """Replace OUT (and its rejects and manifest) if it exists."""


def merge(
    shards: Annotated[list[Path], "Shard outputs (each OUT of `delia sample --shard i/N`)."],
    out: Annotated[Path, Flags("--out", "-o"), "Merged messages JSONL (rejects and manifest beside it)."],
    config: MergeConfig | None = None,
    **options: Any,
) -> MergeSummary:
    """Combine shard outputs into one, checking that every shard of the same run is present and complete,
    and that no query is missing or appears twice. Duplicate answers across shards are rejected too
    when the run filtered duplicates. Returns the summary (counts) that the manifest keeps.

    Example:\n
      delia sample-merge part0.jsonl part1.jsonl part2.jsonl part3.jsonl --out diverse.jsonl
    """
    from delia.data import rejects_path
    from delia.files import read_complete_jsonl, write_jsonl

    cfg = MergeConfig.build(config, **options)
    if not shards:
        raise DeliaError("sample-merge needs the shard outputs to merge")
    inputs = [p for s in shards for p in (s, rejects_path(s), manifest_path(s))]
    check_output(out, inputs=inputs, overwrite=cfg.overwrite)
    for beside_out in (rejects_path(out), manifest_path(out)):
        check_output(beside_out, inputs=inputs, overwrite=True)  # replaced with OUT, but never an input
    manifests = []
    for s in shards:
        m = manifest_path(s)
        if not m.exists():
            raise DeliaError(f"{s}: no {m.name} beside it; is it a `delia sample` output?")
        manifests.append(_read_manifest(m, "not a readable manifest"))
        if manifests[-1].status != "complete":
            raise DeliaError(f"{s}: sampling did not finish ({m.name} says {manifests[-1].status!r}); "
                             "rerun its `delia sample` command to resume it")
    strip = lambda st: {k: v for k, v in st.items() if k != "shard"}  # noqa: E731
    base = strip(manifests[0].settings)
    for s, m in zip(shards[1:], manifests[1:], strict=True):
        changed = changed_settings(base, strip(m.settings))
        if changed:
            raise DeliaError(f"{s}: sampled with other settings than {shards[0]} ({', '.join(changed)})")
    parsed = [parse_shard(m.settings["shard"]) for m in manifests]
    count = parsed[0][1]
    indices = Counter(i for i, _ in parsed)
    if any(n != count for _, n in parsed):
        raise DeliaError(f"shards come from different splits: {sorted({m.settings['shard'] for m in manifests})}")
    repeated = sorted(i for i, c in indices.items() if c > 1)
    missing = sorted(set(range(count)) - set(indices))
    if repeated or missing:
        raise DeliaError(f"shards of a {count}-way split: missing {missing or 'none'}, "
                         f"given twice {repeated or 'none'}")

    n = base["samples_per_query"]
    kept_rows: list[dict] = []
    rejected_rows: list[dict] = []
    owner: dict[str, Path] = {}
    seen: set[str] = set()
    moved = 0
    for s, m in sorted(zip(shards, manifests, strict=True), key=lambda p: parse_shard(p[1].settings["shard"])):
        kept, rejected = read_complete_jsonl(s), read_complete_jsonl(rejects_path(s))
        per_query = Counter(r["meta"]["query_id"] for r in (*kept, *rejected))
        for qid, c in per_query.items():
            if qid in owner:
                raise DeliaError(f"query {qid} is in both {owner[qid]} and {s}")
            if c != n:
                raise DeliaError(f"{s}: query {qid} has {c} samples, expected {n}")
            owner[qid] = s
        if _ids_digest(per_query) != m.query_ids_sha256:
            raise DeliaError(f"{s}: its rows do not cover the queries its manifest lists "
                             f"({len(per_query)} queries present, {m.summary.queries if m.summary else '?'} expected)")
        for r in kept:
            key = normalise(r["messages"][-1]["content"])
            if base["filters"]["duplicates"] and key in seen:
                rejected_rows.append({**r, "reason": "duplicate"})
                moved += 1
                continue
            seen.add(key)
            kept_rows.append(r)
        rejected_rows += rejected

    out = Path(out)
    write_jsonl(out, kept_rows)
    write_jsonl(rejects_path(out), rejected_rows)
    by_prompt = _by_prompt((*kept_rows, *rejected_rows), base["mode"])
    summary = MergeSummary(out=str(out), shards=len(shards), queries=len(owner), kept=len(kept_rows),
                           rejected=dict(Counter(r["reason"] for r in rejected_rows)), cross_shard_duplicates=moved,
                           by_prompt={p: _yield(c) for p, c in sorted(by_prompt.items())})
    MergeManifest(stage="sample-merge", status="complete", settings=base, shards=[str(s) for s in shards],
                  finished=_now(), summary=summary, query_ids_sha256=_ids_digest(owner),
                  versions=manifests[0].versions).write(out)
    log.info("merged %d shards: %d queries, %d kept, %d rejected -> %s", len(shards), len(owner), len(kept_rows),
             len(rejected_rows), out)
    return summary

