"""The Pareto front over arms and one recommended arm, by a rule stated in advance.

Tuning trades the task metric against what it does to everything else (format leakage, drift from the base
model, obeying "do not use the format"), so no single number ranks the arms. The front says which arms no other
beats on every axis at once; the recommendation picks one by `RULE`, so that a report's choice is reproducible
and can be argued with, not a matter of taste. The base model's row takes part in both: "do not tune" is a real
option, on the front whenever nothing beats its leakage and drift (usually 0), and recommended only if no arm's
task metric is clearly above it.

The report turns its summary into `ArmPoint`s (`delia.report.front_points`); nothing here reads a report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASK, LEAKAGE, DRIFT, CONTRAST, COMPUTE = "task", "leakage", "drift", "contrast", "compute"
HIGHER_IS_BETTER = {TASK: True, LEAKAGE: False, DRIFT: False, CONTRAST: True, COMPUTE: False}
RULE = ("Recommended arm: of the arms whose task metric is not clearly below the best arm's (the paired 95% "
        "interval of its difference to the best arm includes 0 or, without such an interval, its task metric equals "
        "the best), the one with the lowest leakage, then the lowest drift, then the least compute, then the first "
        "by name; an arm without a task score is not recommended.")

Formatter = Callable[[str, float], str]  # (axis, value) -> text, e.g. percent for a share


def plain(axis: str, value: float) -> str:
    """Three significant digits: a neutral default, since this module does not know the metrics' units."""
    return f"{value:.3g}"


def _finite(value: float | None, what: str) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number or None, got {value}")


@dataclass(frozen=True)
class ArmPoint:
    """One arm (or the base model) as the front and the rule see it: means over seeds, one number per axis.

    `task_gap_ci` is the paired interval (low, high) of this arm's task metric minus the best arm's, over the same
    seeds and rows; None where they cannot be paired (other seeds) or were not computed. `contrast` is None
    without a contrast set, `task` None for a model without a task score, `compute` None where not counted."""

    name: str
    task: float | None
    leakage: float
    drift: float
    contrast: float | None = None
    compute: float | None = None
    task_gap_ci: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for axis in (TASK, LEAKAGE, DRIFT, CONTRAST, COMPUTE):
            _finite(getattr(self, axis), f"{self.name}'s {axis}")
        if self.task_gap_ci is not None:
            low, high = self.task_gap_ci
            _finite(low, f"{self.name}'s task_gap_ci")
            _finite(high, f"{self.name}'s task_gap_ci")
            if low > high:
                raise ValueError(f"{self.name}'s task_gap_ci {self.task_gap_ci}: low above high")


@dataclass(frozen=True)
class FrontEntry:
    """One arm's place: on the front, or dominated by the named arms (each at least as good on every axis in
    `axes` and strictly better on one)."""

    name: str
    on_front: bool
    dominated_by: tuple[str, ...]
    axes: tuple[str, ...]  # the axes compared, the same for every entry of one front


@dataclass(frozen=True)
class Recommendation:
    """The arm `RULE` picks, why (one sentence with the numbers), and which arms the task filter left out."""

    arm: str | None  # None: no arm has a task score
    reason: str
    best: str | None  # the arm with the highest task metric
    kept: tuple[str, ...]  # task metric not clearly below the best's
    excluded: tuple[str, ...]  # task metric clearly below the best's
    unscored: tuple[str, ...]  # no task score: neither kept nor recommended


def _unique(points: Sequence[ArmPoint]) -> None:
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")


def _axis_value(p: ArmPoint, axis: str) -> float:
    """The value on an axis, oriented so that larger is better; a missing task score is the worst of all."""
    v = getattr(p, axis)
    if v is None:
        return -math.inf
    return v if HIGHER_IS_BETTER[axis] else -v


def dominates(a: ArmPoint, b: ArmPoint, axes: Sequence[str]) -> bool:
    """`a` is at least as good as `b` on every axis and strictly better on one (identical points: neither)."""
    va, vb = [_axis_value(a, x) for x in axes], [_axis_value(b, x) for x in axes]
    return all(x >= y for x, y in zip(va, vb, strict=True)) and any(x > y for x, y in zip(va, vb, strict=True))


