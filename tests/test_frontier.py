import numpy as np
import pytest

from delia.frontier import (
    RULE,
    ArmPoint,
    front_sentences,
    pareto,
    plot_front,
    recommend,
)
from delia.report import front_points, summary_formatter, task_gaps


def by_name(entries):
    return {e.name: e for e in entries}


def test_a_dominated_arm_names_every_arm_that_dominates_it():
    points = [ArmPoint("a", 0.8, 0.1, 0.1), ArmPoint("b", 0.7, 0.05, 0.2), ArmPoint("c", 0.6, 0.2, 0.3),
              ArmPoint("d", 0.7, 0.3, 0.1)]
    front = by_name(pareto(points))
    assert [e.name for e in pareto(points)] == ["a", "b", "c", "d"]  # the given order
    assert front["a"].on_front and front["b"].on_front
    assert not front["c"].on_front and front["c"].dominated_by == ("a", "b")  # b: better task, leakage, drift
    assert not front["d"].on_front and front["d"].dominated_by == ("a",)  # b has worse drift than d
    assert front["a"].axes == ("task", "leakage", "drift")


def test_strictly_better_on_one_axis_is_needed_and_enough():
    front = by_name(pareto([ArmPoint("a", 0.8, 0.1, 0.1), ArmPoint("b", 0.8, 0.1, 0.11)]))
    assert front["b"].dominated_by == ("a",)  # equal elsewhere, worse drift
    assert front["a"].on_front


def test_identical_points_do_not_dominate_each_other():
    front = by_name(pareto([ArmPoint("a", 0.5, 0.2, 0.1), ArmPoint("b", 0.5, 0.2, 0.1),
                            ArmPoint("c", 0.9, 0.1, 0.0)]))
    assert front["a"].dominated_by == ("c",) and front["b"].dominated_by == ("c",)
    twins = by_name(pareto([ArmPoint("a", 0.5, 0.2, 0.1), ArmPoint("b", 0.5, 0.2, 0.1)]))
    assert twins["a"].on_front and twins["b"].on_front


def test_contrast_counts_only_when_every_arm_has_it():
    # b is worse than a on task, leakage and drift alike, but obeys "do not use the format" far more often
    all_have = [ArmPoint("a", 0.8, 0.1, 0.1, contrast=0.2), ArmPoint("b", 0.7, 0.2, 0.2, contrast=0.9)]
    front = by_name(pareto(all_have))
    assert front["b"].on_front and front["a"].axes == ("task", "leakage", "drift", "contrast")
    one_lacks = [*all_have, ArmPoint("c", 0.1, 0.9, 0.9)]
    front = by_name(pareto(one_lacks))
    assert front["b"].dominated_by == ("a",) and front["a"].axes == ("task", "leakage", "drift")


def test_a_point_without_task_score_is_worst_on_task_but_can_be_on_the_front():
    front = by_name(pareto([ArmPoint("base", None, 0.0, 0.0), ArmPoint("sft", 0.8, 0.4, 0.3),
                            ArmPoint("worse", None, 0.1, 0.0)]))
    assert front["base"].on_front  # nothing matches its leakage and drift
    assert front["worse"].dominated_by == ("base",)
    assert by_name(pareto([ArmPoint("x", None, 0.1, 0.1), ArmPoint("y", 0.1, 0.1, 0.1)]))["x"].dominated_by == ("y",)


def test_the_base_row_is_on_the_front_and_left_out_by_the_task_rule():
    points = [ArmPoint("base", 0.2, 0.0, 0.0, task_gap_ci=None), ArmPoint("sft", 0.8, 0.5, 0.4),
              ArmPoint("delia", 0.78, 0.1, 0.1, task_gap_ci=(-0.05, 0.01))]
    assert by_name(pareto(points))["base"].on_front
    r = recommend(points)
    assert r.arm == "delia" and r.best == "sft"
    assert r.excluded == ("base",) and r.kept == ("sft", "delia")
    # where tuning gains nothing on the task, not tuning wins on leakage
    r = recommend([ArmPoint("base", 0.8, 0.0, 0.0), ArmPoint("sft", 0.8, 0.5, 0.4)])
    assert r.arm == "base"


def test_the_task_filter_comes_before_leakage():
    points = [ArmPoint("best", 0.9, 0.3, 0.3), ArmPoint("close", 0.85, 0.2, 0.2, task_gap_ci=(-0.1, 0.0)),
              ArmPoint("clean", 0.6, 0.0, 0.0, task_gap_ci=(-0.4, -0.2))]
    r = recommend(points)
    assert r.arm == "close"  # clean leaks least, but its task metric is clearly below the best's
    assert r.excluded == ("clean",)
    assert "lowest leakage" in r.reason and "close" in r.reason and "0.2" in r.reason


def test_without_an_interval_only_an_equal_task_metric_is_kept():
    r = recommend([ArmPoint("a", 0.9, 0.3, 0.3), ArmPoint("b", 0.8999, 0.0, 0.0), ArmPoint("c", 0.9, 0.2, 0.3)])
    assert r.kept == ("a", "c") and r.excluded == ("b",) and r.arm == "c"


def test_ties_on_leakage_go_to_drift_then_compute_then_name():
    base = dict(task=0.8, leakage=0.1, task_gap_ci=(-0.01, 0.01))
    r = recommend([ArmPoint("a", **base, drift=0.3), ArmPoint("b", **base, drift=0.2), ArmPoint("top", 0.81, 0.2, 0)])
    assert r.arm == "b" and "ties with a on leakage" in r.reason and "lowest drift" in r.reason
    r = recommend([ArmPoint("a", **base, drift=0.2, compute=2e12), ArmPoint("b", **base, drift=0.2, compute=1e12),
                   ArmPoint("c", **base, drift=0.2)])
    assert r.arm == "b" and "least compute" in r.reason  # unknown compute (c) is not taken as cheap
    r = recommend([ArmPoint("b", **base, drift=0.2, compute=1e12), ArmPoint("a", **base, drift=0.2, compute=1e12)])
    assert r.arm == "a" and "first by name" in r.reason


