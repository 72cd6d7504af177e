"""`delia run`: every stage of an experiment for every arm and seed, each stage cached by a hash of its inputs.

A stage's folder is `OUT/stages/<stage>-<hash>/`; it counts as done only when its `stage.json` exists,
so a rerun skips finished stages and an interrupted one continues where it stopped (sampling and
training resume inside their folder). Changing any input (data, model, option) changes the hash.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from delia import __version__
from delia.experiment import Experiment, load_experiment
from delia.files import sha256_file, sha256_json, write_json
from delia.models import model_fingerprint
from delia.versions import library_versions

console = Console(stderr=True)


class StageCache:
    """Runs a stage in a folder named by the hash of its inputs, unless that folder is already complete."""

    def __init__(self, root: Path):
        self.root = root
        self.done: list[str] = []
        self.skipped: list[str] = []

    def run(self, stage: str, label: str, inputs: dict[str, Any], fn: Callable[[Path], Any]) -> tuple[Path, dict]:
        key = sha256_json({"stage": stage, "inputs": inputs, "delia": __version__})[:12]
        folder = self.root / f"{stage}-{key}"
        marker = folder / "stage.json"
        if marker.exists():
            self.skipped.append(f"{stage}:{label}")
            console.print(f"[dim]cached[/] {stage} {label} -> {folder}", highlight=False)
            return folder, json.loads(marker.read_text(encoding="utf-8"))
        folder.mkdir(parents=True, exist_ok=True)
        console.rule(f"{stage} {label}")
        start = time.perf_counter()
        result = fn(folder)
        record = {"stage": stage, "label": label, "inputs": inputs, "wall_s": round(time.perf_counter() - start, 2),
                  "result": result}
        write_json(marker, record)
        self.done.append(f"{stage}:{label}")
        return folder, json.loads(marker.read_text(encoding="utf-8"))


def run_experiment(exp: Experiment, out: Path) -> dict[str, Any]:
    """Sample, mix, train, evaluate and probe every arm and seed of `exp`; write the report into `out`."""
    from delia.evaluate import evaluate
    from delia.mix import mix
    from delia.models import resolve_model
    from delia.report import ModelResult, write_report
    from delia.sample import sample
    from delia.task_data import resolve_data_path
    from delia.train import train

    exp.task.train, exp.task.eval = resolve_data_path(exp.task.train), resolve_data_path(exp.task.eval)
    pool_spec = exp.pool if isinstance(exp.pool, dict) else None
    exp.pool, exp.general, exp.contrast = (None if p is None else resolve_data_path(p)  # type: ignore[arg-type]
                                           for p in (None if pool_spec else exp.pool, exp.general, exp.contrast))
    out.mkdir(parents=True, exist_ok=True)
    cache = StageCache(out / "stages")
    model_path = resolve_model(exp.model)
    model_id = {"model": exp.model, "fingerprint": model_fingerprint(model_path)}
    pool_facts = None
    if pool_spec is not None and any(a.ratio > 0 for a in exp.arms):  # only DELIA arms sample from it
        exp.pool, pool_facts = build_pool(cache, pool_spec, model_path, model_id, [exp.task.train, exp.task.eval])
    data_hashes = {"task_train": sha256_file(exp.task.train), "task_eval": sha256_file(exp.task.eval)}
    for name in ("pool", "general", "contrast"):
        if getattr(exp, name) is not None:
            data_hashes[name] = sha256_file(getattr(exp, name))

    metric_cfg = None
    if exp.task.metric_config:
        import yaml

        metric_cfg = out / "metric_config.yaml"
        metric_cfg.write_text(yaml.safe_dump({"kind": exp.task.metric, **exp.task.metric_config}), encoding="utf-8")
    eval_kwargs = {"metric": exp.task.metric, "metric_config": metric_cfg, "general": exp.general,
                   "contrast": exp.contrast, **exp.eval}
    eval_inputs = {"data": data_hashes["task_eval"], "metric": exp.task.metric,
                   "metric_config": exp.task.metric_config, "options": exp.eval,
                   "general": data_hashes.get("general"), "contrast": data_hashes.get("contrast")}
    token_specs = [f"{t}={d}" if d else t for t, d in exp.task.add_tokens.items()]
    described = {t: d for t, d in exp.task.add_tokens.items() if d}
    # The base model gets the new tokens the way the first seed's training initialises them.
    probe_kwargs = {"token": [f"{t}={d}" for t, d in described.items()], "data": exp.task.eval,
                    "init": exp.train.get("token_init", "random"), "seed": exp.seeds[0]}

    def probed(label: str, key: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """The probe stage's result (what probe.json holds), cached like every stage."""
        from delia.probe import probe

        inputs = {**key, **probe_kwargs, "data": data_hashes["task_eval"]}
        return cache.run("probe", label, inputs, lambda d: probe(d, **kwargs))[1]["result"]

    train_eval = exp.task.eval if exp.train_eval else None
    samples = None
    if any(a.ratio > 0 for a in exp.arms):
        folder, rec = cache.run("sample", "pool", {"model": model_id, "pool": data_hashes["pool"],
                                                   "options": exp.sample},
                                lambda d: sample(exp.pool, d / "samples.jsonl", model=model_path, **exp.sample))
        samples, sample_s = folder / "samples.jsonl", rec["wall_s"]

    runs: list[ModelResult] = []
    if exp.eval_base:
        folder, rec = cache.run("eval", "base", {"model": model_id, **eval_inputs},
                                lambda d: evaluate(exp.task.eval, d, model=model_path, **eval_kwargs))
        base = ModelResult("base", None, None, folder, wall_s={"eval": rec["wall_s"]})
        if described:
            base.probe = probed("base", {"model": model_id}, model=model_path, **probe_kwargs)
        runs.append(base)

    for arm in exp.arms:
        for seed in exp.seeds:
            label = f"{arm.name} seed {seed}"
            wall: dict[str, float] = {}
            if arm.ratio > 0:
                assert samples is not None
                mix_inputs = {"task": data_hashes["task_train"], "diverse": sha256_file(samples), "ratio": arm.ratio,
                              "seed": seed, "options": exp.mix}
                folder, rec = cache.run("mix", label, mix_inputs, lambda d, r=arm.ratio, s=seed: mix(
                    exp.task.train, samples, d / "mixed.jsonl", ratio=r, seed=s, tokenizer=model_path, **exp.mix))
                train_data, data_hash = folder / "mixed.jsonl", sha256_file(folder / "mixed.jsonl")
                wall["mix"] = rec["wall_s"]
                if seed == exp.seeds[0]:  # one sampling serves every seed: count it once per arm
                    wall["sample"] = sample_s
            else:
                train_data, data_hash = exp.task.train, data_hashes["task_train"]
            options = {**exp.train, **arm.train, "seed": seed}
            train_key = {"model": model_id, "data": data_hash, "tokens": token_specs, "options": options}
            if train_eval is not None:
                train_key["eval_data"] = data_hashes["task_eval"]
            tfolder, rec = cache.run("train", label, train_key,
                lambda d, td=train_data, o=options: train(td, d / "adapter", model=model_path, add_token=token_specs,
                                                          eval_data=train_eval, resume=True, **o))
            adapter, trained = tfolder / "adapter", rec["inputs"]
            wall["train"] = rec["wall_s"]
            efolder, rec = cache.run("eval", label, {"adapter": trained, **eval_inputs},
                                     lambda d, a=adapter: evaluate(exp.task.eval, d, adapter=a, **eval_kwargs))
            wall["eval"] = rec["wall_s"]
            result = ModelResult(arm.name, arm.ratio, seed, efolder, train_dir=adapter, wall_s=wall,
                               trained_tokens=_trained_tokens(adapter))
            if described:
                result.probe = probed(label, {"adapter": trained}, adapter=adapter, data=exp.task.eval)
            runs.append(result)

    manifest = {"experiment": exp.model_dump(mode="json"), "model": model_id, "data_sha256": data_hashes,
                "versions": library_versions(), "stages_run": cache.done, "stages_cached": cache.skipped}
    if pool_facts is not None:
        manifest["pool"] = pool_facts
    md, html, summary = write_report(out, exp.name, runs, exp.baseline_arm, manifest, exp.bootstrap)
    write_json(out / "manifest.json", manifest)
    return {"report_md": str(md), "report_html": str(html), "summary": summary,
            "stages_run": cache.done, "stages_cached": cache.skipped}


