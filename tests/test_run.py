"""`delia run` end to end on the tiny model: every stage, the report, and a rerun that skips every stage."""

import json

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
        "sample": {"max_new_tokens": 8, "drop_truncated": False, "drop_repetitive": False, "progress": False,
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
    # sample + base eval + base probe, then per arm and seed: (mix) train eval probe
    assert len(first["stages_run"]) == 3 + 2 * 3 + 2 * 4 and not first["stages_cached"]
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
    assert report.count("| delia |") == 2 + 3  # verdict, all metrics, three example answers
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
    assert again["stages_cached"] == ["train:sft seed 0", "probe:sft seed 0"]
    assert again["stages_run"] == ["eval:sft seed 0"]


def test_bad_config_names_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"task": {"train": "a.jsonl"}, "arms": [{"name": "x", "ratio": -1}]}))
    with pytest.raises(DeliaError) as e:
        load_experiment(path)
    msg = str(e.value)
    assert f"{path}: field 'task.eval'" in msg and "arms.0.ratio" in msg


def test_shipped_example_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples"
    paper = load_experiment(root / "paper-format.yaml")
    assert paper.task.train.name == "train.jsonl" and paper.task.train.parent.name == "delia-format"
    assert [a.ratio for a in paper.arms] == [0, 100, 260] and paper.baseline_arm == "sft"
    assert str(paper.general) == "demo-data:general.jsonl" and paper.train_eval
    demo = load_experiment(root / "demo.yaml")
    assert str(demo.task.train).startswith("demo-data:") and str(demo.general) == "demo-data:general.jsonl"
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
    msg = str(e.value)
    assert f"{path}: field 'train': " in msg and "'lerning_rate' is not an option of delia train (did you mean " \
        "'learning_rate'?)" in msg and "'seed' is set by the experiment itself" in msg
    assert "field 'arms.1.train'" in msg and "'lora_rr'" in msg and "'bogus' is not an option of delia eval" in msg
    assert "field 'sample'" not in msg
