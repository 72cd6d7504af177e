import json
import os
import subprocess
import sys
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from delia import __version__
from delia.cli import main, stages, with_config
from delia.patches.typer_errors import PlainErrorsGroup

GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def run(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "delia", *args], capture_output=True, text=True)


def test_version():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"delia {__version__}"


def test_inspect_with_and_without_a_tokenizer(write_jsonl, tiny_model):
    path = write_jsonl("m.jsonl", [GOOD, GOOD])
    done = run("data", "inspect", str(path))
    assert done.returncode == 0 and "messages" in done.stdout and "rows" in done.stdout
    done = run("data", "inspect", str(path), "--model", str(tiny_model))
    assert done.returncode == 0 and "prompt_tokens" in done.stdout and "p50=" in done.stdout


def test_convert_writes_messages_jsonl(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi!"}]))
    out = tmp_path / "out.jsonl"
    done = run("data", "convert", str(src), str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["messages"][1] == {"role": "assistant", "content": "Hi!"}


def test_bad_input_exits_2_names_the_place_and_writes_nothing(write_jsonl, tmp_path):
    path = write_jsonl("bad.jsonl", [GOOD, {"messages": [{"role": "user", "content": "a"},
                                                         {"role": "bot", "content": "b"}]}])
    out = tmp_path / "out" / "converted.jsonl"
    done = run("data", "convert", str(path), str(out))
    assert done.returncode == 2
    assert f"{path}:2: field 'messages[1].role': unknown role 'bot'" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # no temp file left
    out.parent.mkdir()
    out.write_text("an earlier good output\n")
    assert run("data", "convert", str(path), str(out)).returncode == 2
    assert [p.name for p in out.parent.iterdir()] == [out.name] and out.read_text() == "an earlier good output\n"


def test_skip_invalid_writes_output_and_rejects(write_jsonl, tmp_path):
    path = write_jsonl("bad.jsonl", [GOOD, b"{nope", GOOD])
    out = tmp_path / "converted.jsonl"
    done = run("data", "convert", str(path), str(out), "--skip-invalid")
    assert done.returncode == 0
    assert len(out.read_text().splitlines()) == 2
    rejects = [json.loads(x) for x in (tmp_path / "converted.rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"line": 2, "field": None, "reason": "invalid_json", "error": rejects[0]["error"], "raw": None}]
    assert "invalid_json: 1" in " ".join(done.stderr.split())


def test_convert_with_explicit_format_and_columns_to_a_saved_dataset(tmp_path):
    src = tmp_path / "qa.csv"
    src.write_text("question,answer,id\nWhat is 2+2?,4,a\nPad 12.,0012,b\n", encoding="utf-8")
    out = tmp_path / "out_ds"
    done = run("data", "convert", str(src), str(out), "--format", "prompt-completion",
               "-c", "prompt=question", "--columns", "completion=answer")
    assert done.returncode == 0, done.stderr
    assert "wrote 2 rows (prompt-completion)" in " ".join(done.stderr.split())
    from delia.data import read_chat

    assert [(r["messages"][1]["content"], r["id"]) for r in read_chat(out).records] == [("4", "a"), ("0012", "b")]
    done = run("data", "convert", str(src), str(tmp_path / "x.jsonl"), "--columns", "prompt")
    assert done.returncode == 2 and "--columns expects FIELD=COLUMN" in " ".join(done.stderr.split())


def test_query_pools_need_allow_no_assistant(write_jsonl, tmp_path):
    path = write_jsonl("pool.jsonl", [{"messages": [{"role": "user", "content": "A query."}]}])
    out = tmp_path / "pool_out.jsonl"
    done = run("data", "convert", str(path), str(out))
    assert done.returncode == 2 and "last turn must be from the assistant" in done.stderr and not out.exists()
    assert run("data", "convert", str(path), str(out), "--allow-no-assistant").returncode == 0
    assert json.loads(out.read_text())["messages"] == [{"role": "user", "content": "A query."}]


def test_errors_print_rows_and_user_text_literally(tmp_path):
    # "[row 1]" and a role of "[bold]x" look like rich markup: they must reach the user as written.
    src = tmp_path / "a.json"
    src.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 5}]))
    done = run("data", "convert", str(src), str(tmp_path / "out.jsonl"))
    assert done.returncode == 2 and f"{src}[row 1]: field 'output': must be a string" in " ".join(done.stderr.split())
    src = tmp_path / "b.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "[bold]x", "content": "a"}]}) + "\n")
    done = run("data", "convert", str(src), str(tmp_path / "out.jsonl"))
    assert "unknown role '[bold]x'" in done.stderr


