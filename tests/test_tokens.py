import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from delia.errors import DeliaError
from delia.tokens import add_tokens, embedding_module_names, parse_token_specs


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def test_parse_token_specs():
    assert parse_token_specs(["<sep>", "<x>=stands for x", "==eq", "<y>="]) == [
        ("<sep>", None), ("<x>", "stands for x"), ("=", "eq"), ("<y>", None)]
    with pytest.raises(DeliaError, match="twice"):
        parse_token_specs(["<a>", "<a>=again"])
    with pytest.raises(DeliaError, match="non-empty"):
        parse_token_specs([" <a>"])
    with pytest.raises(DeliaError, match="^`token` ' <a>': "):  # the errors name the option the specs came from
        parse_token_specs([" <a>"], option="token")


@pytest.mark.parametrize("method", ["random", "mean", "mean-noise", "description"])
def test_init_methods_tied_padding_row(tiny_model, method):
    model, tok = _load(tiny_model)
    n, rows = len(tok), model.get_input_embeddings().weight.shape[0]
    ref = model.get_input_embeddings().weight[:n].detach().clone()
    rec = add_tokens(model, tok, [("<sep>", "a short answer")], method, seed=1)
    sid = tok.convert_tokens_to_ids("<sep>")
    w = model.get_input_embeddings().weight
    assert sid == n < rows and w.shape[0] == rows  # reuses a padding row, no resize
    assert rec["tied_embeddings"] and rec["tokens"][0]["padding_row_reused"] and not rec["embedding_rows"]["resized"]
    assert model.get_output_embeddings().weight[sid].equal(w[sid])
    assert tok.tokenize("a <sep> b").count("<sep>") == 1
    row = w[sid].detach()
    if method == "mean":
        torch.testing.assert_close(row, ref.mean(0))
    elif method == "mean-noise":
        assert not row.equal(ref.mean(0)) and (row - ref.mean(0)).norm() < 0.5 * ref.std() * row.numel() ** 0.5
    elif method == "description":
        ids = tok("a short answer", add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(row, ref[ids].mean(0))
    else:
        assert abs(row.std() - ref.std()) < 0.5 * ref.std()
        model2, tok2 = _load(tiny_model)
        add_tokens(model2, tok2, [("<sep>", None)], method, seed=1)
        assert model2.get_input_embeddings().weight[sid].equal(row)  # seeded
        model3, tok3 = _load(tiny_model)
        add_tokens(model3, tok3, [("<sep>", None)], method, seed=2)
        assert not model3.get_input_embeddings().weight[sid].equal(row)


def test_untied_output_rows_and_resize(tiny_model_untied):
    model, tok = _load(tiny_model_untied)
    n, rows = len(tok), model.get_input_embeddings().weight.shape[0]
    out_ref = model.get_output_embeddings().weight[:n].detach().clone()
    specs = [(f"<t{i}>", None) for i in range(rows - n + 2)]  # two more than the padding rows hold
    rec = add_tokens(model, tok, specs, "mean", seed=0)
    assert not rec["tied_embeddings"] and rec["embedding_rows"]["resized"]
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == rows + 2
    last = tok.convert_tokens_to_ids(specs[-1][0])
    torch.testing.assert_close(model.get_output_embeddings().weight[last], out_ref.mean(0))
    assert [t["padding_row_reused"] for t in rec["tokens"]][-3:] == [True, False, False]
    assert embedding_module_names(model) == ("embed_tokens", "lm_head")


def test_existing_token_and_bad_requests(tiny_model):
    model, tok = _load(tiny_model)
    rec = add_tokens(model, tok, [("<|im_end|>", None)], "random")
    assert rec["tokens"] == [{"token": "<|im_end|>", "id": tok.convert_tokens_to_ids("<|im_end|>"), "init": "existing"}]
    with pytest.raises(DeliaError, match="needs a description"):
        add_tokens(model, tok, [("<new>", None)], "description")
    with pytest.raises(DeliaError, match="unknown token init"):
        add_tokens(model, tok, [("<new>", None)], "zeros")
