"""The experiment report: a results table with bootstrap intervals, deltas to plain SFT, plots, costs, manifest.

Written twice from the same content: `report.md` (plots as PNG files beside it) and a self-contained
`report.html` (plots inlined as data URIs; no script, font or style is loaded from anywhere).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from delia.artifacts import (
    CONTRAST_ROWS,
    IMPORTANT_LOSS_FILE,
    PREDICTIONS,
    TRAINER_LOG,
    EvalScores,
    PoolFacts,
    RewriteFacts,
    ScoredSet,
    general_rows_file,
)
from delia.files import atomic_writer
from delia.frontier import (
    COMPUTE,
    CONTRAST,
    DRIFT,
    LEAKAGE,
    RULE,
    TASK,
    ArmPoint,
    Formatter,
    front_sentences,
    pareto,
    plot_front,
    recommend,
)
from delia.text import shorten

log = logging.getLogger(__name__)
TRUNCATED = "truncated"  # per-row 1.0 where the eval cut the task answer at max_new_tokens (finish reason `length`)
TRUNCATION_WARN = 0.10  # share of the base's or plain SFT's task answers cut, above which the report warns


@dataclass
class ModelResult:
    """One trained-and-evaluated model: an arm at a seed (or the untuned base model)."""

    arm: str
    ratio: float | None
    seed: int | None
    eval_dir: Path
    train_dir: Path | None = None
    wall_s: dict[str, float] = field(default_factory=dict)
    probe: dict[str, Any] | None = None
    kind: str | None = None  # the arm's kind (sft, delia, delia-kl, replay-reference, scaled); None for the base
    sweep: str | None = None  # the `ratios` line the arm was expanded from (experiment.expand_sweeps)
    of: str | None = None  # kind scaled: the arm whose adapter it scales (its ratio is that arm's)
    scale: float | None = None  # kind scaled: the factor of the LoRA update
    compute: dict[str, float] | None = None  # tokens and estimated FLOPs (delia.compute.arm_cost)


# ----------------------------------------------------------------------------- statistics


def bootstrap_mean(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% interval of a (seeds x examples) score matrix, resampling seeds, then examples.

    NaN entries (a row without a score, e.g. an unparseable reference) are left out of each mean.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[None, :]
    with warnings.catch_warnings():  # no scored row at all (e.g. every answer cut): NaN, said by the caller
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = float(np.nanmean(values)) if values.size else float("nan")
    if values.size == 0 or np.isnan(mean):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    s, e = values.shape
    pick_s = rng.integers(0, s, size=(n, s))
    pick_e = rng.integers(0, e, size=(n, s, e))
    with warnings.catch_warnings():  # a draw of only missing rows is NaN, and nanpercentile skips it
        warnings.simplefilter("ignore", RuntimeWarning)
        draws = np.nanmean(values[pick_s[:, :, None], pick_e].reshape(n, -1), axis=1)
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return mean, float(lo), float(hi)


def bootstrap_delta(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b and its 95% interval, paired by seed and example (both arms saw the same eval rows)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs equal shapes, got {a.shape} and {b.shape}")
    return bootstrap_mean(a - b, n, seed)


# ----------------------------------------------------------------------------- collecting


def set_metric(name: str | None, metric: str) -> str:
    """A general set's metric as the report names it: `leakage` for the single set, `<set>/leakage` for a named one."""
    return metric if name is None else f"{name}/{metric}"


def base_metric(metric: str) -> str:
    """The metric without its general set (`alpaca/leakage` -> `leakage`): what its unit and role depend on."""
    return metric.rpartition("/")[2]


def _sections(summary: EvalScores) -> list[tuple[str | None, EvalScores | ScoredSet, str]]:
    """(set name, section, per-row file) of every averaged section of a scores.json: the task, each general set,
    the contrast prompts."""
    contrast = [(None, summary.contrast, CONTRAST_ROWS)] if summary.contrast else []
    return ([(None, summary, PREDICTIONS)] + [(n, s, general_rows_file(n)) for n, s in summary.scored_sets()]
            + contrast)


def load_scores(eval_dir: Path) -> tuple[EvalScores, dict[str, list[float]]]:
    """(scores.json, per-row values of each averaged metric) of one `delia eval` output folder: the task's
    metrics from predictions.jsonl and, where evaluated, each general set's and the contrast metrics; and
    `TRUNCATED`, whether each task answer was cut, where the rows say how they ended."""
    summary = EvalScores.read(eval_dir)
    per_row: dict[str, list[float]] = {}
    for name, section, file in _sections(summary):
        rows = [json.loads(line) for line in (eval_dir / file).read_text(encoding="utf-8").splitlines()]
        per_row.update({
            set_metric(name, metric): [float("nan") if r["scores"].get(key) is None else float(r["scores"][key])
                                       for r in rows]
            for metric, key in section.row_means.items()
        })
        if file == PREDICTIONS and rows and all("finish_reason" in r for r in rows):
            per_row[TRUNCATED] = [float(r["finish_reason"] == "length") for r in rows]
    return summary, per_row


def higher_is_better(summary: EvalScores) -> dict[str, bool]:
    """Direction of every metric of a scores.json: task metrics are scores; general ones say their own."""
    out = dict.fromkeys(summary.row_means, True)
    for name, section, _ in _sections(summary)[1:]:
        out.update((set_metric(name, m), up) for m, up in section.higher_is_better.items())
    return out


