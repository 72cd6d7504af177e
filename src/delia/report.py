"""The experiment report: a results table with bootstrap intervals, deltas to plain SFT, plots, costs, manifest.

Written twice from the same content: `report.md` (plots as PNG files beside it) and a self-contained
`report.html` (plots inlined as data URIs; no script, font or style is loaded from anywhere).
"""

from __future__ import annotations

import base64
import html
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from delia.files import atomic_writer


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
    kind: str | None = None  # the arm's kind (sft, delia, delia-kl, replay-reference); None for the base model
    compute: dict[str, float] | None = None  # tokens and estimated FLOPs (delia.compute.arm_cost)


# ----------------------------------------------------------------------------- statistics


def bootstrap_mean(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% interval of a (seeds x examples) score matrix, resampling seeds, then examples.

    NaN entries (a row without a score, e.g. an unparseable reference) are left out of each mean.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[None, :]
    mean = float(np.nanmean(values))
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


def load_scores(eval_dir: Path) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """(scores.json, per-row values of each averaged metric) of one `delia eval` output folder: the task's
    metrics from predictions.jsonl and, where evaluated, the general-behaviour and contrast metrics."""
    from delia.evaluate import CONTRAST_ROWS, GENERAL_ROWS, PREDICTIONS, SCORES

    summary = json.loads((eval_dir / SCORES).read_text(encoding="utf-8"))
    per_row: dict[str, list[float]] = {}
    for section, file in ((summary, PREDICTIONS), (summary.get("general"), GENERAL_ROWS),
                          (summary.get("contrast"), CONTRAST_ROWS)):
        if not section:
            continue
        rows = [json.loads(line) for line in (eval_dir / file).read_text(encoding="utf-8").splitlines()]
        per_row.update({
            metric: [float("nan") if r["scores"].get(key) is None else float(r["scores"][key]) for r in rows]
            for metric, key in section.get("row_means", {}).items()
        })
    return summary, per_row


def higher_is_better(summary: dict[str, Any]) -> dict[str, bool]:
    """Direction of every metric of a scores.json: task metrics are scores; general ones say their own."""
    out = dict.fromkeys(summary.get("row_means", {}), True)
    for section in ("general", "contrast"):
        out.update((summary.get(section) or {}).get("higher_is_better", {}))
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
    task = [m for m in first.get("row_means", {}) if m == first.get("primary") or m.startswith("label")]
    out: dict[str, Any] = {"primary": first.get("primary"), "metrics": metrics, "task": task,
                           "general": [m for m in metrics if m not in first.get("row_means", {})],
                           "higher_is_better": direction, "baseline": baseline,
                           "general_prompts": (first.get("general") or {}).get("n"), "arms": {}}
    for name, group in arms.items():
        group.sort(key=lambda r: -1 if r.seed is None else r.seed)
        costs = [r.compute for r in group if r.compute]
        entry: dict[str, Any] = {"ratio": group[0].ratio, "kind": group[0].kind, "seeds": [r.seed for r in group],
                                 "metrics": {}, "delta": {},
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
        out["arms"][name] = entry
    return out


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
    axes_metrics = [m for m in ("leakage", "drift_kl") if m in summary["general"]]
    if primary in summary["metrics"] and axes_metrics:
        fig, axes = plt.subplots(1, len(axes_metrics), figsize=(5 * len(axes_metrics), 3.8), squeeze=False)
        for ax, x_metric in zip(axes[0], axes_metrics, strict=True):
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
        axes[0][0].legend(fontsize=7)
        fig.suptitle("mean with 95% interval per arm; x: one seed", fontsize=8)
        save(fig, "tradeoff.png", "Task metric against format leakage and drift")

    costed = {n: a for n, a in summary["arms"].items() if a["compute"]}
    y_metrics = [m for m in (primary, "leakage") if m in summary["metrics"]]
    if costed and y_metrics:
        fig, axes = plt.subplots(1, len(y_metrics), figsize=(5 * len(y_metrics), 3.8), squeeze=False)
        for ax, m in zip(axes[0], y_metrics, strict=True):
            k = 100 if is_pct(m) else 1
            for i, (name, a) in enumerate(costed.items()):
                y, lo, hi = (v * k for v in a["metrics"][m])
                ax.errorbar([a["compute"]["flops"]], [y], yerr=[[y - lo], [hi - y]], fmt="o", color=f"C{i}",
                            capsize=3, label=f"{name} ({a['kind']}, {a['ratio']:g})")
            ax.set_xscale("log")
            ax.set_xlabel("estimated FLOPs per seed (sampling share + training)")
            ax.set_ylabel(f"{label(m)}: {'higher' if summary['higher_is_better'].get(m, True) else 'lower'} is better")
        axes[0][0].legend(fontsize=7)
        save(fig, "compute.png", "Task metric and leakage against compute")

    trained = {n: a for n, a in summary["arms"].items() if a["ratio"] is not None}
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
    from delia.important import IMPORTANT_LOSS_FILE
    from delia.train import TRAINER_LOG

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


PCT_SUFFIXES = ("accuracy", "rate", "match", "contains", "leakage", "obey")
HEADLINE_GENERAL = ("leakage", "drift_kl", "contrast_obey")  # what the verdict shows of general behaviour
EXAMPLES = 3  # general prompts shown with every arm's answer
EXAMPLE_CHARS = 240


def is_pct(metric: str) -> bool:
    """Shares (shown in percent), as opposed to chrF points, nats or other units."""
    return metric.endswith(PCT_SUFFIXES)


def fmt(v: float | None, metric: str, sign: bool = False) -> str:
    """A metric value in its display unit: percent for shares, 3 decimals for KL, 2 otherwise."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    text = f"{100 * v:.1f}" if is_pct(metric) else f"{v:.3f}" if "kl" in metric else f"{v:.2f}"
    return f"+{text}" if sign and v >= 0 else text


def interval(triple: tuple[float, float, float], metric: str, sign: bool = False) -> str:
    mean, lo, hi = triple
    return f"{fmt(mean, metric, sign)} [{fmt(lo, metric, sign)}, {fmt(hi, metric, sign)}]"


def label(metric: str) -> str:
    """A column heading: the metric, its unit, and its direction for general behaviour."""
    unit = " (%)" if is_pct(metric) else ""
    return f"{metric}{unit}"


def headline(summary: dict[str, Any]) -> list[str]:
    """The metrics the verdict shows: the task's, then leakage, drift and contrast where measured."""
    return summary["task"] + [m for m in HEADLINE_GENERAL if m in summary["general"]]


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


def examples(runs: list[ModelResult], k: int = EXAMPLES) -> list[tuple[str, list[tuple[str, str, bool | None]]]]:
    """The first `k` general prompts with the answer of the base model and of each arm's first seed:
    [(prompt, [(arm, answer, leaked)])]. A collapse into the task's format shows here at a glance."""
    from delia.evaluate import GENERAL_ROWS

    shown: dict[str, ModelResult] = {}
    for r in sorted(runs, key=lambda r: -1 if r.seed is None else r.seed):
        if (r.eval_dir / GENERAL_ROWS).exists():
            shown.setdefault(r.arm, r)
    if not shown:
        return []
    answers = {arm: [json.loads(line) for line in (r.eval_dir / GENERAL_ROWS).read_text(encoding="utf-8")
                     .splitlines()[:k]] for arm, r in shown.items()}
    first = next(iter(answers.values()))
    out = []
    for i, row in enumerate(first):
        prompt = next((m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"), "")
        out.append((prompt, [(arm, rows[i]["output"], rows[i]["scores"].get("leak")) for arm, rows in answers.items()
                             if i < len(rows)]))
    return out


def _short(text: str, n: int = EXAMPLE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


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


def _pool_blocks(pool: dict[str, Any]) -> list[Block]:
    """The pool that `delia pool` built for the run: rows per cleaning step, decontamination, coverage."""
    sel = pool["selection"]
    shares = ", ".join(f"{s} {v['share']:.0%}" for s, v in sel["per_source"].items())
    coverage = (f" Selected for diversity from {sel['clusters_covered']} of {sel['clusters']} clusters."
                if "clusters" in sel else "")
    return [("h2", "Pool"),
            ("p", f"Built by `delia pool` from {len(pool['sources'])} source(s): {pool['rows_read']} rows read, "
             f"{pool['rows']} kept; {pool['decontaminated']} removed for overlapping the task's train or eval "
             f"prompts (decontamination).{coverage} Rows per source: {shares}."),
            ("table", ["step", "rows removed"], [[k, str(v)] for k, v in pool["steps"].items()])]


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
    if summary["general"]:
        blocks.append(("p", f"Task: {', '.join(summary['task'])} on the task's eval set (higher is better). General "
                       f"behaviour on {summary['general_prompts']} held-out general prompts: leakage is the share "
                       "of answers in the task's format, drift_kl the mean per-token KL(base || tuned) on the base "
                       "model's own greedy answers (nats); lower is better for both. " + interval_note))
    else:
        blocks.append(("p", "No general prompts were evaluated (set `general` in the experiment): this report "
                       "shows the task score only, not what tuning did to everything else. " + interval_note))
    blocks.append(("table", *verdict_table(summary)))
    if lines := verdict(summary):
        blocks.append(("ul", lines))
    if "Task metric against format leakage and drift" in plots:
        blocks += [("h2", "Trade-off"), ("img", "trade-off", plots.pop("Task metric against format leakage and drift"))]
    if shown := examples(runs):
        blocks += [("h2", "Example general answers"),
                   ("p", f"The first {len(shown)} general prompts, answered by the base model and the first seed "
                    "of every arm (greedy; leak: the answer is in the task's format).")]
        for i, (prompt, answers) in enumerate(shown, start=1):
            blocks += [("p", f"Prompt {i}: {_short(prompt)}"),
                       ("table", ["arm", "answer", "leak"],
                        [[arm, _short(text) or "(empty)", "–" if leak is None else "yes" if leak else "no"]
                         for arm, text, leak in answers])]
    if (compute := compute_table(summary))[1]:
        blocks += [("h2", "Compute"),
                   ("p", "Per seed (mean over seeds). Sampling counts the share of the sampling run whose answers the "
                    "arm mixed in; FLOPs are estimated from tokens (delia.compute: 2 forwards per trained token, 1 "
                    "per forward-only, prompt or generated token); wall: that sampling share, mixing and training, "
                    "measured, and as `delia run --plan` estimated it before the run.")]
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
        blocks += _pool_blocks(pool)
    blocks += [("h2", "Manifest"), ("pre", json.dumps(manifest, indent=2, default=str))]

    md_path, html_path = folder / "report.md", folder / "report.html"
    with atomic_writer(md_path) as fh:
        fh.write(_markdown(title, blocks))
    with atomic_writer(html_path) as fh:
        fh.write(_html(title, blocks))
    with atomic_writer(folder / "summary.json") as fh:
        json.dump(summary, fh, indent=2)
    return md_path, html_path, summary
