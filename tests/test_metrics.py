"""Metrics on hand-made outputs: the format schema, hostile outputs that must never run, sacrebleu numbers."""

from __future__ import annotations

import builtins
import importlib.machinery
import json
import sys
import types

import pytest
import sacrebleu

from delia.data import read_chat
from delia.errors import DeliaError
from delia.metrics import MetricConfig, normalize_answer, parse_output, score

REF_NO = "{'thought': 'fine', 'hallucination': 'no'}"
REF_YES = "{'thought': 'made up', 'hallucination': 'yes'}"


def test_format_rows_and_aggregates():
    cfg = MetricConfig.delia_format()
    outputs = [
        "{'thought': 'ok', 'hallucination': 'no'}",  # right, strict
        '{"thought": "ok", "hallucination": "no"}',  # JSON, right
        "```json\n{\"thought\": \"x\", \"hallucination\": \"no\"}\n```",  # fenced: well-formed, not strict
        "Sure! {'thought': 'a', 'hallucination': 'no'} Hope this helps.",  # span
        "{'thought': 'ok', 'hallucination': 'no'}",  # well-formed, wrong label (reference says yes)
        "{'thought': 'ok', 'hallucination': 'maybe'}",  # value not allowed
        "{'thought': 'ok', 'hallucination': 'no', 'extra': 1}",  # exact_keys
        "{'thought': 'ok'}",  # missing key
        "['thought', 'hallucination']",  # parses, not an object
        "The response is accurate.",  # prose
    ]
    refs = [REF_NO] * 4 + [REF_YES] + [REF_NO] * 5
    s = score(cfg, outputs, refs)
    assert [r["format_ok"] for r in s.rows] == [True] * 5 + [False] * 5
    assert [r["strict_format_ok"] for r in s.rows] == [True, True, False, False, True] + [False] * 5
    assert [r["label_ok"] for r in s.rows] == [True] * 4 + [False] * 6
    assert [r["parsed"] for r in s.rows] == [True] * 9 + [False]
    assert "not in ['yes', 'no']" in s.rows[5]["error"] and "extra" in s.rows[6]["error"]
    assert "missing keys ['hallucination']" in s.rows[7]["error"] and "list" in s.rows[8]["error"]
    assert s.primary == "format_accuracy"
    assert s.metrics == {"format_accuracy": 0.5, "strict_format_accuracy": 0.3, "parse_rate": 0.9,
                         "label_accuracy": 0.4, "n": 10}
    for metric, key in s.row_means.items():  # the documented invariant the report's bootstrap relies on
        assert s.metrics[metric] == pytest.approx(sum(map(float, (r[key] for r in s.rows))) / len(s.rows))


def test_extract_off_scores_only_whole_outputs():
    cfg = MetricConfig(kind="format", required_keys=["a"], extract=False)
    s = score(cfg, ["{'a': 1}", "```\n{'a': 1}\n```", "x {'a': 1} y"], ["-"] * 3)
    assert [r["format_ok"] for r in s.rows] == [True, False, False]
    assert "label_accuracy" not in s.metrics


def test_reference_without_label_is_left_out_of_label_accuracy():
    s = score(MetricConfig.delia_format(), [REF_NO, REF_NO], [REF_NO, "plain text"])
    assert [r["label_ok"] for r in s.rows] == [True, None]
    assert s.metrics["label_accuracy"] == 1.0 and s.metrics["format_accuracy"] == 1.0
    assert any("left out of label_accuracy" in n for n in s.notes)


def test_authors_references_are_well_formed(delia_format_data):
    refs = [r["messages"][-1]["content"] for r in read_chat(delia_format_data / "eval.jsonl").records]
    s = score(MetricConfig.delia_format(), refs, refs)
    assert len(refs) == 11
    assert s.metrics["strict_format_accuracy"] == 1.0 and s.metrics["label_accuracy"] == 1.0


@pytest.fixture
def no_eval(monkeypatch):
    """Make any use of eval/exec/compile in exec mode fail loudly during the test."""

    def refuse(*_a, **_k):
        raise AssertionError("model output reached eval/exec")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)


def test_hostile_outputs_never_run(tmp_path, monkeypatch, no_eval):
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "x"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    (tmp_path / "f").write_text("secret")
    hostile = [
        "__import__('os').system('touch PWNED')",
        f"__import__('shutil').rmtree('{victim}')",
        "{'thought': open('f').read(), 'hallucination': 'no'}",
        "{'thought': __import__('os').system('touch PWNED'), 'hallucination': 'no'}",
        "```python\nimport os; os.system('touch PWNED')\n```",
        "{'thought': (lambda: __import__('os').system('touch PWNED'))(), 'hallucination': 'no'}",
        "[" * 200_000 + "]" * 200_000,  # too long
        "{'a': " * 500 + "1" + "}" * 500,  # too deep for the parser's stack
        "(" * 5000 + ")" * 5000,
        "9" * 100_000,  # int conversion limit
        "{'thought': f'{__import__(\"os\").getcwd()}', 'hallucination': 'no'}",
        "\x00{'thought': 'a', 'hallucination': 'no'}\x00",
    ]
    s = score(MetricConfig.delia_format(), hostile, [REF_NO] * len(hostile))
    assert not (tmp_path / "PWNED").exists()
    assert (victim / "keep.txt").read_text() == "keep" and (tmp_path / "f").read_text() == "secret"
    # everything but the NUL-wrapped literal (extracted from its {...} span) is unparseable
    assert [r["parsed"] for r in s.rows] == [False] * (len(hostile) - 1) + [True]
    assert s.rows[-1]["strict"] is False
    assert all(r["error"] for r in s.rows[:-1])


