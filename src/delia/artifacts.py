"""Typed records of what the stages write: each record reads and writes its own JSON file.

A record's fields are declared in the order its writer puts them on disk, and a record writes only the fields it
was given (`Part.dump`), so a file written through a record holds the same keys and values, in the same order, as
the dicts the stages wrote before. Unknown keys are kept (files of other versions load and write back whole);
fields that earlier versions did not write have defaults; a missing required field is a `DataError` naming the
file and the field. A foundation module: pydantic and the standard library only, no torch or transformers.

| record          | file                                   | written by                          |
|-----------------|----------------------------------------|-------------------------------------|
| TrainRecord     | ADAPTER/delia_train.json               | `delia train` (last: marks a finished run) |
| EvalScores      | OUT/scores.json                        | `delia eval` (last: marks a finished eval) |
| SampleManifest  | OUT.manifest.json (SampleSummary)      | `delia sample`                      |
| MergeManifest   | OUT.manifest.json (MergeSummary)       | `delia sample-merge`                |
| MixSummary      | OUT.summary.json                       | `delia mix`                         |
| PoolSummary     | OUT.sources.json                       | `delia pool`                        |
| StageRecord     | RUN/stages/STAGE-KEY/stage.json        | `delia run` (marks a finished stage) |

`CostPlan` (`delia run --plan`, the plan stage's result) and `PoolFacts` (what a run's report shows of its pool)
are kept inside other files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from delia.errors import DataError, DeliaError
from delia.files import beside, write_json

Number = int | float  # a count or a measure kept as written: an int stays an int, a float a float
R = TypeVar("R")

# The per-row files beside a record
PREDICTIONS = "predictions.jsonl"  # beside scores.json: one row per eval row, with its scores
GENERAL_ROWS = "general.jsonl"  # beside scores.json: a single general set's rows (named sets: general_rows_file)
CONTRAST_ROWS = "contrast.jsonl"  # beside scores.json: the contrast prompts' rows
TRAINER_LOG = "trainer_log.jsonl"  # beside delia_train.json: the trainer's log history
IMPORTANT_LOSS_FILE = "important_token_loss.jsonl"  # beside delia_train.json: loss on the important tokens


def general_rows_file(name: str | None) -> str:
    """Where an eval folder keeps a general set's per-row scores."""
    return GENERAL_ROWS if name is None else f"general-{name}.jsonl"


class Part(BaseModel):
    """A part of a record. Unknown keys are kept; `dump` gives the fields that were set, in declared order."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def dump(self) -> dict[str, Any]:
        """What the file holds: the fields given (one an older file lacks stays absent), as Python values."""
        return self.model_dump(exclude_unset=True)


class Record(Part):
    """A JSON file of one stage output. `FILE`: its name inside the output folder."""

    FILE: ClassVar[str]

    @classmethod
    def path(cls, where: str | Path) -> Path:
        """The record's file: `where` itself when it is the file (named `FILE`, or an existing file), else `FILE`
        inside the folder `where`."""
        where = Path(where)
        return where if where.name == cls.FILE or where.is_file() else where / cls.FILE

    @classmethod
    def source(cls, where: str | Path) -> Path:
        """The file `read` reads for `where`: `path(where)`."""
        return cls.path(where)

    @classmethod
    def read(cls, where: str | Path) -> Self:
        """The record in `where` (its folder or its file); DeliaError naming the file when it is missing, not
        JSON, or lacks a required field."""
        path = cls.source(where)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DeliaError(f"{path}: no such file (a {cls.__name__} that delia writes)") from None
        except UnicodeDecodeError as e:
            raise DataError(path, f"not UTF-8 text (byte {e.start})") from None
        except ValueError as e:
            raise DataError(path, f"not JSON ({e})") from None
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: Any, source: str | Path) -> Self:
        """`data` (the parsed JSON of `source`) as this record; a missing or wrong field raises DataError."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise _data_error(e, source, cls.__name__) from None

    @classmethod
    def find(cls, where: str | Path | None) -> Self | None:
        """The record in `where` if its file exists, else None."""
        if where is None:
            return None
        path = cls.source(where)
        return cls.read(path) if path.is_file() else None

    def write(self, where: str | Path) -> Path:
        """Write the record atomically to `path(where)`: into the folder (or to the file) `where`, or for a record
        beside an output, beside the output `where`. Returns the file."""
        path = self.path(where)
        write_json(path, self.dump())
        return path


