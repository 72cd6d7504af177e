import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from delia.files import write_json, write_jsonl
from delia.report import RunResult, bootstrap_delta, bootstrap_mean, summarise, write_report


def test_bootstrap_mean_interval_contains_mean_and_shrinks_with_data():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, size=(2, 20)).astype(float)
    large = rng.integers(0, 2, size=(2, 2000)).astype(float)
    m, lo, hi = bootstrap_mean(small, n=500)
    assert lo <= m <= hi
    assert m == pytest.approx(small.mean())
    _, llo, lhi = bootstrap_mean(large, n=500)
    assert (lhi - llo) < (hi - lo)


def test_bootstrap_constant_scores_have_zero_width():
    assert bootstrap_mean(np.ones((3, 10)), n=200) == (1.0, 1.0, 1.0)


def test_bootstrap_ignores_missing_rows():
    m, lo, hi = bootstrap_mean(np.array([[1.0, np.nan, 1.0, 0.0]]), n=200)
    assert m == pytest.approx(2 / 3)


def test_paired_delta_sees_a_consistent_gain_that_unpaired_noise_hides():
    rng = np.random.default_rng(0)
    base = rng.random((3, 200))
    better = base + 0.05  # same rows, every one a bit better
    d, lo, hi = bootstrap_delta(better, base, n=500)
    assert d == pytest.approx(0.05)
    assert lo == pytest.approx(0.05) and hi == pytest.approx(0.05)
    with pytest.raises(ValueError):
        bootstrap_delta(better[:, :10], base, n=10)


def _fake_eval(folder, values, metric="format_accuracy", key="format_ok"):
    folder.mkdir(parents=True)
    write_jsonl(folder / "predictions.jsonl", [{"id": str(i), "scores": {key: v}} for i, v in enumerate(values)])
    write_json(folder / "scores.json", {"primary": metric, "metrics": {metric: float(np.mean(values))},
                                        "row_means": {metric: key}})
    return folder


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.srcs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href")]


def test_report_files_are_well_formed_and_self_contained(tmp_path):
    runs = [RunResult("base", None, None, _fake_eval(tmp_path / "base", [0, 0, 1, 0]))]
    for seed in (0, 1):
        runs.append(RunResult("sft", 0.0, seed, _fake_eval(tmp_path / f"sft{seed}", [1, 0, 1, 0]),
                              trained_tokens=100, wall_s={"train": 2.0}))
        runs.append(RunResult("delia", 5.0, seed, _fake_eval(tmp_path / f"delia{seed}", [1, 1, 1, 0]),
                              trained_tokens=600, wall_s={"train": 9.0}))
    md, html, summary = write_report(tmp_path / "report", "t", runs, "sft", {"k": "v"}, n_boot=200)
    assert summary["arms"]["sft"]["metrics"]["format_accuracy"][0] == pytest.approx(0.5)
    assert summary["arms"]["delia"]["delta"]["format_accuracy"][0] == pytest.approx(0.25)
    assert "format_accuracy" not in summary["arms"]["sft"]["delta"]  # no delta to itself
    assert summary["arms"]["delia"]["trained_tokens"] == 1200
    text = md.read_text()
    assert "| delia | 5 | 0,1 | 75.0 [" in text and "+25.0" in text
    assert "![Metric against mixing ratio](metric_vs_ratio.png)" in text
    assert (tmp_path / "report" / "metric_vs_ratio.png").stat().st_size > 1000
    page = html.read_text()
    parser = _Collect()
    parser.feed(page)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert parser.srcs and all(s.startswith("data:image/png;base64,") for s in parser.srcs)
    assert not re.search(r"https?://", page)
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["primary"] == "format_accuracy"


def test_summarise_without_baseline_has_no_deltas(tmp_path):
    runs = [RunResult("a", 1.0, 0, _fake_eval(tmp_path / "a", [1, 0]))]
    s = summarise(runs, None, 100)
    assert s["arms"]["a"]["delta"] == {}
