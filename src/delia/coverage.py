"""Pool coverage: how close each prompt of a set (general prompts, the task's prompts) comes to its nearest pool
query, read before any compute is spent on sampling and training: "the pool does not cover prompts like X".

Vectors are `delia.models.embed`'s (the target model's mean-pooled last hidden states), standardised per dimension
by the pool's own mean and spread and compared by cosine, as the pool's k-means selection sees them: raw hidden
states have a few huge dimensions that put every cosine near 1. Each pool thus has its own scale; to compare
pools, standardise all of them by the same vectors (`standardise_by`, e.g. the union of the pools), or the
narrower pool's scale flatters it.

The threshold, unless one is given, is the pool's own typical nearest-neighbour similarity: the median, over
the pool's queries, of the cosine to the nearest *other* pool query (leave-one-out). A prompt below it lies
farther from the pool than half the pool's queries lie from each other, in a region the pool covers more
thinly than it covers itself. Measured on the pool, it means the same under any model, where the level of raw
cosines differs from model to model; it also means that two pools' shares are each against their own density,
so compare pools by their median nearest similarity on one scale. A pool made of families of templated queries
(many rows per task) has near-identical neighbours, an own typical similarity near 1, and every prompt below it:
then read the medians, or give a `threshold`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, Field

from delia.config import Flags, StageConfig
from delia.data import first_turns, read_chat
from delia.errors import DeliaError
from delia.files import check_output, sha256_file, write_json
from delia.progress import ProgressCallback
from delia.stage import Stage
from delia.text import shorten

TEXT_CHARS = 200  # of a least-covered prompt in the record
LINE_CHARS = 80  # of the least-covered prompt in the one-line summary
_CHUNK = 512  # prompts compared at once: a large pool never needs its whole similarity matrix


class Spread(BaseModel):
    """Quantiles (numpy's linear interpolation) and mean of a set of similarities."""

    p10: float
    p25: float
    p50: float
    p75: float
    p90: float
    mean: float

    @classmethod
    def of(cls, values: np.ndarray) -> Spread:
        q = np.quantile(values, [0.1, 0.25, 0.5, 0.75, 0.9])
        return cls(**{k: round(float(v), 4) for k, v in zip(("p10", "p25", "p50", "p75", "p90"), q, strict=True)},
                   mean=round(float(values.mean()), 4))


class Nearest(BaseModel):
    """A prompt's cosine similarity to its nearest pool query, and that query's index in the pool."""

    similarity: float
    query: int


class Uncovered(Nearest):
    """One of the least-covered prompts: its index in its set, its text and the pool query nearest to it."""

    prompt: int
    text: str
    query_text: str | None = None


class Coverage(BaseModel):
    """How well a pool covers one set of prompts."""

    prompts: int
    pool_queries: int
    nearest: Spread
    """Each prompt's similarity to its nearest pool query."""
    pool_self: Spread
    """Each pool query's similarity to its nearest other pool query (leave-one-out)."""
    threshold: float
    threshold_from: Literal["pool median", "given"]
    below: int
    """Prompts whose nearest similarity is strictly below the threshold."""
    below_share: float
    least_covered: list[Uncovered]
    """The prompts with the lowest nearest similarity, lowest first (ties: in the set's order)."""
    per_prompt: list[Nearest]

    def line(self, name: str) -> str:
        """The one-line summary a log or a terminal shows."""
        bar = (f"the pool's own typical {self.threshold:.2f}" if self.threshold_from == "pool median"
               else f"the given {self.threshold:.2f}")
        least = self.least_covered[0] if self.least_covered else None
        return (f"{name}: median nearest similarity {self.nearest.p50:.2f}; {self.below_share:.0%} of prompts are "
                f"below {bar}" + (f"; least covered: {shorten(least.text, LINE_CHARS)!r}" if least else ""))


def _unit(vectors: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    x = (np.asarray(vectors, dtype=np.float64) - mean) / scale
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _nearest(prompts: np.ndarray, pool: np.ndarray, leave_one_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt row, the largest cosine to a pool row and that row's index, the lowest on a tie (unit rows).
    `leave_one_out`: the prompts are the pool, and a row is not its own neighbour."""
    sims, index = np.empty(len(prompts)), np.empty(len(prompts), dtype=np.int64)
    for start in range(0, len(prompts), _CHUNK):
        block = prompts[start:start + _CHUNK] @ pool.T
        rows = np.arange(len(block))
        if leave_one_out:
            block[rows, rows + start] = -np.inf
        index[start:start + len(block)] = block.argmax(1)
        sims[start:start + len(block)] = block[rows, index[start:start + len(block)]]
    return sims, index


def coverage(pool_vectors: np.ndarray, prompt_vectors: np.ndarray, prompt_texts: Sequence[str], *,
             pool_texts: Sequence[str] | None = None, threshold: float | None = None, least: int = 5,
             standardise_by: np.ndarray | None = None) -> Coverage:
    """How well the pool covers the prompts: each prompt's nearest pool query, the spread of those similarities,
    the share below `threshold` (default: the pool's median leave-one-out nearest similarity) and the `least`
    least-covered prompts with their text (and their nearest pool query's, given `pool_texts`).
    `standardise_by`: vectors whose mean and spread standardise both sides (default: the pool's)."""
    if len(prompt_texts) != len(prompt_vectors):
        raise ValueError(f"{len(prompt_texts)} prompt texts for {len(prompt_vectors)} vectors")
    if len(prompt_vectors) == 0:
        raise DeliaError("no prompts to measure the pool's coverage of")
    if len(pool_vectors) < 2:
        raise DeliaError(f"the pool has {len(pool_vectors)} queries; coverage needs at least 2 (its own spread)")
    frame = pool_vectors if standardise_by is None else standardise_by
    if len(frame) < 2:
        raise DeliaError(f"{len(frame)} vectors to standardise by; at least 2 are needed (their spread)")
    mean, scale = frame.mean(0), frame.std(0) + 1e-6  # the selection's standardisation
    pool = _unit(pool_vectors, mean, scale)
    sims, index = _nearest(_unit(prompt_vectors, mean, scale), pool)
    own, _ = _nearest(pool, pool, leave_one_out=True)
    bar = float(np.median(own)) if threshold is None else threshold
    below = int((sims < bar).sum())
    order = np.argsort(sims, kind="stable")[:least]
    return Coverage(
        prompts=len(sims), pool_queries=len(pool), nearest=Spread.of(sims), pool_self=Spread.of(own),
        threshold=round(bar, 4), threshold_from="pool median" if threshold is None else "given", below=below,
        below_share=round(below / len(sims), 4),
        least_covered=[Uncovered(prompt=int(i), text=shorten(prompt_texts[i], TEXT_CHARS),
                                 similarity=round(float(sims[i]), 4), query=int(index[i]),
                                 query_text=shorten(pool_texts[index[i]], TEXT_CHARS) if pool_texts else None)
                       for i in order],
        per_prompt=[Nearest(similarity=round(float(s), 4), query=int(i)) for s, i in zip(sims, index, strict=True)])


# ----------------------------------------------------------------------------- prompt files


def read_prompts(paths: Sequence[Path]) -> dict[str, list[str]]:
    """Each file's first user turns (any format `delia data` reads, no answer needed), read before a model is
    loaded, so that a bad or empty file costs nothing."""
    sets = {}
    for path in paths:
        texts = [first_turns(r)[0] for r in read_chat(path, require_assistant=False).records]
        if not texts:
            raise DeliaError(f"{path}: no user prompts in it")
        sets[str(path)] = texts
    return sets


def measure(pool_vectors: np.ndarray, pool_texts: Sequence[str], prompt_sets: Mapping[str, list[str]],
            vectors_of: Callable[[list[str]], np.ndarray], *, threshold: float | None = None, least: int = 5,
            standardise_by: np.ndarray | None = None) -> dict[str, Coverage]:
    """Coverage of each prompt set, its prompts embedded by `vectors_of` as the pool's queries were."""
    return {name: coverage(pool_vectors, vectors_of(texts), texts, pool_texts=pool_texts, threshold=threshold,
                           least=least, standardise_by=standardise_by) for name, texts in prompt_sets.items()}


def coverage_record(pool: str | Path, model: str, max_embed_tokens: int, covered: Mapping[str, Coverage],
                    standardised_by: Sequence[Path] = ()) -> dict[str, Any]:
    """What OUT.coverage.json (`delia pool --coverage`) and `delia coverage --out` write."""
    return {"pool": str(pool), "model": model, "max_embed_tokens": max_embed_tokens,
            "standardised_by": [str(p) for p in standardised_by] or "the pool",
            "files": {name: c.model_dump() for name, c in covered.items()}}


# ----------------------------------------------------------------------------- the verb


class CoverageConfig(StageConfig):
    """Options of `delia coverage`."""

    model: Annotated[str, Flags("--model", "-m")] = "smollm2-135m"
    """Target model whose hidden states embed the pool's queries and the prompts (the pool's own model)."""
    out: Annotated[Path | None, Flags("--out", "-o")] = None
    """Write the coverage record (JSON) here."""
    threshold: float | None = Field(None, ge=-1, le=1)
    """Cosine below which a prompt counts as not covered (default: the pool's own median nearest-neighbour
    similarity, leave-one-out)."""
    least: int = Field(5, ge=0)
    """Least-covered prompts listed per file."""
    standardise_by: list[Path] | None = None
    """Files whose queries (first user turns), together, standardise the vectors instead of the pool's: give
    the same ones (e.g. every pool compared) to compare pools on one scale; repeatable."""
    max_embed_tokens: int = Field(128, ge=1)
    """Tokens of each text that are embedded (as `delia pool` embedded the pool)."""
    batch_size: int = Field(16, ge=1)
    """Texts per embedding batch."""
    device: str | None = None
    """cpu, cuda, ... (default: cuda if present)."""
    overwrite: bool = False
    """Replace `out` if it exists."""


@dataclass
class CoverageStage(Stage[dict[str, Any]]):
    """Coverage as a stage of `delia run`: how well the diverse rows the arms train on (the sampled answers' queries,
    or the pool's) cover each general set and the task's prompts. Its identity is the model's, the hashes of the
    pool and of each named prompt file, and the options."""

    name: ClassVar[str] = "coverage"
    result: ClassVar[Any] = dict[str, Any]

    pool: Path
    prompts: dict[str, Path]  # set name -> its file
    config: CoverageConfig
    model: dict[str, Any]  # the model's identity
    label: str = "pool"

    def identity(self) -> dict[str, Any]:
        return {"model": self.model, "pool": sha256_file(self.pool), "options": self.config.options(),
                "prompts": {name: sha256_file(path) for name, path in self.prompts.items()}}

    def run(self, folder: Path, progress: ProgressCallback | None = None) -> dict[str, Any]:
        """The coverage record, its files named by set; without each prompt's nearest query (kept short)."""
        record = pool_coverage(self.pool, list(self.prompts.values()), self.config, progress=progress)
        files = {name: record["files"][str(path)] for name, path in self.prompts.items()}
        return {**record, "files": {n: {k: v for k, v in f.items() if k != "per_prompt"} for n, f in files.items()}}


def coverage_lines(record: dict[str, Any]) -> list[str]:
    """One line per prompt set, least covered first, naming the prompt the pool is farthest from."""
    files = {name: Coverage.model_validate({**f, "per_prompt": []}) for name, f in record["files"].items()}
    return [c.line(name) for name, c in sorted(files.items(), key=lambda kv: kv[1].nearest.p50)]


def pool_coverage(
    pool: Annotated[Path, "Pool: the messages JSONL `delia pool` wrote (any format `delia data` reads)."],
    prompts: Annotated[list[Path], "Prompt files (general prompts, task prompts): their first user turns."],
    config: CoverageConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Check how well an existing pool covers sets of prompts, without rebuilding it; returns the record, and
    writes it to `out` if one is given.

    Per prompt file: each prompt's cosine to its nearest pool query in the target model's embedding space, their
    spread, the share below the pool's own typical nearest-neighbour similarity, and the least-covered prompts.
    `options` set any CoverageConfig field over `config`; `progress` hears of the embedding, batch by batch.

    Examples:\n
      delia coverage pool.jsonl general.jsonl task_eval.jsonl\n
      delia coverage pool.jsonl general.jsonl --model smollm2-135m --out pool.coverage.json\n
      delia coverage pool-a.jsonl general.jsonl --standardise-by pool-a.jsonl --standardise-by pool-b.jsonl
    """
    from delia.models import embed, resolve_model

    cfg = CoverageConfig.build(config, **options)
    if not prompts:
        raise DeliaError("give at least one prompt file")
    if cfg.out is not None:
        check_output(cfg.out, inputs=[pool, *prompts, *(cfg.standardise_by or [])], overwrite=cfg.overwrite)
    queries = [first_turns(r)[0] for r in read_chat(pool, require_assistant=False).records]
    prompt_sets = read_prompts(prompts)
    frame_sets = read_prompts(cfg.standardise_by or [])
    if len(queries) < 2:
        raise DeliaError(f"{pool}: {len(queries)} queries; coverage needs at least 2 (the pool's own spread)")
    model_path = resolve_model(cfg.model)

    def vectors_of(texts: list[str]) -> np.ndarray:
        return embed(texts, model_path, max_tokens=cfg.max_embed_tokens, batch_size=cfg.batch_size,
                     device=cfg.device, progress=progress)[0]

    frame = np.vstack([vectors_of(texts) for texts in frame_sets.values()]) if frame_sets else None
    covered = measure(vectors_of(queries), queries, prompt_sets, vectors_of, threshold=cfg.threshold,
                      least=cfg.least, standardise_by=frame)
    result = coverage_record(pool, cfg.model, cfg.max_embed_tokens, covered, cfg.standardise_by or ())
    if cfg.out is not None:
        write_json(cfg.out, result)
    return {**result, "out": None if cfg.out is None else str(cfg.out)}