def _leakage_by_kind(summaries: list[EvalScores]) -> dict[str, dict[str, dict[str, float]]]:
    """Leakage metric -> kind of prompt -> answers, leaked and share, summed over the runs (seeds) of an arm."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for summary in summaries:
        for name, section in summary.scored_sets():
            for kind, c in section.leakage_by_kind.items():
                total = out.setdefault(set_metric(name, "leakage"), {}).setdefault(kind, {"n": 0, "leaked": 0})
                total["n"] += c.n
                total["leaked"] += c.leaked
    for kinds in out.values():
        for c in kinds.values():
            c["share"] = c["leaked"] / c["n"]
    return out


def summarise(runs: list[ModelResult], baseline: str | None, n_boot: int) -> dict[str, Any]:
    """Per arm and metric: mean with 95% interval, and the paired delta to the baseline arm.

    `task` lists the task's headline metrics (the primary one and any label accuracy), `general` the
    general-behaviour ones (leakage, drift, quality, contrast) where they were evaluated."""
    arms: dict[str, list[ModelResult]] = {}
    for r in runs:
        arms.setdefault(r.arm, []).append(r)
    loaded = {id(r): load_scores(r.eval_dir) for r in runs}  # each eval folder read once

    def matrix(group: list[ModelResult], metric: str) -> np.ndarray:
        return np.array([loaded[id(r)][1][metric] for r in group], dtype=float)

    first = loaded[id(runs[0])][0]
    direction: dict[str, bool] = {}
    for summary, _ in loaded.values():
        direction.update(higher_is_better(summary))
    common = set.intersection(*(set(rows) for _, rows in loaded.values()))
    metrics = [m for m in direction if m in common]
    task = [m for m in first.row_means if m == first.primary or m.startswith("label")]
    truncation = TRUNCATED in common
    out: dict[str, Any] = {"primary": first.primary, "metrics": metrics, "task": task,
                           "general": [m for m in metrics if m not in first.row_means],
                           "higher_is_better": direction, "baseline": baseline,
                           "general_prompts": first.general.n if first.general else None,
                           "general_sets": {name: s.n for name, s in first.scored_sets() if name is not None},
                           "max_new_tokens": first.sampling.max_new_tokens, "arms": {}}
    for name, group in arms.items():
        group.sort(key=lambda r: -1 if r.seed is None else r.seed)
        costs = [r.compute for r in group if r.compute]
        entry: dict[str, Any] = {"ratio": group[0].ratio, "kind": group[0].kind, "sweep": group[0].sweep,
                                 "of": group[0].of, "scale": group[0].scale,
                                 "seeds": [r.seed for r in group], "metrics": {}, "delta": {},
                                 "trained_tokens": _total(c["trained_tokens"] for c in costs),
                                 "compute": {k: float(np.mean([c[k] for c in costs])) for k in costs[0]}
                                 if costs else None,
                                 "wall_s": _sum_dicts(r.wall_s for r in group)}
        entry["per_seed"] = {}
        for m in metrics:
            entry["metrics"][m] = bootstrap_mean(matrix(group, m), n_boot)
            entry["per_seed"][m] = [None if np.isnan(v) else float(v) for v in _row_means(matrix(group, m))]
            base = arms.get(baseline) if baseline else None
            if base is not None and name != baseline and [r.seed for r in base] == entry["seeds"]:
                entry["delta"][m] = bootstrap_delta(matrix(group, m), matrix(base, m), n_boot)
        if truncation:  # the share cut at the budget, and each task metric on the answers that ended
            cut = matrix(group, TRUNCATED)
            entry[TRUNCATED] = bootstrap_mean(cut, n_boot)
            entry["finished"] = {m: bootstrap_mean(np.where(cut > 0, np.nan, matrix(group, m)), n_boot) for m in task}
        if by_kind := _leakage_by_kind([loaded[id(r)][0] for r in group]):
            entry["leakage_by_kind"] = by_kind
        out["arms"][name] = entry
    sweeps: dict[str, list[str]] = {}
    for name, entry in out["arms"].items():
        if entry["sweep"] is not None:
            sweeps.setdefault(entry["sweep"], []).append(name)
    out["sweeps"] = {s: sorted(names, key=lambda n: out["arms"][n]["ratio"]) for s, names in sweeps.items()}
    if out["primary"] in common:  # the recommendation's task rule: each arm's paired gap to the best arm
        out["task_gap"] = task_gaps({n: matrix(g, out["primary"]) for n, g in arms.items()},
                                    {n: out["arms"][n]["seeds"] for n in arms}, n_boot)
    out["warnings"] = [w] if (w := truncation_warning(out)) else []
    return out


def truncation_warning(summary: dict[str, Any]) -> str | None:
    """A warning when the eval cut more than `TRUNCATION_WARN` of the base model's or a plain-SFT arm's task
    answers at `max_new_tokens`: the arms are judged against them, and a cut answer scores as a wrong one."""
    cut = {name: a[TRUNCATED][0] for name, a in summary["arms"].items()
           if TRUNCATED in a and not a["ratio"] and not a["of"] and a[TRUNCATED][0] > TRUNCATION_WARN}  # base, sft
    if not cut:
        return None
    shares = " and ".join(f"{share:.0%} of {name}'s" for name, share in cut.items())
    return (f"The eval cut {shares} task answers at max_new_tokens {summary['max_new_tokens']} (more than "
            f"{TRUNCATION_WARN:.0%}): their scores measure the budget as much as the model. Raise `max_new_tokens` "
            "under `eval:` in the experiment YAML.")


def _row_means(values: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # a seed without any scored row is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=1)


def _total(values) -> int | None:
    vals = [v for v in values if v is not None]
    return sum(vals) if vals else None


def _sum_dicts(dicts) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return {k: round(v, 1) for k, v in out.items()}


# ----------------------------------------------------------------------------- plots


def _panels(plt: Any, n: int) -> tuple[Any, list[Any]]:
    """A figure of `n` panels, at most three a row, and their axes in order."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _side_metrics(summary: dict[str, Any]) -> list[str]:
    """Each general set's leakage and drift: what the plots set against the task metric."""
    return [m for m in summary["general"] if base_metric(m) in ("leakage", "drift_kl")]