class BesideRecord(Record):
    """A record written beside an output file OUT, as `OUT` without its extension plus `SUFFIX`."""

    SUFFIX: ClassVar[str]
    STRIP: ClassVar[tuple[str, ...] | None] = None  # extensions taken off OUT's name (None: any)

    @classmethod
    def path(cls, where: str | Path) -> Path:
        """The record's file beside the output `where`."""
        return beside(where, cls.SUFFIX, strip=cls.STRIP)

    @classmethod
    def source(cls, where: str | Path) -> Path:
        """The file `read` reads: `where` itself when it is a record's file, else the record beside the output
        `where`."""
        where = Path(where)
        return where if where.name.endswith(cls.SUFFIX) and where.is_file() else cls.path(where)


def _data_error(e: ValidationError, source: str | Path, what: str) -> DataError:
    """One line: the first problem's field and message, and how many more there are."""
    errors = e.errors()
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    message = "missing" if first["type"] == "missing" else first["msg"]
    if field is None:
        message = f"not a {what} ({message})"
    more = len(errors) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return DataError(source, message, field=field)


# ----------------------------------------------------------------------------- delia train


class TrainedModel(Part):
    name: str  # the base model as given (a bundled name, or a folder made absolute): what loads it again
    path: str  # what the name resolved to on the training machine


class TrainData(Part):
    path: str
    sha256: str
    rows: int
    train_tokens: int  # input tokens of one pass over the data
    anchor_rows: int = 0  # diverse rows trained by KL to the base model (diverse_loss kl)
    anchor_tokens: int = 0
    sources: dict[str, int]  # rows per source (task, diverse, unknown)
    dropped_too_long: dict[str, int] | None  # rows whose prompt alone fills max_length (None: packing)


class TrainEvalData(Part):
    path: str | None
    sha256: str | None
    rows: int


class PeftFacts(Part):
    target_modules: list[str]
    layers: list[int] | None = None
    modules_to_save: list[str] | None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    mask_dropout_layers: int = 0
    trainable_params: int
    total_params: int


class NewToken(Part):
    token: str
    id: int
    description: str | None = None
    init: str
    padding_row_reused: bool | None = None
    init_norm: float | None = None


class NewTokens(Part):
    """What `delia.tokens.add_tokens` did."""

    init: str
    seed: int
    tied_embeddings: bool
    tokenizer_len: dict[str, int]
    embedding_rows: dict[str, Any]
    tokens: list[NewToken]


class TrainedTokens(Part):
    """The token counts of a training run that its compute depends on (`delia.compute.training_cost`)."""

    rows: int
    train_tokens: Number  # of one pass over the data
    tokens_trained: Number  # input tokens times the passes run
    tokens_forward_only: Number = 0  # base-model passes of diverse_loss kl


class TrainRecord(Record):
    """`delia_train.json`: what a finished training run did. Written last, so its presence marks a finished run."""

    FILE: ClassVar[str] = "delia_train.json"

    settings: dict[str, Any]  # every TrainConfig option, the data and the output
    model: TrainedModel
    seed: int
    data: TrainData
    eval_data: TrainEvalData
    versions: dict[str, Any]
    device: str
    processes: int = 1
    precision: str
    peft: PeftFacts
    new_tokens: NewTokens | None
    soft_prompt: str = ""  # the tokens trained before every task prompt (`train.soft_prompt`; '' for none)
    important_tokens: list[str]
    steps: int
    epochs_run: Number | None
    resumed_from: str | None
    tokens_trained: int
    tokens_forward_only: int = 0
    metrics: dict[str, Any]
    checkpoint_bytes: int | None = None
    outputs: list[str]

    def adapter_base(self) -> str:
        """The base model the adapter was trained on, as given to training (a bundled name resolves again on
        another machine)."""
        return self.model.name

    def new_token_ids(self) -> list[int]:
        """Ids of the tokens training added ([] for none)."""
        return [t.id for t in self.new_tokens.tokens] if self.new_tokens else []

    def token_descriptions(self) -> dict[str, str]:
        """Token -> description, for the added tokens that have one."""
        return {t.token: t.description for t in self.new_tokens.tokens if t.description} if self.new_tokens else {}

    def trained_tokens(self) -> TrainedTokens:
        return TrainedTokens(rows=self.data.rows, train_tokens=self.data.train_tokens,
                             tokens_trained=self.tokens_trained, tokens_forward_only=self.tokens_forward_only)


def adapter_base(adapter: str | Path) -> str:
    """The base model of a `delia train` adapter folder: the one its delia_train.json names, else (an adapter
    trained elsewhere) the `base_model_name_or_path` of its PEFT adapter_config.json."""
    record = TrainRecord.find(adapter)
    if record is not None:
        return record.adapter_base()
    config = Path(adapter) / "adapter_config.json"
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not base:
        raise DeliaError(f"{adapter}: names no base model (no {TrainRecord.FILE}, and no base_model_name_or_path "
                         "in adapter_config.json)")
    return base


# ----------------------------------------------------------------------------- delia eval


class LeakCount(Part):
    n: int
    leaked: int
    share: float


