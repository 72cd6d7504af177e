import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from delia import __version__
from delia.cli import STAGES, main, with_config

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


def test_skip_invalid_writes_output_and_rejects(write_jsonl, tmp_path):
    path = write_jsonl("bad.jsonl", [GOOD, b"{nope", GOOD])
    out = tmp_path / "converted.jsonl"
    done = run("data", "convert", str(path), str(out), "--skip-invalid")
    assert done.returncode == 0
    assert len(out.read_text().splitlines()) == 2
    rejects = [json.loads(x) for x in (tmp_path / "converted.rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"line": 2, "field": None, "reason": "invalid_json", "error": rejects[0]["error"], "raw": None}]
    assert "invalid_json: 1" in " ".join(done.stderr.split())


def test_missing_model_is_a_clean_error(tmp_path):
    done = run("model", "prepare", str(tmp_path / "nothing.gguf"))
    assert done.returncode == 2 and "no such GGUF file" in done.stderr and "Traceback" not in done.stderr


def _echo(
    name: Annotated[str, typer.Option(help="A name.")] = "x",
    count: Annotated[int, typer.Option(help="A count.")] = 1,
) -> None:
    typer.echo(f"{name}:{count}")


def test_config_yaml_sets_options_and_the_command_line_wins(tmp_path):
    app = typer.Typer()
    app.command("echo")(with_config(_echo))
    app.command("other")(lambda: None)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: from-yaml\ncount: 3\n")
    runner = CliRunner()
    assert runner.invoke(app, ["echo", "--config", str(cfg)]).stdout.strip() == "from-yaml:3"
    assert runner.invoke(app, ["echo", "--config", str(cfg), "--count", "5"]).stdout.strip() == "from-yaml:5"
    cfg.write_text("name: a\ncolour: red\n")
    bad = runner.invoke(app, ["echo", "--config", str(cfg)])
    assert bad.exit_code == 2 and "unknown option(s) colour" in bad.output


@pytest.mark.parametrize("verb", [*STAGES, "data inspect", "data convert", "model prepare"])
def test_every_verb_has_help_with_examples(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([*verb.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Usage" in out and "Example" in out and "delia " in out


def test_stage_functions_are_the_python_api():
    import importlib

    for target in STAGES.values():
        module, fn = target.split(":")
        assert callable(getattr(importlib.import_module(module), fn))
    assert Path(sys.executable).exists()
