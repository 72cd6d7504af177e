"""General-behaviour evaluation: leakage rules on hand-made answers, drift on the tiny model, eval end to end."""

from __future__ import annotations

import json

import pytest

from delia.evaluate import CONTRAST_ROWS, GENERAL_ROWS, SCORES, evaluate
from delia.general import drift, leak_row, quality, read_prompts, summarise_rows
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


def _answers(model, tokenizer, prompts):
    from delia.backends import SamplingParams
    from delia.backends.hf import HFBackend
    from delia.chat import prompt_ids

    ids = [prompt_ids(tokenizer, p) for p in prompts.prompts]
    done = dict(HFBackend(model, tokenizer).generate(ids, SamplingParams(temperature=0, top_p=1, max_new_tokens=8)))
    return {"vocab_size": model.get_output_embeddings().weight.shape[0],
            "rows": [{"prompt_ids": ids[i], "answer_ids": list(done[i].token_ids)} for i in range(len(ids))]}


def test_drift_is_zero_for_a_fresh_adapter_and_positive_after_a_step(tiny_model, write_jsonl):
    import torch
    from peft import LoraConfig, get_peft_model

    from delia.models import load_model

    model, tok = load_model(str(tiny_model))
    prompts = read_prompts(write_jsonl("general.jsonl", GENERAL))
    answers = _answers(model, tok, prompts)
    assert all(r["answer_ids"] for r in answers["rows"])
    itself = drift(model, answers)  # a plain model is its own base
    assert all(d["kl"] == 0 and d["nll"] == pytest.approx(d["base_nll"]) for d in itself)

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    fresh = drift(peft, answers)  # LoRA B starts at zero: the tuned model is the base
    assert all(d["kl"] == pytest.approx(0, abs=1e-6) for d in fresh)
    assert [d["base_nll"] for d in fresh] == pytest.approx([d["base_nll"] for d in itself], abs=1e-5)

    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([answers["rows"][0]["prompt_ids"] + [7, 8, 9]])
    peft.train()
    peft(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    peft.eval()
    moved = drift(peft, answers)
    assert all(d["kl"] > 0 for d in moved)
    assert [d["base_nll"] for d in moved] == pytest.approx([d["base_nll"] for d in itself], abs=1e-5)

    separate, _ = load_model(str(tiny_model))  # the base given apart gives the same numbers
    assert [d["kl"] for d in drift(peft, answers, base_model=separate)] == pytest.approx(
        [d["kl"] for d in moved], rel=1e-4, abs=1e-6)


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
    assert json.loads((out / SCORES).read_text()) == summary
    g = summary["general"]
    assert g["n"] == 3 and g["metrics"]["drift_kl"] == 0 and g["metrics"]["leakage"] in (0, 1 / 3, 2 / 3, 1)
    assert {"leakage", "drift_kl", "base_answer_nll", "general_chrf", "general_contains"} == set(g["metrics"])
    rows = [json.loads(line) for line in (out / GENERAL_ROWS).read_text().splitlines()]
    assert [r["id"] for r in rows] == ["g1", "g2", "g3"]
    assert all(r["output"] == r["base_output"] for r in rows)  # the base model is its own base
    assert "contains" in rows[0]["scores"] and "chrf" in rows[1]["scores"] and "chrf" not in rows[2]["scores"]
    crows = [json.loads(line) for line in (out / CONTRAST_ROWS).read_text().splitlines()]
    assert len(crows) == 3 and summary["contrast"]["n"] == 3
    cached = list((tmp_path / "cache" / "general-base").glob("*.json"))
    assert len(cached) == 1  # base answers generated once, then reused
    evaluate(task, tmp_path / "again", model=str(tiny_model), metric_config=metric, max_new_tokens=4,
             general=general, general_max_new_tokens=6)
    assert list((tmp_path / "cache" / "general-base").glob("*.json")) == cached
