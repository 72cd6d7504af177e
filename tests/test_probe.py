"""The new-token alignment probe on the tiny random model."""

from __future__ import annotations

import json

import pytest

from delia.cli import main
from delia.errors import DeliaError
from delia.models import load_model
from delia.probe import PROBE, TEMPLATES, ProbeConfig, probe, probe_token
from delia.tokens import add_tokens

DESC = "the format of a dict with keys thought and hallucination"


def _check_entry(entry: dict, layers: int, k: int) -> None:
    for key in ("cosine_last", "cosine_mean", "baseline"):
        assert len(entry[key]) == layers
        assert all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in entry[key])
    assert -1.0 <= entry["embedding_description_cosine"] <= 1.0
    assert len(entry["neighbours"]) == k
    sims = [n["cosine"] for n in entry["neighbours"]]
    assert sims == sorted(sims, reverse=True) and all(n["id"] != entry["id"] for n in entry["neighbours"])


def test_probe_base_model_adds_the_token_like_training(tiny_model, delia_format_data, tmp_path):
    out = tmp_path / "probe"
    result = probe(out, model=str(tiny_model), token=[f"<sep>={DESC}"], data=delia_format_data / "eval.jsonl",
                   max_prompts=3, neighbours=5)
    assert json.loads((out / PROBE).read_text()) == result
    assert result["layers"] == 3  # embeddings + 2 blocks
    entry = result["tokens"]["<sep>"]
    assert entry["prompts"] == 3 and entry["prompt_source"].endswith("eval.jsonl") and entry["in_model"] is False
    assert entry["description"] == DESC
    added = result["added_for_probe"]
    assert added["init"] == "random" and added["tokens"][0]["token"] == "<sep>"
    assert entry["id"] == added["tokens"][0]["id"]
    _check_entry(entry, 3, 5)


