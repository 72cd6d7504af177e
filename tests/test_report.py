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
    front = text[text.index("## Pareto front"):order[1]]  # in the verdict, before the trade-off
    assert "On the front over task (higher is better) and leakage, drift (lower is better): base, delia." in front
    assert "Dominated: sft (by delia)." in front  # same task, more leakage and drift
    assert "Recommended: delia" in front and (tmp_path / "report" / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert (0.0, 0.0) in (summary["task_gap"]["sft"], summary["task_gap"]["delia"])  # the best arm's own gap


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


def _finished(folder, reasons, max_new_tokens=16):
    """Say how each task answer of a fake eval folder ended (`stop` or `length`, cut at `max_new_tokens`)."""
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    write_jsonl(folder / "predictions.jsonl", [{**r, "finish_reason": f} for r, f in zip(rows, reasons, strict=True)])
    scores = json.loads((folder / "scores.json").read_text())
    write_json(folder / "scores.json", {**scores, "sampling": {"max_new_tokens": max_new_tokens}})
    return folder


def test_truncation_share_score_on_finished_answers_and_the_warning(tmp_path, caplog):
    stop, cut = "stop", "length"
    runs = [ModelResult("base", None, None, _finished(_fake_eval(tmp_path / "base", [0, 1, 1, 1]),
                                                      [cut, stop, stop, stop])),
            ModelResult("sft", 0.0, 0, _finished(_fake_eval(tmp_path / "sft", [1, 1, 1, 1]), [stop] * 4)),
            ModelResult("delia", 1.0, 0, _finished(_fake_eval(tmp_path / "delia", [0, 0, 1, 1]),
                                                   [cut, cut, stop, stop]))]
    with caplog.at_level("WARNING", logger="delia.report"):
        md, _, summary = write_report(tmp_path / "r", "t", runs, "sft", {}, n_boot=200)
    arms = summary["arms"]
    assert [arms[n]["truncated"][0] for n in ("base", "sft", "delia")] == [0.25, 0.0, 0.5]
    assert arms["base"]["finished"]["format_accuracy"][0] == 1.0  # its one cut answer was its one wrong one
    assert arms["delia"]["finished"]["format_accuracy"] == (1.0, 1.0, 1.0)
    assert summary["max_new_tokens"] == 16
    # delia cuts more, but only the base and plain SFT are warned about: every arm is judged against them
    assert summary["warnings"] == ["The eval cut 25% of base's task answers at max_new_tokens 16 (more than 10%): "
                                   "their scores measure the budget as much as the model. Raise `max_new_tokens` "
                                   "under `eval:` in the experiment YAML."]
    assert summary["warnings"][0] in caplog.text
    text = md.read_text()
    assert f"Warning: {summary['warnings'][0]}" in text.split("## Truncated answers")[0]
    assert "| arm | cut at 16 tokens (%) | format_accuracy (%), answers that ended |" in text
    assert "| delia | 50.0 [" in text and "| sft | 0.0 [0.0, 0.0] | 100.0 [100.0, 100.0] |" in text

    runs[0] = ModelResult("base", None, None, _finished(_fake_eval(tmp_path / "base2", [0, 1, 1, 1]), [stop] * 4))
    _, _, summary = write_report(tmp_path / "r2", "t", runs, "sft", {}, n_boot=100)
    assert summary["warnings"] == []


def test_an_arm_whose_answers_were_all_cut_has_no_finished_score(tmp_path):
    runs = [ModelResult("sft", 0.0, 0, _finished(_fake_eval(tmp_path / "sft", [0, 0]), ["length"] * 2))]
    md, _, summary = write_report(tmp_path / "r", "t", runs, "sft", {}, n_boot=100)
    assert summary["arms"]["sft"]["truncated"][0] == 1.0
    assert np.isnan(summary["arms"]["sft"]["finished"]["format_accuracy"][0])
    assert "| sft | 100.0 [100.0, 100.0] | – [–, –] |" in md.read_text()
    assert "100% of sft's" in summary["warnings"][0]


def _fake_sets(folder, sets):
    """Add named general sets to a fake eval folder: {name: (leaks, kls, kinds or None)}."""
    scores = json.loads((folder / "scores.json").read_text())
    for name, (leaks, kls, kinds) in sets.items():
        rows = [{"id": f"{name}{i}", "prompt": [{"role": "user", "content": f"{name} question {i}"}],
                 "output": "{}" if leak else "prose", "scores": {"leak": leak, "kl": kl},
                 **({"kind": kinds[i]} if kinds else {})}
                for i, (leak, kl) in enumerate(zip(leaks, kls, strict=True))]
        write_jsonl(folder / f"general-{name}.jsonl", rows)
        section = {"metrics": {"leakage": float(np.mean(leaks)), "drift_kl": float(np.mean(kls))},
                   "row_means": {"leakage": "leak", "drift_kl": "kl"},
                   "higher_is_better": {"leakage": False, "drift_kl": False}, "n": len(leaks)}
        if kinds:
            from delia.general import leakage_by_kind

            section["leakage_by_kind"] = leakage_by_kind(rows)
        scores.setdefault("general_sets", {})[name] = section
    write_json(folder / "scores.json", scores)
    return folder


KINDS = ["yes_no", "yes_no", "long_form", "own_format"]


def _swept(tmp_path):
    """base, sft and a sweep `delia` at ratios 1, 2, 4 over two seeds, on two general sets (`qa` with kinds)."""
    def run(arm, ratio, seed, qa_leaks, chat_leaks, sweep=None):
        folder = _fake_eval(tmp_path / f"{arm}{seed}", [1, 1, 0, 1])
        _fake_sets(folder, {"qa": (qa_leaks, [0.5 * sum(qa_leaks)] * 4, KINDS),
                            "chat": (chat_leaks, [0.1] * 4, None)})
        return ModelResult(arm, ratio, seed, folder, kind=None if ratio is None else "sft" if not ratio else "delia",
                           sweep=sweep)

    runs = [run("base", None, None, [0, 0, 0, 0], [0, 0, 0, 0])]
    for seed in (0, 1):
        runs += [run("sft", 0.0, seed, [1, 1, 1, 1], [1, 1, 0, 0]),
                 run("delia-1", 1.0, seed, [1, 1, 1, 0], [1, 1, 0, 0], "delia"),
                 run("delia-2", 2.0, seed, [0, 0, 1, 0], [1, 1, 0, 0], "delia"),
                 run("delia-4", 4.0, seed, [0, 0, 0, 0], [1, 1, 0, 0], "delia")]
    return runs


def test_several_general_sets_leakage_by_kind_and_the_dose_response(tmp_path):
    md, html, summary = write_report(tmp_path / "r", "t", _swept(tmp_path), "sft", {}, n_boot=300)
    assert summary["general"] == ["qa/leakage", "qa/drift_kl", "chat/leakage", "chat/drift_kl"]
    assert summary["general_sets"] == {"qa": 4, "chat": 4} and summary["general_prompts"] is None
    assert summary["sweeps"] == {"delia": ["delia-1", "delia-2", "delia-4"]}
    assert summary["arms"]["delia-2"]["sweep"] == "delia" and summary["arms"]["sft"]["sweep"] is None
    assert summary["arms"]["delia-2"]["leakage_by_kind"] == {"qa/leakage": {
        "yes_no": {"n": 4, "leaked": 0, "share": 0.0}, "long_form": {"n": 2, "leaked": 2, "share": 1.0},
        "own_format": {"n": 2, "leaked": 0, "share": 0.0}}}
    text = md.read_text()
    assert "| arm | ratio | format_accuracy (%) | qa/leakage (%) | qa/drift_kl | chat/leakage (%) | chat/drift_kl |" \
        in text
    assert "the held-out general prompt sets qa (4 prompts), chat (4 prompts)" in text
    assert "| sft | 0 | 75.0 [" in text and "| 100.0 [100.0, 100.0] | 2.000 [2.000, 2.000] | 50.0 [" in text
    heads = ("## Verdict", "## Trade-off", "## Dose-response", "## Leakage by kind of prompt",
             "## Example general answers", "## All metrics")
    assert [text.index(h) for h in heads] == sorted(text.index(h) for h in heads)
    assert ("- Sweep delia (ratios 1, 2, 4): qa/leakage is first clearly below sft's at ratio 2 (Δ -75.0 ["
            in text) and "chat/leakage is clearly below sft's at none of them." in text
    assert "| arm | yes_no | long_form | own_format |" in text
    assert "| base | 0.0 (0/2) | 0.0 (0/1) | 0.0 (0/1) |" in text and "| sft | 100.0 (4/4) | 100.0 (2/2) |" in text
    assert "The first 3 general prompts of set qa" in text and "| delia-4 | prose | no |" in text
    assert (tmp_path / "r" / "dose_response.png").stat().st_size > 1000
    assert (tmp_path / "r" / "tradeoff.png").stat().st_size > 1000
    assert "## Truncated answers" not in text  # the fake rows do not say how they ended


def _dose_summary(deltas: dict[str, list[tuple[float, float, float] | None]]) -> dict:
    """A hand-made summary: sweep `kl` at ratios 1, 2, 4, 8 with the given paired leakage deltas to `sft`."""
    arms = {"sft": {"ratio": 0.0, "delta": {}}}
    for i, ratio in enumerate((1, 2, 4, 8)):
        arms[f"kl-{ratio}"] = {"ratio": float(ratio), "delta": {m: d[i] for m, d in deltas.items() if d[i]}}
    return {"baseline": "sft", "general": [*deltas, "drift_kl"], "arms": arms,
            "sweeps": {"kl": ["kl-1", "kl-2", "kl-4", "kl-8"]}}


def test_dose_response_names_the_smallest_ratio_whose_leakage_is_clearly_below_the_baseline():
    from delia.report import dose_response

    unclear, below = (-0.1, -0.3, 0.05), (-0.2, -0.3, -0.1)
    # the smallest, even where a larger ratio is unclear again
    assert dose_response(_dose_summary({"leakage": [unclear, below, unclear, below]})) == [
        "Sweep kl (ratios 1, 2, 4, 8): leakage is first clearly below sft's at ratio 2 "
        "(Δ -20.0 [-30.0, -10.0] points)."]
    lines = dose_response(_dose_summary({"a/leakage": [unclear] * 4, "b/leakage": [below] * 4}))
    assert lines == ["Sweep kl (ratios 1, 2, 4, 8): a/leakage is clearly below sft's at none of them; "
                     "b/leakage is first clearly below sft's at ratio 1 (Δ -20.0 [-30.0, -10.0] points)."]
    higher = (0.2, 0.1, 0.3)  # clearly different, but above: not below
    assert "none of them" in dose_response(_dose_summary({"leakage": [higher] * 4}))[0]
    assert dose_response(_dose_summary({"leakage": [None] * 4})) == []  # no paired comparison (other seeds)
