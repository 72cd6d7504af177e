import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from delia.errors import DeliaError
from delia.important import ImportantTokenLoss, encode_rows, important_ids


@pytest.fixture
def model_and_tokenizer(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), AutoTokenizer.from_pretrained(
        tiny_model)


def test_important_ids(model_and_tokenizer):
    _, tok = model_and_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert important_ids(tok, ["<|im_end|>"]) == {end: "<|im_end|>"}
    quotes = important_ids(tok, ["'"])  # every token whose text holds a quote
    assert len(quotes) > 1 and all("'" in tok.decode([i]) for i in quotes)
    with pytest.raises(DeliaError, match="matches no token"):
        important_ids(tok, ["\u2603"])


def test_measure_matches_cross_entropy_by_hand(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    record = {"messages": [{"role": "user", "content": "Is 'x' fine?"}, {"role": "assistant", "content": "'yes'"}]}
    rows = encode_rows(tok, [record], None)
    ids, n_prompt = rows[0]
    chosen = important_ids(tok, ["'"])
    result = ImportantTokenLoss(rows, chosen, tmp_path / "x.jsonl").measure(model)

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    by_hand = {"prompt": [], "response": []}
    for p in range(len(ids) - 1):
        if ids[p + 1] in chosen:
            loss = torch.nn.functional.cross_entropy(logits[p:p + 1], torch.tensor([ids[p + 1]])).item()
            by_hand["response" if p + 1 >= n_prompt else "prompt"].append(loss)
    assert by_hand["prompt"] and by_hand["response"]
    assert result["count"] == len(by_hand["prompt"]) + len(by_hand["response"])
    assert result["prompt_loss"] == pytest.approx(sum(by_hand["prompt"]) / len(by_hand["prompt"]), rel=1e-5)
    assert result["response_loss"] == pytest.approx(sum(by_hand["response"]) / len(by_hand["response"]), rel=1e-5)
    assert result["per_token"]["'"]["count"] == result["count"]