def test_identical_embedding_gives_cosine_one(tiny_model):
    """A token whose embedding equals a one-token description's must look identical at every layer."""
    import torch

    model, tok = load_model(str(tiny_model), device="cpu")
    word = next(w for w in ("The", "What", "Write", "Translate") if len(tok(w, add_special_tokens=False)
                                                                     ["input_ids"]) == 1)
    word_id = tok(word, add_special_tokens=False)["input_ids"][0]
    add_tokens(model, tok, [("<x>", word)], method="description")  # mean of one row: that row exactly
    assert torch.equal(model.get_input_embeddings().weight[tok.convert_tokens_to_ids("<x>")],
                       model.get_input_embeddings().weight[word_id])
    entry = probe_token(model, tok, "<x>", word, [[{"role": "user", "content": "<x>"}]], neighbours=3)
    assert entry["cosine_last"] == pytest.approx([1.0] * 3, abs=1e-5)
    assert entry["cosine_mean"] == pytest.approx([1.0] * 3, abs=1e-5)
    assert entry["embedding_description_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert entry["neighbours"][0]["id"] == word_id and entry["neighbours"][0]["cosine"] == pytest.approx(1.0)
    # a random token is not aligned with the word: below 1 at the embedding layer
    add_tokens(model, tok, [("<y>", None)], method="random", seed=1)
    other = probe_token(model, tok, "<y>", word, [[{"role": "user", "content": "<y>"}]], neighbours=3)
    assert other["cosine_last"][0] < 0.9


def test_probe_cli_templates_and_token_file(tiny_model_untied, tmp_path, capsys):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("'<sep>': the hallucination-check format\n'<q>': a question\n")
    out = tmp_path / "p"
    with pytest.raises(SystemExit) as done:
        main(["probe", str(out), "--model", str(tiny_model_untied), "--tokens-file", str(tokens),
              "--token", "<q>=a short question", "--neighbours", "4", "--init", "mean"])
    assert done.value.code == 0
    result = json.loads((out / PROBE).read_text())
    assert set(result["tokens"]) == {"<sep>", "<q>"}
    assert result["tokens"]["<q>"]["description"] == "a short question"  # --token wins over the file
    for entry in result["tokens"].values():
        assert entry["prompt_source"] == "templates" and entry["prompts"] == len(TEMPLATES)
        _check_entry(entry, 3, 4)
    assert result["added_for_probe"]["tied_embeddings"] is False and result["added_for_probe"]["init"] == "mean"
    assert "probe <q>: cosine_last by layer" in capsys.readouterr().err  # the command prints the result


def test_probe_needs_descriptions(tiny_model, tmp_path):
    with pytest.raises(DeliaError, match="no token with a description"):
        probe(tmp_path / "p", model=str(tiny_model), token=["<sep>"])


@pytest.mark.parametrize(("options", "named"), [
    ({"init": "zeros"}, "field 'init': unknown init 'zeros'; expected one of random, mean, mean-noise, description"),
    ({"max_prompts": 0}, "field 'max_prompts': max_prompts must be >= 1, got 0"),
    ({"format": "csv"}, "field 'format': unknown format 'csv'"),
    ({"model": "m", "adapter": "a"}, "set `model` or `adapter`, not both"),
    ({"adapter_scale": 0.5}, "`adapter_scale` scales an `adapter`'s LoRA update: give `adapter`"),
])
def test_probe_options_errors_name_the_field(options, named, tmp_path):
    with pytest.raises(DeliaError) as e:
        probe(tmp_path / "p", ProbeConfig(token=["<sep>=x"]), **options)
    assert named in str(e.value)
    assert not (tmp_path / "p").exists()


def test_probe_reports_progress_per_token(tiny_model, tmp_path):
    events = []
    probe(tmp_path / "p", model=str(tiny_model), token=["<a>=first", "<b>=second"], max_prompts=1, neighbours=2,
          progress=events.append)
    assert [(e.task, e.done, e.total) for e in events] == [("probe", 1, 2), ("probe", 2, 2)]


def test_eval_and_probe_on_a_trained_adapter(tiny_model, delia_format_data, write_jsonl, tmp_path):
    """A `delia train` adapter with `<sep>`: eval loads it, the probe reads the description it recorded."""
    from delia.evaluate import evaluate
    from delia.training import train

    data = write_jsonl("train.jsonl", [
        {"messages": [{"role": "user", "content": f"Is '{q}' right? Answer in the <sep> format."},
                      {"role": "assistant", "content": f"{{'thought': 'ok', 'hallucination': '{a}'}}"}]}
        for q, a in [("2+2=4", "no"), ("Paris is in Spain", "yes"), ("the sky is blue", "no"), ("1>2", "yes")]])
    adapter = train(data, tmp_path / "adapter", model=str(tiny_model), add_token=[f"<sep>={DESC}"], max_steps=2,
                    batch_size=2, warmup_steps=0, learning_rate=1e-2)
    scores = evaluate(delia_format_data / "eval.jsonl", tmp_path / "eval", adapter=adapter, limit=2,
                      max_new_tokens=4)
    assert scores.rows == 2 and scores.model.endswith("(adapter)")

    result = probe(tmp_path / "probe", adapter=adapter, data=delia_format_data / "eval.jsonl", max_prompts=2,
                   neighbours=3)
    entry = result["tokens"]["<sep>"]
    assert entry["description"] == DESC and entry["in_model"] is True and result["added_for_probe"] is None
    _check_entry(entry, 3, 3)
    base = probe(tmp_path / "probe-base", model=str(tiny_model), token=[f"<sep>={DESC}"],
                 data=delia_format_data / "eval.jsonl", max_prompts=2, neighbours=3)["tokens"]["<sep>"]
    assert base["id"] == entry["id"]  # the base gets the token where training put it
    assert base["embedding_norm"] != pytest.approx(entry["embedding_norm"])  # training moved the row

    # the adapter at another scale: the LoRA update scaled (the token's row kept as trained), as `delia eval` does
    half = probe(tmp_path / "probe-half", adapter=adapter, adapter_scale=0.5, data=delia_format_data / "eval.jsonl",
                 max_prompts=2, neighbours=3)
    assert "0.5" in half["model"] and half["tokens"]["<sep>"]["embedding_norm"] == pytest.approx(
        entry["embedding_norm"])
    assert half["tokens"]["<sep>"]["cosine_last"] != pytest.approx(entry["cosine_last"])
