"""The experiment config alone (no model): ratio sweeps as one arm line, and several general sets."""

from pathlib import Path

import pytest
import yaml

from delia.errors import DeliaError
from delia.experiment import load_experiment


def _load(tmp_path, **config):
    for name in ("a.jsonl", "b.jsonl", "p.jsonl"):  # the data files must exist; their rows are not read
        (tmp_path / name).touch()
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"task": {"train": "a.jsonl", "eval": "b.jsonl"}, "pool": "p.jsonl", **config}))
    return load_experiment(path)


def test_a_ratios_line_expands_into_one_arm_per_ratio(tmp_path):
    exp = _load(tmp_path, arms=[
        {"name": "sft", "kind": "sft"},
        {"name": "delia-kl", "kind": "delia-kl", "ratios": [4, 0, 1, 0.25], "train": {"kl_coef": 0.5}},
        {"name": "delia", "ratios": [2]},
        {"name": "replay-1", "kind": "replay-reference", "ratio": 1}])
    arms = {a.name: a for a in exp.arms}
    # in place of the line, by ratio; ratio 0 is the sft arm, not a copy of it
    assert list(arms) == ["sft", "delia-kl-0.25", "delia-kl-1", "delia-kl-4", "delia-2", "replay-1"]
    assert [arms[n].ratio for n in ("delia-kl-0.25", "delia-kl-1", "delia-kl-4")] == [0.25, 1, 4]
    assert {arms[n].sweep for n in ("delia-kl-0.25", "delia-kl-1", "delia-kl-4")} == {"delia-kl"}
    assert all(arms[n].kind == "delia-kl" and arms[n].diverse == "self" and arms[n].train == {"kl_coef": 0.5}
               for n in ("delia-kl-0.25", "delia-kl-1", "delia-kl-4"))
    assert arms["delia-2"].kind == "delia" and arms["delia-2"].sweep == "delia"  # a sweep's default kind
    assert arms["sft"].sweep is None and arms["replay-1"].sweep is None
    assert all(a.ratios is None for a in exp.arms)
    # the sweep fields stay out of dumps: an arm written out by hand keeps its stage keys
    dumped = exp.model_dump(mode="json")["arms"]
    assert dumped[2] == {"name": "delia-kl-1", "kind": "delia-kl", "ratio": 1.0, "diverse": "self",
                         "train": {"kl_coef": 0.5}}
    assert exp.baseline_arm == "sft"


@pytest.mark.parametrize("arms, message", [
    ([{"name": "d", "ratio": 1, "ratios": [1, 2]}], "give `ratio` or `ratios`"),
    ([{"name": "d", "ratios": [1, 1.0]}], "must be distinct and at least 0"),
    ([{"name": "d", "ratios": [-1, 2]}], "must be distinct and at least 0"),
    ([{"name": "d", "ratios": []}], "needs a ratio above 0"),
    ([{"name": "sft", "kind": "sft"}, {"name": "d", "ratios": [0]}], "needs a ratio above 0"),
    ([{"name": "d", "kind": "sft", "ratios": [1]}], "kind sft has no diverse rows to sweep"),
    ([{"name": "d", "kind": "delia-kll", "ratios": [1]}], "did you mean 'delia-kl'"),
    ([{"name": "d", "kind": "delia", "diverse": "reference", "ratios": [1]}], "only for kind delia-kl"),
    ([{"name": "d", "ratios": [0, 1]}], "ratio 0 is plain SFT, the sft arm of the experiment, and there is none"),
    ([{"name": "sft", "kind": "sft"}, {"name": "d-2", "ratio": 2}, {"name": "d", "ratios": [1, 2]}],
     r"arm names must be unique, got \['sft', 'd-2', 'd-1', 'd-2'\]"),
    ([{"name": "d", "ratios": [1], "train": {"lora_rr": 8}}], "'lora_rr' is not an option of delia train"),
])
def test_bad_sweeps_are_refused_at_load(tmp_path, arms, message):
    with pytest.raises(DeliaError, match=message):
        _load(tmp_path, arms=arms)


