"""The upstream behaviour each workaround in `delia.upstream` relies on: a test here fails when it changes."""

import subprocess
import sys
import warnings

from delia.cli import metavar


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


def test_transformers_progress_bars_follow_the_hub_switch_read_at_import():
    code = ("import os; os.environ['HF_HUB_DISABLE_PROGRESS_BARS'] = '1'; "
            "from transformers.utils import logging; print(logging.is_progress_bar_enabled())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_the_deprecation_warning_it_filters_is_still_raised_by_transformers(monkeypatch):
    import inspect

    from transformers import PreTrainedModel

    from delia.upstream import quiet_loading

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what quiet_loading sets, undone after the test
    source = inspect.getsource(PreTrainedModel)
    assert "`is_gradient_checkpointing` is deprecated" in source
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_loading()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
    assert not seen
