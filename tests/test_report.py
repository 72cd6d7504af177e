import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from delia.files import write_json, write_jsonl
from delia.report import ModelResult, bootstrap_delta, bootstrap_mean, summarise, write_report


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


def _cost(trained: int) -> dict[str, float]:
    return {"sampled_queries": 0.0, "prompt_tokens": 0.0, "generated_tokens": 0.0, "sample_flops": 0.0,
            "trained_tokens": trained, "forward_only_tokens": 0, "train_flops": 1e9 * trained, "flops": 1e9 * trained}


def test_report_files_are_well_formed_and_self_contained(tmp_path):
    runs = [ModelResult("base", None, None, _fake_eval(tmp_path / "base", [0, 0, 1, 0]))]
    for seed in (0, 1):
        runs.append(ModelResult("sft", 0.0, seed, _fake_eval(tmp_path / f"sft{seed}", [1, 0, 1, 0]),
                              compute=_cost(100), wall_s={"train": 2.0}, kind="sft"))
        runs.append(ModelResult("delia", 5.0, seed, _fake_eval(tmp_path / f"delia{seed}", [1, 1, 1, 0]),
                              compute=_cost(600), wall_s={"train": 9.0}, kind="delia"))
    md, html, summary = write_report(tmp_path / "report", "t", runs, "sft", {"k": "v"}, n_boot=200)
    assert summary["arms"]["sft"]["metrics"]["format_accuracy"][0] == pytest.approx(0.5)
    assert summary["arms"]["delia"]["delta"]["format_accuracy"][0] == pytest.approx(0.25)
    assert "format_accuracy" not in summary["arms"]["sft"]["delta"]  # no delta to itself
    assert summary["arms"]["delia"]["trained_tokens"] == 1200
    assert summary["arms"]["delia"]["compute"]["flops"] == pytest.approx(6e11)  # per seed
    text = md.read_text()
    assert "| delia | 5 | 0,1 | 75.0 [" in text and "+25.0" in text
    assert "![Metric against mixing ratio](metric_vs_ratio.png)" in text
    assert (tmp_path / "report" / "metric_vs_ratio.png").stat().st_size > 1000
    assert "| delia | delia | 5 | 0 | 0 | 600 | 0 | 0.6 | 9 |" in text  # compute per seed
    assert (tmp_path / "report" / "compute.png").stat().st_size > 1000
    page = html.read_text()
    parser = _Collect()
    parser.feed(page)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert parser.srcs and all(s.startswith("data:image/png;base64,") for s in parser.srcs)
    assert not re.search(r"https?://", page)
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["primary"] == "format_accuracy"


def test_summarise_without_baseline_has_no_deltas(tmp_path):
    runs = [ModelResult("a", 1.0, 0, _fake_eval(tmp_path / "a", [1, 0]))]
    s = summarise(runs, None, 100)
    assert s["arms"]["a"]["delta"] == {}


def _fake_general(folder, leaks, kls):
    """Add a general-behaviour section (as `delia eval --general` writes it) to a fake eval folder."""
    rows = [{"id": f"g{i}", "prompt": [{"role": "user", "content": f"general question {i} | with a pipe"}],
             "output": "{\"x\": 1}" if leak else f"a prose answer {i}", "base_output": f"a prose answer {i}",
             "scores": {"leak": leak, "kl": kl}} for i, (leak, kl) in enumerate(zip(leaks, kls, strict=True))]
    write_jsonl(folder / "general.jsonl", rows)
    scores = json.loads((folder / "scores.json").read_text())
    scores["general"] = {"metrics": {"leakage": float(np.mean(leaks)), "drift_kl": float(np.mean(kls))},
                         "row_means": {"leakage": "leak", "drift_kl": "kl"},
                         "higher_is_better": {"leakage": False, "drift_kl": False}, "n": len(leaks)}
    write_json(folder / "scores.json", scores)
    return folder


