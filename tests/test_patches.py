"""The upstream behaviour each workaround in `delia.patches` relies on: a test here fails when it changes.

One section per patch module; each checks that the upstream code the patch replaces or reads still exists and still
behaves as the module's docstring says (so that the patch is still needed and still takes effect).
"""

import subprocess
import sys
import warnings

import pytest
import torch

from delia.cli import metavar

# ----------------------------------------------------------------------------- typer_usage


def test_typer_still_has_the_argument_display_hooks_it_replaces():
    from typer.core import TyperArgument

    assert callable(TyperArgument._usage_display_name) and callable(TyperArgument.display_type_rich)


def test_help_shows_plain_argument_names_and_no_python_types():
    done = subprocess.run([sys.executable, "-m", "delia", "mix", "--help"], capture_output=True, text=True,
                          env={"COLUMNS": "80", "PATH": ""})
    usage = done.stdout.splitlines()[0]
    assert usage.endswith(" mix [OPTIONS] TASK DIVERSE [OUT]")
    assert "<path>" not in done.stdout and "list[" not in done.stdout and "`options`" not in done.stdout
    assert "-o, --out PATH" in done.stdout


def test_metavars_name_choices_and_kinds_of_value():
    from pathlib import Path
    from typing import Literal

    assert metavar(Literal["a", "b"]) == "a|b"
    assert metavar(list[Path] | None) == "PATH"
    assert metavar(int | Literal["auto"]) == "INTEGER|auto"
    assert metavar(bool) is None


# ----------------------------------------------------------------------------- quiet_loading


def test_transformers_progress_bars_follow_the_hub_switch_read_at_import():
    code = ("import os; os.environ['HF_HUB_DISABLE_PROGRESS_BARS'] = '1'; "
            "from transformers.utils import logging; print(logging.is_progress_bar_enabled())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_the_deprecation_warning_it_filters_is_still_raised_by_transformers(monkeypatch):
    import inspect

    from transformers import PreTrainedModel

    from delia.patches.quiet_loading import quiet_loading

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what quiet_loading sets, undone after the test
    source = inspect.getsource(PreTrainedModel)
    assert "`is_gradient_checkpointing` is deprecated" in source
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_loading()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
    assert not seen


def test_the_cli_module_imports_no_upstream_model_library_before_its_patches_apply():
    """`main()` applies `apply_cli` first; the switches it sets are read when transformers is imported."""
    code = ("import sys, delia.cli; "
            "print([m for m in ('transformers', 'huggingface_hub', 'trl', 'peft', 'torch') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr


# ----------------------------------------------------------------------------- typer_errors


def test_typer_main_loop_still_takes_the_markup_mode_that_plain_errors_turn_off():
    import inspect

    import typer.core

    from delia.patches.typer_errors import PlainErrorsGroup

    assert "rich_markup_mode" in inspect.signature(typer.core._main).parameters
    assert issubclass(PlainErrorsGroup, typer.core.TyperGroup) and "main" in vars(typer.core.TyperGroup)


# ----------------------------------------------------------------------------- trl_label_positions


def test_trl_fused_head_still_chooses_its_compact_path_by_the_module_global_it_swaps():
    import inspect

    import trl.trainer.utils as trl_utils

    assert callable(trl_utils._use_triton)
    assert not trl_utils._use_triton(torch.device("cpu"))  # TRL scores every position on CPU: the patch is needed
    source = inspect.getsource(trl_utils.add_fused_lm_head)
    assert "_use_triton(" in source  # looked up in trl.trainer.utils at call time: swapping the global takes effect


def test_label_positions_patch_swaps_the_global_inside_the_trainer_loss_only():
    import trl.trainer.utils as trl_utils

    from delia.patches.trl_label_positions import score_label_positions_only

    original, seen = trl_utils._use_triton, []

    class Trainer:
        def compute_loss(self):
            seen.append(trl_utils._use_triton(torch.device("cpu")))

    trainer = Trainer()
    score_label_positions_only(trainer)
    trainer.compute_loss()
    assert seen == [True] and trl_utils._use_triton is original


# ----------------------------------------------------------------------------- peft_mask_dropout


def test_peft_lora_layers_still_keep_their_dropout_as_nn_dropout_in_a_module_dict():
    from peft import LoraConfig, get_peft_model

    from delia.patches.peft_mask_dropout import MaskDropout, use_mask_dropout

    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(8, 8))
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=2, lora_dropout=0.1, target_modules=["proj"]))
    layer = model.get_base_model().proj
    assert isinstance(layer.lora_dropout, torch.nn.ModuleDict)
    assert type(layer.lora_dropout["default"]) is torch.nn.Dropout
    assert use_mask_dropout(model) == 1 and isinstance(layer.lora_dropout["default"], MaskDropout)
    calls = []
    layer.lora_dropout["default"].register_forward_hook(lambda *a: calls.append(1))
    model.train()(torch.randn(2, 8))
    assert calls  # PEFT's forward goes through the module in the dict, so the replacement takes effect


