"""The experiment config that `delia run` reads: one YAML names the model, the task, the pool, the arms and seeds.

Stage sections (`sample`, `mix`, `train`, `eval`, a built `pool`) are the stages' typed configs
(`SampleConfig`, `MixConfig`, `TrainConfig`, `EvalConfig`, `PoolConfig`): any option of the verb can be set
here under the same name, and every key and value is checked when the file is loaded, before any stage runs.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from delia.config import StageConfig
from delia.coverage import CoverageConfig
from delia.errors import DeliaError
from delia.evaluate import EvalConfig
from delia.files import read_yaml
from delia.general import GeneralFiles, general_sets, map_files
from delia.metrics import MetricConfig, MetricKind
from delia.mix import MixConfig
from delia.pool import PoolConfig
from delia.rewrite import RewriteConfig
from delia.sample import SampleConfig
from delia.task_data import data_path_problem
from delia.tokens import parse_token_specs
from delia.training.config import TrainConfig

# Each section's stage config, and the options `delia run` sets itself (per arm, seed or task).
SECTIONS: dict[str, tuple[type[StageConfig], frozenset[str]]] = {
    "pool": (PoolConfig, frozenset({"out", "task", "model", "overwrite"})),
    "sample": (SampleConfig, frozenset({"model", "overwrite"})),
    "mix": (MixConfig, frozenset({"ratio", "diverse_count", "seed", "tokenizer", "overwrite"})),
    "train": (TrainConfig, frozenset({"model", "add_token", "eval_data", "resume", "seed", "diverse_loss",
                                      "overwrite"})),
    "eval": (EvalConfig, frozenset({"model", "adapter", "adapter_scale", "metric", "metric_config", "general",
                                    "contrast", "overwrite"})),
    "rewrite": (RewriteConfig, frozenset({"model", "metric", "metric_config", "overwrite"})),
    "coverage": (CoverageConfig, frozenset({"model", "out", "overwrite"})),
}
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # an experiment's name: a folder name, never a path


def section(stage: str, options: dict[str, Any]) -> Any:
    """An experiment section as its stage's typed config; a ValueError naming each bad key or value (with the
    closest option, for a typo), or a key that `delia run` sets itself."""
    config, owned = SECTIONS[stage]
    return config.section(options, owned)


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: Path = Field(description="Task training rows (any format `delia data` reads).")
    eval: Path = Field(description="Task evaluation rows; the last assistant turn is the reference.")
    metric: MetricKind = Field("format", description="format, translation, exact or contains.")
    metric_config: dict[str, Any] = Field(default_factory=dict, description="MetricConfig fields for `metric`.")
    add_tokens: dict[str, str | None] = Field(
        default_factory=dict, description="New special tokens, each with the instruction it stands for (or null)."
    )

    @field_validator("add_tokens")
    @classmethod
    def _token_names(cls, tokens: dict[str, str | None]) -> dict[str, str | None]:
        try:
            parse_token_specs(list(tokens), option="add_tokens")
        except DeliaError as e:
            raise ValueError(str(e)) from None
        return tokens

    @model_validator(mode="after")
    def _metric(self) -> Task:
        if "kind" in self.metric_config:
            raise ValueError("`metric_config` takes the metric's options; its kind is `metric`")
        try:
            MetricConfig(kind=self.metric, **self.metric_config)
        except ValidationError as e:
            raise ValueError("`metric_config`: " + "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'metric_config'}: {err['msg'].removeprefix('Value error, ')}"
                for err in e.errors())) from None
        return self


# What each arm kind trains on: its diverse text (None: no diverse rows) and the loss of its diverse rows.
ARM_KINDS: dict[str, tuple[str | None, str | None]] = {
    "sft": (None, None),                      # the task rows alone
    "sdft": (None, None),                     # the task rows as the model rewrote them (SDFT), alone
    "promot": (None, None),                   # ProMoT: a soft prompt trained first, frozen beside LoRA, task-only
    "delia": ("self", "ce"),                  # the paper: the model's own answers, trained as text
    "delia-kl": ("self", "kl"),               # KL to the base model on the diverse rows (self or reference text)
    "replay-reference": ("reference", "ce"),  # the pool's reference answers as text: does self-sampling matter?
}
# The kind that trains nothing: another arm's adapters with their LoRA update scaled (WiSE-FT), one arm per scale.
SCALED = "scaled"
ALONE = ("sft", "sdft", "promot")  # the kinds that train on the task rows alone (ratio 0)
PROMOT = "promot"
PROMOT_TRAIN = {"soft_prompt": 16}  # kind promot's train settings, under the arm's `train`
# Its first phase, the soft prompt alone, under the arm's `prompt_train`: prompt tuning needs a higher rate and more
# steps than LoRA (Lester et al. 2021), and its steps cost what LoRA's do.
PROMPT_PHASE = {"learning_rate": 1e-2, "epochs": 3}


def arm_kind(kind: str | None, ratio: float, diverse: str | None) -> tuple[str, str | None]:
    """(kind, diverse text) of an arm as written: the kind's default filled in and its rules checked (ValueError)."""
    if kind is None:
        kind = "sft" if ratio == 0 else "delia"
    if kind == "sdft" and ratio != 0:
        raise ValueError("kind sdft is the rewritten task rows alone (ratio 0); with diverse rows, give the kind "
                         "of those (delia, delia-kl) and `rewrite: true`")
    if kind == PROMOT and ratio != 0:
        raise ValueError("kind promot is the task rows alone (ratio 0); with diverse rows, give the kind of those "
                         "(delia, delia-kl) and `promot: true`")
    if kind not in ARM_KINDS:
        close = difflib.get_close_matches(kind, [*ARM_KINDS, SCALED], n=1)
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join([*ARM_KINDS, SCALED])}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    if (kind in ALONE) != (ratio == 0):
        raise ValueError(f"kind {kind} needs " + ("ratio 0" if kind in ALONE else "a ratio above 0"))
    text = ARM_KINDS[kind][0]
    if diverse is not None and (kind != "delia-kl" or diverse not in ("self", "reference")):
        raise ValueError("`diverse` is `self` or `reference`, and only for kind delia-kl"
                         + (f" (kind {kind} trains on {text} text)" if text else ""))
    return kind, diverse or text