def _three_arms(tmp_path):
    runs = [ModelResult("base", None, None, _fake_general(_fake_eval(tmp_path / "base", [0, 0, 0, 0]),
                                                        [0, 0, 0, 0, 0, 0], [0.0] * 6))]
    for seed in (0, 1):
        runs.append(ModelResult("sft", 0.0, seed, _fake_general(_fake_eval(tmp_path / f"sft{seed}", [1, 1, 1, 1]),
                                                               [1, 1, 1, 1, 1, 1], [2.0, 2.1, 1.9, 2.0, 2.2, 1.8])))
        runs.append(ModelResult("delia", 1.0, seed, _fake_general(_fake_eval(tmp_path / f"delia{seed}", [1, 1, 1, 1]),
                                                                [0, 0, 0, 0, 0, 1], [0.1, 0.2, 0.1, 0.1, 0.3, 0.9])))
    return runs


def test_verdict_examples_and_tradeoff_come_first(tmp_path):
    md, html, summary = write_report(tmp_path / "report", "t", _three_arms(tmp_path), "sft", {}, n_boot=300)
    assert summary["task"] == ["format_accuracy"] and summary["general"] == ["leakage", "drift_kl"]
    assert summary["higher_is_better"] == {"format_accuracy": True, "leakage": False, "drift_kl": False}
    assert summary["arms"]["delia"]["per_seed"]["leakage"] == [pytest.approx(1 / 6), pytest.approx(1 / 6)]
    text = md.read_text()
    order = [text.index(h) for h in ("## Verdict", "## Trade-off", "## Example general answers", "## All metrics")]
    assert order == sorted(order)
    verdict = text[order[0]:order[1]]
    assert "| arm | ratio | format_accuracy (%) | leakage (%) | drift_kl |" in verdict
    assert "| base | – | 0.0 [0.0, 0.0] | 0.0 [0.0, 0.0] | 0.000 [0.000, 0.000] |" in verdict
    line = next(ln for ln in verdict.splitlines() if ln.startswith("- delia"))
    assert line.startswith("- delia (ratio 1) against sft: format_accuracy +0.0 [+0.0, +0.0] points, "
                           "no clear difference; leakage -83.3 [")
    assert "points, lower (better); drift_kl -1.717 [" in line and line.endswith("lower (better).")
    examples = text[order[2]:order[3]]
    assert examples.count("Prompt ") == 3 and "Prompt 1: general question 0 | with a pipe" in examples
    assert "| sft | {\"x\": 1} | yes |" in examples and "| delia | a prose answer 0 | no |" in examples
    assert (tmp_path / "report" / "tradeoff.png").stat().st_size > 1000
    assert "Example general answers" in html.read_text()


def test_report_without_general_prompts_says_what_it_cannot_show(tmp_path):
    runs = [ModelResult("sft", 0.0, 0, _fake_eval(tmp_path / "a", [1, 0])),
            ModelResult("delia", 1.0, 0, _fake_eval(tmp_path / "b", [1, 1]))]
    md, _, summary = write_report(tmp_path / "r", "t", runs, "sft", {}, n_boot=100)
    assert summary["general"] == [] and "No general prompts were evaluated" in md.read_text()
    assert "## Trade-off" not in md.read_text()


@pytest.mark.parametrize("width", [60, 80, 200])
def test_terminal_table_fits_the_width_and_cuts_nothing(tmp_path, width):
    import io

    from rich.console import Console

    from delia.cli import summary_table

    summary = summarise(_three_arms(tmp_path), "sft", 200)
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False).print(summary_table(summary))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text and "..." not in text
    if width < 80:  # narrower still wraps (folds) cells instead of cutting them
        return
    flat = "".join(text.split())
    for needle in ("format_accuracy(%)", "leakage(%)", "drift_kl", "100.0[100.0,100.0]", "Δvssft", "delia(ratio1)"):
        assert needle in flat
