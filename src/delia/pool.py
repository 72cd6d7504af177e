"""`delia pool`: the diverse query pool a DELIA run samples from, built from public sources, cleaned,
decontaminated against the task and selected for diversity.

Steps, in this order; each one's removals are counted in `OUT.sources.json` and listed with their reason in
`OUT.removed.jsonl`, so no row disappears silently:

1. read: rows that cannot be read (an error naming file, line and field, or counted with `skip_invalid`),
   empty rows, multi-turn rows, rows without a reference answer;
2. decontamination: a query sharing word n-grams with a task prompt (train or eval) above a threshold;
3. script: queries or references whose letters are mostly outside the given Unicode scripts (optional);
4. length: query and reference bounds in tokens of the target model's tokenizer;
5. exact duplicates (normalised query text), then near-duplicates (MinHash LSH on word 3-grams);
6. selection to `size` rows: k-means on the target model's mean-pooled hidden states, drawn round-robin
   across clusters (seeded).

With `coverage` prompt files, OUT.coverage.json tells how close each of their prompts comes to the pool
(`delia.coverage`), before anything is sampled or trained.
"""

from __future__ import annotations

import difflib
import io
import logging
import re
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import Field, field_validator, model_validator

from delia.artifacts import PoolSummary
from delia.config import Flags
from delia.coverage import coverage_record, measure, read_prompts
from delia.data import ChatData, ReadOptions, parse_columns, read_chat
from delia.errors import DeliaError
from delia.files import (
    atomic_writer,
    beside,
    check_output,
    sha256_file,
    sha256_path,
    write_json,
    write_jsonl,
)
from delia.metrics import script_share, unicode_scripts
from delia.progress import ProgressCallback
from delia.stage import Stage
from delia.text import normalise

HF_PREFIX = "hf:"
EMPTY_REASONS = frozenset({"empty_content", "empty_conversation"})
STEPS = ("invalid", "empty", "multi_turn", "no_reference", "contaminated", "script", "query_too_short",
         "query_too_long", "reference_too_short", "reference_too_long", "duplicate", "near_duplicate",
         "not_selected")
_WORD = re.compile(r"\w+")
log = logging.getLogger(__name__)


def sources_path(out: str | Path) -> Path:
    return PoolSummary.path(out)


def removed_path(out: str | Path) -> Path:
    return beside(out, ".removed.jsonl", strip=(".jsonl",))


def plot_path(out: str | Path) -> Path:
    return beside(out, ".selection.png", strip=(".jsonl",))


def coverage_path(out: str | Path) -> Path:
    return beside(out, ".coverage.json", strip=(".jsonl",))


# ----------------------------------------------------------------------------- reading sources


def _read_hf(spec: str, format: str, columns: dict[str, str] | None) -> tuple[ChatData, dict[str, Any]]:
    """`hf:NAME[:SPLIT]`: a saved dataset folder (load_from_disk) or a hub dataset (load_dataset)."""
    import datasets

    datasets.disable_progress_bars()
    name, _, split = spec[len(HF_PREFIX):].partition(":")
    local = Path(name).expanduser()
    try:
        ds = datasets.load_from_disk(str(local)) if local.is_dir() else datasets.load_dataset(name)
    except Exception as e:
        if local.is_dir():
            raise DeliaError(f"{spec}: cannot read the saved dataset: {e}") from None
        raise DeliaError(f"{spec}: not a saved dataset folder, and the Hugging Face hub could not provide the "
                         f"dataset '{name}' ({type(e).__name__}). Pass a local file or a saved dataset folder "
                         "(hf:PATH) instead.") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise DeliaError(f"{spec}: no split {split!r}; the dataset has {', '.join(ds)}")
        ds = ds[split]
    elif split:
        raise DeliaError(f"{spec}: the saved dataset has no splits; leave out ':{split}'")
    with tempfile.TemporaryDirectory(prefix="delia-pool-") as tmp:
        folder = Path(tmp) / "data"
        ds.save_to_disk(str(folder))
        data = read_chat(folder, format, columns=columns, require_assistant=False, skip_invalid=True)  # type: ignore[arg-type]
        identity = {"kind": "hf", "name": name, "split": split or None, "rows": len(ds),
                    "content_sha256": sha256_path(folder)}
    for r in data.rejects:  # name the source the user gave, not the temporary export
        r["error"] = r["error"].replace(str(folder), spec, 1)
    data.path = spec
    return data, identity


