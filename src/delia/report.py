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
class RunResult:
    """One trained-and-evaluated model: an arm at a seed (or the untuned base model)."""

    arm: str
    ratio: float | None
    seed: int | None
    eval_dir: Path
    train_dir: Path | None = None
    trained_tokens: int | None = None
    wall_s: dict[str, float] = field(default_factory=dict)
    probe: dict[str, Any] | None = None


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
    """(scores.json, per-row values of each averaged metric) of one `delia eval` output folder."""
    summary = json.loads((eval_dir / "scores.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    per_row = {
        metric: [float("nan") if r["scores"].get(key) is None else float(r["scores"][key]) for r in rows]
        for metric, key in summary.get("row_means", {}).items()
    }
    return summary, per_row


def summarise(runs: list[RunResult], baseline: str | None, n_boot: int) -> dict[str, Any]:
    """Per arm and metric: mean with 95% interval, and the paired delta to the baseline arm."""
    arms: dict[str, list[RunResult]] = {}
    for r in runs:
        arms.setdefault(r.arm, []).append(r)
    loaded = {id(r): load_scores(r.eval_dir) for r in runs}  # each eval folder read once

    def matrix(group: list[RunResult], metric: str) -> np.ndarray:
        return np.array([loaded[id(r)][1][metric] for r in group], dtype=float)

    first = loaded[id(runs[0])][0]
    metrics = list(first.get("row_means", {}))
    out: dict[str, Any] = {"primary": first.get("primary"), "metrics": metrics, "arms": {}}
    for name, group in arms.items():
        group.sort(key=lambda r: -1 if r.seed is None else r.seed)
        entry: dict[str, Any] = {"ratio": group[0].ratio, "seeds": [r.seed for r in group], "metrics": {},
                                 "delta": {}, "trained_tokens": _total(r.trained_tokens for r in group),
                                 "wall_s": _sum_dicts(r.wall_s for r in group)}
        for m in metrics:
            entry["metrics"][m] = bootstrap_mean(matrix(group, m), n_boot)
            base = arms.get(baseline) if baseline else None
            if base is not None and name != baseline and [r.seed for r in base] == entry["seeds"]:
                entry["delta"][m] = bootstrap_delta(matrix(group, m), matrix(base, m), n_boot)
        out["arms"][name] = entry
    return out


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


def _plots(runs: list[RunResult], summary: dict[str, Any], folder: Path) -> list[tuple[str, Path]]:
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

    trained = {n: a for n, a in summary["arms"].items() if a["ratio"] is not None}
    if trained:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for m in summary["metrics"]:
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


def _history(run: RunResult, key: str) -> list[tuple[int, float]]:
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


def _fmt(v: float | None, pct: bool) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def _results_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    metrics = summary["metrics"]
    pct = {m: m.endswith(("accuracy", "rate", "match", "contains")) for m in metrics}
    head = ["arm", "ratio", "seeds"]
    for m in metrics:
        head += [f"{m}{' (%)' if pct[m] else ''}", f"Δ {m}"]
    head += ["trained tokens", "wall s"]
    rows = []
    for name, a in summary["arms"].items():
        seeds = ",".join(str(s) for s in a["seeds"] if s is not None)
        row = [name, "–" if a["ratio"] is None else f"{a['ratio']:g}", seeds]
        for m in metrics:
            mean, lo, hi = a["metrics"][m]
            row.append(f"{_fmt(mean, pct[m])} [{_fmt(lo, pct[m])}, {_fmt(hi, pct[m])}]")
            if m in a["delta"]:
                d, dlo, dhi = a["delta"][m]
                row.append(f"{'+' if d >= 0 else ''}{_fmt(d, pct[m])} [{_fmt(dlo, pct[m])}, {_fmt(dhi, pct[m])}]")
            else:
                row.append("–")
        row.append("–" if a["trained_tokens"] is None else f"{a['trained_tokens']:,}")
        row.append(f"{sum(a['wall_s'].values()):.0f}" if a["wall_s"] else "–")
        rows.append(row)
    return head, rows


def write_report(folder: Path, title: str, runs: list[RunResult], baseline: str | None,
                 manifest: dict[str, Any], n_boot: int = 2000) -> tuple[Path, Path, dict[str, Any]]:
    """Write report.md, report.html and summary.json into `folder`; returns their paths and the summary."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs, baseline, n_boot)
    plots = _plots(runs, summary, folder)
    head, rows = _results_table(summary)
    note = (f"Means over seeds and eval rows; [95% interval] from {n_boot} bootstrap resamples of seeds and rows. "
            f"Δ: paired difference to the baseline arm `{baseline}` (same seeds, same rows).")
    costs = "; ".join(f"{n}: " + ", ".join(f"{stage} {s:.0f}" for stage, s in a["wall_s"].items())
                      for n, a in summary["arms"].items())
    after_table = f"Primary metric: {summary['primary']}. Wall time per arm and stage, all seeds (s): {costs}."
    alignment = [f"{r.arm}" + ("" if r.seed is None else f" seed {r.seed}") + ": " + "; ".join(
        f"{tok}: mean cosine {np.mean(v):.3f}, last layer {v[-1]:.3f}" for tok, v in _probe_layers(r.probe).items())
        for r in runs if r.probe]
    manifest_text = json.dumps(manifest, indent=2, default=str)

    md = [f"# {title}", "", note, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", after_table, ""]
    for t, p in plots:
        md += [f"## {t}", "", f"![{t}]({p.name})", ""]
    if alignment:
        md += ["## New-token alignment", "", *(f"- {line}" for line in alignment), ""]
    md += ["## Manifest", "", "```json", manifest_text, "```", ""]

    esc = html.escape
    h = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{esc(title)}</title>",
         "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
         "td:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>",
         f"<h1>{esc(title)}</h1>", f"<p>{esc(note)}</p>", "<table><tr>"
         + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows]
    h += ["</table>", f"<p>{esc(after_table)}</p>"]
    for t, p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        h.append(f"<h2>{esc(t)}</h2><img alt='{esc(t)}' src='data:image/png;base64,{data}'>")
    if alignment:
        h += ["<h2>New-token alignment</h2><ul>", *(f"<li>{esc(line)}</li>" for line in alignment), "</ul>"]
    h += ["<h2>Manifest</h2>", f"<pre>{esc(manifest_text)}</pre></body></html>"]

    md_path, html_path = folder / "report.md", folder / "report.html"
    with atomic_writer(md_path) as fh:
        fh.write("\n".join(md))
    with atomic_writer(html_path) as fh:
        fh.write("\n".join(h))
    with atomic_writer(folder / "summary.json") as fh:
        json.dump(summary, fh, indent=2)
    return md_path, html_path, summary