def build_pool(cache: StageCache, spec: dict[str, Any], model_path: str, model_id: dict[str, Any],
               targets: list[Path]) -> tuple[Path, dict[str, Any]]:
    """The experiment's pool built by `delia pool` as a cached stage, decontaminated against the task's files;
    returns its path and the facts the report shows (counts per step, decontamination, coverage)."""
    from delia.pool import pool
    from delia.task_data import resolve_data_path

    sources = [str(resolve_data_path(s)) for s in spec["sources"]]
    options = {k: v for k, v in spec.items() if k != "sources"}
    inputs = {"model": model_id, "options": options, "task": [sha256_file(t) for t in targets],
              "sources": [sha256_file(s) if Path(s).is_file() else s for s in sources]}
    folder, rec = cache.run("pool", "pool", inputs, lambda d: pool(sources, out=d / "pool.jsonl", task=targets,
                                                                   model=model_path, **options))
    stats = rec["result"]
    selection = {k: v for k, v in stats["selection"].items() if k not in ("cluster_sizes", "selected_per_cluster")}
    return folder / "pool.jsonl", {"rows": stats["rows"], "rows_read": stats["rows_read"], "steps": stats["steps"],
                                   "decontaminated": stats["decontamination"]["removed"], "selection": selection,
                                   "sources": [s["source"] for s in stats["sources"]]}