def _direction(summary: dict[str, Any], m: str) -> str:
    return f"{label(m)}: {'higher' if summary['higher_is_better'].get(m, True) else 'lower'} is better"


def _plots(runs: list[ModelResult], summary: dict[str, Any], folder: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, Path]] = []

    def save(fig, name: str, title: str) -> None:
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append((title, path))

    primary = summary["primary"]
    axes_metrics = _side_metrics(summary)
    if primary in summary["metrics"] and axes_metrics:
        fig, axes = _panels(plt, len(axes_metrics))
        for ax, x_metric in zip(axes, axes_metrics, strict=True):
            for i, (name, a) in enumerate(summary["arms"].items()):
                scale = [100 if is_pct(m) else 1 for m in (x_metric, primary)]
                (x, xlo, xhi), (y, ylo, yhi) = ([v * k for v in a["metrics"][m]]
                                                for m, k in zip((x_metric, primary), scale, strict=True))
                color = f"C{i}"
                ax.errorbar([x], [y], xerr=[[x - xlo], [xhi - x]], yerr=[[y - ylo], [yhi - y]], fmt="o",
                            color=color, capsize=3, label=name if a["ratio"] is None else f"{name} ({a['ratio']:g})")
                seeds = list(zip(a["per_seed"][x_metric], a["per_seed"][primary], strict=True))
                ax.scatter([sx * scale[0] for sx, sy in seeds if sx is not None and sy is not None],
                           [sy * scale[1] for sx, sy in seeds if sx is not None and sy is not None],
                           s=12, color=color, alpha=0.45, marker="x")
            ax.set_xlabel(f"{label(x_metric)}: lower is better")
            ax.set_ylabel(f"{label(primary)}: higher is better")
        axes[0].legend(fontsize=7)
        fig.suptitle("mean with 95% interval per arm; x: one seed", fontsize=8)
        save(fig, "tradeoff.png", "Task metric against format leakage and drift")

    costed = {n: a for n, a in summary["arms"].items() if a["compute"]}
    y_metrics = [m for m in summary["metrics"] if m == primary or base_metric(m) == "leakage"]
    if costed and y_metrics:
        fig, axes = _panels(plt, len(y_metrics))
        for ax, m in zip(axes, y_metrics, strict=True):
            k = 100 if is_pct(m) else 1
            for i, (name, a) in enumerate(costed.items()):
                y, lo, hi = (v * k for v in a["metrics"][m])
                ax.errorbar([a["compute"]["flops"]], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=f"C{i}",
                            capsize=3, label=f"{name} ({a['kind']}, {a['ratio']:g})")
            ax.set_xscale("log")
            ax.set_xlabel("estimated FLOPs per seed (sampling share + training)")
            ax.set_ylabel(_direction(summary, m))
        axes[0].legend(fontsize=7)
        save(fig, "compute.png", "Task metric and leakage against compute")

    dose = [m for m in (primary, *_side_metrics(summary)) if m in summary["metrics"]]
    if summary["sweeps"] and dose:
        fig, axes = _panels(plt, len(dose))
        start = summary["arms"].get(summary["baseline"] or "")
        start = [start] if start is not None and start["ratio"] == 0 else []  # plain SFT is every sweep's ratio 0
        ratios = sorted({0.0} | {summary["arms"][n]["ratio"] for names in summary["sweeps"].values() for n in names})
        for ax, m in zip(axes, dose, strict=True):
            k = 100 if is_pct(m) else 1
            for i, (sweep, names) in enumerate(summary["sweeps"].items()):
                points = start + [summary["arms"][n] for n in names]
                x = np.array([p["ratio"] for p in points])
                y, lo, hi = (np.array([p["metrics"][m][j] * k for p in points]) for j in range(3))
                ax.errorbar(x, y, yerr=np.clip([y - lo, hi - y], 0, None), marker="o", capsize=3, color=f"C{i}",
                            label=sweep)
            ax.set_xscale("symlog", linthresh=ratios[1])  # ratios grow by factors, from 0
            ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
            ax.set_xlabel("diverse rows per task row" + (f" (0 = {summary['baseline']})" if start else ""))
            ax.set_ylabel(_direction(summary, m))
        axes[0].legend(fontsize=7)
        fig.suptitle("mean with 95% interval per swept arm", fontsize=8)
        save(fig, "dose_response.png", DOSE_RESPONSE)

    trained = {n: a for n, a in summary["arms"].items() if a["ratio"] is not None and not a["of"]}  # not scaled
    if trained:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for m in summary["task"]:
            pts = sorted((a["ratio"], *a["metrics"][m]) for a in trained.values())
            x = np.array([p[0] for p in pts])
            y, lo, hi = (np.array([p[i] for p in pts]) for i in (1, 2, 3))
            ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=m)
        ax.set_xlabel("diverse rows per task row (0 = plain SFT)")
        ax.set_ylabel("score (95% interval)")
        ax.legend(fontsize=8)
        save(fig, "metric_vs_ratio.png", "Metric against mixing ratio")

    for title, fname, key in (("Training loss", "train_loss.png", "loss"),
                              ("Important-token loss", "important_token_loss.png", "important")):
        series = [(r, _history(r, key)) for r in runs if r.train_dir is not None]
        series = [(r, h) for r, h in series if h]
        if series:
            fig, ax = plt.subplots(figsize=(6, 3.6))
            for r, h in series:
                ax.plot([p[0] for p in h], [p[1] for p in h], label=f"{r.arm} s{r.seed}", alpha=0.8)
            ax.set_xlabel("step")
            ax.set_ylabel(title.lower())
            ax.legend(fontsize=7)
            save(fig, fname, title)

    probed = [r for r in runs if r.probe]
    if probed:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for r in probed:
            for token, layers in _probe_layers(r.probe).items():
                ax.plot(range(len(layers)), layers, marker=".", label=f"{r.arm} s{r.seed} {token}")
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine(token, description)")
        ax.legend(fontsize=7)
        save(fig, "alignment.png", "New-token alignment per layer")
    return made


