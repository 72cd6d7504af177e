"""scripts/paired.py: the paired Δ of two arms from two run folders."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paired.py"


def _arm(run: Path, arm: str, seed: int, leaks: list[bool], kl: float) -> None:
    folder = run / "stages" / f"eval-{arm}-{seed}"
    folder.mkdir(parents=True)
    (folder / "stage.json").write_text(json.dumps({"stage": "eval", "label": f"{arm} seed {seed}"}))
    (folder / "general-qa.jsonl").write_text("".join(json.dumps({"scores": {"leak": leak, "kl": kl}}) + "\n"
                                                     for leak in leaks))


def test_paired_difference_over_the_seeds_both_runs_have(tmp_path):
    for seed in (0, 1):
        _arm(tmp_path / "a", "delia-1", seed, [True, True, False, False], 0.5)
        _arm(tmp_path / "b", "delia-1", seed, [False, False, False, False], 0.25)
    _arm(tmp_path / "b", "delia-1", 2, [True] * 4, 9.0)  # a seed only one run has: left out
    done = subprocess.run([sys.executable, str(SCRIPT), f"{tmp_path / 'a'}:delia-1", f"{tmp_path / 'b'}:delia-1"],
                          capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0].endswith("seeds 0, 1")
    assert lines[1].startswith("  general-qa leakage: 50.000 against 0.000; Δ +50.000 [")
    assert lines[2].startswith("  general-qa drift_kl: 0.500 against 0.250; Δ +0.250 [+0.250, +0.250]")


def test_an_arm_without_evals_is_named(tmp_path):
    _arm(tmp_path / "a", "sft", 0, [False], 0.0)
    done = subprocess.run([sys.executable, str(SCRIPT), f"{tmp_path / 'a'}:delia", f"{tmp_path / 'a'}:sft"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "no eval stage of arm 'delia'" in done.stderr
