"""Paired difference of two arms' general behaviour, each from its own run folder, over the seeds both have.

    python scripts/paired.py runs/shots-cpu:delia-1 runs/sweep-cpu:delia-1

Prints, per general set, each arm's leakage (%) and drift (nats) and the paired Δ (A - B: same seeds, same prompts)
with its 95% bootstrap interval, as `delia run`'s report computes it for arms of one run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from delia.report import bootstrap_delta, bootstrap_mean

METRICS = (("leakage", "leak", 100.0), ("drift_kl", "kl", 1.0))  # (name, score key, scale)


def eval_folders(run: Path, arm: str) -> dict[int, Path]:
    """Seed -> eval stage folder of `arm` in `run`."""
    found = {}
    for record in run.glob("stages/eval-*/stage.json"):
        label = json.loads(record.read_text())["label"]
        name, _, seed = label.rpartition(" seed ")
        if name == arm:
            found[int(seed)] = record.parent
    if not found:
        raise SystemExit(f"{run}: no eval stage of arm {arm!r}")
    return found


def scores(folders: dict[int, Path], seeds: list[int], general: str, key: str) -> np.ndarray:
    """(seeds x prompts) scores of one general set."""
    rows = [[json.loads(line)["scores"][key] for line in (folders[s] / general).read_text().splitlines()]
            for s in seeds]
    return np.array(rows, dtype=float)


def main(a: str, b: str) -> None:
    (run_a, arm_a), (run_b, arm_b) = (spec.rsplit(":", 1) for spec in (a, b))
    fa, fb = eval_folders(Path(run_a), arm_a), eval_folders(Path(run_b), arm_b)
    seeds = sorted(set(fa) & set(fb))
    print(f"{a} - {b}, seeds {', '.join(map(str, seeds))}")
    for general in sorted(p.name for p in fa[seeds[0]].glob("general*.jsonl")):
        for name, key, scale in METRICS:
            xa, xb = scores(fa, seeds, general, key) * scale, scores(fb, seeds, general, key) * scale
            delta, lo, hi = bootstrap_delta(xa, xb)
            print(f"  {general.removesuffix('.jsonl')} {name}: {bootstrap_mean(xa)[0]:.3f} against "
                  f"{bootstrap_mean(xb)[0]:.3f}; Δ {delta:+.3f} [{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