def test_parse_output_prefers_json_and_keeps_python_literals():
    assert parse_output('{"a": true, "b": null}') == ({"a": True, "b": None}, True, None)
    assert parse_output("{'a': True, 'b': None}") == ({"a": True, "b": None}, True, None)
    value, strict, err = parse_output("   ")
    assert value is None and not strict and err == "empty output"


def test_translation_matches_sacrebleu():
    hyps = ["the cat sat on the mat", "hello there my friend", "góðan daginn", ""]
    refs = ["the cat is on the mat", "hello here my friend", "góðan dag", "nothing"]
    s = score(MetricConfig(kind="translation"), hyps, refs)
    assert s.primary == "chrf_sentence_mean" and s.primary in s.row_means
    assert s.metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert s.metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    for h, r, row in zip(hyps, refs, s.rows, strict=True):
        assert row["chrf"] == pytest.approx(sacrebleu.sentence_chrf(h, [r]).score)
        assert row["bleu"] == pytest.approx(sacrebleu.sentence_bleu(h, [r]).score)
    assert s.metrics["chrf_sentence_mean"] == pytest.approx(sum(r["chrf"] for r in s.rows) / 4)
    assert score(MetricConfig(kind="translation"), refs[:3], refs[:3]).metrics["bleu"] == pytest.approx(100.0)
    assert "comet" not in s.metrics and any("no local checkpoint" in n for n in s.notes)


def test_comet_skipped_without_the_package(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "comet" else real(name, *a))
    s = score(MetricConfig(kind="translation", comet_model=ckpt), ["a b"], ["a b"], sources=["x"])
    assert "comet" not in s.metrics
    assert any("unbabel-comet is not installed" in n for n in s.notes)


def test_comet_uses_a_local_checkpoint_only(tmp_path, monkeypatch):
    calls = {}

    class Model:
        def predict(self, data, **kw):
            calls["data"] = data
            return types.SimpleNamespace(scores=[0.5, 0.7], system_score=0.6)

    def load_from_checkpoint(path, reload_hparams=False, strict=False, local_files_only=False):
        calls["load"] = (path, local_files_only)
        return Model()

    fake = types.ModuleType("comet")
    fake.__spec__ = importlib.machinery.ModuleSpec("comet", None)
    fake.load_from_checkpoint = load_from_checkpoint
    monkeypatch.setitem(sys.modules, "comet", fake)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    s = score(MetricConfig(kind="translation", comet_model=ckpt), ["a", "b"], ["a", "c"], sources=["s1", "s2"])
    assert calls["load"] == (str(ckpt), True)
    assert calls["data"][1] == {"src": "s2", "mt": "b", "ref": "c"}
    assert s.metrics["comet"] == 0.6 and [r["comet"] for r in s.rows] == [0.5, 0.7]
    with pytest.raises(DeliaError, match="checkpoint not found"):
        score(MetricConfig(kind="translation", comet_model=tmp_path / "missing.ckpt"), ["a"], ["a"], sources=["s"])


def test_exact_and_contains_normalise():
    assert normalize_answer("  Paris,\tFRANCE!! ") == "paris france"
    outs = ["paris", "The answer is Paris.", "PARIS!", "Parisian", "no", "not sure"]
    refs = ["Paris", "paris", "Paris", "Paris", "No.", "no"]
    exact = score(MetricConfig(kind="exact"), outs, refs)
    contains = score(MetricConfig(kind="contains"), outs, refs)
    assert [r["exact"] for r in exact.rows] == [True, False, True, False, True, False]
    assert [r["contains"] for r in contains.rows] == [True, True, True, False, True, False]
    assert exact.metrics == {"exact_match": 0.5, "n": 6} and contains.primary == "contains"
    assert all(x.primary in x.row_means for x in (exact, contains))


def test_metric_config_yaml_and_errors(tmp_path):
    good = tmp_path / "m.yaml"
    good.write_text("kind: format\nrequired_keys: [answer, label]\nexact_keys: true\n"
                    "allowed_values: {label: [A, B]}\nlabel_key: label\n")
    cfg = MetricConfig.load(good)
    assert cfg.required_keys == ["answer", "label"] and cfg.label_key == "label"
    assert score(cfg, ['{"answer": "x", "label": "B"}'], ['{"answer": "y", "label": "B"}']).metrics[
        "label_accuracy"] == 1.0
    for text, message in [("kind: format\nrequired_key: [a]\n", "required_key"),
                          ("kind: translation\nlabel_key: a\n", "only apply to kind 'format'"),
                          ("kind: exact\ncomet_model: m.ckpt\n", "comet_model only applies"),
                          ("kind: bleu\n", "kind"), ("- a\n", "mapping"), ("exact_keys: true\n", "needs")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(DeliaError, match=message):
            MetricConfig.load(bad)
    with pytest.raises(DeliaError, match="unknown metric"):
        MetricConfig.named("bleu")
    assert MetricConfig.named("format") == MetricConfig.delia_format()
    assert json.loads(MetricConfig.delia_format().model_dump_json())["label_key"] == "hallucination"


def test_length_mismatch_is_an_error():
    with pytest.raises(DeliaError, match="2 outputs but 1 references"):
        score(MetricConfig(kind="exact"), ["a", "b"], ["a"])
