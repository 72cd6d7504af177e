"""`delia run` end to end on the tiny model: every stage, the report, and a rerun that skips every stage."""

import json
import re

import pytest
import yaml

from delia.errors import DeliaError
from delia.experiment import load_experiment
from delia.run import run_experiment


def _task(i: int) -> dict:
    answer = {"thought": f"checked claim {i}", "hallucination": "yes" if i % 3 == 0 else "no"}
    return {"messages": [{"role": "user", "content": f"Is claim {i} a hallucination? Answer in the <sep> format."},
                         {"role": "assistant", "content": repr(answer)}]}


@pytest.fixture
def experiment(tmp_path, tiny_model, write_jsonl):
    write_jsonl("train.jsonl", [_task(i) for i in range(6)])
    write_jsonl("eval.jsonl", [_task(i) for i in range(100, 104)])
    write_jsonl("pool.jsonl", [{"messages": [{"role": "user", "content": f"Tell me about topic {i}."},
                                             {"role": "assistant", "content": f"Topic {i} is a long story."}]}
                               for i in range(12)])
    write_jsonl("general.jsonl", [{"messages": [{"role": "user", "content": f"What is the capital of country {i}?"},
                                                {"role": "assistant", "content": "Paris"}]} for i in range(4)])
    write_jsonl("contrast.jsonl", [{"messages": [{"role": "user", "content": f"Is claim {i} true? Do not use the "
                                                  "<sep> format: answer in plain words."}]} for i in range(3)])
    config = {
        "name": "tiny", "model": str(tiny_model), "pool": "pool.jsonl", "seeds": [0, 1], "bootstrap": 100,
        "general": "general.jsonl", "contrast": "contrast.jsonl",
        "task": {"train": "train.jsonl", "eval": "eval.jsonl", "metric": "format",
                 "metric_config": {"required_keys": ["thought", "hallucination"], "exact_keys": True,
                                   "allowed_values": {"hallucination": ["yes", "no"]}, "label_key": "hallucination"},
                 "add_tokens": {"<sep>": "a Python dict with the keys thought and hallucination"}},
        "arms": [{"name": "sft", "ratio": 0}, {"name": "delia", "ratio": 1}],
        "sample": {"max_new_tokens": 8, "drop_truncated": False, "drop_repetitive": False,
                   "drop_duplicates": False, "drop_reference_copies": False},
        "mix": {"allow_short": True},
        "train": {"max_steps": 2, "batch_size": 2, "warmup_steps": 0, "eval_steps": 1, "logging_steps": 1},
        "eval": {"max_new_tokens": 8, "general_max_new_tokens": 6},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_twice_second_skips_every_stage(experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    first = run_experiment(load_experiment(experiment), out)
    # plan + sample + base eval + base probe, then per arm and seed: (mix) train eval probe
    assert len(first["stages_run"]) == 4 + 2 * 3 + 2 * 4 and not first["stages_cached"]
    summary = first["summary"]
    assert set(summary["arms"]) == {"base", "sft", "delia"}
    assert summary["arms"]["delia"]["seeds"] == [0, 1]
    assert "format_accuracy" in summary["arms"]["delia"]["delta"]
    assert summary["general"] == ["leakage", "drift_kl", "base_answer_nll", "general_contains", "contrast_obey"]
    assert summary["arms"]["base"]["metrics"]["drift_kl"] == (0.0, 0.0, 0.0)
    assert "leakage" in summary["arms"]["delia"]["delta"] and "contrast_obey" in summary["arms"]["sft"]["metrics"]
    report = (out / "report.md").read_text()
    heads = ("## Verdict", "## Trade-off", "## Example general answers", "## All metrics")
    assert [report.index(h) for h in heads] == sorted(report.index(h) for h in heads)
    # verdict, all metrics, three example answers, truncated answers, compute
    assert report.count("| delia |") == 2 + 3 + 1 + 1
    assert "## New-token alignment" in report and "- delia seed 1: <sep>" in report
    assert "- delia (ratio 1) against sft: format_accuracy " in report and "leakage " in report
    assert (out / "tradeoff.png").stat().st_size > 1000
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["data_sha256"]) == {"task_train", "task_eval", "pool", "general", "contrast"}

    second = run_experiment(load_experiment(experiment), out)
    assert second["stages_run"] == []
    assert sorted(second["stages_cached"]) == sorted(first["stages_run"])
    assert json.loads(json.dumps(second["summary"])) == json.loads(json.dumps(summary))


def test_changed_option_reruns_only_what_depends_on_it(experiment, tmp_path):
    out = tmp_path / "out"
    config = yaml.safe_load(experiment.read_text())
    config.update(seeds=[0], arms=[{"name": "sft", "ratio": 0}], eval_base=False)
    experiment.write_text(yaml.safe_dump(config))
    run_experiment(load_experiment(experiment), out)
    config["eval"]["max_new_tokens"] = 4
    experiment.write_text(yaml.safe_dump(config))
    again = run_experiment(load_experiment(experiment), out)
    assert again["stages_cached"] == ["plan:costs", "train:sft seed 0", "probe:sft seed 0"]
    assert again["stages_run"] == ["eval:sft seed 0"]


def test_bad_config_names_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"task": {"train": "a.jsonl"}, "arms": [{"name": "x", "ratio": -1}]}))
    with pytest.raises(DeliaError) as e:
        load_experiment(path)
    msg = str(e.value)
    assert re.search(rf"{re.escape(str(path))}:\d+: field 'task.eval'", msg) and "arms.0.ratio" in msg


