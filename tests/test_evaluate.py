"""`delia eval` end to end on the tiny random model (and one e2e run on SmolLM2 with the `<sep>` task)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from delia.artifacts import PREDICTIONS, EvalScores
from delia.cli import main
from delia.errors import DeliaError
from delia.evaluate import EvalConfig, evaluate
from delia.metrics import MetricConfig, score

ROWS = [
    {"id": "a", "messages": [{"role": "user", "content": "Is the sky blue? Answer in the <sep> format."},
                             {"role": "assistant", "content": "{'thought': 'it is', 'hallucination': 'no'}"}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "{'thought': 'four', 'hallucination': 'yes'}"}]},
    {"messages": [{"role": "user", "content": "Translate: good morning"},
                  {"role": "assistant", "content": "{'thought': 'x', 'hallucination': 'no'}"}]},
]


def _read(out: Path) -> tuple[list[dict], dict]:
    preds = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    return preds, json.loads((out / EvalScores.FILE).read_text())


def test_evaluate_tiny_model(tiny_model, write_jsonl, tmp_path):
    data = write_jsonl("eval.jsonl", ROWS)
    out = tmp_path / "eval"
    result = evaluate(data, out, model=str(tiny_model), max_new_tokens=6, batch_size=2)
    preds, scores = _read(out)
    assert result.dump() == scores
    assert len(preds) == 3 and scores["rows"] == 3
    assert preds[0]["id"] == "a" and len({p["id"] for p in preds}) == 3
    assert preds[1]["prompt"] == ROWS[1]["messages"][:-1]
    assert preds[1]["reference"] == ROWS[1]["messages"][-1]["content"]
    for p in preds:
        assert set(p) == {"id", "prompt", "reference", "output", "finish_reason", "prompt_tokens",
                          "completion_tokens", "scores"}
        assert p["finish_reason"] in ("stop", "length") and 1 <= p["completion_tokens"] <= 6
        assert set(p["scores"]) == {"parsed", "strict", "format_ok", "strict_format_ok", "label_ok", "error"}
    expected = score(MetricConfig.delia_format(), [p["output"] for p in preds], [p["reference"] for p in preds])
    assert scores["metrics"] == expected.metrics and [p["scores"] for p in preds] == expected.rows
    assert scores["primary"] == "format_accuracy" and scores["kind"] == "format"
    assert scores["metric_config"]["label_key"] == "hallucination"
    assert scores["sampling"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 6, "seed": 0}
    assert sum(scores["finish_reasons"].values()) == 3
    assert scores["tokens"]["completion"] == sum(p["completion_tokens"] for p in preds)
    assert len(scores["data_sha256"]) == 64 and scores["model"] == str(tiny_model)
    assert sorted(x.name for x in out.iterdir()) == [PREDICTIONS, EvalScores.FILE]  # no temporary files left

    events = []
    again = evaluate(data, tmp_path / "again", EvalConfig(model=str(tiny_model), max_new_tokens=6),
                     progress=events.append)  # greedy: same outputs
    assert [p["output"] for p in _read(tmp_path / "again")[0]] == [p["output"] for p in preds]
    assert again.metrics == scores["metrics"]
    assert [(e.task, e.done, e.total, e.unit) for e in events] == [("eval", i, 3, "rows") for i in (1, 2, 3)]


def test_evaluate_cli_with_metric_config_and_limit(tiny_model, write_jsonl, tmp_path, capsys):
    data = write_jsonl("eval.jsonl", ROWS)
    cfg = tmp_path / "metric.yaml"
    cfg.write_text("kind: contains\n")
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as done:
        main(["eval", str(data), str(out), "--model", str(tiny_model), "--metric-config", str(cfg),
              "--limit", "2", "--max-new-tokens", "3"])
    assert done.value.code == 0
    preds, scores = _read(out)
    assert len(preds) == 2 and scores["rows"] == 2 and scores["primary"] == "contains"
    assert all(set(p["scores"]) == {"contains"} for p in preds)
    assert scores["metrics"]["n"] == 2
    assert "eval contains=" in capsys.readouterr().err  # the command prints the metrics the stage returns


def test_evaluate_errors(tiny_model, write_jsonl, tmp_path):
    data = write_jsonl("eval.jsonl", ROWS)
    cfg = tmp_path / "metric.yaml"
    cfg.write_text("kind: exact\n")
    with pytest.raises(DeliaError, match="disagrees"):
        evaluate(data, tmp_path / "o", model=str(tiny_model), metric="translation", metric_config=cfg)
    with pytest.raises(DeliaError, match="not both"):
        evaluate(data, tmp_path / "o", model=str(tiny_model), adapter=tmp_path)
    bad = write_jsonl("bad.jsonl", [{"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(DeliaError, match="last turn must be from the assistant"):
        evaluate(bad, tmp_path / "o", model=str(tiny_model))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("options", "named"), [
    ({"metric": "bleu"}, "field 'metric': unknown metric 'bleu'; expected one of format, translation"),
    ({"max_new_tokens": 0}, "field 'max_new_tokens': max_new_tokens must be >= 1, got 0"),
    ({"top_p": 1.5}, "field 'top_p': top_p must be <= 1, got 1.5"),
    ({"contrast": "c.jsonl"}, "`contrast` needs `general`"),
    ({"adapter": "a", "base_model": "b"}, "`base_model` is for a merged `model`"),
    ({"model": "m", "adapter": "a"}, "set `model` or `adapter`, not both"),
    ({"adapter_scale": 0.5}, "`adapter_scale` scales an `adapter`'s LoRA update: give `adapter`"),
    ({"adapter": "a", "adapter_scale": -1}, "adapter_scale must be >= 0"),
    ({"max_new_token": 8}, "'max_new_token' is not an option of delia eval (did you mean 'max_new_tokens'?)"),
])
def test_eval_options_are_checked_before_anything_runs(options, named, tmp_path):
    with pytest.raises(DeliaError) as e:
        evaluate(tmp_path / "missing.jsonl", tmp_path / "o", **options)
    assert named in str(e.value)
    with pytest.raises(DeliaError):
        EvalConfig.build(**options)
    assert not (tmp_path / "o").exists()


def test_eval_cli_names_flags_of_a_bad_combination_and_a_missing_file(write_jsonl, tmp_path, capsys):
    data, contrast = write_jsonl("eval.jsonl", ROWS), write_jsonl("contrast.jsonl", ROWS)
    with pytest.raises(SystemExit) as done:
        main(["eval", str(data), str(tmp_path / "o"), "--contrast", str(contrast)])
    assert done.value.code == 2 and "--contrast needs --general" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit) as done:
        main(["eval", str(data), str(tmp_path / "o"), "--general", str(tmp_path / "nope.jsonl")])
    err = " ".join(capsys.readouterr().err.split())
    assert done.value.code == 2 and f"--general {tmp_path / 'nope.jsonl'}: no such file or folder" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_evaluate_smollm2_on_sep_rows(delia_format_data, tmp_path):
    rows = (delia_format_data / "eval.jsonl").read_text().splitlines()[:2]
    data = tmp_path / "sep.jsonl"
    data.write_text("\n".join(rows) + "\n")
    result = evaluate(data, tmp_path / "out", max_new_tokens=24)
    preds, scores = _read(tmp_path / "out")
    assert result.dump() == scores and len(preds) == 2
    assert all(p["output"].strip() for p in preds)  # the real model answers something
    assert all(p["completion_tokens"] <= 24 for p in preds)
    assert 0.0 <= scores["metrics"]["format_accuracy"] <= 1.0 and scores["metrics"]["n"] == 2