def _history(run: ModelResult, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs from a train folder: the trainer's loss log or the important-token loss JSONL."""
    assert run.train_dir is not None
    path = run.train_dir / (TRAINER_LOG if key == "loss" else IMPORTANT_LOSS_FILE)
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and "step" in r]


def _probe_layers(probe: dict[str, Any]) -> dict[str, list[float]]:
    """token -> per-layer cosine between the token's hidden state and its spelled-out description's."""
    return {tok: entry["cosine_last"] for tok, entry in probe.get("tokens", {}).items()}


# ----------------------------------------------------------------------------- rendering


PCT_SUFFIXES = ("accuracy", "rate", "match", "contains", "leakage", "obey", TRUNCATED)
HEADLINE_GENERAL = ("leakage", "drift_kl", "contrast_obey")  # what the verdict shows of general behaviour
EXAMPLES = 3  # general prompts shown with every arm's answer
EXAMPLE_CHARS = 240
DOSE_RESPONSE = "Dose-response: task metric, leakage and drift against ratio"


def is_pct(metric: str) -> bool:
    """Shares (shown in percent), as opposed to chrF points, nats or other units."""
    return base_metric(metric).endswith(PCT_SUFFIXES)


def fmt(v: float | None, metric: str, sign: bool = False) -> str:
    """A metric value in its display unit: percent for shares, 3 decimals for KL, 2 otherwise."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    text = f"{100 * v:.1f}" if is_pct(metric) else f"{v:.3f}" if "kl" in base_metric(metric) else f"{v:.2f}"
    return f"+{text}" if sign and v >= 0 else text


def interval(triple: tuple[float, float, float], metric: str, sign: bool = False) -> str:
    mean, lo, hi = triple
    return f"{fmt(mean, metric, sign)} [{fmt(lo, metric, sign)}, {fmt(hi, metric, sign)}]"


def label(metric: str) -> str:
    """A column heading: the metric, its unit, and its direction for general behaviour."""
    unit = " (%)" if is_pct(metric) else ""
    return f"{metric}{unit}"


def headline(summary: dict[str, Any]) -> list[str]:
    """The metrics the verdict shows: the task's, then each general set's leakage and drift, and contrast, where
    measured."""
    return summary["task"] + [m for m in summary["general"] if base_metric(m) in HEADLINE_GENERAL]


def _judge(delta: tuple[float, float, float], higher: bool) -> str:
    _, lo, hi = delta
    if lo <= 0 <= hi:
        return "no clear difference"
    up = lo > 0
    return f"{'higher' if up else 'lower'} ({'better' if up == higher else 'worse'})"


def verdict(summary: dict[str, Any]) -> list[str]:
    """One sentence per arm against the baseline: each headline metric's paired delta, and what it means."""
    base = summary.get("baseline")
    lines = []
    for name, a in summary["arms"].items():
        if name == base or not a["delta"]:
            continue
        parts = []
        for m in headline(summary):
            if m in a["delta"]:
                d = a["delta"][m]
                unit = " points" if is_pct(m) else ""
                parts.append(f"{m} {interval(d, m, sign=True)}{unit}, "
                             f"{_judge(d, summary['higher_is_better'].get(m, True))}")
        ratio = "" if a["ratio"] is None else f" (ratio {a['ratio']:g})"
        lines.append(f"{name}{ratio} against {base}: " + "; ".join(parts) + ".")
    return lines