def test_shipped_example_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples"
    paper = load_experiment(root / "paper-format.yaml")
    assert paper.task.train.name == "train.jsonl" and paper.task.train.parent.name == "delia-format"
    assert [a.ratio for a in paper.arms] == [0, 100, 260] and paper.baseline_arm == "sft"
    assert [(a.name, a.sweep) for a in paper.arms] == [("sft", None), ("delia-100", "delia"), ("delia-260", "delia")]
    assert str(paper.general) == "demo-data:general.jsonl" and paper.train_eval
    demo = load_experiment(root / "demo.yaml")
    assert str(demo.task.train).startswith("demo-data@3:") and str(demo.pool) == "demo-data@3:pool-broad.jsonl"
    assert {k: str(v) for k, v in demo.general.items()} == {"evals": "demo-data@3:general.jsonl",
                                                            "outside": "demo-data@3:general-outside.jsonl"}
    sep = load_experiment(root / "sep-cpu.yaml")
    assert str(sep.task.eval) == "sep-data:heldout.jsonl" and str(sep.contrast) == "sep-data:contrast.jsonl"
    assert sep.task.train.parent.name == "delia-format" and "<sep>" in sep.task.add_tokens
    mt = load_experiment(root / "translation-cpu.yaml")
    assert mt.task.metric == "translation"
    assert mt.task.metric_config["target_scripts"] == ["HIRAGANA", "KATAKANA", "CJK"]


def test_a_typo_in_a_stage_section_is_refused_at_load_with_the_closest_option(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({
        "task": {"train": "a.jsonl", "eval": "b.jsonl"}, "pool": "p.jsonl",
        "arms": [{"name": "sft", "ratio": 0}, {"name": "delia", "ratio": 1, "train": {"lora_rr": 8}}],
        "train": {"lerning_rate": 0.1, "seed": 3}, "sample": {"max_new_tokens": 8}, "eval": {"bogus": 1}}))
    with pytest.raises(DeliaError) as e:
        load_experiment(path)
    msg = re.sub(r"\.yaml:\d+: ", ".yaml: ", str(e.value))  # the YAML line aside
    assert f"{path}: field 'train': " in msg and "'lerning_rate' is not an option of delia train (did you mean " \
        "'learning_rate'?)" in msg and "'seed' is set by the experiment itself" in msg
    assert "field 'arms.1.train'" in msg and "'lora_rr'" in msg and "'bogus' is not an option of delia eval" in msg
    assert "field 'sample'" not in msg


