"""ProMoT's two phases on the tiny fixtures: a soft prompt trained alone, then kept frozen while LoRA trains, and
put before task prompts only at eval."""

import json

import pytest
import torch
from safetensors.torch import load_file

from delia.errors import DeliaError
from delia.evaluate import evaluate
from delia.models import load_trained
from delia.training import TrainConfig, build_trainer, train

FAST = {"max_length": 256, "batch_size": 4, "warmup_steps": 0, "learning_rate": 1e-2, "logging_steps": 1}
SOFT = ["<soft_0>", "<soft_1>", "<soft_2>"]


def _row(i, source):
    return {"messages": [{"role": "user", "content": f"Check item {i} in the <sep> format."},
                         {"role": "assistant", "content": f"<sep>{{'thought': 'item {i}', 'hallucination': 'no'}}"}],
            "source": source}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "mixed.jsonl"
    path.write_text("".join(json.dumps(_row(i, "task" if i % 2 else "diverse")) + "\n" for i in range(12)))
    return path


@pytest.fixture(scope="module")
def phase_one(mixed, tiny_model, tiny_model_untied, tmp_path_factory):
    """The soft prompt trained alone (LoRA off) on each tiny model, once for the module: {tied: folder}."""
    return {tied: _phase_one(mixed, tmp_path_factory.mktemp("one"), model)
            for tied, model in ((True, tiny_model), (False, tiny_model_untied))}


def _rows(adapter, tokens):
    """The embedding rows an adapter folder ends with for `tokens`."""
    model, tokenizer = load_trained(adapter, device="cpu")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    return model.get_input_embeddings().weight[torch.tensor(ids)].detach().clone()


def _phase_one(data, out, model, **kw):
    return train(data, out, **FAST, model=str(model), add_token=["<sep>"], soft_prompt=3, lora=False, max_steps=2,
                 **kw)


@pytest.mark.parametrize("tied", [True, False])
def test_phase_one_trains_only_the_new_rows(mixed, phase_one, tmp_path, tiny_model, tiny_model_untied, tied):
    model = tiny_model if tied else tiny_model_untied
    run = build_trainer(mixed, tmp_path / "look", **FAST, model=str(model), add_token=["<sep>"], soft_prompt=3,
                        lora=False)
    texts = [run.tokenizer.decode(x) for x in run.trainer.train_dataset["input_ids"]]
    assert sum("<soft_0><soft_1><soft_2>Check item" in t for t in texts) == 6  # the task rows, not the diverse ones
    trainable = [n for n, p in run.trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("trainable_tokens_delta" in n for n in trainable)

    out = phase_one[tied]
    weights = load_file(out / "adapter_model.safetensors")
    assert all(not v.any() for k, v in weights.items() if "lora_B" in k)  # LoRA left at its init: no change
    record = json.loads((out / "delia_train.json").read_text())
    assert [t["token"] for t in record["new_tokens"]["tokens"]] == ["<sep>", *SOFT]
    init = torch.tensor([t["init_norm"] for t in record["new_tokens"]["tokens"][1:]])
    assert not torch.allclose(_rows(out, SOFT).norm(dim=-1), init, atol=1e-4)  # the soft rows moved


@pytest.mark.parametrize("tied", [True, False])
def test_phase_two_keeps_the_soft_prompt_frozen(mixed, phase_one, tmp_path, tiny_model, tiny_model_untied, tied):
    model = tiny_model if tied else tiny_model_untied
    one = phase_one[tied]
    two = train(mixed, tmp_path / "two", **FAST, model=str(model), add_token=["<sep>"], soft_prompt=3,
                token_rows_from=one, max_steps=2)
    assert torch.equal(_rows(two, SOFT), _rows(one, SOFT))  # bit for bit
    model, tokenizer = load_trained(two, device="cpu")
    assert model.generation_config.suppress_tokens == tokenizer.convert_tokens_to_ids(SOFT)  # input-only
    assert not torch.equal(_rows(two, ["<sep>"]), _rows(one, ["<sep>"]))  # the task's token trains on
    weights = load_file(two / "adapter_model.safetensors")
    assert any(v.any() for k, v in weights.items() if "lora_B" in k)


def test_eval_puts_the_soft_prompt_before_task_prompts_only(mixed, phase_one, tmp_path, tiny_model, write_jsonl):
    two = train(mixed, tmp_path / "two", **FAST, model=str(tiny_model), add_token=["<sep>"], soft_prompt=3,
                token_rows_from=phase_one[True], max_steps=1)
    data = write_jsonl("eval.jsonl", [_row(i, "task") for i in range(3)])
    general = write_jsonl("general.jsonl", [{"messages": [{"role": "user", "content": f"Say hi {i}."}]}
                                            for i in range(3)])
    runs = {}
    for on in (True, False):
        runs[on] = evaluate(data, tmp_path / f"eval-{on}", adapter=two, general=general, soft_prompt=on,
                            max_new_tokens=4, general_max_new_tokens=4)
    assert runs[True].soft_prompt == "".join(SOFT) and runs[False].soft_prompt is None
    assert runs[True].tokens["prompt"] == runs[False].tokens["prompt"] + 3 * 3
    answers = [[json.loads(x)["output"] for x in (tmp_path / f"eval-{on}" / "general.jsonl").open()]
               for on in (True, False)]
    assert answers[0] == answers[1]  # general prompts never get it


def test_soft_prompt_options_are_checked(mixed, phase_one, tmp_path, tiny_model):
    assert "train it first (LoRA off: `lora: false`, --no-lora), then give that run" in TrainConfig.build(
        soft_prompt=3).token_problem()
    assert "give `add_token` or `soft_prompt`" in TrainConfig.build(lora=False).token_problem()
    assert "`train_rows` new" in TrainConfig.build(soft_prompt=3, lora=False, train_rows="all").token_problem()
    assert TrainConfig.build(soft_prompt=3, lora=False).token_problem() is None
    with pytest.raises(DeliaError, match="train it first"):
        train(mixed, tmp_path / "none", **FAST, model=str(tiny_model), soft_prompt=3, max_steps=1)
    assert not (tmp_path / "none").exists()  # refused before the output folder is made
    with pytest.raises(DeliaError, match=r"its tokenizer lacks <soft_3>"):
        train(mixed, tmp_path / "two", **FAST, model=str(tiny_model), add_token=["<sep>"], soft_prompt=4,
              token_rows_from=phase_one[True], max_steps=1)