def _local_path(spec: str) -> Path:
    """The file or folder a source names (an `hf:` hub name gives a path that does not exist)."""
    return Path(spec[len(HF_PREFIX):].partition(":")[0]).expanduser() if spec.startswith(HF_PREFIX) else Path(spec)


def _read_source(spec: str, format: str, columns: dict[str, str] | None) -> tuple[ChatData, dict[str, Any]]:
    """A source's records (rows that are not valid chat come back as rejects) and its identity for SOURCES."""
    if spec.startswith(HF_PREFIX):
        return _read_hf(spec, format, columns)
    path = Path(spec)
    data = read_chat(path, format, columns=columns, require_assistant=False, skip_invalid=True)  # type: ignore[arg-type]
    identity = ({"kind": "folder", "content_sha256": sha256_path(path)} if path.is_dir()
                else {"kind": "file", "sha256": sha256_file(path)})
    return data, identity


def _parse_licences(pairs: Sequence[str] | None, sources: Sequence[str]) -> dict[str, str]:
    out = {}
    for p in pairs or []:
        src, sep, lic = p.rpartition("=")
        if not sep or src not in sources:
            raise DeliaError(f"`licence` expects SOURCE=LICENCE with SOURCE one of the sources, got {p!r}")
        out[src] = lic
    return out


