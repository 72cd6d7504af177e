"""KL anchoring of diverse rows (`diverse_loss kl`) on the tiny fixtures."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_train import _conversation, _settings

from delia.errors import DeliaError
from delia.training import ANCHOR_COLUMN, TRAIN_RECORD, build_trainer, train
from delia.training.anchor import AnchoredSFTTrainer, chunked_kl

KL = {"diverse_loss": "kl"}


@pytest.fixture
def rows(write_jsonl):
    """16 rows, every even one a diverse row."""
    return write_jsonl("train.jsonl", [_conversation(i) for i in range(16)]), None


def _batch(run):
    """The first training batch holding both task and anchor rows."""
    for batch in run.trainer.get_train_dataloader():
        if batch[ANCHOR_COLUMN].any() and not batch[ANCHOR_COLUMN].all():
            return batch
    raise AssertionError("no mixed batch")


def test_chunked_kl_matches_the_full_kl_at_any_chunk():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=True)
    base = torch.nn.Linear(8, 50, bias=True)
    ht, hb = torch.randn(13, 8, requires_grad=True), torch.randn(13, 8)
    for t in (1.0, 2.0):
        full = F.kl_div(F.log_softmax(head(ht) / t, -1), F.log_softmax(base(hb) / t, -1), log_target=True,
                        reduction="sum") * t * t
        g_full = torch.autograd.grad(full, [ht, head.weight])
        for chunk in (1, 4, 13, 100):
            kl = chunked_kl(ht, hb, head, base, t, chunk)
            assert torch.allclose(kl, full, atol=1e-5)
            g = torch.autograd.grad(kl, [ht, head.weight])
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, g_full, strict=True))


def test_anchor_rows_flagged_and_collated(rows, tmp_path, tiny_model):
    data, _ = rows
    run = build_trainer(**_settings(data, tmp_path / "run", tiny_model, **KL))
    assert isinstance(run.trainer, AnchoredSFTTrainer)
    flags = run.trainer.train_dataset[ANCHOR_COLUMN]
    assert sum(flags) == 8 and len(flags) == 16  # rows with source 'diverse' (every even one)
    assert run.record["data"]["anchor_rows"] == 8 and run.record["data"]["anchor_tokens"] > 0
    assert _batch(run)[ANCHOR_COLUMN].dtype == torch.bool


def test_kl_is_zero_at_the_zero_adapter_and_positive_after_a_step(rows, tmp_path, tiny_model):
    data, _ = rows
    run = build_trainer(**_settings(data, tmp_path / "run", tiny_model, **KL))
    trainer, model = run.trainer, run.trainer.model
    batch = _batch(run)
    anchor = batch[ANCHOR_COLUMN]
    model.train()
    trainer.compute_loss(model, dict(batch))
    assert trainer._metrics["train"]["anchor_kl"][-1] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at 0

    # the KL term alone: no task rows, so the CE term is 0
    only = {k: v[anchor] for k, v in batch.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    with torch.no_grad():  # move the adapter off zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    loss = trainer.compute_loss(model, dict(only))
    assert float(loss.detach()) > 0
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)  # only trainable parameters get a gradient
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer.zero_grad()


def test_kl_training_runs_and_records_forward_only_tokens(rows, tmp_path, tiny_model):
    data, _ = rows
    out = train(data, tmp_path / "run", model=str(tiny_model), **{**FAST_KL, "add_token": ["<sep>"]})
    record = json.loads((out / TRAIN_RECORD).read_text())
    assert record["tokens_forward_only"] == record["data"]["anchor_tokens"]  # one epoch
    assert 0 < record["tokens_forward_only"] < record["tokens_trained"]
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any("anchor_kl" in e for e in log)


FAST_KL = {"max_length": 256, "batch_size": 4, "warmup_steps": 0, "learning_rate": 1e-2, "logging_steps": 1, **KL}


@pytest.mark.parametrize("bad, message", [
    ({"diverse_loss": "mse"}, "unknown diverse_loss"),
    ({**KL, "batching": "packing"}, "not packing"),
    ({**KL, "kl_temperature": 0}, "kl_temperature must be > 0"),
])
def test_bad_kl_settings(rows, tmp_path, tiny_model, bad, message):
    data, _ = rows
    with pytest.raises(DeliaError, match=message):
        build_trainer(**_settings(data, tmp_path / "run", tiny_model, **bad))


def test_kl_needs_diverse_rows(write_jsonl, tmp_path, tiny_model):
    data = write_jsonl("task.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}]}] * 4)
    with pytest.raises(DeliaError, match="no row has source 'diverse'"):
        build_trainer(**_settings(data, tmp_path / "run", tiny_model, **KL))


def test_chunked_and_unchunked_kl_agree_on_the_tiny_model(rows, tmp_path, tiny_model):
    data, _ = rows
    run = build_trainer(**_settings(data, tmp_path / "run", tiny_model, **KL, add_token=["<sep>"]))
    trainer, model = run.trainer, run.trainer.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = _batch(run)
    model.train()
    results = []
    for chunk in (1, 3, 100_000):
        trainer.kl_chunk = chunk
        torch.manual_seed(0)  # the same LoRA dropout masks
        loss = trainer.compute_loss(model, dict(batch))
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        results.append((loss.detach(), grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        for a, b in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
