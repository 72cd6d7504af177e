"""The CPU LoRA dropout: nn.Dropout's distribution and gradient from a cheaper mask, used by training."""

import pytest
import torch

from delia.patches.peft_mask_dropout import MaskDropout, use_mask_dropout


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keeps_each_element_with_probability_1_minus_p_scaled_by_its_inverse(p):
    torch.manual_seed(0)
    x = torch.ones(2000, 500)
    y = MaskDropout(p).train()(x)
    kept = y != 0
    share = kept.float().mean().item()
    assert abs(share - (1 - p)) < 4 * (p * (1 - p) / x.numel()) ** 0.5  # within 4 standard errors
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    assert abs(y.mean().item() - 1) < 0.01  # unbiased, like nn.Dropout


def test_gradient_is_the_mask_scaled_and_eval_is_the_identity():
    torch.manual_seed(1)
    drop = MaskDropout(0.3).train()
    x = torch.randn(64, 32, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() / 0.7)
    assert torch.equal(drop.eval()(x), x)


def test_seeded_masks_repeat():
    drop = MaskDropout(0.05).train()
    x = torch.randn(128, 64)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(a, drop(x))


CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="delia's CPU paths serve CPU training; "
                            "this machine trains on its GPU")


@CPU_ONLY
def test_training_uses_it_for_every_lora_layer_on_cpu(tmp_path, write_jsonl, tiny_model):
    from test_train import _conversation, _settings

    from delia.training import build_trainer

    data = write_jsonl("train.jsonl", [_conversation(i) for i in range(8)])
    run = build_trainer(**_settings(data, tmp_path / "run", tiny_model))
    lora = [m for m in run.trainer.model.modules() if hasattr(m, "lora_dropout")]
    assert lora and all(isinstance(m.lora_dropout["default"], MaskDropout) for m in lora)
    assert run.record["peft"]["mask_dropout_layers"] == len(lora)
    assert use_mask_dropout(run.trainer.model) == 0  # already replaced
    none = build_trainer(**_settings(data, tmp_path / "none", tiny_model, lora_dropout=0.0))
    assert none.record["peft"]["mask_dropout_layers"] == 0


@CPU_ONLY
def test_the_lm_head_scores_only_label_positions_with_the_same_loss_and_gradients(tmp_path, write_jsonl,
                                                                                  tiny_model):
    import functools

    import trl.trainer.utils as trl_utils
    from test_train import _conversation, _settings

    from delia.training import build_trainer

    data = write_jsonl("train.jsonl", [_conversation(i) for i in range(8)])
    run = build_trainer(**_settings(data, tmp_path / "run", tiny_model))
    original = trl_utils._use_triton
    assert not original(torch.device("cpu"))  # TRL's own choice on CPU: every position; left as it is outside
    model, batch = run.trainer.model, next(iter(run.trainer.get_train_dataloader()))
    model.eval()  # no dropout: both passes see the same network
    scored, apply = [], trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        scored.append(hidden.shape[0])
        return apply(hidden, *args)

    def loss_and_grads(compute_loss):
        model.zero_grad()
        loss = compute_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    trl_utils._ChunkedLogProbFunction.apply = spy
    try:
        compact = loss_and_grads(run.trainer.compute_loss)
        full = loss_and_grads(functools.partial(type(run.trainer).compute_loss, run.trainer))
    finally:
        trl_utils._ChunkedLogProbFunction.apply = apply
    assert trl_utils._use_triton is original
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert scored == [labelled, batch["labels"][:, 1:].numel()] and labelled < scored[1]
    assert torch.allclose(compact[0], full[0], atol=1e-6)
    for name, grad in compact[1].items():
        assert torch.allclose(grad, full[1][name], atol=1e-6), name