def _structured(spec: str, data: ChatData, licence: str | None, skip_invalid: bool, drop_multi_turn: bool,
                require_reference: bool, removed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pool rows (user query, assistant reference) with provenance; the rest go to `removed` with a reason."""
    for r in data.rejects:
        if r["reason"] in EMPTY_REASONS:
            removed.append({"reason": "empty", "source": spec, **_loc(r), "error": r["error"]})
        elif skip_invalid:
            removed.append({"reason": "invalid", "source": spec, **_loc(r), "error": r["error"]})
        else:
            raise DeliaError(r["error"])
    rows = []
    for record, loc in zip(data.records, data.locations, strict=True):
        users = [m for m in record["messages"] if m["role"] == "user"]
        refs = [m for m in record["messages"] if m["role"] == "assistant"]
        where = {f"source_{k}": v for k, v in loc.items()}
        reason = ("multi_turn" if drop_multi_turn and len(users) > 1
                  else "no_reference" if require_reference and not refs else None)
        messages = [{"role": "user", "content": users[0]["content"]}, *refs[:1]]
        if reason:
            removed.append({"reason": reason, "source": spec, **where, "messages": record["messages"]})
            continue
        own_id = {"source_id": record["id"]} if record.get("id") not in (None, "") else {}
        place = f":{loc['line']}" if "line" in loc else f"[row {loc['row']}]"
        rows.append({"messages": messages, "id": f"{spec}{place}", "source": spec, **where, **own_id,
                     "licence": licence})
    return rows


def _loc(reject: dict[str, Any]) -> dict[str, int]:
    return {f"source_{k}": reject[k] for k in ("line", "row") if k in reject}


def _query(row: dict[str, Any]) -> str:
    return row["messages"][0]["content"]


def _reference(row: dict[str, Any]) -> str | None:
    return row["messages"][1]["content"] if len(row["messages"]) > 1 else None


def _texts(row: dict[str, Any]) -> list[str]:
    return [m["content"] for m in row["messages"]]


# ----------------------------------------------------------------------------- decontamination


def _words(text: str) -> list[str]:
    return _WORD.findall(normalise(text))


def _grams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class Contamination:
    """Word n-gram overlap of a query with every task prompt: the share of the shorter text's n-grams that the
    two share. A prompt shorter than n words is one gram of all its words (matched as a contiguous phrase)."""

    def __init__(self, targets: Sequence[Path], n: int):
        self.n = n
        self.prompts: list[dict[str, Any]] = []
        self.index: dict[int, dict[tuple[str, ...], list[int]]] = defaultdict(lambda: defaultdict(list))
        self.sizes: list[int] = []
        for path in targets:
            data = read_chat(path, require_assistant=False)
            for record, loc in zip(data.records, data.locations, strict=True):
                words = _words(" ".join(m["content"] for m in record["messages"] if m["role"] == "user"))
                if not words:
                    continue
                m = min(n, len(words))
                grams = _grams(words, m)
                for g in grams:
                    self.index[m][g].append(len(self.prompts))
                self.sizes.append(len(grams))
                self.prompts.append({"file": str(path), **loc})

    def match(self, query: str) -> dict[str, Any] | None:
        """The task prompt with the highest overlap, with the overlap, or None if it shares no n-gram."""
        words = _words(query)
        best: dict[str, Any] | None = None
        for m, index in self.index.items():
            grams = _grams(words, m)
            shared = Counter(t for g in grams for t in index.get(g, ()))
            for t, count in shared.items():
                overlap = count / min(len(grams), self.sizes[t])
                if best is None or overlap > best["overlap"]:
                    best = {"task": self.prompts[t], "overlap": round(overlap, 4), "shared_ngrams": count}
        return best


# ----------------------------------------------------------------------------- duplicates


def _exact_duplicates(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]] | None]:
    """Per row, None for the first of its normalised query, else the reason and the first row's id."""
    first: dict[str, str] = {}
    reasons: list[tuple[str, dict[str, Any]] | None] = []
    for row in rows:
        key = normalise(_query(row))
        reasons.append(("duplicate", {"duplicate_of": first[key]}) if key in first else None)
        first.setdefault(key, row["id"])
    return reasons


def _near_duplicates(rows: list[dict[str, Any]], threshold: float, num_perm: int = 128) -> dict[int, int]:
    """{row index: index of the earlier row it nearly duplicates}: MinHash LSH on the queries' word 3-grams,
    candidates confirmed by their estimated Jaccard similarity."""
    from datasketch import MinHash, MinHashLSH

    shingles = []
    for row in rows:
        words = _words(_query(row))
        shingles.append([" ".join(g).encode() for g in _grams(words, min(3, len(words)))])
    hashes = MinHash.bulk(shingles, num_perm=num_perm)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dupes = {}
    for i, h in enumerate(hashes):
        close = [j for j in lsh.query(h) if hashes[j].jaccard(h) >= threshold]
        if close:
            dupes[i] = min(close)
        else:
            lsh.insert(i, h)
    return dupes


# ----------------------------------------------------------------------------- diversity selection


def select(vectors: np.ndarray, size: int, clusters: int, seed: int) -> tuple[list[int], np.ndarray]:
    """(selected row indices in row order, cluster label of every row): seeded k-means (k-means++ start) on
    standardised, unit-length vectors, then one row per cluster in turn, each cluster's rows in a seeded order,
    until `size` rows are drawn."""
    from scipy.cluster.vq import kmeans2

    x = (vectors - vectors.mean(0)) / (vectors.std(0) + 1e-6)  # a few huge hidden dimensions would dominate
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-6
    with warnings.catch_warnings():  # an empty cluster only contributes no rows
        warnings.simplefilter("ignore")
        _, labels = kmeans2(x.astype(np.float64), clusters, iter=30, minit="++", seed=seed)
    rng = np.random.default_rng(seed)
    members = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(clusters)]
    picked: list[int] = []
    while len(picked) < size:
        for m in members:
            if m and len(picked) < size:
                picked.append(int(m.pop(0)))
    return sorted(picked), labels


