"""`delia run`: every stage of an experiment for every arm and seed, each cached by its identity.

A stage's folder is `OUT/stages/<stage>-<key>/`, the key hashing the stage's identity (`delia.stage`); it counts
as done only when its `stage.json` exists, so a rerun skips finished stages and an interrupted one continues where
it stopped (sampling, rewriting and training resume inside their folder). Changing any input (data, model,
option) changes the key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from delia.artifacts import CostPlan, PoolFacts, TrainRecord
from delia.config import Flags, StageConfig
from delia.errors import DeliaError
from delia.experiment import SCALED, Arm, Experiment, load_experiment
from delia.files import check_output, discard_output, holds_other_files, mark_output, sha256_file, write_json
from delia.general import map_files
from delia.models import model_identity
from delia.progress import ProgressCallback
from delia.stage import StageCache
from delia.versions import library_versions

log = logging.getLogger(__name__)


RUN_KIND = "run"  # the output marker's kind (files.mark_output)


def claim_run_folder(out: Path, overwrite: bool = False) -> None:
    """Make `out` a run folder, refusing one that holds other files: a run writes its report and stages there.

    A folder of an earlier run (marked, or with the `stages/` of a run from before folders were marked) is
    resumed, or with `overwrite` removed first."""
    check_output(out, overwrite=True, folder=True)
    if holds_other_files(out, RUN_KIND) and not (out / "stages").is_dir():
        raise DeliaError(f"{out}: holds files that no delia run wrote; choose a new or empty folder with `out`")
    if overwrite and out.is_dir():
        mark_output(out, RUN_KIND)  # a run's folder from before folders were marked
        discard_output(out, RUN_KIND)
    mark_output(out, RUN_KIND)


def resolve_paths(exp: Experiment) -> Experiment:
    """`exp` with prepared data sets (`demo-data:...`) resolved to files, prepared on first use."""
    from delia.task_data import resolve_data_path

    exp.task.train, exp.task.eval = resolve_data_path(exp.task.train), resolve_data_path(exp.task.eval)
    if exp.pool is not None and not isinstance(exp.pool, dict):  # a dict is a spec that the pool stage builds
        exp.pool = resolve_data_path(exp.pool)
    exp.general = None if exp.general is None else map_files(exp.general, resolve_data_path)
    exp.contrast = None if exp.contrast is None else resolve_data_path(exp.contrast)
    return exp


def run_experiment(exp: Experiment, out: Path, flops_per_s: float | None = None,
                   progress: ProgressCallback | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Sample, mix, train, evaluate and probe every arm and seed of `exp`; write the report into `out`.

    The report puts the plan's wall-time estimate (at `flops_per_s`, or measured) beside the measured time.
    Stages report their progress to `progress`. A finished or interrupted run in `out` is resumed, or with
    `overwrite` removed first."""
    from delia.compute import arm_cost, sum_trained
    from delia.coverage import CoverageConfig
    from delia.evaluate import EvalStage
    from delia.mix import MixStage
    from delia.models import resolve_model
    from delia.plan import PlanStage
    from delia.probe import ProbeConfig, ProbeStage
    from delia.report import ModelResult, write_report
    from delia.rewrite import RewriteConfig, RewriteStage
    from delia.sample import SampleConfig, SampleStage
    from delia.training import TrainConfig, TrainStage

    claim_run_folder(out, overwrite)
    resolve_paths(exp)
    pool_spec = exp.pool if isinstance(exp.pool, dict) else None
    cache = StageCache(out / "stages")
    model_path = resolve_model(exp.model)
    model_id = model_identity(exp.model, model_path)
    pool_facts = None
    if pool_spec is not None:  # built only when an arm draws diverse rows from it
        exp.pool = None
    if pool_spec is not None and any(a.ratio > 0 for a in exp.arms):
        exp.pool, pool_facts = build_pool(cache, pool_spec, model_path, model_id, [exp.task.train, exp.task.eval],
                                           progress)
    data_hashes = {"task_train": sha256_file(exp.task.train), "task_eval": sha256_file(exp.task.eval)}
    for name in ("pool", "general", "contrast"):  # a single general file keeps its hash's place (and stage keys)
        if getattr(exp, name) is not None:
            data_hashes[name] = map_files(getattr(exp, name), sha256_file)
    # the estimate made before the first run of these settings, kept for the report's comparison
    plan = cache.run(PlanStage(exp, model_id, data_hashes, flops_per_s))[1].result
    estimate = plan.estimates()
    if (short := plan.short_arms()) and not exp.mix.allow_short:
        raise DeliaError("the pool is too small for the arms' ratios (" + "; ".join(short) + "): use a larger pool "
                         "or lower ratios, or set `allow_short: true` under `mix:` to train on every row it has")

    metric_cfg = None
    if exp.task.metric_config:
        import yaml

        metric_cfg = out / "metric_config.yaml"
        metric_cfg.write_text(yaml.safe_dump({"kind": exp.task.metric, **exp.task.metric_config}), encoding="utf-8")
    eval_cfg = exp.eval.model_copy(update={"metric": exp.task.metric, "metric_config": metric_cfg,
                                           "general": exp.general, "contrast": exp.contrast, "overwrite": True})

    def evaluation(label: str, subject: dict[str, Any], **update: Any) -> EvalStage:
        """The eval stage of `subject` (the base model, or an adapter as `update` gives it)."""
        return EvalStage(exp.task.eval, eval_cfg.model_copy(update=update), subject, exp.task.metric_config, label)

    token_specs = [f"{t}={d}" if d else t for t, d in exp.task.add_tokens.items()]
    described = [f"{t}={d}" for t, d in exp.task.add_tokens.items() if d]
    # The base model gets the new tokens the way the first seed's training initialises them.
    probe_cfg = ProbeConfig(data=exp.task.eval, init=exp.train.token_init, seed=exp.seeds[0])

    def probed(label: str, subject: dict[str, Any], **update: Any) -> dict[str, Any]:
        """The probe stage's result (what probe.json holds), cached like every stage."""
        stage = ProbeStage(probe_cfg.model_copy(update=update), subject, described, label)
        return cache.run(stage, progress)[1].result

    train_eval = exp.task.eval if exp.train_eval else None
    samples = sampled = None
    if any(a.samples for a in exp.arms):
        assert isinstance(exp.pool, Path)
        sampling = SampleConfig.build(exp.sample, model=model_path)
        folder, sampled = cache.run(SampleStage(exp.pool, sampling, model_id, "pool"), progress)
        samples = folder / "samples.jsonl"
    coverage = None
    if exp.coverage is not None and (diverse_rows := samples or exp.pool) is not None:
        from delia.coverage import CoverageStage

        sets = {} if exp.general is None else exp.general if isinstance(exp.general, dict) else {"general": exp.general}
        stage = CoverageStage(Path(diverse_rows), {**sets, "task eval": exp.task.eval},
                              CoverageConfig.build(exp.coverage, model=model_path), model_id)
        coverage = cache.run(stage, progress)[1].result
    # the task rows an arm trains on: as given, or (`rewrite`) as the model rewrote them, shown the reference (SDFT)
    task_rows = {False: exp.task.train}
    rewritten = None
    if any(a.rewrite for a in exp.arms):
        rewriting = RewriteConfig.build(exp.rewrite, model=model_path, metric=exp.task.metric,
                                        metric_config=metric_cfg, overwrite=True)
        folder, rewritten = cache.run(RewriteStage(exp.task.train, rewriting, model_id, exp.task.metric_config,
                                                   "task"), progress)
        task_rows[True] = folder / "rewritten.jsonl"

    runs: list[ModelResult] = []
    if exp.eval_base:
        folder, rec = cache.run(evaluation("base", {"model": model_id}, model=model_path), progress)
        base = ModelResult("base", None, None, folder, wall_s={"eval": rec.wall_s})
        if described:
            base.probe = probed("base", {"model": model_id}, model=model_path, token=described)
        runs.append(base)

    def scaled(arm: Arm, of: ModelResult, of_train: dict[str, Any]) -> ModelResult:
        """A scaled arm at the seed of `of`: that arm's adapter (trained as `of_train`) evaluated at the arm's
        scale. It trains nothing, so its compute is the `of` arm's training and no more."""
        assert arm.scale is not None and of.compute is not None
        label = f"{arm.name} seed {of.seed}"
        folder, rec = cache.run(evaluation(label, {"adapter": of_train}, adapter=of.train_dir, adapter_scale=arm.scale),
                                progress)  # at 1: the `of` arm's own eval
        result = ModelResult(arm.name, of.ratio, of.seed, folder, wall_s={"eval": rec.wall_s}, kind=SCALED,
                             of=arm.of, scale=arm.scale, compute={**of.compute, "est_wall_s": estimate[arm.name]})
        if described:  # at 1: the `of` arm's own probe
            scale = {"adapter_scale": arm.scale} if arm.scale != 1.0 else {}
            result.probe = probed(label, {"adapter": of_train, **scale}, adapter=of.train_dir, **scale)
        return result

    trained: dict[tuple[str, int], tuple[ModelResult, dict[str, Any]]] = {}  # (arm, seed): result, train identity
    for arm in sorted(exp.arms, key=lambda a: a.kind == SCALED):  # a scaled arm after the arm it scales
        for seed in exp.seeds:
            if arm.kind == SCALED:
                runs.append(scaled(arm, *trained[(str(arm.of), seed)]))
                continue
            label = f"{arm.name} seed {seed}"
            wall: dict[str, float] = {}
            share = 0.0  # of the sampling run this arm's diverse rows took
            train_data = alone = task_rows[arm.rewrite]
            if arm.rewrite and rewritten is not None:
                wall["rewrite"] = rewritten.wall_s
            if arm.ratio > 0:
                diverse = samples if arm.samples else exp.pool
                assert isinstance(diverse, Path)
                mixing = exp.arm_mix(arm, seed).model_copy(update={"tokenizer": model_path, "overwrite": True})
                folder, mixed = cache.run(MixStage(train_data, diverse, mixing, label), progress)
                train_data = folder / "mixed.jsonl"
                wall["mix"] = mixed.wall_s
                if arm.samples and sampled is not None:  # what sampling only the rows this seed uses would take
                    share = mixed.result.diverse_rows() / max(1, sampled.result.kept)
                    wall["sample"] = round(sampled.wall_s * share, 2)
            adapter, trainings = None, []  # a phase after the first starts from the rows the one before ended with
            for i, phase in enumerate(phases := exp.arm_phases(arm, seed)):
                training = TrainConfig.build(phase, model=model_path, add_token=token_specs, eval_data=train_eval,
                                             resume=True, **({"token_rows_from": adapter} if adapter else {}))
                data = alone if training.trains_soft_prompt() else train_data  # a soft prompt learns the task only
                tfolder, trained_rec = cache.run(TrainStage(data, training, model_id, label + (
                    f" phase {i + 1}" if len(phases) > 1 else "")), progress)
                adapter, train_identity = tfolder / "adapter", trained_rec.inputs
                wall["train"] = wall.get("train", 0.0) + trained_rec.wall_s
                trainings.append(TrainRecord.read(adapter).trained_tokens())
            assert adapter is not None
            efolder, evaluated = cache.run(evaluation(label, {"adapter": train_identity}, adapter=adapter), progress)
            wall["eval"] = evaluated.wall_s
            cost = arm_cost(model_path, sum_trained(trainings), sampled.result.sampled_tokens() if sampled else None,
                            share, rewritten.result.generation() if arm.rewrite and rewritten else None)
            result = ModelResult(arm.name, arm.ratio, seed, efolder, train_dir=adapter, wall_s=wall, kind=arm.kind,
                                 sweep=arm.sweep, compute={**cost, "est_wall_s": estimate[arm.name]})
            if described:
                result.probe = probed(label, {"adapter": train_identity}, adapter=adapter)
            runs.append(result)
            trained[(arm.name, seed)] = result, train_identity

    manifest = {"experiment": exp.model_dump(mode="json"), "model": model_id, "data_sha256": data_hashes,
                "plan": plan.dump(), "versions": library_versions(), "stages_run": cache.done,
                "stages_cached": cache.skipped}
    if pool_facts is not None:
        manifest["pool"] = pool_facts.dump()
    if rewritten is not None:
        manifest["rewrite"] = rewritten.result.facts().dump()
    if coverage is not None:
        manifest["coverage"] = coverage
    md, html, summary = write_report(out, exp.name, runs, exp.baseline_arm, manifest, exp.bootstrap)
    write_json(out / "manifest.json", manifest)
    return {"report_md": str(md), "report_html": str(html), "summary": summary,
            "stages_run": cache.done, "stages_cached": cache.skipped}