def dose_response(summary: dict[str, Any]) -> list[str]:
    """One sentence per sweep: for each general set, the smallest swept ratio whose leakage is clearly below the
    baseline's (the paired 95% interval of the difference lies below 0), or that none is. The smallest, not a
    threshold: a larger ratio may be unclear again, which the dose-response figure shows."""
    base = summary.get("baseline")
    leakage = [m for m in summary["general"] if base_metric(m) == "leakage"]
    lines = []
    for sweep, names in summary["sweeps"].items():
        arms = [summary["arms"][n] for n in names]
        parts = []
        for m in leakage:
            compared = [a for a in arms if m in a["delta"]]
            if not compared:
                continue
            first = next((a for a in compared if a["delta"][m][2] < 0), None)
            unit = " points" if is_pct(m) else ""
            parts.append(f"{m} is first clearly below {base}'s at ratio {first['ratio']:g} "
                         f"(Δ {interval(first['delta'][m], m, sign=True)}{unit})" if first else
                         f"{m} is clearly below {base}'s at none of them")
        if parts:
            ratios = ", ".join(f"{a['ratio']:g}" for a in arms)
            lines.append(f"Sweep {sweep} (ratios {ratios}): " + "; ".join(parts) + ".")
    return lines


def truncation_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(head, rows): each arm's share of task answers cut at max_new_tokens and its task metrics on the answers
    that ended; no rows where the eval rows do not say how they ended."""
    head = ["arm", f"cut at {summary['max_new_tokens']} tokens (%)",
            *(f"{label(m)}, answers that ended" for m in summary["task"])]
    rows = [[name, interval(a[TRUNCATED], TRUNCATED), *(interval(a["finished"][m], m) for m in summary["task"])]
            for name, a in summary["arms"].items() if TRUNCATED in a]
    return head, rows


def kind_tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(leakage metric, head, rows) per general set whose prompts have kinds: each arm's leakage by kind of
    prompt, in percent with (leaked / answers) over all its seeds."""
    tables = []
    for m in (m for m in summary["general"] if base_metric(m) == "leakage"):
        by_arm = {name: a["leakage_by_kind"][m] for name, a in summary["arms"].items()
                  if m in a.get("leakage_by_kind", {})}
        kinds = list(dict.fromkeys(k for kinds in by_arm.values() for k in kinds))
        if kinds:
            tables.append((m, ["arm", *kinds], [
                [name, *(f"{100 * c[k]['share']:.1f} ({c[k]['leaked']}/{c[k]['n']})" if k in c else "–"
                         for k in kinds)] for name, c in by_arm.items()]))
    return tables


def verdict_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(head, rows): every arm's headline metrics with intervals, the base model's row included."""
    metrics = headline(summary)
    head = ["arm", "ratio", *(label(m) for m in metrics)]
    rows = [[name, "–" if a["ratio"] is None else f"{a['ratio']:g}", *(interval(a["metrics"][m], m) for m in metrics)]
            for name, a in summary["arms"].items()]
    return head, rows


def _results_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    metrics = summary["metrics"]
    head = ["arm", "ratio", "seeds"]
    for m in metrics:
        head += [label(m), f"Δ {m}"]
    head += ["trained tokens", "wall s"]
    rows = []
    for name, a in summary["arms"].items():
        seeds = ",".join(str(s) for s in a["seeds"] if s is not None)
        row = [name, "–" if a["ratio"] is None else f"{a['ratio']:g}", seeds]
        for m in metrics:
            row.append(interval(a["metrics"][m], m))
            row.append(interval(a["delta"][m], m, sign=True) if m in a["delta"] else "–")
        row.append("–" if a["trained_tokens"] is None else f"{a['trained_tokens']:,}")
        row.append(f"{sum(a['wall_s'].values()):.0f}" if a["wall_s"] else "–")
        rows.append(row)
    return head, rows


def examples(runs: list[ModelResult], general_set: str | None = None,
             k: int = EXAMPLES) -> list[tuple[str, list[tuple[str, str, bool | None]]]]:
    """The first `k` prompts of a general set (None: the single one) with the answer of the base model and of
    each arm's first seed: [(prompt, [(arm, answer, leaked)])]. A collapse into the task's format shows here at
    a glance."""
    file = general_rows_file(general_set)
    shown: dict[str, ModelResult] = {}
    for r in sorted(runs, key=lambda r: -1 if r.seed is None else r.seed):
        if (r.eval_dir / file).exists():
            shown.setdefault(r.arm, r)
    if not shown:
        return []
    answers = {arm: [json.loads(line) for line in (r.eval_dir / file).read_text(encoding="utf-8")
                     .splitlines()[:k]] for arm, r in shown.items()}
    first = next(iter(answers.values()))
    out = []
    for i, row in enumerate(first):
        prompt = next((m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"), "")
        out.append((prompt, [(arm, rows[i]["output"], rows[i]["scores"].get("leak")) for arm, rows in answers.items()
                             if i < len(rows)]))
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


# ("h2", text) | ("p", text) | ("table", head, rows) | ("img", title, path) | ("ul", items) | ("pre", text)
Block = tuple


def _markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {title}", ""]
    for kind, *rest in blocks:
        if kind == "h2":
            out += [f"## {rest[0]}", ""]
        elif kind == "p":
            out += [rest[0], ""]
        elif kind == "table":
            head, rows = rest
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows] + [""]
        elif kind == "img":
            out += [f"![{rest[0]}]({rest[1].name})", ""]
        elif kind == "ul":
            out += [f"- {item}" for item in rest[0]] + [""]
        elif kind == "pre":
            out += ["```json", rest[0], "```", ""]
    return "\n".join(out)


def _html(title: str, blocks: list[Block]) -> str:
    esc = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{esc(title)}</title>",
           "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;"
           "vertical-align:top}td:first-child{text-align:left}td.text{text-align:left;max-width:28em}"
           "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for kind, *rest in blocks:
        if kind == "h2":
            out.append(f"<h2>{esc(rest[0])}</h2>")
        elif kind == "p":
            out.append(f"<p>{esc(rest[0])}</p>")
        elif kind == "table":
            head, rows = rest
            out.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td{' class=text' if len(c) > 40 else ''}>{esc(c)}</td>" for c in r) + "</tr>"
                    for r in rows]
            out.append("</table>")
        elif kind == "img":
            data = base64.b64encode(rest[1].read_bytes()).decode()
            out.append(f"<img alt='{esc(rest[0])}' src='data:image/png;base64,{data}'>")
        elif kind == "ul":
            out += ["<ul>", *(f"<li>{esc(item)}</li>" for item in rest[0]), "</ul>"]
        elif kind == "pre":
            out.append(f"<pre>{esc(rest[0])}</pre>")
    return "\n".join(out + ["</body></html>"])


def compute_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(head, rows): what one seed of each arm cost, in tokens and estimated FLOPs (delia.compute), and wall time."""
    head = ["arm", "kind", "ratio", "sampled queries", "generated tokens", "trained tokens", "forward-only tokens",
            "TFLOPs", "wall s", "planned s"]
    rows = []
    for name, a in summary["arms"].items():
        c = a["compute"]
        if not c:
            continue
        wall = sum(a["wall_s"].get(k, 0.0) for k in ("sample", "mix", "train")) / max(1, len(a["seeds"]))
        rows.append([name, str(a["kind"]), f"{a['ratio']:g}", f"{c['sampled_queries']:,.0f}",
                     f"{c['generated_tokens']:,.0f}", f"{c['trained_tokens']:,.0f}", f"{c['forward_only_tokens']:,.0f}",
                     f"{c['flops'] / 1e12:,.1f}", f"{wall:,.0f}",
                     f"{c['est_wall_s']:,.0f}" if "est_wall_s" in c else "–"])
    return head, rows