def _plot(vectors: np.ndarray, labels: np.ndarray, picked: list[int], path: Path) -> None:
    """2-D PCA of the embeddings: every cleaned query grey, the selected ones coloured by cluster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = vectors - vectors.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    chosen = np.zeros(len(x), dtype=bool)
    chosen[picked] = True
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(xy[~chosen, 0], xy[~chosen, 1], s=6, c="lightgrey", label=f"not selected ({(~chosen).sum()})")
    ax.scatter(xy[chosen, 0], xy[chosen, 1], s=8, c=labels[chosen], cmap="tab20",
               label=f"selected ({chosen.sum()}), colour: cluster")
    ax.set(title="Pool selection: 2-D PCA of query embeddings", xlabel="PC 1", ylabel="PC 2")
    ax.legend(loc="best", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    with atomic_writer(path, "wb") as fh:
        fh.write(buf.getvalue())


# ----------------------------------------------------------------------------- the stage


def _drop(rows: list[dict[str, Any]], reasons: Iterable[tuple[str, dict[str, Any]] | None],
          removed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose reason is None; the others go to `removed` with their reason and details."""
    kept = []
    for row, why in zip(rows, reasons, strict=True):
        if why is None:
            kept.append(row)
        else:
            removed.append({"reason": why[0], **why[1], **row})
    return kept


def _bounds(count: int, low: int | None, high: int | None, what: str) -> str | None:
    if low is not None and count < low:
        return f"{what}_too_short"
    if high is not None and count > high:
        return f"{what}_too_long"
    return None


def _require_rows(rows: list[dict[str, Any]], removed: list[dict[str, Any]]) -> None:
    """Stop with the count of what removed every row, before a model is loaded for nothing."""
    if not rows:
        why = ", ".join(f"{k}: {v}" for k, v in Counter(r["reason"] for r in removed).most_common())
        raise DeliaError(f"no rows left for the pool (removed: {why or 'none; the sources are empty'}); "
                         "loosen the filters or add sources")


class PoolConfig(ReadOptions):
    """Options of `delia pool`."""

    task: Annotated[list[Path] | None, Flags("--task", "-t")] = None
    """Task file (train or eval) to decontaminate against; repeatable."""
    coverage: list[Path] | None = None
    """Prompt file (general prompts, task prompts) whose coverage by the pool goes to OUT.coverage.json;
    repeatable."""
    size: int | None = Field(None, ge=1)
    """Select this many rows for diversity (default: keep all)."""
    model: Annotated[str, Flags("--model", "-m")] = "smollm2-135m"
    """Target model: its tokenizer counts the length bounds, its hidden states embed the queries."""
    licence: list[str] | None = None
    """SOURCE=LICENCE, repeatable: recorded per row."""
    drop_multi_turn: bool = True
    """Drop rows with more than one user turn."""
    require_reference: bool = True
    """Drop rows without an assistant reference (one-shot sampling needs one)."""
    decontaminate: bool = True
    """Drop queries that overlap a `task` prompt."""
    ngram: int = Field(8, ge=1)
    """Decontamination: n of the word n-grams."""
    overlap: float = Field(0.2, ge=0, le=1)
    """Decontamination: drop a query when this share of the shorter text's n-grams (query or task prompt) is
    shared."""
    script: list[str] | None = None
    """Keep rows whose letters are mostly in these Unicode scripts (e.g. LATIN; repeatable). A script heuristic,
    not language identification: it cannot tell English from French."""
    script_min_share: float = Field(0.8, ge=0, le=1)
    """Share of letters that must be in `script`."""
    min_query_tokens: int | None = Field(2, ge=0)
    """Shortest query, in tokens."""
    max_query_tokens: int | None = Field(1024, ge=0)
    """Longest query, in tokens."""
    min_reference_tokens: int | None = Field(16, ge=0)
    """Shortest reference, in tokens (one-shot sampling mostly copies short ones)."""
    max_reference_tokens: int | None = Field(2048, ge=0)
    """Longest reference, in tokens."""
    dedup: bool = True
    """Drop exact duplicate queries (case and spacing ignored)."""
    near_dedup: bool = True
    """Drop near-duplicate queries (MinHash LSH)."""
    near_threshold: float = Field(0.7, gt=0, le=1)
    """Jaccard similarity of word 3-grams that counts as a near-duplicate."""
    clusters: int | None = Field(None, ge=1)
    """k-means clusters for the selection (default: the square root of `size`)."""
    seed: int = 0
    """Seed of the clustering and the draw."""
    max_embed_tokens: int = Field(128, ge=1)
    """Tokens of each query that are embedded."""
    batch_size: int = Field(16, ge=1)
    """Queries per embedding batch."""
    device: str | None = None
    """cpu, cuda, ... (default: cuda if present)."""
    overwrite: bool = False
    """Replace OUT and the files beside it if they exist."""

    @field_validator("script")
    @classmethod
    def _known_scripts(cls, scripts: list[str] | None) -> list[str] | None:
        unknown = [s for s in scripts or [] if (s.upper().split() or [""])[0] not in unicode_scripts()]
        if unknown:
            close = difflib.get_close_matches(unknown[0].upper(), unicode_scripts(), n=1)
            raise ValueError(f"unknown Unicode script {unknown[0]!r}" + (f"; did you mean {close[0]}?" if close else
                                                                         " (e.g. LATIN, CYRILLIC, CJK, HIRAGANA)"))
        return scripts

    @model_validator(mode="after")
    def _bounds_in_order(self) -> PoolConfig:
        for what in ("query", "reference"):
            low, high = getattr(self, f"min_{what}_tokens"), getattr(self, f"max_{what}_tokens")
            if low is not None and high is not None and low > high:
                raise ValueError(f"`min_{what}_tokens` {low} is above `max_{what}_tokens` {high}")
        return self