def front_axes(points: Sequence[ArmPoint]) -> tuple[str, ...]:
    """Task, leakage and drift; contrast only when every point has it, since a missing value cannot be compared
    without guessing it."""
    has_contrast = bool(points) and all(p.contrast is not None for p in points)
    return (TASK, LEAKAGE, DRIFT, CONTRAST) if has_contrast else (TASK, LEAKAGE, DRIFT)


def pareto(points: Sequence[ArmPoint]) -> list[FrontEntry]:
    """Each arm, in the given order: on the front, or dominated and by which arms. A point without a task score
    counts as the worst on the task axis, so it is on the front only where no other point matches it elsewhere."""
    _unique(points)
    axes = front_axes(points)
    entries = []
    for p in points:
        by = tuple(q.name for q in points if q is not p and dominates(q, p, axes))
        entries.append(FrontEntry(p.name, not by, by, axes))
    return entries


def _kept(p: ArmPoint, best: ArmPoint) -> bool:
    if p is best:
        return True
    assert p.task is not None and best.task is not None
    if p.task_gap_ci is not None:
        return p.task_gap_ci[1] >= 0
    return math.isclose(p.task, best.task, rel_tol=1e-9, abs_tol=1e-12)


def _tie_key(p: ArmPoint, axis: str) -> tuple[Any, ...]:
    if axis == COMPUTE:  # unknown compute is not assumed cheap
        return (p.compute is None, p.compute or 0.0)
    return (getattr(p, axis),)


def recommend(points: Sequence[ArmPoint], fmt: Formatter = plain) -> Recommendation:
    """The arm `RULE` picks. `fmt` writes the numbers of the reason (the report passes its units)."""
    _unique(points)
    scored = [p for p in points if p.task is not None]
    unscored = tuple(p.name for p in points if p.task is None)
    if not scored:
        return Recommendation(None, "No arm has a task score, so none is recommended.", None, (), (), unscored)
    best = max(scored, key=lambda p: p.task)  # the first of equal bests
    kept = [p for p in scored if _kept(p, best)]
    excluded = tuple(p.name for p in scored if p not in kept)
    pool, decided = kept, "name"
    ties: list[str] = []  # the axes the pick ties on before the one that decides
    for axis in (LEAKAGE, DRIFT, COMPUTE):
        low = min(_tie_key(p, axis) for p in pool)
        tied = [p for p in pool if _tie_key(p, axis) == low]
        if len(tied) == 1:
            pick, decided = tied[0], axis
            break
        ties.append(axis)
        pool = tied
    else:
        pick = min(pool, key=lambda p: p.name)
    reason = _reason(pick, best, kept, ties, decided, [p.name for p in pool if p is not pick], fmt)
    return Recommendation(pick.name, reason, best.name, tuple(p.name for p in kept), excluded, unscored)


def _value(p: ArmPoint, axis: str, fmt: Formatter) -> str:
    v = getattr(p, axis)
    return "unknown" if v is None else fmt(axis, v)


def _reason(pick: ArmPoint, best: ArmPoint, kept: list[ArmPoint], ties: list[str], decided: str,
            tied_with: list[str], fmt: Formatter) -> str:
    assert best.task is not None
    best_text = f"the best arm {best.name}'s ({fmt(TASK, best.task)})"
    if len(kept) == 1:
        return (f"{pick.name} has the highest task metric ({fmt(TASK, best.task)}) and every other scored arm's is "
                f"clearly below it; its leakage is {_value(pick, LEAKAGE, fmt)}, its drift {_value(pick, DRIFT, fmt)}.")
    among = ", ".join(p.name for p in kept)
    if decided == "name":
        values = ", ".join(f"{t} ({_value(pick, t, fmt)})" for t in ties)
        why = f"it ties with {', '.join(tied_with)} on {values} and comes first by name"
    else:
        superlative = {LEAKAGE: "the lowest leakage", DRIFT: "the lowest drift", COMPUTE: "the least compute"}[decided]
        why = f"it has {superlative} ({_value(pick, decided, fmt)})"
        if ties:
            tie_values = " and ".join(f"{t} ({_value(pick, t, fmt)})" for t in ties)
            why = (f"it ties with {', '.join(tied_with)} on {tie_values} and has {superlative} "
                   f"({_value(pick, decided, fmt)})")
    assert pick.task is not None
    if pick is best:
        task = f"its task metric {fmt(TASK, pick.task)} is the best"
    else:
        gap = ("" if pick.task_gap_ci is None else
               f", difference to {best.name} [{fmt(TASK, pick.task_gap_ci[0])}, {fmt(TASK, pick.task_gap_ci[1])}]")
        task = f"its task metric is {fmt(TASK, pick.task)}{gap}"
    rest = [f"{t} {_value(pick, t, fmt)}" for t in (LEAKAGE, DRIFT) if t != decided and t not in ties]
    return (f"Of {among}, whose task metric is not clearly below {best_text}, {pick.name} is picked because {why}; "
            f"{task}" + "".join(f", its {r}" for r in rest) + ".")