class Arm(BaseModel):
    """One way of training: its kind, the diverse rows per task row, and train overrides; or, with `ratios`,
    a sweep of one such arm over several ratios (expanded at load by `expand_sweeps`); or, kind `scaled`,
    another arm's adapters at several scales (expanded at load by `expand_scaled`)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str | None = Field(None, description=f"One of {', '.join([*ARM_KINDS, SCALED])}; default: sft at "
                             "ratio 0, else delia.")
    ratio: float = Field(0.0, ge=0, allow_inf_nan=False,
                         description="Diverse rows per task row; 0 for sft, more than 0 otherwise.")
    diverse: str | None = Field(None, description="delia-kl only: the diverse text under the KL, `self` (the "
                                "model's own answers, the default) or `reference` (the pool's: no sampling).")
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the experiment's train settings "
                                  "(e.g. kl_coef, kl_temperature for delia-kl).")
    # Both kept out of dumps, so that an arm written out by hand and the same arm from a sweep have one stage key.
    ratios: list[float] | None = Field(None, exclude=True, description="Instead of `ratio`: a sweep, one arm per "
                                       "ratio named `<name>-<ratio>` (e.g. delia-kl-4), same kind and options. "
                                       "Ratio 0 is plain SFT, no kind's ratio: it stands for the experiment's sft "
                                       "arm (which must exist), drawn at ratio 0 of the sweep's dose-response.")
    sweep: str | None = Field(None, exclude=True, description="The sweep the arm belongs to (the `ratios` line's "
                              "name, set at load): the report draws and judges a sweep's arms by ratio.")
    of: str | None = Field(None, description="Kind scaled: the arm (after sweeps expand, e.g. delia-4) whose "
                           "adapter of each seed is evaluated at each scale; nothing is trained.")
    scales: list[FiniteFloat] | None = Field(None, exclude=True, description="Kind scaled: the factors of the LoRA "
                                             "update, one arm per scale named `<name>-<scale>`; above 0 (0 is the "
                                             "base model), 1 the `of` arm itself, above 1 an extrapolation.")
    scale: float | None = Field(None, description="Kind scaled: this arm's factor (set at load from `scales`).")
    rewrite: bool = Field(False, description="Train on the task rows as the model rewrote them, shown the reference "
                          "(SDFT, `delia rewrite`; kind sdft sets it), beside the arm's diverse rows if it has any.")
    promot: bool = Field(False, description="Train a soft prompt first on the task rows alone, then the arm's "
                         "training beside it, frozen (ProMoT; kind promot implies it), with the arm's diverse rows "
                         "if it has any (never prefixed by the soft prompt).")
    prompt_train: dict[str, Any] = Field(default_factory=dict, description="With `promot`: overrides of the train "
                                         "settings for its first phase, the soft prompt trained alone on the task "
                                         f"rows (default: {PROMPT_PHASE}; the soft prompt's size is the arm's "
                                         f"`train.soft_prompt`, default {PROMOT_TRAIN['soft_prompt']}).")

    @model_serializer(mode="wrap")
    def _without_unset_scaling(self, handler: SerializerFunctionWrapHandler) -> Any:
        """`of`, `scale`, `rewrite` and `promot` left out where unset: a dump that names them only for the arms that
        use them keeps the other arms' dumps, and the stage keys made of them, as they were before they existed."""
        dumped = handler(self)
        for key in ("of", "scale", "rewrite", "promot", "prompt_train"):
            if isinstance(dumped, dict) and dumped.get(key) in (None, False, {}):
                dumped.pop(key, None)
        return dumped

    @field_validator("train", "prompt_train")
    @classmethod
    def _train_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        section("train", options)  # checked here; used over the experiment's train section (`arm_train`)
        return options

    @model_validator(mode="after")
    def _kind(self) -> Arm:
        if self.kind == SCALED or {"of", "scales", "scale"} & self.model_fields_set:
            return self._scaled()
        if self.ratios is None:
            self.kind, self.diverse = arm_kind(self.kind, self.ratio, self.diverse)
            self._checked_by_kind()
            return self
        if "ratio" in self.model_fields_set:
            raise ValueError("give `ratio` or `ratios` (a sweep), not both")
        if any(r < 0 for r in self.ratios) or len(set(self.ratios)) != len(self.ratios):
            raise ValueError(f"`ratios` must be distinct and at least 0, got {self.ratios}")
        if not any(r > 0 for r in self.ratios):
            raise ValueError("`ratios` needs a ratio above 0 (ratio 0 is the sft arm)")
        if self.kind == "sft":
            raise ValueError("kind sft has no diverse rows to sweep: `ratios` needs a kind with them")
        arm_kind(self.kind, max(self.ratios), self.diverse)  # the rules of every swept arm: all ratios are > 0
        self._checked_by_kind()
        return self

    def _checked_by_kind(self) -> None:
        """`rewrite` as kind sdft implies it; `promot` and `prompt_train` where they fit the kind (a sweep line's
        kind, written or not, is never sft, sdft or promot: those are refused before)."""
        self.rewrite = self.rewrite or self.kind == "sdft"
        if self.promot and self.kind == "sft":
            raise ValueError("kind sft with `promot: true` is kind promot: give `kind: promot`")
        if self.prompt_train and not self.soft_prompt_first:
            raise ValueError("`prompt_train` is for kind promot or `promot: true` (its soft prompt's phase)")

    def _scaled(self) -> Arm:
        """A scaled arm as written: `of` and `scales`, and nothing that trains."""
        if self.kind != SCALED:
            raise ValueError("`of` and `scales` are for kind scaled")
        if self.of is None or self.scales is None:
            raise ValueError("kind scaled needs `of` (an arm) and `scales` (e.g. [0.25, 0.5, 0.75])")
        if "scale" in self.model_fields_set:
            raise ValueError("give `scales`, a list: each scale is an arm named `<name>-<scale>`")
        if not self.scales or min(self.scales) <= 0 or len(set(self.scales)) != len(self.scales):
            raise ValueError(f"`scales` must be distinct and above 0 (0 is the base model), got {self.scales}")
        if set(self.model_fields_set) & {"ratio", "ratios", "diverse", "train", "rewrite", "promot", "prompt_train"}:
            raise ValueError("kind scaled trains nothing: no `ratio`, `ratios`, `diverse`, `train`, `rewrite`, "
                             "`promot` or `prompt_train` (the `of` arm's training is scaled)")
        return self

    @property
    def diverse_loss(self) -> str:
        return ARM_KINDS[str(self.kind)][1] or "ce"

    @property
    def soft_prompt_first(self) -> bool:
        """Whether the arm trains ProMoT's soft prompt first (kind promot, or `promot: true`)."""
        return self.promot or self.kind == PROMOT

    @property
    def samples(self) -> bool:
        """Whether the arm needs the sampling stage (the model's own answers)."""
        return self.diverse == "self"