def test_a_scaled_line_expands_into_one_arm_per_scale_of_a_trained_arm(tmp_path):
    exp = _load(tmp_path, arms=[
        {"name": "sft-scaled", "kind": "scaled", "of": "sft", "scales": [0.75, 0.25, 1.5]},  # before its `of`
        {"name": "sft", "kind": "sft"},
        {"name": "delia", "ratios": [2, 4]},
        {"name": "half", "kind": "scaled", "of": "delia-2", "scales": [0.5]}])  # a swept arm, by its name
    arms = {a.name: a for a in exp.arms}
    assert list(arms) == ["sft-scaled-0.25", "sft-scaled-0.75", "sft-scaled-1.5", "sft", "delia-2", "delia-4",
                          "half-0.5"]
    assert [(arms[n].of, arms[n].scale) for n in ("sft-scaled-0.25", "sft-scaled-1.5", "half-0.5")] == [
        ("sft", 0.25), ("sft", 1.5), ("delia-2", 0.5)]
    assert all(arms[n].kind == "scaled" and arms[n].ratio == 0 and arms[n].scales is None for n in arms if "-0." in n)
    dumped = exp.model_dump(mode="json")["arms"]
    assert dumped[0] == {"name": "sft-scaled-0.25", "kind": "scaled", "ratio": 0.0, "diverse": None, "train": {},
                         "of": "sft", "scale": 0.25}
    assert "of" not in dumped[3] and "scale" not in dumped[3]  # other arms dump as before the kind existed
    assert exp.baseline_arm == "sft"


@pytest.mark.parametrize("arms, message", [
    ([{"name": "sft", "kind": "sft"}, {"name": "s", "kind": "scaled", "of": "sfft", "scales": [0.5]}],
     r"`of` 'sfft' is not an arm; it names an arm that trains: sft \(did you mean 'sft'\?\)"),
    ([{"name": "d", "ratios": [2]}, {"name": "s", "kind": "scaled", "of": "d", "scales": [0.5]}],
     "`of` 'd' is not an arm; it names an arm that trains: d-2"),
    ([{"name": "sft", "kind": "sft"}, {"name": "s", "kind": "scaled", "of": "sft", "scales": [0.5]},
      {"name": "t", "kind": "scaled", "of": "s-0.5", "scales": [0.5]}], "`of` 's-0.5' is a scaled arm"),
    ([{"name": "sft", "kind": "sft"}, {"name": "s", "kind": "scaled", "of": "sft"}], "kind scaled needs `of`"),
    ([{"name": "sft", "kind": "sft"}, {"name": "s", "kind": "scaled", "scales": [1]}], "kind scaled needs `of`"),
    ([{"name": "sft", "kind": "sft"}, {"name": "s", "kind": "scaled", "of": "sft", "scales": []}],
     "must be distinct and above 0"),
    ([{"name": "sft", "kind": "sft"}, {"name": "s", "kind": "scaled", "of": "sft", "scales": [0, 1]}],
     "must be distinct and above 0"),
    ([{"name": "sft", "kind": "sft"}, {"name": "s", "kind": "scaled", "of": "sft", "scales": [0.5], "ratio": 1}],
     "kind scaled trains nothing"),
    ([{"name": "sft", "kind": "sft"}, {"name": "s", "kind": "scaled", "of": "sft", "scales": [0.5],
                                       "train": {"lora_r": 4}}], "kind scaled trains nothing"),
    ([{"name": "sft", "kind": "sft"}, {"name": "s", "kind": "scaled", "of": "sft", "scale": 0.5}],
     "kind scaled needs `of`"),
    ([{"name": "sft", "kind": "sft"}, {"name": "s", "of": "sft", "scales": [0.5]}], "are for kind scaled"),
    ([{"name": "sft", "kind": "sft"}, {"name": "s", "kind": "scaeld"}], "did you mean 'scaled'"),
])
def test_bad_scaled_arms_are_refused_at_load(tmp_path, arms, message):
    with pytest.raises(DeliaError, match=message):
        _load(tmp_path, arms=arms)


