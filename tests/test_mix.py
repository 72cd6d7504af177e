import json
import logging
from collections import Counter

import pytest

from delia.data import read_chat
from delia.errors import DeliaError
from delia.mix import MixConfig, mix, summary_path


def _rows(prefix, n, answer="fine"):
    return [{"messages": [{"role": "user", "content": f"{prefix} question {i}"},
                          {"role": "assistant", "content": f"{answer} {i}"}], "id": f"{prefix}{i}",
             "meta": {"n": i}} for i in range(n)]


@pytest.fixture
def inputs(write_jsonl):
    task = write_jsonl("task.jsonl", [{"prompt": f"task {i}", "completion": f"done {i}", "tag": "t"} for i in range(4)])
    return task, write_jsonl("diverse.jsonl", _rows("d", 30))


def test_ratio_keeps_every_task_row_and_sources(inputs, tmp_path, tiny_model):
    task, diverse = inputs
    out = tmp_path / "mix.jsonl"
    summary = mix(task, diverse, out, ratio=2.5, tokenizer=str(tiny_model))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(r["source"] for r in rows) == {"task": 4, "diverse": 10}
    assert sorted(r["messages"][0]["content"] for r in rows if r["source"] == "task") == [f"task {i}" for i in range(4)]
    diverse_ids = [r["id"] for r in rows if r["source"] == "diverse"]
    assert len(set(diverse_ids)) == 10 and all(i.startswith("d") for i in diverse_ids)
    assert all(r["meta"] == {"tag": "t"} for r in rows if r["source"] == "task")
    assert summary.sources["task"].rows == 4 and summary.sources["diverse"].rows == 10
    assert summary.sources["diverse"].total_tokens > 0
    assert json.loads(summary_path(out).read_text()) == summary.dump()
    assert [r["source"] for r in rows] != ["task"] * 4 + ["diverse"] * 10  # shuffled together


def test_deterministic_for_a_seed(inputs, tmp_path):
    task, diverse = inputs
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    mix(task, diverse, a, diverse_count=12, seed=3, tokenizer="")
    mix(task, diverse, b, diverse_count=12, seed=3, tokenizer="")
    mix(task, diverse, c, diverse_count=12, seed=4, tokenizer="")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_pool_too_small(inputs, tmp_path, caplog):
    task, diverse = inputs
    with pytest.raises(DeliaError, match="pool has 30 rows but 40"):
        mix(task, diverse, tmp_path / "m.jsonl", ratio=10, tokenizer="")
    assert not (tmp_path / "m.jsonl").exists()
    summary = mix(task, diverse, tmp_path / "m.jsonl", MixConfig(ratio=10, allow_short=True), tokenizer="")
    assert summary.short and summary.sources["diverse"].rows == 30
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "only 30 rows of the 40" in caplog.text


@pytest.mark.parametrize("kw", [{}, {"ratio": 1, "diverse_count": 3}, {"ratio": -1}])
def test_needs_one_valid_amount(inputs, tmp_path, kw):
    with pytest.raises(DeliaError):
        mix(*inputs, tmp_path / "m.jsonl", tokenizer="", **kw)


@pytest.mark.parametrize(("options", "named"), [
    ({}, "set exactly one of `ratio` or `diverse_count`"),
    ({"ratio": 1, "diverse_count": 3}, "set exactly one of `ratio` or `diverse_count`"),
    ({"ratio": -1}, "field 'ratio': ratio must be >= 0, got -1"),
    ({"diverse_count": -2}, "field 'diverse_count': diverse_count must be >= 0, got -2"),
    ({"ratio": 1, "seeed": 2}, "'seeed' is not an option of delia mix (did you mean 'seed'?)"),
])
def test_options_errors_name_the_field(inputs, tmp_path, options, named):
    with pytest.raises(DeliaError) as e:
        mix(*inputs, tmp_path / "m.jsonl", **options)
    assert named in str(e.value)
    assert not (tmp_path / "m.jsonl").exists()


def test_cli_names_the_flags_of_a_bad_amount(inputs, tmp_path, capsys):
    from delia.cli import main

    with pytest.raises(SystemExit) as done:
        main(["mix", *map(str, inputs), str(tmp_path / "m.jsonl"), "--ratio", "1", "--diverse-count", "2"])
    err = " ".join(capsys.readouterr().err.split())
    assert done.value.code == 2 and "set exactly one of --ratio or --diverse-count" in err


def test_hf_dataset_output_and_cli(inputs, tmp_path):
    from delia.cli import main

    task, diverse = inputs
    cfg = tmp_path / "mix.yaml"
    cfg.write_text("ratio: 1\nseed: 7\nmodel: ''\n")
    with pytest.raises(SystemExit) as done:
        main(["mix", str(task), str(diverse), str(tmp_path / "mixed"), "--config", str(cfg)])
    assert done.value.code == 0
    data = read_chat(tmp_path / "mixed")
    assert Counter(r["source"] for r in data.records) == {"task": 4, "diverse": 4}
    assert json.loads(summary_path(tmp_path / "mixed").read_text())["seed"] == 7


@pytest.mark.parametrize("flag", ["--tokenizer", "--model", "-m"])
def test_cli_empty_tokenizer_skips_counts(inputs, tmp_path, flag, capsys):
    from delia.cli import main

    task, diverse = inputs
    with pytest.raises(SystemExit) as done:
        main(["mix", str(task), str(diverse), str(tmp_path / "m.jsonl"), "--ratio", "1", flag, ""])
    assert done.value.code == 0
    summary = json.loads(summary_path(tmp_path / "m.jsonl").read_text())
    assert summary["tokenizer"] is None and "total_tokens" not in summary["sources"]["task"]
    assert "wrote 8 rows to" in capsys.readouterr().err  # the command prints the summary the stage returns


def test_default_tokenizer_never_installs(inputs, tmp_path, monkeypatch, caplog):
    import delia.models

    def no_install(*a, **k):
        raise AssertionError("mix must not install or load a model only to count tokens")

    monkeypatch.setattr(delia.models, "bundled_installed", lambda name: False)
    monkeypatch.setattr(delia.models, "load_tokenizer", no_install)
    monkeypatch.setattr(delia.models, "_bundled_gguf", no_install)
    caplog.set_level(logging.INFO, logger="delia")
    summary = mix(*inputs, tmp_path / "m.jsonl", ratio=1)
    assert summary.tokenizer is None and summary.sources["diverse"].total_tokens is None
    assert "not installed" in caplog.text


def test_default_tokenizer_is_the_bundled_model_when_installed(inputs, tmp_path, monkeypatch, tiny_model):
    import delia.models

    loaded, real = [], delia.models.load_tokenizer
    monkeypatch.setattr(delia.models, "bundled_installed", lambda name: True)
    monkeypatch.setattr(delia.models, "load_tokenizer", lambda name: loaded.append(name) or real(str(tiny_model)))
    summary = mix(*inputs, tmp_path / "m.jsonl", ratio=1)
    assert loaded == [delia.models.DEFAULT_MODEL] and summary.tokenizer == delia.models.DEFAULT_MODEL
    assert summary.sources["diverse"].total_tokens > 0