def expand_sweeps(arms: list[Arm]) -> list[Arm]:
    """`arms` with each `ratios` line replaced, in place, by one arm per ratio above 0, named `<name>-<ratio>`
    and carrying the line's name as `sweep`. A ratio 0 adds no arm: plain SFT is the experiment's sft arm, and
    training a copy of it per sweep would only cost time; a sweep listing 0 without an sft arm is refused."""
    out = []
    for arm in arms:
        if arm.ratios is None:
            out.append(arm)
            continue
        if 0 in arm.ratios and not any(a.kind == "sft" for a in arms):
            raise ValueError(f"arm {arm.name!r}: ratio 0 is plain SFT, the sft arm of the experiment, and there "
                             "is none: add one (`{name: sft, kind: sft}`) or leave 0 out of `ratios`")
        for r in sorted(r for r in arm.ratios if r > 0):
            kind, diverse = arm_kind(arm.kind, r, arm.diverse)
            out.append(arm.model_copy(update={"name": f"{arm.name}-{r:g}", "ratio": r, "ratios": None,
                                              "sweep": arm.name, "kind": kind, "diverse": diverse}, deep=True))
    return out


def expand_scaled(arms: list[Arm]) -> list[Arm]:
    """`arms` with each scaled line replaced, in place, by one arm per scale, named `<name>-<scale>`; its `of`
    must be an arm that trains (sweeps already expanded), since scaling a scaled arm is a scale of the same."""
    trained = [a.name for a in arms if a.kind != SCALED]
    lines = [a for a in arms if a.kind == SCALED]
    scaled = {a.name for a in lines} | {_scaled_name(a, s) for a in lines for s in a.scales or []}
    out = []
    for arm in arms:
        if arm.kind != SCALED:
            out.append(arm)
            continue
        if arm.of not in trained:
            close = difflib.get_close_matches(str(arm.of), trained, n=1)
            raise ValueError(f"arm {arm.name!r}: `of` {arm.of!r} is " + ("a scaled arm" if arm.of in scaled else
                             "not an arm") + f"; it names an arm that trains: {', '.join(trained)}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
        out += [arm.model_copy(update={"name": _scaled_name(arm, s), "scale": s, "scales": None})
                for s in sorted(arm.scales or [])]
    return out


def _scaled_name(arm: Arm, scale: float) -> str:
    return f"{arm.name}-{scale:g}"


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "experiment"
    model: str = "smollm2-135m"
    task: Task
    pool: Path | dict[str, Any] | None = Field(
        None, description="Diverse query pool, needed by any arm with ratio > 0: a ready file, or `delia pool`'s "
        "sources and options (`{sources: [...], size: N, ...}`), built as a stage and decontaminated against the "
        "task's train and eval files.")
    general: GeneralFiles | None = Field(
        None, description="Held-out general prompts (none in the pool or the task): every model is also scored on "
        "format leakage, drift from the base model and quality. A file, or several sets scored apart: a list of "
        "files (each set named by its file's stem) or a mapping of set names to files.")
    contrast: Path | None = Field(None, description="Prompts that tell the model not to use the task's format "
                                  "(scored as the share that obey); needs `general`.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    arms: list[Arm] = Field(min_length=1,
                            default_factory=lambda: [Arm(name="sft", ratio=0), Arm(name="delia", ratio=100)])
    baseline: str | None = Field(None, description="Arm the others are compared with; default: the first sft arm.")
    eval_base: bool = Field(True, description="Also evaluate the untuned model.")
    train_eval: bool = Field(False, description="Also score the task's eval set during training (the loss and "
                             "important-token loss curves); costs training time, the report's results do not need it.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Options of `delia sample`.")
    mix: MixConfig = Field(default_factory=MixConfig, description="Options of `delia mix` (e.g. allow_short).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Options of `delia train`.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Options of `delia eval`.")
    rewrite: RewriteConfig = Field(default_factory=RewriteConfig, description="Options of `delia rewrite`, for "
                                   "arms that train on the task rows as the model rewrote them (kind sdft, or "
                                   "`rewrite: true`).")
    coverage: CoverageConfig | None = Field(None, description="Options of `delia coverage`: with this section "
                                            "(`coverage: {}` for the defaults), the report shows how well the diverse "
                                            "rows' queries cover each general set and the task's prompts.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples for the 95% intervals.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not PLAIN_NAME.fullmatch(name) or name.endswith("."):
            raise ValueError(f"{name!r} is not a plain name (letters, digits, '.', '_', '-'; no '/'): it names the "
                             "run's folder, runs/<name>; give other paths with `delia run --out`")
        return name

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be unique, got {seeds}")
        return seeds

    @field_validator("sample", "mix", "train", "eval", "rewrite", "coverage", mode="before")
    @classmethod
    def _stage_options(cls, options: Any, info: ValidationInfo) -> Any:
        return section(str(info.field_name), options) if isinstance(options, dict) else options

    @field_serializer("sample", "mix", "train", "eval", "rewrite", "coverage")
    def _as_written(self, config: StageConfig | None) -> dict[str, Any] | None:
        """A section as the YAML set it: the run's stage keys and manifest hold what the user chose."""
        return None if config is None else config.written()

    @field_validator("general")
    @classmethod
    def _general_sets(cls, general: GeneralFiles | None) -> GeneralFiles | None:
        return None if general is None else general_sets(general)

    @field_validator("pool")
    @classmethod
    def _pool_spec(cls, pool: Path | dict[str, Any] | None) -> Path | dict[str, Any] | None:
        if isinstance(pool, dict):
            if not isinstance(pool.get("sources"), list) or not pool["sources"]:
                raise ValueError("a pool to build needs `sources`: a list of files, folders or hf: dataset ids")
            section("pool", {k: v for k, v in pool.items() if k != "sources"})
        return pool

    @field_validator("arms")
    @classmethod
    def _expanded_unique_arms(cls, arms: list[Arm]) -> list[Arm]:
        arms = expand_scaled(expand_sweeps(arms))
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        return arms

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        if any(a.ratio > 0 for a in self.arms) and self.pool is None:
            raise ValueError("an arm has ratio > 0 but no `pool` of diverse queries (and references) is given")
        if self.contrast is not None and self.general is None:
            raise ValueError("`contrast` needs `general` (its leakage rule and base model come with it)")
        if self.baseline is not None and self.baseline not in {a.name for a in self.arms}:
            raise ValueError(f"baseline {self.baseline!r} is not an arm")
        for arm in (a for a in self.arms if a.kind != SCALED):  # the train section and the arm's overrides, together
            try:
                for i, phase in enumerate(self.arm_phases(arm, self.seeds[0])):
                    # as the run completes it: the task's tokens, and a later phase starts from the earlier one's rows
                    whole = TrainConfig.build(phase, add_token=list(self.task.add_tokens) or None,
                                              **({"token_rows_from": "earlier-phase"} if i else {}))
                    if problem := whole.token_problem():
                        raise DeliaError(problem)
            except DeliaError as e:
                raise ValueError(f"arm {arm.name!r}: {e}") from None
        return self

    def arm_train(self, arm: Arm, seed: int) -> TrainConfig:
        """The training options of `arm` at `seed`: the train section with the arm's overrides and its kind's loss
        of diverse rows (set only where it is not the default, so the default's stage keys stay as they were).
        Checked whole when the experiment is loaded."""
        update = {**arm.train, "seed": seed} | ({"diverse_loss": arm.diverse_loss} if arm.diverse_loss != "ce" else {})
        if arm.soft_prompt_first:
            update = PROMOT_TRAIN | update
        return self.train.model_copy(update=update)

    def arm_phases(self, arm: Arm, seed: int) -> list[TrainConfig]:
        """The trainings of `arm` at `seed`, in order: one, or with `promot` the soft prompt alone on the task rows
        alone (its `prompt_train` over `PROMPT_PHASE`), then LoRA beside it on the arm's rows (`arm_train`; the run
        gives it the first's rows)."""
        last = self.arm_train(arm, seed)
        if not arm.soft_prompt_first:
            return [last]
        # without the kind's loss of diverse rows, which it has none of: one such phase for promot and delia-kl
        alone = self.train.model_copy(update={**PROMOT_TRAIN, **arm.train, "seed": seed})
        return [alone.model_copy(update={**PROMPT_PHASE, **arm.prompt_train, "lora": False}), last]

    def arm_mix(self, arm: Arm, seed: int) -> MixConfig:
        """The mixing options of `arm` at `seed`: the mix section with the arm's ratio and the seed."""
        return self.mix.model_copy(update={"ratio": arm.ratio, "seed": seed})

    @property
    def baseline_arm(self) -> str | None:
        if self.baseline:
            return self.baseline
        return next((a.name for a in self.arms if a.kind == "sft"), None)


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment YAML; relative data paths are taken from the YAML's folder."""
    path = Path(path)
    raw = read_yaml(path, "the experiment config")
    try:
        exp = Experiment.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}:{yaml_line(path, err['loc'])}: field '{'.'.join(map(str, err['loc']))}': "
                 f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise DeliaError("invalid experiment config\n" + "\n".join(lines)) from None
    base = path.resolve().parent

    def rel(p: Path | None) -> Path | None:
        if p is None or p.is_absolute() or ":" in str(p):  # absolute, or a prepared set such as demo-data:NAME
            return p
        return (base / p).resolve()

    exp.task.train, exp.task.eval = rel(exp.task.train), rel(exp.task.eval)
    if isinstance(exp.pool, dict):
        exp.pool = {**exp.pool, "sources": [str(rel(Path(s))) for s in exp.pool["sources"]]}
    else:
        exp.pool = rel(exp.pool)
    exp.general = None if exp.general is None else map_files(exp.general, rel)
    exp.contrast = rel(exp.contrast)
    missing = [f"{path}:{yaml_line(path, loc)}: field '{'.'.join(map(str, loc))}': {problem}"
               for loc, file in _data_files(exp) if (problem := data_path_problem(file))]
    if missing:
        raise DeliaError("invalid experiment config\n" + "\n".join(missing))
    return exp


def _data_files(exp: Experiment) -> list[tuple[tuple[str | int, ...], Path]]:
    """(YAML location, path) of every data file the experiment names."""
    files: list[tuple[tuple[str | int, ...], Path]] = [(("task", "train"), exp.task.train),
                                                      (("task", "eval"), exp.task.eval)]
    if isinstance(exp.pool, dict):
        files += [(("pool", "sources", i), Path(s)) for i, s in enumerate(exp.pool["sources"])
                  if not s.startswith("hf:")]
    elif exp.pool is not None:
        files.append((("pool",), exp.pool))
    if exp.general is not None:
        sets = general_sets(exp.general)
        files += [(("general",), sets)] if isinstance(sets, Path) else [(("general", n), f) for n, f in sets.items()]
    if exp.contrast is not None:
        files.append((("contrast",), exp.contrast))
    return files


def yaml_line(path: Path, loc: tuple[str | int, ...]) -> str:
    """The 1-based line of the YAML node at `loc` (the deepest one that exists), or '' if none is found."""
    import yaml

    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return ""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return "" if line is None else str(line)