def build_pool(cache: StageCache, spec: dict[str, Any], model_path: str, model_id: dict[str, Any],
               targets: list[Path], progress: ProgressCallback | None = None) -> tuple[Path, PoolFacts]:
    """The experiment's pool built by `delia pool` as a cached stage, decontaminated against the task's files;
    returns its path and the facts the report shows (counts per step, decontamination, coverage)."""
    from delia.pool import PoolStage
    from delia.task_data import resolve_data_path

    sources = [str(resolve_data_path(s)) for s in spec["sources"]]
    options = {k: v for k, v in spec.items() if k != "sources"}
    folder, rec = cache.run(PoolStage(sources, options, targets, model_id, model_path), progress)
    return folder / "pool.jsonl", rec.result.facts()


class RunConfig(StageConfig):
    """Options of `delia run` (the experiment's own settings are in its YAML)."""

    out: Annotated[Path | None, Flags("--out", "-o")] = None
    """Output folder (default runs/<name>)."""
    plan: Annotated[bool, Flags("--plan")] = False
    """Return the estimated tokens, FLOPs and wall time of every arm and seed, and stop: no stage runs (a prepared
    data set the experiment names is built if missing; a pool to build is estimated from its sources)."""
    flops_per_s: float | None = Field(None, gt=0)
    """Achieved FLOP/s for the wall-time estimates: what a run really reaches, about a third of the device's peak
    (e.g. 3e14 on an H100 in bf16); default: measured on this machine."""
    overwrite: bool = False
    """Start over: remove an earlier run in the output folder (only a folder that a delia run wrote)."""
    baseline: str | None = None
    """Arm the report compares the others with (default: the experiment YAML's baseline key, else its first sft arm);
    a rerun with another baseline reuses every finished stage."""