# ----------------------------------------------------------------------------- peft_head_bias


def test_peft_trainable_tokens_wrapper_still_lacks_the_bias_that_trl_fused_head_reads():
    import inspect

    import trl.trainer.utils as trl_utils
    from peft.utils.other import TrainableTokensWrapper

    from delia.patches.peft_head_bias import give_head_a_bias

    head = TrainableTokensWrapper(torch.nn.Linear(4, 10, bias=False), "default", token_indices=[1])
    assert not hasattr(head, "bias")  # PEFT answers `.weight` only
    assert "lm_head.bias" in inspect.getsource(trl_utils.add_fused_lm_head)

    class Model:
        def get_output_embeddings(self):
            return head

    trainer = type("Trainer", (), {"model": Model()})()
    give_head_a_bias(trainer)
    assert head.bias is None


def test_head_bias_patch_refuses_a_head_with_a_bias():
    from peft.utils.other import TrainableTokensWrapper

    from delia.errors import DeliaError
    from delia.patches.peft_head_bias import give_head_a_bias

    head = TrainableTokensWrapper(torch.nn.Linear(4, 10, bias=True), "default", token_indices=[1])
    trainer = type("Trainer", (), {"model": type("Model", (), {"get_output_embeddings": lambda self: head})()})()
    with pytest.raises(DeliaError, match="train_rows"):
        give_head_a_bias(trainer)


# ----------------------------------------------------------------------------- token_rows_decay


def test_transformers_still_decays_peft_token_rows_and_the_patch_names_them():
    from peft.utils.other import TrainableTokensWrapper
    from transformers import Trainer

    from delia.patches.token_rows_decay import TOKEN_ROWS, keep_token_rows_out_of_decay

    model = torch.nn.Module()
    model.head = TrainableTokensWrapper(torch.nn.Linear(4, 10, bias=False), "default", token_indices=[1])
    rows = [n for n, _ in model.named_parameters() if TOKEN_ROWS in n]
    assert rows  # PEFT's name of the rows' parameter, which the patch matches
    assert set(rows) <= set(Trainer.get_decay_parameter_names(None, model))  # decayed unless the patch runs

    class Fake:
        def get_decay_parameter_names(self, model):
            return Trainer.get_decay_parameter_names(None, model)

    trainer = Fake()
    keep_token_rows_out_of_decay(trainer)
    assert not set(rows) & set(trainer.get_decay_parameter_names(model))


# ----------------------------------------------------------------------------- token_rows (delia's row-only path)


def test_trl_fused_forward_and_peft_token_layer_still_offer_what_the_row_only_path_wraps():
    """`delia.training.token_rows._fast_token_rows` wraps TRL's fused forward (set on the model instance) and
    reads PEFT's trainable-token layer; `tests/test_train.py` checks its values against PEFT's own path."""
    import dataclasses
    import inspect

    import trl.trainer.utils as trl_utils
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    source = inspect.getsource(trl_utils.add_fused_lm_head)
    assert "model.forward = types.MethodType(_fused_forward, model)" in source
    assert "fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None" in source
    assert {"loss", "log_probs", "label_mask"} <= {f.name for f in dataclasses.fields(trl_utils.FusedCausalLMOutput)}
    for name in ("get_merged_weights", "_get_embed_scale", "active_adapters", "merged", "disable_adapters"):
        assert hasattr(TrainableTokensLayer, name), name