def _trained_tokens(adapter: Path) -> int | None:
    meta = adapter / "delia_train.json"
    if not meta.exists():
        return None
    return json.loads(meta.read_text(encoding="utf-8")).get("tokens_trained")


def summary_table(summary: dict[str, Any]) -> Any:
    """The verdict as a rich table that fits 80 columns: one block of rows per arm, a metric per row, its
    mean [95% interval] and the paired Δ to the baseline; cells wrap, never cut."""
    from rich.table import Table

    from delia.report import headline, interval, label

    base = summary.get("baseline")
    table = Table(title="results: mean [95% interval]", title_justify="left", show_lines=False)
    table.add_column("arm / metric", overflow="fold")
    table.add_column("mean [95%]", overflow="fold")
    table.add_column(f"Δ vs {base}" if base else "Δ", overflow="fold")
    for name, a in summary["arms"].items():
        ratio = "" if a["ratio"] is None else f" (ratio {a['ratio']:g})"
        table.add_row(f"[bold]{escape(name)}[/]{ratio}", "", "", end_section=False)
        for m in headline(summary):
            d = a["delta"].get(m)
            table.add_row(f"  {label(m)}", interval(a["metrics"][m], m), interval(d, m, sign=True) if d else "–")
    return table


def print_summary(result: dict[str, Any]) -> None:
    """The verdict table and sentences, then where the report is (the CLI's view of a run's result)."""
    from delia.report import verdict

    summary = result["summary"]
    out = Console(soft_wrap=False)
    out.print(summary_table(summary))
    for line in verdict(summary):
        out.print(escape(line), highlight=False)
    if not summary["general"]:
        out.print("no general prompts evaluated: leakage and drift unknown (set `general` in the experiment)")
    console.print(f"report: {result['report_md']}\n        {result['report_html']}", highlight=False)


def run(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML (see examples/).", exists=True, dir_okay=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default runs/<name>).")] = None,
) -> dict[str, Any]:
    """Run an experiment: sample, mix, train and eval every arm and seed, then write report.md and report.html.

    Finished stages are cached by a hash of their inputs: a rerun skips them, an interrupted run continues.

    Examples:\n
      delia run examples/demo.yaml\n
      delia run examples/paper-format.yaml --out runs/paper
    """
    exp = load_experiment(experiment)
    result = run_experiment(exp, out or Path("runs") / exp.name)
    print_summary(result)
    return result