def test_every_arm_kind_runs_cached_and_resumes(experiment, tmp_path, monkeypatch):
    import delia.evaluate

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    config = yaml.safe_load(experiment.read_text())
    config.update(seeds=[0], eval_base=False, contrast=None, arms=[
        {"name": "sft", "kind": "sft"},
        {"name": "kl-ref", "kind": "delia-kl", "ratio": 1, "diverse": "reference", "train": {"kl_coef": 0.5}},
        {"name": "kl-self", "kind": "delia-kl", "ratio": 1},
        {"name": "replay", "kind": "replay-reference", "ratio": 1},
        {"name": "delia", "ratio": 1}])
    config["task"]["add_tokens"] = {"<sep>": None}  # no probe stage: fewer stages to count
    experiment.write_text(yaml.safe_dump(config))
    exp = load_experiment(experiment)
    assert [a.kind for a in exp.arms] == ["sft", "delia-kl", "delia-kl", "replay-reference", "delia"]
    assert [a.diverse for a in exp.arms] == [None, "reference", "self", "reference", "self"]

    real = delia.evaluate.evaluate
    calls = []

    def dies_at_the_replay_eval(data, out, config=None, **kw):
        calls.append(out)
        if len(calls) == 4:  # a kill in the middle of the run
            raise KeyboardInterrupt
        return real(data, out, config, **kw)

    monkeypatch.setattr(delia.evaluate, "evaluate", dies_at_the_replay_eval)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, out)
    monkeypatch.setattr(delia.evaluate, "evaluate", real)
    result = run_experiment(load_experiment(experiment), out)
    # delia's mixture is kl-self's (same samples, ratio and seed): one mix stage serves both
    assert result["stages_run"] == ["eval:replay seed 0", "train:delia seed 0", "eval:delia seed 0"]
    arms = result["summary"]["arms"]
    kl_ref, kl_self, replay, delia = (arms[n]["compute"] for n in ("kl-ref", "kl-self", "replay", "delia"))
    assert kl_ref["generated_tokens"] == 0 == replay["generated_tokens"] and kl_ref["sample_flops"] == 0
    assert kl_ref["forward_only_tokens"] > 0 and kl_self["forward_only_tokens"] > 0
    assert delia["forward_only_tokens"] == 0 < delia["generated_tokens"] == kl_self["generated_tokens"]
    assert delia["sampled_queries"] == 6  # half of the 12 sampled queries: the 6 rows ratio 1 mixes in
    assert arms["sft"]["compute"]["flops"] < delia["flops"]
    stages = sorted(p.name.split("-")[0] for p in (out / "stages").iterdir())
    assert stages.count("sample") == 1 and stages.count("train") == 5
    trains = [json.loads((p / "stage.json").read_text()) for p in (out / "stages").glob("train-*")]
    kl_options = [t["inputs"]["options"] for t in trains if t["inputs"]["options"].get("diverse_loss") == "kl"]
    assert len(kl_options) == 2 and {o.get("kl_coef") for o in kl_options} == {0.5, None}
    report = (out / "report.md").read_text()
    assert "## Compute" in report and "| kl-ref | delia-kl | 1 | 0 | 0 |" in report
    plan = json.loads((out / "manifest.json").read_text())["plan"]
    for row in plan["arms"]:  # the plan counts tokens the way training does, up to template details
        measured = arms[row["arm"]]["compute"]
        assert row["trained_tokens"] == pytest.approx(measured["trained_tokens"], rel=0.15)
        assert row["forward_only_tokens"] == pytest.approx(measured["forward_only_tokens"], rel=0.15)
        assert measured["est_wall_s"] == row["est_wall_s"] > 0
    assert plan["sampling_run"]["queries"] == 12 and plan["arms"][2]["diverse_rows"] == 6