def _pool_blocks(pool: PoolFacts) -> list[Block]:
    """The pool that `delia pool` built for the run: rows per cleaning step, decontamination, coverage."""
    sel = pool.selection
    shares = ", ".join(f"{s} {v['share']:.0%}" for s, v in sel["per_source"].items())
    coverage = (f" Selected for diversity from {sel['clusters_covered']} of {sel['clusters']} clusters."
                if "clusters" in sel else "")
    return [("h2", "Pool"),
            ("p", f"Built by `delia pool` from {len(pool.sources)} source(s): {pool.rows_read} rows read, "
             f"{pool.rows} kept; {pool.decontaminated} removed for overlapping the task's train or eval "
             f"prompts (decontamination).{coverage} Rows per source: {shares}."),
            ("table", ["step", "rows removed"], [[k, str(v)] for k, v in pool.steps.items()])]


def _coverage_blocks(record: dict[str, Any]) -> list[Block]:
    """How well the diverse rows' queries cover each general set and the task's prompts (`coverage:`)."""
    from delia.coverage import coverage_lines

    files = record["files"]
    some = next(iter(files.values()))
    scale = ("the pool's own typical nearest similarity" if some["threshold_from"] == "pool median"
             else "the given threshold")
    rows = [[name, str(f["prompts"]), f"{f['nearest']['p50']:.2f}", f"{f['nearest']['p10']:.2f}–"
             f"{f['nearest']['p90']:.2f}", f"{f['below_share']:.0%} (< {f['threshold']:.2f})"]
            for name, f in files.items()]
    return [("h2", "Pool coverage"),
            ("p", f"Each prompt's cosine similarity to its nearest query among the {some['pool_queries']} diverse "
             f"rows' queries, in the model's embedding space (`delia coverage`). Below: the share under {scale}. "
             "A set with a low median holds prompts unlike any the diverse rows show the model: there the task's "
             "format is the likelier to leak. Least covered first:"),
            ("ul", coverage_lines(record)),
            ("table", ["prompt set", "prompts", "median", "p10–p90", "below"], rows)]


def _rewrite_blocks(rewrite: RewriteFacts) -> list[Block]:
    """How many task rows the arms with `rewrite` (SDFT) trained on as the model rewrote them."""
    others = ", ".join(f"{reason.replace('_', ' ')} {n}" for reason, n in rewrite.reasons.items()
                       if n and reason != "kept")
    return [("h2", "Self-distilled task rows"),
            ("p", f"The arms with `rewrite` (kind sdft) trained on the task rows as the model rewrote them, shown the "
             f"reference (`delia rewrite`): {rewrite.kept} of {rewrite.rows} rewrites kept "
             f"({rewrite.kept_share:.0%}); the other rows keep their reference"
             + (f" ({others})." if others else "."))]