def test_inspect_counts_rejects_with_skip_invalid(write_jsonl):
    path = write_jsonl("m.jsonl", [GOOD, b"{nope", {"messages": [{"role": "user", "content": "a"}]}])
    done = run("data", "inspect", str(path))
    assert done.returncode == 2 and f"{path}:2:" in done.stderr
    done = run("data", "inspect", str(path), "--skip-invalid")
    assert done.returncode == 0
    assert "invalid_json=1" in done.stdout and "last_turn=1" in done.stdout and "rows" in done.stdout


def test_hub_id_offline_is_a_clean_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "delia", "model", "prepare", "some-org/not-a-cached-model"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Pass a local model folder or a GGUF file instead" in " ".join(done.stderr.split())


def test_missing_model_is_a_clean_error(tmp_path):
    done = run("model", "prepare", str(tmp_path / "nothing.gguf"))
    assert done.returncode == 2 and "no such GGUF file" in done.stderr and "Traceback" not in done.stderr


def _echo(
    name: Annotated[str, typer.Option(help="A name.")] = "x",
    count: Annotated[int, typer.Option(help="A count.")] = 1,
) -> None:
    typer.echo(f"{name}:{count}")


def _config_app(name: str, fn) -> typer.Typer:
    """A two-command app (so typer keeps the command name) whose `name` command takes --config."""
    app = typer.Typer(cls=PlainErrorsGroup)
    app.command(name)(with_config(fn))
    app.command("other")(lambda: None)
    return app


def test_config_yaml_sets_options_and_the_command_line_wins(tmp_path):
    app = _config_app("echo", _echo)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: from-yaml\ncount: 3\n")
    runner = CliRunner()
    assert runner.invoke(app, ["echo", "--config", str(cfg)]).stdout.strip() == "from-yaml:3"
    assert runner.invoke(app, ["echo", "--config", str(cfg), "--count", "5"]).stdout.strip() == "from-yaml:5"
    cfg.write_text("name: a\ncolour: red\n")
    bad = runner.invoke(app, ["echo", "--config", str(cfg)])
    assert bad.exit_code == 2 and "unknown option(s) colour" in bad.output
    cfg.write_text("- name\n- count\n")
    bad = runner.invoke(app, ["echo", "--config", str(cfg)])
    assert bad.exit_code == 2 and "expected a mapping" in bad.output
    bad = runner.invoke(app, ["echo", "--config", str(tmp_path / "absent.yaml")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def _columns_command(
    max_length: Annotated[int, typer.Option(help="Dashed on the command line.")] = 8,
    columns: Annotated[list[str] | None, typer.Option("--columns", help="Repeatable.")] = None,
) -> None:
    typer.echo(f"{max_length}:{columns}")


def test_config_yaml_keys_may_be_dashed_and_set_lists(tmp_path):
    app = _config_app("cols", _columns_command)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-length: 64\ncolumns: [prompt=q, completion=a]\n")
    done = CliRunner().invoke(app, ["cols", "--config", str(cfg)])
    assert done.stdout.strip() == "64:['prompt=q', 'completion=a']"


@pytest.mark.parametrize("verb", [*stages(), "data inspect", "data convert", "model prepare"])
def test_every_verb_has_help_with_examples(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([*verb.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Usage" in out and "Example" in out and "delia " in out


def test_stage_functions_are_the_python_api():
    import importlib

    for function in stages().values():
        assert getattr(importlib.import_module(function.__module__), function.__name__) is function


@pytest.mark.parametrize("verb", list(stages()))
def test_help_at_80_columns_cuts_no_option_and_keeps_examples_whole(verb, capsys, monkeypatch):
    """Every option of the verb's config appears whole in its help at 80 columns, and example command lines
    are not rewrapped (a command broken at a hyphen would not paste)."""
    import re

    from delia.cli import config_class_of, flags_of

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert "…" not in out
    for flag in flags_of(config_class_of(stages()[verb])).values():
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", out), flag
    examples = [line.strip() for line in out.splitlines() if line.strip().startswith("delia ")]
    assert examples and all(not line.endswith("-") for line in examples)