def test_sdft_arms_train_on_the_rewritten_task_rows(experiment, tmp_path, monkeypatch):
    from delia.files import sha256_file

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    config = yaml.safe_load(experiment.read_text())
    config.update(seeds=[0], eval_base=False, contrast=None, rewrite={"max_new_tokens": 8}, arms=[
        {"name": "sft", "kind": "sft"}, {"name": "sdft", "kind": "sdft"},
        {"name": "sdft-kl", "kind": "delia-kl", "ratio": 1, "rewrite": True}])
    config["task"]["add_tokens"] = {"<sep>": None}  # no probe stage
    experiment.write_text(yaml.safe_dump(config))
    exp = load_experiment(experiment)
    assert [(a.kind, a.rewrite) for a in exp.arms] == [("sft", False), ("sdft", True), ("delia-kl", True)]
    out = tmp_path / "out"
    result = run_experiment(exp, out)
    stages = {p.name.split("-")[0]: p for p in (out / "stages").iterdir()}
    assert sorted(p.name.split("-")[0] for p in (out / "stages").iterdir()).count("rewrite") == 1  # shared
    rewritten = stages["rewrite"] / "rewritten.jsonl"
    rows = [json.loads(line) for line in rewritten.read_text().splitlines()]
    record = json.loads((out / "manifest.json").read_text())["rewrite"]
    assert record["rows"] == len(rows) == 6 and record["kept"] == sum(r["rewrite"]["kept"] for r in rows)
    assert sum(record["reasons"].values()) == 6
    trains = {t["label"]: t["inputs"] for t in (json.loads((p / "stage.json").read_text())
                                                for p in (out / "stages").glob("train-*"))}
    assert trains["sdft seed 0"]["data"] == sha256_file(rewritten)  # the rewritten rows, not the task's
    assert trains["sft seed 0"]["data"] == sha256_file(exp.task.train)
    mixes = [json.loads((p / "stage.json").read_text()) for p in (out / "stages").glob("mix-*")]
    assert [m["inputs"]["task"] for m in mixes] == [sha256_file(rewritten)]
    arms = result["summary"]["arms"]
    assert arms["sft"]["compute"]["generated_tokens"] == 0 < arms["sdft"]["compute"]["generated_tokens"]
    assert arms["sdft-kl"]["compute"]["generated_tokens"] > arms["sdft"]["compute"]["generated_tokens"]  # + samples
    assert "rewrite" in arms["sdft"]["wall_s"] and "rewrite" not in arms["sft"]["wall_s"]
    assert "## Self-distilled task rows" in (out / "report.md").read_text()
    plan = {a["arm"]: a for a in json.loads((out / "manifest.json").read_text())["plan"]["arms"]}
    assert plan["sft"]["generated_tokens"] == 0 < plan["sdft"]["generated_tokens"] <= 6 * 8
    assert not run_experiment(load_experiment(experiment), out)["stages_run"]  # all cached


def test_plan_prints_costs_in_80_columns_and_runs_nothing(experiment, tmp_path, monkeypatch, capsys):
    from delia.cli import main

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        main(["run", str(experiment), "--plan", "--flops-per-s", "1e9", "--out", str(tmp_path / "out")])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 80 and "delia" in out and "at the given achieved rate, 1 GFLOP/s" in out
    assert not (tmp_path / "out").exists()


def test_plan_estimates_a_pool_still_to_be_built_without_building_it(experiment, tmp_path, monkeypatch, capsys):
    from delia.cli import main

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    config = yaml.safe_load(experiment.read_text())
    config["pool"] = {"sources": ["pool.jsonl"], "size": 8, "min_reference_tokens": 1}
    experiment.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as e:
        main(["run", str(experiment), "--plan", "--flops-per-s", "1e9", "--out", str(tmp_path / "out")])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0, out
    assert "the pool is still to be built: estimated as 8 rows (its requested size)" in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "embeddings").exists()


def test_a_short_pool_is_flagged_by_the_plan_and_refused_by_the_run(experiment, tmp_path, monkeypatch, capsys):
    from delia.cli import main
    from delia.plan import plan_experiment
    from delia.run import resolve_paths

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    config = yaml.safe_load(experiment.read_text())
    config["arms"] = [{"name": "sft", "ratio": 0}, {"name": "delia", "ratio": 5}]  # 30 rows asked, 12 in the pool
    config["mix"] = {}
    experiment.write_text(yaml.safe_dump(config))
    plan = plan_experiment(resolve_paths(load_experiment(experiment)), 1e9)
    delia = plan.arms[1]
    assert (delia.diverse_rows, delia.diverse_asked, delia.short) == (12, 30, True)
    with pytest.raises(SystemExit):
        main(["run", str(experiment), "--plan", "--flops-per-s", "1e9"])
    assert "SHORT pool: delia: 12 of the 30 diverse rows asked for" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(DeliaError, match="the pool is too small for the arms' ratios"):
        run_experiment(load_experiment(experiment), tmp_path / "out")
    assert not list((tmp_path / "out" / "stages").glob("sample-*"))  # refused before sampling