def front_sentences(entries: Sequence[FrontEntry], recommendation: Recommendation) -> list[str]:
    """Plain sentences for the terminal verdict and the report, no padding, so any width can wrap them."""
    if not entries:
        return ["No arms to compare."]
    axes = entries[0].axes
    up = [a for a in axes if HIGHER_IS_BETTER[a]]
    down = [a for a in axes if not HIGHER_IS_BETTER[a]]
    on = [e.name for e in entries if e.on_front]
    dominated = [f"{e.name} (by {', '.join(e.dominated_by)})" for e in entries if not e.on_front]
    lines = [f"On the front over {', '.join(up)} (higher is better) and {', '.join(down)} (lower is better): "
             f"{', '.join(on)}.",
             f"Dominated: {', '.join(dominated)}." if dominated else "Dominated: none."]
    r = recommendation
    lines.append(f"Recommended: {r.arm if r.arm is not None else 'none'} — {r.reason}")
    if r.excluded:
        lines.append(f"Left out for a task metric clearly below {r.best}'s: {', '.join(r.excluded)}.")
    if r.unscored:
        lines.append(f"Without a task score, not recommended: {', '.join(r.unscored)}.")
    return lines


def plot_front(points: Sequence[ArmPoint], entries: Sequence[FrontEntry], path: Path, *,
               task_label: str = "task", leakage_label: str = "leakage", drift_label: str = "drift",
               task_pct: bool = False, leakage_pct: bool = False) -> Path:
    """Task metric (y) against leakage (x), drift as colour, every arm named; the front as a staircase through its
    points by leakage. `*_pct` shows a share in percent, as the report's other figures do. Points without a task
    score cannot be placed and are named in the title instead. Writes a PNG; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    on = {e.name for e in entries if e.on_front}
    placed = [p for p in points if p.task is not None]
    ky, kx = (100 if task_pct else 1), (100 if leakage_pct else 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if placed:
        drifts = [p.drift for p in placed]
        norm = Normalize(min(drifts), max(drifts) if max(drifts) > min(drifts) else min(drifts) + 1)
        for front in (False, True):
            group = [p for p in placed if (p.name in on) == front]
            if group:
                ax.scatter([p.leakage * kx for p in group], [p.task * ky for p in group],
                           c=[p.drift for p in group], cmap="viridis", norm=norm, s=45 if front else 25,
                           edgecolors="black" if front else "none", alpha=1.0 if front else 0.6,
                           marker="o", zorder=3)
        for p in placed:
            ax.annotate(p.name, (p.leakage * kx, p.task * ky), textcoords="offset points",
                        xytext=(4, 3), fontsize=7)
        line = sorted((p.leakage * kx, p.task * ky) for p in placed if p.name in on)
        ax.plot([x for x, _ in line], [y for _, y in line], drawstyle="steps-post", color="grey", linestyle="--",
                linewidth=1, zorder=2, label="front")
        fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax,
                     label=f"{drift_label}: lower is better")
        ax.legend(fontsize=7)
    ax.set_xlabel(f"{leakage_label}: lower is better")
    ax.set_ylabel(f"{task_label}: higher is better")
    missing = [p.name for p in points if p.task is None]
    title = "Pareto front (outlined: on the front)" + (f"; no task score: {', '.join(missing)}" if missing else "")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