def test_no_task_score_no_recommendation_and_duplicate_names_are_refused():
    r = recommend([ArmPoint("base", None, 0.0, 0.0)])
    assert r.arm is None and r.unscored == ("base",)
    with pytest.raises(ValueError, match="unique"):
        pareto([ArmPoint("a", 0.1, 0.1, 0.1), ArmPoint("a", 0.2, 0.1, 0.1)])
    with pytest.raises(ValueError, match="finite"):
        ArmPoint("a", float("nan"), 0.1, 0.1)
    with pytest.raises(ValueError, match="low above high"):
        ArmPoint("a", 0.1, 0.1, 0.1, task_gap_ci=(0.1, -0.1))


def test_sentences_name_the_front_the_dominated_and_the_pick():
    points = [ArmPoint("a", 0.9, 0.1, 0.1), ArmPoint("b", 0.88, 0.05, 0.2, task_gap_ci=(-0.05, 0.02)),
              ArmPoint("c", 0.5, 0.2, 0.3), ArmPoint("base", None, 0.0, 0.0)]
    lines = front_sentences(pareto(points), recommend(points))
    assert lines[0].endswith(": a, b, base.")
    assert lines[1] == "Dominated: c (by a, b)."
    assert lines[2].startswith("Recommended: b — ") and "0.05" in lines[2]
    assert lines[3] == "Left out for a task metric clearly below a's: c."
    assert lines[4] == "Without a task score, not recommended: base."
    assert all("  " not in line for line in lines)  # no padding to a width
    assert "lowest leakage, then the lowest drift, then the least compute" in RULE


def test_plot_writes_a_png(tmp_path):
    points = [ArmPoint("a", 0.9, 0.1, 0.1), ArmPoint("b", 0.8, 0.05, 0.2), ArmPoint("c", 0.5, 0.2, 0.3),
              ArmPoint("base", None, 0.0, 0.0)]
    path = plot_front(points, pareto(points), tmp_path / "front.png", task_pct=True, leakage_pct=True)
    assert path == tmp_path / "front.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    same = [ArmPoint("a", 0.9, 0.1, 0.1), ArmPoint("b", 0.8, 0.05, 0.1)]  # one drift value: a flat colour scale
    assert plot_front(same, pareto(same), tmp_path / "flat.png").read_bytes()[:4] == b"\x89PNG"


def test_task_gaps_pair_only_the_best_arms_seeds():
    rng = np.random.default_rng(0)
    best = rng.random((2, 50))
    rows = {"best": best, "near": best - 0.001, "far": best - 0.3, "base": best[:1] - 0.5, "other": best - 0.001}
    seeds = {"best": [1, 2], "near": [1, 2], "far": [1, 2], "base": [None], "other": [3, 4]}
    gaps = task_gaps(rows, seeds, n_boot=200)
    assert gaps["best"] == (0.0, 0.0)
    assert gaps["near"] == pytest.approx((-0.001, -0.001))
    assert gaps["far"][1] < 0
    assert gaps["base"] is None and gaps["other"] is None


def summary_of(arms, general=("leakage", "drift_kl")):
    return {"primary": "accuracy", "general": list(general), "arms": arms}


def arm(acc, leak, drift, kind="sft", seeds=(1,), flops=1e12, **more):
    metrics = {"accuracy": (acc, acc, acc), "leakage": (leak, leak, leak), "drift_kl": (drift, drift, drift), **more}
    return {"kind": kind, "seeds": list(seeds), "metrics": metrics, "compute": {"flops": flops} if flops else None}


def test_points_from_the_report_summary():
    summary = summary_of({"base": arm(0.2, 0.0, 0.0, kind=None, seeds=[None], flops=None),
                          "sft": arm(0.8, 0.4, 0.3),
                          "nan": arm(float("nan"), 0.1, 0.1)})
    points = {p.name: p for p in front_points({**summary, "task_gap": {"sft": [0.0, 0.0]}})}
    assert points["base"].compute == 0.0 and points["base"].task == 0.2  # not tuning costs no tuning
    assert points["sft"].compute == 1e12 and points["sft"].task_gap_ci == (0.0, 0.0)
    assert points["nan"].task is None and points["nan"].contrast is None
    uncosted = summary_of({"base": arm(0.2, 0.0, 0.0, kind=None, seeds=[None], flops=None),
                           "sft": arm(0.8, 0.4, 0.3, flops=None)})
    assert [p.compute for p in front_points(uncosted)] == [None, None]  # nothing counted: no 0 for the base
    two_sets = summary_of({"a": arm(0.5, 0.0, 0.0, **{"x/leakage": (0.2,) * 3, "y/leakage": (0.4,) * 3,
                                                      "x/drift_kl": (0.1,) * 3, "y/drift_kl": (0.3,) * 3})},
                          general=("x/leakage", "y/leakage", "x/drift_kl", "y/drift_kl"))
    (p,) = front_points(two_sets)
    assert p.leakage == pytest.approx(0.3) and p.drift == pytest.approx(0.2)
    assert front_points(summary_of({"a": arm(0.5, 0.1, 0.1)}, general=())) == []


def test_the_report_formatter_writes_percent_and_tflops():
    write = summary_formatter({"primary": "accuracy"})
    assert write("leakage", 0.125) == "12.5%" and write("drift", 0.01234) == "0.012"
    assert write("compute", 2.5e12) == "2.5 TFLOPs"