def test_the_plan_counts_a_soft_prompt_phase_on_the_task_rows_alone(experiment):
    from delia.plan import plan_experiment
    from delia.run import resolve_paths

    config = yaml.safe_load(experiment.read_text())
    kl = {"kind": "delia-kl", "diverse": "reference", "ratio": 1}
    config["arms"] = [{"name": "sft", "ratio": 0}, {"name": "kl", **kl},
                      {"name": "pk", **kl, "promot": True, "prompt_train": {"epochs": 3}}]
    config["train"] = {"epochs": 1, "batch_size": 2}
    experiment.write_text(yaml.safe_dump(config))
    sft, kl, pk = plan_experiment(resolve_paths(load_experiment(experiment)), 1e9).arms
    assert pk.trained_tokens == pytest.approx(kl.trained_tokens + 3 * sft.trained_tokens)
    assert pk.forward_only_tokens == kl.forward_only_tokens > 0  # the soft prompt's phase has no KL rows


@pytest.mark.parametrize("arm, message", [
    ({"name": "a", "kind": "sft", "ratio": 1}, "kind sft needs ratio 0"),
    ({"name": "a", "kind": "delia"}, "kind delia needs a ratio above 0"),
    ({"name": "a", "kind": "delia-kll", "ratio": 1}, "did you mean 'delia-kl'"),
    ({"name": "a", "kind": "delia", "ratio": 1, "diverse": "reference"}, "only for kind delia-kl"),
    ({"name": "a", "kind": "delia-kl", "ratio": 1, "train": {"diverse_loss": "ce"}}, "set by the experiment"),
])
def test_bad_arm_kinds_are_refused_at_load(experiment, arm, message):
    config = yaml.safe_load(experiment.read_text())
    config["arms"] = [arm]
    experiment.write_text(yaml.safe_dump(config))
    with pytest.raises(DeliaError, match=message):
        load_experiment(experiment)


def test_baseline_option_refuses_an_unknown_arm(experiment, capsys):
    from delia.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", str(experiment), "--baseline", "nope"])
    assert e.value.code != 0 and "--baseline 'nope' is not an arm" in capsys.readouterr().err