def write_report(folder: Path, title: str, runs: list[ModelResult], baseline: str | None,
                 manifest: dict[str, Any], n_boot: int = 2000) -> tuple[Path, Path, dict[str, Any]]:
    """Write report.md, report.html and summary.json into `folder`; returns their paths and the summary.

    The report answers the question first: a verdict (task metric, leakage and drift of every arm against
    the baseline, with intervals), the trade-off plot, example general answers of every arm side by side;
    then every metric, the other plots and the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs, baseline, n_boot)
    plots = dict((t, p) for t, p in _plots(runs, summary, folder))
    interval_note = (f"Means over seeds and rows; [95% interval] from {n_boot} bootstrap resamples of seeds, then "
                     f"rows. Δ: paired difference to the baseline arm `{baseline}` (same seeds, same rows).")
    blocks: list[Block] = [("h2", "Verdict")]
    sets = summary["general_sets"]
    prompts = (f"{summary['general_prompts']} held-out general prompts" if not sets else
               "the held-out general prompt sets " + ", ".join(f"{n} ({k} prompts)" for n, k in sets.items())
               + " (a set's metrics are named `<set>/<metric>`)")
    if summary["general"]:
        blocks.append(("p", f"Task: {', '.join(summary['task'])} on the task's eval set (higher is better). General "
                       f"behaviour on {prompts}: leakage is the share of answers in the task's format, drift_kl "
                       "the mean per-token KL(base || tuned) on the base model's own greedy answers (nats); lower is "
                       "better for both. " + interval_note))
    else:
        blocks.append(("p", "No general prompts were evaluated (set `general` in the experiment): this report "
                       "shows the task score only, not what tuning did to everything else. " + interval_note))
    for warning in summary["warnings"]:
        log.warning("%s", warning)
        blocks.append(("p", f"Warning: {warning}"))
    blocks.append(("table", *verdict_table(summary)))
    if lines := verdict(summary):
        blocks.append(("ul", lines))
    if points := front_points(summary):
        entries = pareto(points)
        blocks += [("h2", "Pareto front"), ("p", RULE + " The front is taken over means over seeds; an arm is "
                    "dominated when another is at least as good on every axis and better on one."),
                   ("ul", front_lines(summary)),
                   ("img", "front", plot_front(points, entries, folder / "front.png",
                                               task_label=label(summary["primary"]), leakage_label=label("leakage"),
                                               drift_label="drift_kl", task_pct=is_pct(summary["primary"]),
                                               leakage_pct=True))]
    if "Task metric against format leakage and drift" in plots:
        blocks += [("h2", "Trade-off"), ("img", "trade-off", plots.pop("Task metric against format leakage and drift"))]
    if DOSE_RESPONSE in plots:
        blocks += [("h2", "Dose-response"),
                   ("p", "Each sweep's arms by ratio, the baseline at ratio 0 where it is plain SFT. Per sweep and "
                    "general set: the smallest ratio whose leakage is clearly below the baseline's (paired 95% "
                    "interval of the difference below 0).")]
        if lines := dose_response(summary):
            blocks.append(("ul", lines))
        blocks.append(("img", "dose-response", plots.pop(DOSE_RESPONSE)))
    if tables := kind_tables(summary):
        blocks += [("h2", "Leakage by kind of prompt"),
                   ("p", "Share of answers in the task's format per kind of general prompt (the rows' `kind`), "
                    "in percent, with (leaked / answers) over all seeds.")]
        for m, head, rows in tables:
            blocks += ([("p", f"{m}:")] if base_metric(m) != m else []) + [("table", head, rows)]
    first_set = next(iter(sets), None)
    if shown := examples(runs, first_set):
        blocks += [("h2", "Example general answers"),
                   ("p", f"The first {len(shown)} general prompts" + (f" of set {first_set}" if first_set else "")
                    + ", answered by the base model and the first seed of every arm (greedy; leak: the answer is "
                    "in the task's format).")]
        for i, (prompt, answers) in enumerate(shown, start=1):
            blocks += [("p", f"Prompt {i}: {shorten(prompt, EXAMPLE_CHARS)}"),
                       ("table", ["arm", "answer", "leak"],
                        [[arm, shorten(text, EXAMPLE_CHARS) or "(empty)",
                          "–" if leak is None else "yes" if leak else "no"]
                         for arm, text, leak in answers])]
    if (truncation := truncation_table(summary))[1]:
        blocks += [("h2", "Truncated answers"),
                   ("p", f"Share of each model's task answers cut at the eval's max_new_tokens "
                    f"({summary['max_new_tokens']}) before they ended, and the task metrics on the answers that "
                    "ended. A cut answer of a formatted task rarely parses, so where the shares differ, the scores "
                    "compare budgets as well as models.")]
        blocks.append(("table", *truncation))
    if (compute := compute_table(summary))[1]:
        blocks += [("h2", "Compute"),
                   ("p", "Per seed (mean over seeds). Sampling counts the share of the sampling run whose answers the "
                    "arm mixed in; FLOPs are estimated from tokens (delia.compute: 2 forwards per trained token, 1 "
                    "per forward-only, prompt or generated token); wall: that sampling share, mixing and training, "
                    "measured, and as `delia run --plan` estimated it before the run. A scaled arm trains nothing: "
                    "its compute is the training of the arm it scales (`of`), with no further FLOPs.")]
        blocks.append(("table", *compute))
        if "Task metric and leakage against compute" in plots:
            blocks.append(("img", "compute", plots.pop("Task metric and leakage against compute")))
    costs = "; ".join(f"{n}: " + ", ".join(f"{stage} {s:.0f}" for stage, s in a["wall_s"].items())
                      for n, a in summary["arms"].items())
    blocks += [("h2", "All metrics"), ("table", *_results_table(summary)),
               ("p", f"Primary task metric: {summary['primary']}. Wall time per arm and stage, all seeds (s): "
                f"{costs}.")]
    for t, p in plots.items():
        blocks += [("h2", t), ("img", t, p)]
    alignment = [f"{r.arm}" + ("" if r.seed is None else f" seed {r.seed}") + ": " + "; ".join(
        f"{tok}: mean cosine {np.mean(v):.3f}, last layer {v[-1]:.3f}" for tok, v in _probe_layers(r.probe).items())
        for r in runs if r.probe]
    if alignment:
        blocks += [("h2", "New-token alignment"), ("ul", alignment)]
    if pool := manifest.get("pool"):
        blocks += _pool_blocks(PoolFacts.model_validate(pool))
    if rewrite := manifest.get("rewrite"):
        blocks += _rewrite_blocks(RewriteFacts.model_validate(rewrite))
    if coverage := manifest.get("coverage"):
        blocks += _coverage_blocks(coverage)
    blocks += [("h2", "Manifest"), ("pre", json.dumps(manifest, indent=2, default=str))]

    md_path, html_path = folder / "report.md", folder / "report.html"
    with atomic_writer(md_path) as fh:
        fh.write(_markdown(title, blocks))
    with atomic_writer(html_path) as fh:
        fh.write(_html(title, blocks))
    with atomic_writer(folder / "summary.json") as fh:
        json.dump(summary, fh, indent=2)
    return md_path, html_path, summary


# ----------------------------------------------------------------------------- the Pareto front's inputs


def task_gaps(rows: Mapping[str, np.ndarray], seeds: Mapping[str, Sequence[int | None]],
              n_boot: int = 2000) -> dict[str, tuple[float, float] | None]:
    """Per arm: the paired 95% interval of its task metric minus the best arm's, from (seeds x rows) score matrices
    (`bootstrap_delta`); the best arm's is (0, 0); None where the seeds differ from the best's (no
    pairing) or no row was scored. The best is the highest mean, as `recommend` takes it."""
    means = {}
    for name, m in rows.items():
        m = np.asarray(m, dtype=float)
        if m.size and not np.isnan(m).all():
            means[name] = float(np.nanmean(m))
    if not means:
        return dict.fromkeys(rows)
    best = max(means, key=means.__getitem__)
    out: dict[str, tuple[float, float] | None] = {}
    for name, m in rows.items():
        m, b = np.asarray(m, dtype=float), np.asarray(rows[best], dtype=float)
        if name == best:
            out[name] = (0.0, 0.0)
        elif name in means and list(seeds[name]) == list(seeds[best]) and m.shape == b.shape:
            _, lo, hi = bootstrap_delta(m, b, n_boot)
            out[name] = None if np.isnan(lo) or np.isnan(hi) else (lo, hi)
        else:
            out[name] = None
    return out


def _mean_of(arm: dict[str, Any], metrics: list[str]) -> float | None:
    values = [arm["metrics"][m][0] for m in metrics if m in arm["metrics"]]
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


def front_points(summary: dict[str, Any]) -> list[ArmPoint]:
    """ArmPoints from `summarise`'s summary: task the primary metric's mean; leakage and drift the mean
    over general sets of `leakage` / `drift_kl` (each set weighs the same); contrast `contrast_obey`; compute the
    FLOPs of one seed, 0 for the untuned base (it costs no tuning). Arms without leakage or drift (no general set
    evaluated) are left out: the front needs both. Each arm's task gap to the best is the summary's `task_gap`."""
    general, gaps = summary.get("general", []), summary.get("task_gap") or {}
    leak = [m for m in general if base_metric(m) == "leakage"]
    drift = [m for m in general if base_metric(m) == "drift_kl"]
    contrast = [m for m in general if base_metric(m) == "contrast_obey"]
    costed = any(a.get("compute") for a in summary["arms"].values())
    points = []
    for name, a in summary["arms"].items():
        leakage, drift_v = _mean_of(a, leak), _mean_of(a, drift)
        if leakage is None or drift_v is None:
            continue
        untuned = a.get("kind") is None and a.get("seeds") == [None]
        compute = (a["compute"]["flops"] if a.get("compute") else 0.0 if untuned and costed else None)
        points.append(ArmPoint(name, _mean_of(a, [summary["primary"]]), leakage, drift_v,
                               contrast=_mean_of(a, contrast), compute=compute,
                               task_gap_ci=_gap(gaps.get(name))))
    return points


def front_lines(summary: dict[str, Any]) -> list[str]:
    """Which arms are on the Pareto front, which are dominated and by whom, and the arm `RULE` recommends."""
    points = front_points(summary)
    return front_sentences(pareto(points), recommend(points, summary_formatter(summary))) if points else []


def _gap(gap: Sequence[float] | None) -> tuple[float, float] | None:
    """A task gap as `front_points` takes it: summary.json holds it as a list."""
    return None if gap is None else (float(gap[0]), float(gap[1]))


def summary_formatter(summary: dict[str, Any]) -> Formatter:
    """Numbers in the report's units: a share in percent, KL to 3 decimals, compute in TFLOPs."""
    metric = {TASK: summary["primary"], LEAKAGE: "leakage", DRIFT: "drift_kl", CONTRAST: "contrast_obey"}

    def write(axis: str, value: float) -> str:
        if axis == COMPUTE:
            return f"{value / 1e12:,.1f} TFLOPs"
        return fmt(value, metric[axis]) + ("%" if is_pct(metric[axis]) else "")

    return write