def test_general_is_a_file_a_list_or_a_mapping_of_named_sets(tmp_path):
    for name in ("g.jsonl", "sets/alpaca.jsonl", "q.jsonl", "c.jsonl", "abs/c.jsonl"):  # files must exist
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    absolute = str(tmp_path / "abs" / "c.jsonl")
    single = _load(tmp_path, general="g.jsonl")
    assert single.general == (tmp_path / "g.jsonl").resolve()  # as before: one file, no set name
    listed = _load(tmp_path, general=["sets/alpaca.jsonl", "demo-data:general.jsonl"])
    assert listed.general == {"alpaca": (tmp_path / "sets" / "alpaca.jsonl").resolve(),
                              "general": Path("demo-data:general.jsonl")}
    named = _load(tmp_path, general={"qa": "q.jsonl", "chat": absolute}, contrast="c.jsonl")
    assert named.general == {"qa": (tmp_path / "q.jsonl").resolve(), "chat": Path(absolute)}
    with pytest.raises(DeliaError, match="two general files share a stem"):
        _load(tmp_path, general=["a/g.jsonl", "b/g.jsonl"])
    with pytest.raises(DeliaError, match="general set name 'a b'"):
        _load(tmp_path, general={"a b": "g.jsonl"})
    with pytest.raises(DeliaError, match="no general sets given"):
        _load(tmp_path, general={})


def test_sections_are_typed_configs_that_key_stages_as_written(tmp_path):
    from delia.mix import MixConfig
    from delia.training import TrainConfig

    exp = _load(tmp_path, train={"epochs": 1, "learning_rate": 1.0e-3}, mix={"allow_short": True},
                arms=[{"name": "sft", "kind": "sft"}, {"name": "kl", "kind": "delia-kl", "ratio": 2,
                                                        "train": {"kl_coef": 4}}])
    assert isinstance(exp.train, TrainConfig) and exp.train.epochs == 1.0  # typed: a float
    assert isinstance(exp.mix, MixConfig) and exp.mix.ratio is None  # the run sets each arm's ratio
    # what keys the stages is the section as written: a whole number stays an int, defaults stay out
    assert exp.model_dump(mode="json")["train"] == {"epochs": 1, "learning_rate": 0.001}
    arms = {a.name: a for a in exp.arms}
    kl = exp.arm_train(arms["kl"], seed=3)
    assert (kl.kl_coef, kl.seed, kl.diverse_loss, kl.epochs) == (4, 3, "kl", 1.0)
    assert kl.written() == {"epochs": 1, "learning_rate": 0.001, "kl_coef": 4, "seed": 3, "diverse_loss": "kl"}
    assert "diverse_loss" not in exp.arm_train(arms["sft"], seed=0).written()  # the default: keys as before
    assert exp.arm_mix(arms["kl"], seed=1).diverse_asked(40) == 80


@pytest.mark.parametrize("config, message", [
    ({"train": {"seed": 3}}, "'seed' is set by the experiment itself"),
    ({"mix": {"ratio": 2}}, "'ratio' is set by the experiment itself"),
    ({"sample": {"temperature": -1}}, "field 'temperature'"),
    ({"arms": [{"name": "sft", "kind": "sft"}, {"name": "kl", "kind": "delia-kl", "ratio": 1,
                                                  "train": {"kl_coef": -1}}]}, "kl_coef must be >= 0"),
])
def test_a_bad_section_is_refused_at_load(tmp_path, config, message):
    with pytest.raises(DeliaError, match=message):
        _load(tmp_path, **config)


def test_sdft_is_the_rewritten_task_rows_and_combines_with_diverse_rows(tmp_path):
    exp = _load(tmp_path, arms=[{"name": "sft", "kind": "sft"}, {"name": "sdft", "kind": "sdft"},
                                {"name": "kl", "kind": "delia-kl", "ratios": [1, 2], "rewrite": True}])
    assert [(a.name, a.kind, a.rewrite) for a in exp.arms] == [
        ("sft", "sft", False), ("sdft", "sdft", True), ("kl-1", "delia-kl", True), ("kl-2", "delia-kl", True)]
    dumped = exp.model_dump(mode="json")["arms"]
    assert "rewrite" not in dumped[0] and dumped[1]["rewrite"] is True  # other arms' stage keys as before
    assert exp.arm_train(exp.arms[1], 0).diverse_loss == "ce"