class ScoredSet(Part):
    """A general prompt set's (or the contrast prompts') section of scores.json."""

    metrics: dict[str, Number | None]
    row_means: dict[str, str] = {}  # metric -> the per-row score it averages (for the report's bootstrap)
    higher_is_better: dict[str, bool] = {}
    n: int
    data: str | None = None
    base_model: str | None = None  # general sets: the model drift is measured against
    max_new_tokens: int | None = None
    new_token_ids: list[int] = []
    leakage_by_kind: dict[str, LeakCount] = {}


class EvalSampling(Part):
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None


class EvalScores(Record):
    """`scores.json`: what `delia eval` returns and writes last (its presence marks a finished eval); per-row
    scores are in `PREDICTIONS` and the general sets' files beside it."""

    FILE: ClassVar[str] = "scores.json"

    kind: str | None = None  # the metric's kind
    primary: str | None  # the headline metric, a mean of per-row scores
    metrics: dict[str, Number | None]
    row_means: dict[str, str] = {}
    notes: list[str] = []
    metric_config: dict[str, Any] = {}
    rows: int | None = None
    data: str | None = None
    data_sha256: str | None = None
    model: str | None = None  # what was loaded, as shown
    adapter_scale: float | None = None  # only with an adapter
    soft_prompt: str | None = None  # the soft prompt put before the task prompts (an adapter trained with one)
    sampling: EvalSampling = Field(default_factory=EvalSampling)
    finish_reasons: dict[str, int] = {}
    tokens: dict[str, int] = {}
    generation_s: float | None = None
    tokens_per_s: float | None = None
    versions: dict[str, Any] = {}
    general: ScoredSet | None = None  # a single general set
    general_sets: dict[str, ScoredSet] = {}  # named general sets
    contrast: ScoredSet | None = None

    def scored_sets(self) -> list[tuple[str | None, ScoredSet]]:
        """(set name, section) of each general set scored: None names a single set (`general`)."""
        single: list[tuple[str | None, ScoredSet]] = [(None, self.general)] if self.general else []
        return single + list(self.general_sets.items())


# ----------------------------------------------------------------------------- delia sample, sample-merge


class SampledTokens(Part):
    """What a sampling run cost in queries and tokens (`delia.compute.sampling_cost`): the plan's estimate, or
    a `SampleSummary`'s counts."""

    queries: int
    generated: int
    prompt_tokens: int
    completion_tokens: int
    skipped: dict[str, int] = {}  # queries left out before sampling (too long, ...), not counted as sampled


class PromptYield(Part):
    queries: int = 0
    kept: int
    rejected: dict[str, int]


class SampleSummary(Part):
    """What `delia sample` returns and its manifest keeps: counts, tokens and speed of the run."""

    out: str
    pool_rows: int
    skipped: dict[str, int]
    shard: str
    queries: int
    resumed: int
    generated: int
    kept: int
    rejected: dict[str, int]
    by_prompt: dict[str, PromptYield] = {}
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float

    def sampled_tokens(self) -> SampledTokens:
        return SampledTokens(queries=self.queries, generated=self.generated, prompt_tokens=self.prompt_tokens,
                             completion_tokens=self.completion_tokens, skipped=self.skipped)


class MergeSummary(Part):
    """What `delia sample-merge` returns and its manifest keeps."""

    out: str
    shards: int
    queries: int
    kept: int
    rejected: dict[str, int]
    cross_shard_duplicates: int
    by_prompt: dict[str, PromptYield] = {}


class SampleManifest(BesideRecord):
    """`OUT.manifest.json` of `delia sample`: its settings and identity (a resume must match it), written at the
    start (status running) and again at the end (complete, with the summary)."""

    SUFFIX: ClassVar[str] = ".manifest.json"

    stage: str
    status: str
    settings: dict[str, Any]
    identity: dict[str, Any] | None = None  # the stage's (delia.stage): what a resume must match; None before it
    limit: int | None = None
    backend: str | None = None
    versions: dict[str, Any] = {}
    started: str | None = None
    finished: str | None = None
    model_path: str | None = None
    query_ids_sha256: str | None = None
    summary: SampleSummary | MergeSummary | None = None


class MergeManifest(BesideRecord):
    """`OUT.manifest.json` of `delia sample-merge`."""

    SUFFIX: ClassVar[str] = ".manifest.json"

    stage: str
    status: str
    settings: dict[str, Any]
    shards: list[str]
    finished: str
    summary: MergeSummary
    query_ids_sha256: str
    versions: dict[str, Any]


# ----------------------------------------------------------------------------- delia mix


class SourceCount(Part):
    """A source's rows in a mixture, and their tokens when a tokenizer counted them."""

    rows: int
    prompt_tokens: dict[str, Number] | None = None  # percentiles
    response_tokens: dict[str, Number] | None = None
    total_tokens: int | None = None