@dataclass
class PoolStage(Stage[PoolSummary]):
    """Building an experiment's pool as a stage of `delia run`: its identity is the model's, the options, the
    hashes of the task files it is decontaminated against and of the sources (a hub name as given)."""

    name: ClassVar[str] = "pool"
    result: ClassVar[Any] = PoolSummary

    sources: list[str]
    options: dict[str, Any]  # PoolConfig fields as the experiment's `pool:` gives them
    task: list[Path]
    model: dict[str, Any]  # the model's identity
    model_path: str
    label: str = "pool"

    def identity(self) -> dict[str, Any]:
        return {"model": self.model, "options": self.options, "task": [sha256_file(t) for t in self.task],
                "sources": [sha256_file(s) if Path(s).is_file() else s for s in self.sources]}

    def run(self, folder: Path, progress: ProgressCallback | None = None) -> PoolSummary:
        return pool(self.sources, out=folder / "pool.jsonl", task=self.task, model=self.model_path,
                    progress=progress, overwrite=True, **self.options)


def pool(
    sources: Annotated[list[str], "Sources: files or folders in any format `delia data` reads, or hf:NAME[:SPLIT] "
                                  "(a hub dataset, or hf:PATH for a saved dataset folder)."],
    out: Annotated[Path, Flags("--out", "-o"), "Output pool (messages JSONL); OUT.sources.json, OUT.removed.jsonl, "
                                               "OUT.selection.png and OUT.coverage.json go beside it."],
    config: PoolConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> PoolSummary:
    """Build a diverse query pool: read sources, clean, decontaminate, select; returns OUT.sources.json's content.

    Every removed row is counted per step and listed with its reason in OUT.removed.jsonl. `options` set any
    PoolConfig field over `config`; `progress` hears of the embedding of the queries, batch by batch.

    Examples:\n
      delia pool alpaca.json dolly.jsonl --out pool.jsonl --task task_train.jsonl --task task_eval.jsonl\n
      delia pool hf:tatsu-lab/alpaca --out pool.jsonl --size 20000 --licence hf:tatsu-lab/alpaca=CC-BY-NC-4.0\n
      delia pool hf:./saved_dataset:test --out pool.jsonl --script LATIN --min-reference-tokens 32
    """
    from delia.models import embed, load_tokenizer, resolve_model

    cfg = PoolConfig.build(config, **options)
    out = Path(out)
    if out.suffix != ".jsonl":
        raise DeliaError(f"{out}: the pool is written as messages JSONL; give a .jsonl path")
    if not sources:
        raise DeliaError("give at least one source")
    for t in cfg.task or []:
        if not Path(t).is_file():
            raise DeliaError(f"`task` {t}: no such file (the task rows to decontaminate against)")
    inputs = [*map(_local_path, sources), *(cfg.task or []), *(cfg.coverage or [])]
    check_output(out, inputs=inputs, overwrite=cfg.overwrite)
    for beside_out in (sources_path(out), removed_path(out), plot_path(out), coverage_path(out)):
        check_output(beside_out, inputs=inputs, overwrite=True)  # replaced with OUT, but never an input
    prompt_sets = read_prompts(cfg.coverage) if cfg.coverage else {}
    licences = _parse_licences(cfg.licence, sources)
    cols = parse_columns(cfg.columns)
    removed: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    source_facts = []
    for spec in sources:
        data, identity = _read_source(spec, cfg.format, cols)
        got = _structured(spec, data, licences.get(spec), cfg.skip_invalid, cfg.drop_multi_turn,
                          cfg.require_reference, removed)
        source_facts.append({"source": spec, **identity, "format": data.format, "licence": licences.get(spec),
                             "rows_read": len(data.records) + len(data.rejects), "rows_usable": len(got)})
        rows += got

    targets = [Path(t) for t in cfg.task or []]
    contamination = Contamination(targets, cfg.ngram) if cfg.decontaminate and targets else None
    if contamination is not None:
        def contaminated(row: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
            hit = contamination.match(_query(row))
            return ("contaminated", {"match": hit}) if hit and hit["overlap"] >= cfg.overlap else None

        rows = _drop(rows, map(contaminated, rows), removed)
    if cfg.script:
        rows = _drop(rows, (None if all(script_share(text, cfg.script) >= cfg.script_min_share for text in _texts(r))
                            else ("script", {}) for r in rows), removed)

    _require_rows(rows, removed)
    model_path = resolve_model(cfg.model)
    tok = load_tokenizer(model_path, resolved=True)
    query_tokens = [len(ids) for ids in tok([_query(r) for r in rows], add_special_tokens=False)["input_ids"]]
    ref_tokens = [len(ids) for ids in tok([_reference(r) or "" for r in rows], add_special_tokens=False)["input_ids"]]
    reasons = []
    for r, q, a in zip(rows, query_tokens, ref_tokens, strict=True):
        why = _bounds(q, cfg.min_query_tokens, cfg.max_query_tokens, "query") or (
            _bounds(a, cfg.min_reference_tokens, cfg.max_reference_tokens, "reference")
            if _reference(r) is not None else None)
        reasons.append((why, {"tokens": {"query": q, "reference": a}}) if why else None)
    rows = _drop(rows, reasons, removed)

    if cfg.dedup:
        rows = _drop(rows, _exact_duplicates(rows), removed)
    if cfg.near_dedup and rows:
        dupes = _near_duplicates(rows, cfg.near_threshold)
        rows = _drop(rows, [("near_duplicate", {"duplicate_of": rows[dupes[i]]["id"]}) if i in dupes else None
                            for i in range(len(rows))], removed)

    _require_rows(rows, removed)
    selection: dict[str, Any] = {"method": "all", "rows": len(rows)}
    plot = vectors = None

    def vectors_of(texts: list[str]) -> np.ndarray:
        return embed(texts, model_path, max_tokens=cfg.max_embed_tokens, batch_size=cfg.batch_size,
                     device=cfg.device, progress=progress)[0]

    if cfg.size is not None and cfg.size < len(rows):
        k = min(len(rows), cfg.clusters or max(1, round(cfg.size ** 0.5)))
        vectors, cache_file, was_cached = embed([_query(r) for r in rows], model_path, max_tokens=cfg.max_embed_tokens,
                                                batch_size=cfg.batch_size, device=cfg.device, progress=progress)
        picked, labels = select(vectors, cfg.size, k, cfg.seed)
        plot = plot_path(out)
        _plot(vectors, labels, picked, plot)
        chosen = set(picked)
        rows = _drop(rows, [None if i in chosen else ("not_selected", {"cluster": int(labels[i])})
                            for i in range(len(rows))], removed)
        vectors = vectors[picked]  # the pool's rows, in order
        per_cluster = Counter(int(labels[i]) for i in picked)
        selection = {"method": "k-means on mean-pooled last hidden states, round-robin across clusters",
                     "rows": len(rows), "clusters": k, "nonempty_clusters": int(len(set(labels.tolist()))),
                     "clusters_covered": len(per_cluster),
                     "cluster_sizes": {str(c): int(n) for c, n in sorted(Counter(labels.tolist()).items())},
                     "selected_per_cluster": {str(c): n for c, n in sorted(per_cluster.items())},
                     "embedding": {"model": cfg.model, "max_tokens": cfg.max_embed_tokens, "cache": str(cache_file),
                                   "cached": was_cached}}
    if cfg.size is not None and cfg.size > len(rows) and selection["method"] == "all":
        log.warning("%d rows left after cleaning, fewer than size %d", len(rows), cfg.size)
    covered = {}
    if prompt_sets:
        queries = [_query(r) for r in rows]
        covered = measure(vectors_of(queries) if vectors is None else vectors, queries, prompt_sets, vectors_of)
    per_source = Counter(r["source"] for r in rows)
    selection["per_source"] = {s: {"rows": per_source[s], "share": round(per_source[s] / max(1, len(rows)), 4)}
                               for s in sources}

    counts = Counter(r["reason"] for r in removed)
    read = sum(f["rows_read"] for f in source_facts)
    summary: dict[str, Any] = {
        "out": str(out), "rows": len(rows), "rows_read": read, "seed": cfg.seed,
        "steps": {step: counts.get(step, 0) for step in STEPS},
        "sources": source_facts,
        "decontamination": {"enabled": contamination is not None, "ngram": cfg.ngram, "overlap": cfg.overlap,
                            "removed": counts.get("contaminated", 0),
                            "targets": [{"path": str(t), "sha256": sha256_file(t)} for t in targets]},
        "selection": selection,
        "settings": {"size": cfg.size, "model": cfg.model, "format": cfg.format, "columns": cols,
                     "skip_invalid": cfg.skip_invalid,
                     "drop_multi_turn": cfg.drop_multi_turn, "require_reference": cfg.require_reference,
                     "script": cfg.script, "script_min_share": cfg.script_min_share,
                     "query_tokens": [cfg.min_query_tokens, cfg.max_query_tokens],
                     "reference_tokens": [cfg.min_reference_tokens, cfg.max_reference_tokens], "dedup": cfg.dedup,
                     "near_dedup": cfg.near_dedup, "near_threshold": cfg.near_threshold, "clusters": cfg.clusters,
                     "max_embed_tokens": cfg.max_embed_tokens},
    }
    # beside files first, the pool last: an OUT that exists is complete
    write_jsonl(removed_path(out), removed)
    summary["files"] = {"removed": str(removed_path(out)), "plot": str(plot) if plot else None,
                        "coverage": str(coverage_path(out)) if covered else None}
    summary["coverage"] = {name: c.model_dump(exclude={"per_prompt"}) for name, c in covered.items()}
    if covered:
        write_json(coverage_path(out), coverage_record(out, cfg.model, cfg.max_embed_tokens, covered))
    record = PoolSummary(**summary)
    record.write(out)
    write_jsonl(out, rows)
    steps = ", ".join(f"{k} {v}" for k, v in summary["steps"].items() if v)
    log.info("wrote %d of %d rows to %s (removed: %s); see %s", len(rows), read, out, steps or "none",
             sources_path(out))
    for name, c in covered.items():
        log.info("%s", c.line(name))
    return record