@pytest.mark.parametrize("arm, message", [
    ({"name": "s", "kind": "sdft", "ratio": 1}, "kind sdft is the rewritten task rows alone"),
    ({"name": "s", "kind": "scaled", "of": "sft", "scales": [0.5], "rewrite": True}, "no `ratio`, `ratios`"),
])
def test_bad_sdft_arms_are_refused(tmp_path, arm, message):
    with pytest.raises(DeliaError, match=message):
        _load(tmp_path, arms=[{"name": "sft", "kind": "sft"}, arm])


def test_promot_trains_its_soft_prompt_first_then_lora_beside_it(tmp_path):
    exp = _load(tmp_path, arms=[{"name": "sft", "kind": "sft"}, {"name": "p", "kind": "promot"},
                                {"name": "p4", "kind": "promot", "train": {"soft_prompt": 4},
                                 "prompt_train": {"epochs": 1}}])
    first, last = exp.arm_phases(exp.arms[1], 0)
    assert (first.lora, first.soft_prompt, first.learning_rate, first.epochs) == (False, 16, 1e-2, 3)
    assert (last.lora, last.soft_prompt, last.learning_rate) == (True, 16, exp.train.learning_rate)
    first, last = exp.arm_phases(exp.arms[2], 0)
    assert (first.soft_prompt, first.epochs, last.soft_prompt) == (4, 1, 4)
    assert exp.arm_phases(exp.arms[0], 0) == [exp.arm_train(exp.arms[0], 0)]
    dumped = exp.model_dump(mode="json")["arms"]
    assert "prompt_train" not in dumped[0] and dumped[2]["prompt_train"] == {"epochs": 1}


def test_promot_true_gives_an_arm_with_diverse_rows_a_soft_prompt_phase_on_the_task_rows(tmp_path):
    exp = _load(tmp_path, arms=[{"name": "sft", "kind": "sft"}, {"name": "p", "kind": "promot"},
                                {"name": "pk", "kind": "delia-kl", "ratio": 2, "promot": True},
                                {"name": "d", "kind": "delia", "ratios": [1, 2], "promot": True,
                                 "prompt_train": {"epochs": 1}}])
    promot, with_kl = exp.arm_phases(exp.arms[1], 0), exp.arm_phases(exp.arms[2], 0)
    assert with_kl[0] == promot[0]  # the soft prompt's phase knows no diverse rows: one stage for both arms
    assert (with_kl[1].lora, with_kl[1].soft_prompt, with_kl[1].diverse_loss) == (True, 16, "kl")
    assert [(a.name, a.promot, len(exp.arm_phases(a, 0))) for a in exp.arms[3:]] == [("d-1", True, 2), ("d-2", True, 2)]
    assert exp.arm_phases(exp.arms[3], 0)[0].epochs == 1
    dumped = exp.model_dump(mode="json")["arms"]
    assert "promot" not in dumped[0] and "promot" not in dumped[1] and dumped[2]["promot"] is True


@pytest.mark.parametrize("arm, message", [
    ({"name": "p", "kind": "promot", "ratio": 1}, "with diverse rows, give the kind of those .* and `promot: true`"),
    ({"name": "p", "kind": "sft", "promot": True}, "is kind promot: give `kind: promot`"),
    ({"name": "p", "kind": "delia", "ratio": 1, "prompt_train": {"epochs": 1}}, "`prompt_train` is for kind promot"),
    ({"name": "p", "kind": "sft", "prompt_train": {"epochs": 1}}, "`prompt_train` is for kind promot"),
    ({"name": "s", "kind": "scaled", "of": "sft", "scales": [0.5], "promot": True}, "`promot` or `prompt_train`"),
    ({"name": "p", "kind": "promot", "prompt_train": {"epoch": 1}}, "did you mean 'epochs'"),
    ({"name": "p", "kind": "promot", "train": {"train_rows": "all"}}, "`train_rows` new"),
])
def test_bad_promot_arms_are_refused(tmp_path, arm, message):
    with pytest.raises(DeliaError, match=message):
        _load(tmp_path, arms=[{"name": "sft", "kind": "sft"}, arm])
