"""General-behaviour evaluation: leakage rules on hand-made answers, drift on the tiny model, eval end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from delia.artifacts import CONTRAST_ROWS, GENERAL_ROWS, EvalScores
from delia.errors import DeliaError
from delia.evaluate import evaluate
from delia.general import (
    BASE_TOP_K,
    drift,
    general_sets,
    leak_row,
    leakage_by_kind,
    map_files,
    quality,
    read_prompts,
    set_files,
    summarise_rows,
)
from delia.metrics import MetricConfig, leaks

SARCASM = MetricConfig(kind="format", required_keys=["sarcastic"], exact_keys=True,
                       allowed_values={"sarcastic": ["yes", "no"]}, label_key="sarcastic")
GENERAL = [
    {"id": "g1", "messages": [{"role": "user", "content": "What is the capital of France?"},
                              {"role": "assistant", "content": "Paris"}]},
    {"id": "g2", "messages": [{"role": "user", "content": "Write a short poem about the sea."},
                              {"role": "assistant", "content": "The sea and the sky meet in blue light, "
                                                               "waves fold into the quiet night."}]},
    {"id": "g3", "messages": [{"role": "user", "content": "Say hello."}]},
]
CONTRAST = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"Item {i}: do not use the <sep> format."}]}
            for i in range(3)]


@pytest.mark.parametrize("answer, leaked", [
    ('{"sarcastic": "yes"}', True),
    ('{"{"s": "true," "n": "1"}}', True),  # broken JSON in the task's shape still counts
    ('  ```json\n{"sarcastic": "no"', True),  # fenced and cut off
    ('{', True),
    ('Sure. "sarcastic": "yes"', True),  # the task's key in key position
    ("In Python a dict is written {'a': 1}, with braces.", False),  # prose that mentions braces
    ("Paris is the capital of France.", False),
    ("", False),
    ("The word sarcastic: meaning mocking.", False),  # the key's word, not in key position
])
def test_format_leakage_on_hand_made_answers(answer, leaked):
    assert leaks(SARCASM, answer) is leaked


def test_translation_leakage_by_target_script_and_none_without_a_rule():
    ja = MetricConfig(kind="translation", target_scripts=["HIRAGANA", "KATAKANA", "CJK"])
    assert leaks(ja, "こんにちは、世界。")
    assert leaks(ja, "東京はおおきい city")  # 7 of 11 letters in the scripts
    assert not leaks(ja, "東京 is big")  # 2 of 7
    assert not leaks(ja, "Tokyo is a big city, 東京")
    assert not leaks(ja, "12345 !!")
    assert leaks(MetricConfig(kind="translation"), "こんにちは") is None
    assert leaks(MetricConfig(kind="contains"), "{") is None
    with pytest.raises(ValueError, match="target_scripts only applies"):
        MetricConfig(kind="format", target_scripts=["CJK"])


def test_new_token_use_is_leakage_even_when_the_text_hides_it():
    sep = MetricConfig.delia_format()
    assert leak_row(sep, "plain words", [5, 900, 6], new_ids=[900]) is True
    assert leak_row(sep, "plain words", [5, 6], new_ids=[900]) is False
    assert leak_row(sep, "{'thought': 'x', 'hallucination': 'no'}", [5], new_ids=[900]) is True


def test_quality_uses_contains_for_short_references_and_chrf_for_long():
    assert quality("The capital is Paris.", "Paris") == {"contains": True}
    assert quality("Parisian food", "Paris") == {"contains": False}
    long = quality("waves fold into the night", GENERAL[1]["messages"][1]["content"])
    assert set(long) == {"chrf"} and 0 < long["chrf"] < 100
    assert quality("anything", None) == {}


def test_contrast_summary_counts_obeying_rows():
    rows = [{"scores": {"obey": v}} for v in (True, False, True, None)]
    s = summarise_rows(rows, {"contrast_obey": ("obey", True)})
    assert s["metrics"]["contrast_obey"] == pytest.approx(2 / 3) and s["row_means"] == {"contrast_obey": "obey"}


def test_drift_is_zero_for_a_fresh_adapter_and_positive_after_a_step(tiny_model, write_jsonl, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from delia.general import base_answers
    from delia.models import load_model

    model, tok = load_model(str(tiny_model))
    prompts = read_prompts(write_jsonl("general.jsonl", GENERAL))
    answers = base_answers(str(tiny_model), prompts, 8, loaded=(model, tok), cache=tmp_path / "cache")
    assert all(r["answer_ids"] for r in answers["rows"]) and answers["top_ids"].shape == (
        sum(len(r["answer_ids"]) for r in answers["rows"]), BASE_TOP_K)
    itself = drift(None, answers)  # the base model against itself: no pass, drift 0
    assert all(d["kl"] == 0 and d["nll"] == d["base_nll"] for d in itself)
    plain = drift(model, answers)  # the same weights through the pass: the cached base distribution again
    assert [d["kl"] for d in plain] == pytest.approx([0, 0, 0], abs=1e-5)
    assert [d["nll"] for d in plain] == pytest.approx([d["base_nll"] for d in itself], abs=1e-4)

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    fresh = drift(peft, answers)  # LoRA B starts at zero: the tuned model is the base
    assert [d["kl"] for d in fresh] == pytest.approx([0, 0, 0], abs=1e-5)

    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([answers["rows"][0]["prompt_ids"] + [7, 8, 9]], device=model.device)
    peft.train()
    peft(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    peft.eval()
    moved = drift(peft, answers)
    assert all(d["kl"] > 1e-6 for d in moved), moved
    assert [d["base_nll"] for d in moved] == [d["base_nll"] for d in itself]
    assert all(d["nll"] != pytest.approx(d["base_nll"]) for d in moved)

    # the cache: a second call reads the same answers back without a model
    again = base_answers(str(tiny_model), prompts, 8, cache=tmp_path / "cache")
    assert again["rows"] == answers["rows"] and (again["top_logp"] == answers["top_logp"]).all()


def test_top_k_kl_is_a_lower_bound_of_the_full_kl_and_exact_when_the_rest_agrees():
    """The drift formula on hand-made distributions: grouping the tail never raises the KL."""
    import torch


    torch.manual_seed(0)
    vocab = 300
    base = torch.randn(5, vocab).log_softmax(-1)
    tuned = (base + 0.5 * torch.randn(5, vocab)).log_softmax(-1)
    full = (base.exp() * (base - tuned)).sum(-1)
    top = base.topk(BASE_TOP_K, dim=-1)
    answers = {"rows": [{"prompt_ids": [1], "answer_ids": [2] * 5, "offset": 0, "base_nll": 1.0}],
               "top_ids": top.indices.numpy(), "top_logp": top.values.numpy()}

    class Fixed(torch.nn.Module):  # returns `tuned` at the answer positions whatever the input
        def __init__(self, logp):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.logp = logp

        def forward(self, input_ids, logits_to_keep, **_):
            from types import SimpleNamespace

            return SimpleNamespace(logits=torch.cat([self.logp, self.logp[-1:]])[None, -logits_to_keep:])

    approx = drift(Fixed(tuned), answers)[0]["kl"]
    assert 0 < approx <= float(full.mean()) + 1e-6
    same_tail = base.clone()  # move only the top tokens: the rest keeps its shape, so the bound is exact
    same_tail.scatter_(1, top.indices, top.values + 0.3 * torch.randn(5, BASE_TOP_K))
    same_tail = same_tail.log_softmax(-1)
    exact = (base.exp() * (base - same_tail)).sum(-1).mean()
    assert drift(Fixed(same_tail), answers)[0]["kl"] == pytest.approx(float(exact), rel=1e-4)


def test_evaluate_with_general_and_contrast(tiny_model, write_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    task = write_jsonl("task.jsonl", [{"messages": [{"role": "user", "content": "Is it?"},
                                                    {"role": "assistant", "content": '{"sarcastic": "no"}'}]}])
    general, contrast = write_jsonl("general.jsonl", GENERAL), write_jsonl("contrast.jsonl", CONTRAST)
    metric = tmp_path / "metric.yaml"
    metric.write_text(json.dumps(SARCASM.model_dump(mode="json")))
    out = tmp_path / "eval"
    summary = evaluate(task, out, model=str(tiny_model), metric_config=metric, max_new_tokens=4,
                       general=general, contrast=contrast, general_max_new_tokens=6)
    assert json.loads((out / EvalScores.FILE).read_text()) == summary.dump()
    g = summary.general
    assert g.n == 3 and g.metrics["drift_kl"] == 0 and g.metrics["leakage"] in (0, 1 / 3, 2 / 3, 1)
    assert {"leakage", "drift_kl", "base_answer_nll", "general_chrf", "general_contains"} == set(g.metrics)
    rows = [json.loads(line) for line in (out / GENERAL_ROWS).read_text().splitlines()]
    assert [r["id"] for r in rows] == ["g1", "g2", "g3"]
    assert all(r["output"] == r["base_output"] for r in rows)  # the base model is its own base
    assert "contains" in rows[0]["scores"] and "chrf" in rows[1]["scores"] and "chrf" not in rows[2]["scores"]
    crows = [json.loads(line) for line in (out / CONTRAST_ROWS).read_text().splitlines()]
    assert len(crows) == 3 and summary.contrast.n == 3
    cached = list((tmp_path / "cache" / "general-base").glob("*.json"))
    assert len(cached) == 1  # base answers generated once, then reused
    evaluate(task, tmp_path / "again", model=str(tiny_model), metric_config=metric, max_new_tokens=4,
             general=general, general_max_new_tokens=6)
    assert list((tmp_path / "cache" / "general-base").glob("*.json")) == cached


def test_a_metric_without_a_shape_has_no_leakage_but_keeps_drift_and_quality(tiny_model, write_jsonl, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    task = write_jsonl("task.jsonl", [{"messages": [{"role": "user", "content": "2+2?"},
                                                    {"role": "assistant", "content": "4"}]}])
    summary = evaluate(task, tmp_path / "eval", model=str(tiny_model), metric="exact", max_new_tokens=4,
                       general=write_jsonl("general.jsonl", GENERAL), general_max_new_tokens=4)
    assert "leakage" not in summary.general.metrics
    assert {"drift_kl", "base_answer_nll", "general_contains"} <= set(summary.general.metrics)


def test_contrast_needs_general(tiny_model, write_jsonl, tmp_path):
    task = write_jsonl("task.jsonl", [{"messages": [{"role": "user", "content": "2+2?"},
                                                    {"role": "assistant", "content": "4"}]}])
    with pytest.raises(DeliaError, match="`contrast` needs `general`"):
        evaluate(task, tmp_path / "eval", model=str(tiny_model), metric="exact", max_new_tokens=2,
                 contrast=write_jsonl("contrast.jsonl", CONTRAST))
    assert not (tmp_path / "eval" / EvalScores.FILE).exists()


def test_leakage_by_kind_counts_rows_with_a_kind_and_a_leakage_score():
    rows = [{"kind": "yes_no", "scores": {"leak": True}}, {"kind": "yes_no", "scores": {"leak": False}},
            {"kind": "yes_no", "scores": {"leak": True}}, {"kind": "long_form", "scores": {"leak": False}},
            {"scores": {"leak": True}},  # no kind: left out
            {"kind": "own_format", "scores": {"leak": None}}]  # no leakage rule: left out
    assert leakage_by_kind(rows) == {"yes_no": {"n": 3, "leaked": 2, "share": pytest.approx(2 / 3)},
                                     "long_form": {"n": 1, "leaked": 0, "share": 0.0}}
    assert leakage_by_kind([{"scores": {"leak": True}}]) == {}


def test_general_sets_name_a_list_by_stems_and_keep_a_single_file_unnamed(tmp_path):
    one = tmp_path / "g.jsonl"
    assert general_sets(one) == one and set_files(one) == {None: one} and set_files(None) == {}
    assert general_sets([one, "demo-data:qa.jsonl"]) == {"g": one, "qa": Path("demo-data:qa.jsonl")}
    assert set_files({"x": one}) == {"x": one}
    assert map_files(one, str) == str(one) and map_files({"x": one}, str) == {"x": str(one)}
    with pytest.raises(ValueError, match="share a stem"):
        general_sets([one, one])


def test_evaluate_scores_each_general_set_apart_with_leakage_by_kind(tiny_model, write_jsonl, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    task = write_jsonl("task.jsonl", [{"messages": [{"role": "user", "content": "Is it?"},
                                                    {"role": "assistant", "content": '{"sarcastic": "no"}'}]}])
    metric = tmp_path / "metric.yaml"
    metric.write_text(json.dumps(SARCASM.model_dump(mode="json")))
    kinds = ["yes_no", "long_form", "yes_no"]
    kinded = write_jsonl("kinded.jsonl", [{**row, "kind": k} for row, k in zip(GENERAL, kinds, strict=True)])
    plain = write_jsonl("plain.jsonl", GENERAL[:2])
    out = tmp_path / "eval"
    summary = evaluate(task, out, model=str(tiny_model), metric_config=metric, max_new_tokens=4,
                       general={"kinded": kinded, "plain": plain}, contrast=write_jsonl("contrast.jsonl", CONTRAST),
                       general_max_new_tokens=4)
    assert "general" not in summary.dump() and list(summary.general_sets) == ["kinded", "plain"]
    sets = summary.general_sets
    assert sets["kinded"].n == 3 and sets["plain"].n == 2 and summary.contrast.n == 3
    assert {"leakage", "drift_kl"} <= set(sets["plain"].metrics) and "leakage_by_kind" not in sets["plain"].dump()
    by_kind = sets["kinded"].leakage_by_kind
    assert {k: c.n for k, c in by_kind.items()} == {"yes_no": 2, "long_form": 1}
    assert sum(c.leaked for c in by_kind.values()) == round(3 * sets["kinded"].metrics["leakage"])
    rows = [json.loads(line) for line in (out / "general-kinded.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == kinds
    assert all("kind" not in json.loads(line) for line in (out / "general-plain.jsonl").read_text().splitlines())
    assert sorted(p.name for p in out.iterdir()) == [CONTRAST_ROWS, "general-kinded.jsonl", "general-plain.jsonl",
                                                     "predictions.jsonl", EvalScores.FILE]
    with pytest.raises(DeliaError, match=f"`general` {tmp_path / 'nope.jsonl'}: no such file"):
        evaluate(task, tmp_path / "o", model=str(tiny_model), general=[plain, tmp_path / "nope.jsonl"])


def test_read_prompts_takes_the_first_rows_of_a_set_with_a_limit(write_jsonl):
    path = write_jsonl("general.jsonl", GENERAL)
    whole, first = read_prompts(path), read_prompts(path, limit=2)
    assert len(whole.ids) == len(GENERAL) > 2 and first.ids == whole.ids[:2] and first.prompts == whole.prompts[:2]