def run(experiment: Annotated[Path, "Experiment YAML (see examples/)."], config: RunConfig | None = None, *,
        progress: ProgressCallback | None = None, **options: Any) -> dict[str, Any] | CostPlan:
    """Run an experiment: sample, mix, train and eval every arm and seed, then write report.md and report.html.

    Finished stages are cached by a hash of their inputs: a rerun skips them, an interrupted run continues.
    Returns the run's result (the report's paths and summary), or with `plan` the cost plan.

    Examples:\n
      delia run examples/demo.yaml\n
      delia run examples/paper-format.yaml --plan --flops-per-s 2e14\n
      delia run examples/paper-format.yaml --out runs/paper\n
      delia run examples/anchor-cpu.yaml --baseline delia-2
    """
    cfg = RunConfig.build(config, **options)
    exp = load_experiment(experiment)
    if cfg.baseline is not None:
        if cfg.baseline not in {a.name for a in exp.arms}:
            raise DeliaError(f"`baseline` {cfg.baseline!r} is not an arm of {experiment} "
                             f"({', '.join(a.name for a in exp.arms)})")
        exp.baseline = cfg.baseline
    if cfg.plan:
        from delia.plan import plan_experiment

        return plan_experiment(resolve_paths(exp), cfg.flops_per_s)
    return run_experiment(exp, cfg.out or Path("runs") / exp.name, cfg.flops_per_s, progress, cfg.overwrite)