def test_bad_values_and_combinations_are_refused_at_load_before_any_stage(tmp_path):
    """Values are checked with the stage's config when the experiment loads: types, choices and bounds in each
    section, and an arm's train overrides together with the experiment's train section."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({
        "task": {"train": "a.jsonl", "eval": "b.jsonl"}, "pool": {"sources": ["s.jsonl"], "size": 0},
        "arms": [{"name": "sft", "ratio": 0}, {"name": "kl", "kind": "delia-kl", "ratio": 1}],
        "train": {"lora_r": "eight", "batching": "packing"}, "sample": {"temperature": -1},
        "mix": {"allow_short": True}, "eval": {"metric_config": None, "batch_size": 0}}))
    with pytest.raises(DeliaError) as e:
        load_experiment(path)
    msg = re.sub(r"\.yaml:\d+: ", ".yaml: ", str(e.value))  # the YAML line aside
    assert f"{path}: field 'train': field 'lora_r': Input should be a valid integer" in msg
    assert "field 'sample': field 'temperature': temperature must be >= 0, got -1" in msg
    assert "field 'pool': field 'size': size must be >= 1, got 0" in msg
    assert "field 'mix'" not in msg  # its ratio is the arm's
    path.write_text(yaml.safe_dump({
        "task": {"train": "a.jsonl", "eval": "b.jsonl"}, "pool": "p.jsonl", "train": {"batching": "packing"},
        "arms": [{"name": "sft", "ratio": 0}, {"name": "kl", "kind": "delia-kl", "ratio": 1}]}))
    with pytest.raises(DeliaError, match="arm 'kl': .*diverse_loss kl needs each row apart"):
        load_experiment(path)
    path.write_text(yaml.safe_dump({"task": {"train": "a.jsonl", "eval": "b.jsonl"}, "sample": {"backend": "openai"}}))
    with pytest.raises(DeliaError, match="field 'sample': `backend` openai needs `base_url`"):
        load_experiment(path)


def _stage_inputs(experiment_path, monkeypatch) -> dict[str, dict]:
    """The inputs (what a stage's key hashes) of every stage up to the base model's eval, running none of them."""
    from delia.artifacts import ArmCost, CostPlan, StageRecord
    from delia.stage import StageCache

    seen: dict[str, dict] = {}
    plan = CostPlan.model_construct(arms=[ArmCost.model_construct(arm=a, est_wall_s=0) for a in ("sft", "delia")])

    def record(self, stage, progress=None):
        seen[stage.name] = stage.identity()
        if stage.name == "eval":
            raise _Stop
        return self.root, StageRecord(stage=stage.name, label=stage.label, inputs=seen[stage.name], wall_s=0,
                                      result=plan)

    monkeypatch.setattr(StageCache, "run", record)
    with pytest.raises(_Stop):
        run_experiment(load_experiment(experiment_path), experiment_path.parent / "out")
    return seen


class _Stop(Exception):
    pass


def test_a_single_general_file_keeps_its_stage_keys_and_named_sets_get_their_own(experiment, monkeypatch):
    """A single `general:` path hashes as it did before sets had names: the file's hash in the eval's and the
    plan's inputs, and arms dumped without the sweep fields."""
    from delia.files import sha256_file

    folder = experiment.parent
    general, contrast = sha256_file(folder / "general.jsonl"), sha256_file(folder / "contrast.jsonl")
    seen = _stage_inputs(experiment, monkeypatch)
    assert seen["eval"] == {"model": seen["plan"]["model"], "data": sha256_file(folder / "eval.jsonl"),
                            "metric": "format", "metric_config": yaml.safe_load(experiment.read_text())["task"][
                                "metric_config"], "options": {"max_new_tokens": 8, "general_max_new_tokens": 6},
                            "general": general, "contrast": contrast}
    assert seen["plan"]["data"]["general"] == general
    assert seen["plan"]["experiment"]["arms"] == [
        {"name": "sft", "kind": "sft", "ratio": 0.0, "diverse": None, "train": {}},
        {"name": "delia", "kind": "delia", "ratio": 1.0, "diverse": "self", "train": {}}]

    (folder / "other.jsonl").write_text('{"messages": [{"role": "user", "content": "Name a colour."}]}\n')
    config = yaml.safe_load(experiment.read_text())
    config["general"] = {"capitals": "general.jsonl", "other": "other.jsonl"}
    experiment.write_text(yaml.safe_dump(config))
    named = _stage_inputs(experiment, monkeypatch)
    assert named["eval"]["general"] == {"capitals": general, "other": sha256_file(folder / "other.jsonl")}
    assert named["plan"]["data"]["general"] == named["eval"]["general"]


def test_a_sweep_and_two_general_sets_with_kinds_run_end_to_end(experiment, tmp_path, monkeypatch, write_jsonl):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    kinds = ["yes_no", "short_answer", "long_form", "own_format"]
    write_jsonl("kinded.jsonl", [{"messages": [{"role": "user", "content": f"Is {i} even? Say yes or no."}],
                                  "kind": kind} for i, kind in enumerate(kinds)])
    config = yaml.safe_load(experiment.read_text())
    config.update(seeds=[0], general={"qa": "kinded.jsonl", "capitals": "general.jsonl"},
                  arms=[{"name": "sft", "kind": "sft"},
                        {"name": "replay", "kind": "replay-reference", "ratios": [0, 1, 2]}])
    config["task"]["add_tokens"] = {"<sep>": None}  # no probe stage
    config["eval"]["max_new_tokens"] = 2  # a random model ends nearly no answer in 2 tokens
    config["coverage"] = {"least": 1, "threshold": 0.5}
    experiment.write_text(yaml.safe_dump(config))
    result = run_experiment(load_experiment(experiment), tmp_path / "out")
    summary = result["summary"]
    assert list(summary["arms"]) == ["base", "sft", "replay-1", "replay-2"]
    assert summary["sweeps"] == {"replay": ["replay-1", "replay-2"]}
    assert {"qa/leakage", "qa/drift_kl", "capitals/leakage", "capitals/drift_kl", "contrast_obey"} <= set(
        summary["general"])
    assert list(summary["arms"]["sft"]["leakage_by_kind"]) == ["qa/leakage"]  # the capitals have no kinds
    by_kind = summary["arms"]["sft"]["leakage_by_kind"]["qa/leakage"]
    assert list(by_kind) == kinds and all(c["n"] == 1 for c in by_kind.values())
    assert summary["arms"]["base"]["truncated"][0] > 0.1 and "max_new_tokens 2" in summary["warnings"][0]
    report = (tmp_path / "out" / "report.md").read_text()
    for head in ("## Dose-response", "## Leakage by kind of prompt", "## Truncated answers", "Warning: The eval cut"):
        assert head in report
    assert "- Sweep replay (ratios 1, 2): " in report
    assert (tmp_path / "out" / "dose_response.png").stat().st_size > 1000
    # coverage of the prompt sets by the diverse rows the replay arms train on (the pool, here)
    covered = json.loads((tmp_path / "out" / "manifest.json").read_text())["coverage"]["files"]
    assert set(covered) == {"qa", "capitals", "task eval"} and covered["qa"]["prompts"] == len(kinds)
    section = report.split("## Pool coverage")[1].split("\n## ")[0]
    assert [line[2:].split(":")[0] for line in section.splitlines() if line.startswith("- ")] == sorted(
        covered, key=lambda name: covered[name]["nearest"]["p50"])
    assert "| qa | 4 |" in section and "(< 0.50)" in section


def test_a_scaled_arm_evaluates_the_of_arms_adapter_at_each_scale_and_trains_nothing(experiment, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    config = yaml.safe_load(experiment.read_text())
    config.update(seeds=[0], eval_base=False, contrast=None, arms=[
        {"name": "sft", "kind": "sft"}, {"name": "sft-scaled", "kind": "scaled", "of": "sft", "scales": [0.5, 1]}])
    experiment.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    first = run_experiment(load_experiment(experiment), out)
    # no train stage of its own; at scale 1 it is the sft arm's own eval and probe, already done
    assert first["stages_run"] == ["plan:costs", "train:sft seed 0", "eval:sft seed 0", "probe:sft seed 0",
                                   "eval:sft-scaled-0.5 seed 0", "probe:sft-scaled-0.5 seed 0"]
    assert first["stages_cached"] == ["eval:sft-scaled-1 seed 0", "probe:sft-scaled-1 seed 0"]
    records = [json.loads((p / "stage.json").read_text()) for p in (out / "stages").iterdir()]
    stages = {f"{r['stage']}:{r['label']}": r for r in records}
    scaled, sft = stages["eval:sft-scaled-0.5 seed 0"], stages["eval:sft seed 0"]
    assert scaled["inputs"]["adapter_scale"] == 0.5 and "adapter_scale" not in sft["inputs"]  # sft's key as before
    assert scaled["inputs"]["adapter"] == sft["inputs"]["adapter"] == stages["train:sft seed 0"]["inputs"]
    assert scaled["result"]["adapter_scale"] == 0.5 and sft["result"]["adapter_scale"] == 1.0  # scores.json
    arms = first["summary"]["arms"]
    half = arms["sft-scaled-0.5"]
    assert (half["kind"], half["ratio"], half["of"], half["scale"]) == ("scaled", 0, "sft", 0.5)
    assert arms["sft"]["of"] is None and "format_accuracy" in half["delta"] and "leakage" in half["delta"]
    assert half["compute"]["flops"] == arms["sft"]["compute"]["flops"] > 0 and half["compute"]["est_wall_s"] == 0
    assert list(half["wall_s"]) == ["eval"]  # no sampling, mixing or training of its own
    report = (out / "report.md").read_text()
    assert "| sft-scaled-0.5 | scaled | 0 |" in report and "A scaled arm trains nothing" in report
    assert "- sft-scaled-0.5 (ratio 0) against sft: format_accuracy " in report
    plan = {a["arm"]: a for a in json.loads((out / "manifest.json").read_text())["plan"]["arms"]}
    assert plan["sft-scaled-0.5"]["of"] == "sft" and plan["sft-scaled-0.5"]["flops"] == plan["sft"]["flops"]
    assert plan["sft-scaled-0.5"]["est_wall_s"] == 0 and "of" not in plan["sft"]
    probes = {r["label"]: r for r in records if r["stage"] == "probe"}
    assert probes["sft-scaled-0.5 seed 0"]["inputs"]["adapter_scale"] == 0.5
    assert "adapter at 0.5" in probes["sft-scaled-0.5 seed 0"]["result"]["model"]

    second = run_experiment(load_experiment(experiment), out)
    assert second["stages_run"] == [] and sorted(second["stages_cached"]) == sorted(
        first["stages_run"] + first["stages_cached"])


def test_a_promot_arm_trains_two_phases_and_puts_its_soft_prompt_before_task_prompts_only(experiment, tmp_path,
                                                                                           monkeypatch):
    from delia.artifacts import TrainRecord

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    config = yaml.safe_load(experiment.read_text())
    config.update(seeds=[0], eval_base=False, arms=[
        {"name": "sft", "kind": "sft"},
        {"name": "promot", "kind": "promot", "train": {"soft_prompt": 2}, "prompt_train": {"max_steps": 1}},
        {"name": "promot-kl", "kind": "delia-kl", "diverse": "reference", "ratio": 1, "promot": True,
         "train": {"soft_prompt": 2}, "prompt_train": {"max_steps": 1}}])
    config["task"]["add_tokens"] = {"<sep>": None}  # no probe stage
    experiment.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = run_experiment(load_experiment(experiment), out)
    trains = {t["label"]: (p, t) for p in (out / "stages").glob("train-*")
              for t in [json.loads((p / "stage.json").read_text())]}
    # the soft prompt's phase trains on the task rows alone, so promot-kl's is promot's, cached
    assert sorted(trains) == ["promot seed 0 phase 1", "promot seed 0 phase 2", "promot-kl seed 0 phase 2",
                              "sft seed 0"]
    assert "train:promot-kl seed 0 phase 1" in result["stages_cached"]
    data = {label: t["inputs"]["data"] for label, (_, t) in trains.items()}
    assert data["promot seed 0 phase 1"] == data["sft seed 0"] != data["promot-kl seed 0 phase 2"]
    first, second = (TrainRecord.read(trains[f"promot seed 0 phase {i}"][0] / "adapter") for i in (1, 2))
    assert (first.settings["lora"], second.settings["lora"]) == (False, True)
    assert second.settings["token_rows_from"] == str(trains["promot seed 0 phase 1"][0] / "adapter")
    assert trains["promot seed 0 phase 2"][1]["inputs"]["token_rows_from"]  # keyed by the rows, not the path
    kl = TrainRecord.read(trains["promot-kl seed 0 phase 2"][0] / "adapter")
    assert kl.settings["diverse_loss"] == "kl" and kl.settings["token_rows_from"] == second.settings["token_rows_from"]
    evals = {json.loads((p / "stage.json").read_text())["label"]: p for p in (out / "stages").glob("eval-*")}
    scores = json.loads((evals["promot seed 0"] / "scores.json").read_text())
    assert scores["soft_prompt"] == "<soft_0><soft_1>"
    prompts = [json.loads(x)["prompt_tokens"] for x in (evals["promot seed 0"] / "predictions.jsonl").open()]
    sft_prompts = [json.loads(x)["prompt_tokens"] for x in (evals["sft seed 0"] / "predictions.jsonl").open()]
    assert [a - b for a, b in zip(prompts, sft_prompts, strict=True)] == [2] * 4
    general = [json.loads(x) for x in (evals["promot seed 0"] / "general.jsonl").open()]
    assert all("<soft_" not in json.dumps(r) for r in general)
    arms = result["summary"]["arms"]
    assert arms["promot"]["compute"]["trained_tokens"] > arms["sft"]["compute"]["trained_tokens"]  # two phases
    assert not run_experiment(load_experiment(experiment), out)["stages_run"]  # all cached