class MixInput(Part):
    path: str
    sha256: str | None
    rows: int


class MixSummary(BesideRecord):
    """`OUT.summary.json`: what `delia mix` returns: rows (and tokens) per source, the draw and its inputs."""

    SUFFIX: ClassVar[str] = ".summary.json"
    STRIP: ClassVar[tuple[str, ...] | None] = (".jsonl", ".json")

    out: str
    seed: int
    ratio: Number | None
    diverse_count: int | None
    diverse_asked: int
    short: bool
    rows: int
    tokenizer: str | None
    sources: dict[str, SourceCount]
    inputs: dict[str, MixInput]

    def diverse_rows(self) -> int:
        """Diverse rows in the mixture (0 without any)."""
        diverse = self.sources.get("diverse")
        return diverse.rows if diverse else 0


# ----------------------------------------------------------------------------- delia pool


class PoolSource(Part):
    source: str  # as given: a path or hf:NAME; then what identifies it, its format, licence and rows


class Decontamination(Part):
    enabled: bool
    ngram: int | None = None
    overlap: float | None = None
    removed: int
    targets: list[dict[str, Any]] = []


class PoolSummary(BesideRecord):
    """`OUT.sources.json`: what `delia pool` returns: rows read and kept, per cleaning step and source, the
    decontamination and the selection."""

    SUFFIX: ClassVar[str] = ".sources.json"
    STRIP: ClassVar[tuple[str, ...] | None] = (".jsonl",)

    out: str
    rows: int
    rows_read: int
    seed: int | None = None
    steps: dict[str, int]
    sources: list[PoolSource]
    decontamination: Decontamination
    selection: dict[str, Any]
    settings: dict[str, Any] = {}
    files: dict[str, str | None] = {}
    coverage: dict[str, Any] = {}

    def facts(self) -> PoolFacts:
        """What a run's report shows of the pool it built."""
        selection = {k: v for k, v in self.selection.items() if k not in ("cluster_sizes", "selected_per_cluster")}
        return PoolFacts(rows=self.rows, rows_read=self.rows_read, steps=self.steps,
                         decontaminated=self.decontamination.removed, selection=selection,
                         sources=[s.source for s in self.sources])


class PoolFacts(Part):
    """The pool a run built, as its manifest and report show it."""

    rows: int
    rows_read: int
    steps: dict[str, int]
    decontaminated: int
    selection: dict[str, Any]
    sources: list[str]


# ----------------------------------------------------------------------------- delia rewrite


class RewriteFacts(Part):
    """The task rows a run's `delia rewrite` rewrote (`delia.rewrite.RewriteSummary` is the whole record), as its
    manifest and report show them."""

    rows: int
    kept: int
    kept_share: float
    reasons: dict[str, int]


# ----------------------------------------------------------------------------- delia run


class ArmCost(Part):
    """One arm at one seed in the plan: its diverse rows, tokens, FLOPs (`delia.compute.arm_cost`) and the
    estimated wall time."""

    arm: str
    kind: str
    ratio: Number
    diverse_rows: int
    diverse_asked: int = 0
    short: bool = False  # the pool holds fewer diverse rows than the ratio asks for
    sampled_queries: Number
    prompt_tokens: Number
    generated_tokens: Number
    sample_flops: Number
    trained_tokens: Number
    forward_only_tokens: Number
    train_flops: Number
    flops: Number
    est_wall_s: Number
    of: str | None = None  # a scaled arm: the arm whose training it shares


class CostPlan(Part):
    """`delia run --plan`: estimated tokens, FLOPs and wall time of every arm (per seed), before anything runs."""

    model: str
    seeds: int
    task_rows: int
    sampling_run: SampledTokens | None
    matmul_peak_flops: float | None
    flops_per_s: float | None
    rates: dict[str, float]
    arms: list[ArmCost]
    pool_note: str | None = None  # how a pool still to be built was estimated

    def estimates(self) -> dict[str, Number]:
        """Arm -> estimated wall time per seed."""
        return {a.arm: a.est_wall_s for a in self.arms}

    def short_arms(self) -> list[str]:
        """`arm: N of M diverse rows` for each arm whose pool holds fewer diverse rows than its ratio asks for."""
        return [f"{a.arm}: {a.diverse_rows:,} of the {a.diverse_asked:,} diverse rows asked for"
                for a in self.arms if a.short]


class StageRecord(Record, Generic[R]):
    """`stage.json` of a run's stage folder: written when the stage finished (its presence marks it done), with
    the stage's inputs (what its folder's key hashes), its wall time and its result (`StageRecord[MixSummary]`
    reads a mix stage's result as a MixSummary)."""

    FILE: ClassVar[str] = "stage.json"

    stage: str
    label: str
    inputs: dict[str, Any]
    wall_s: float
    result: R
