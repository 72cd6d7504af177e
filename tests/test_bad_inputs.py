"""Bad inputs, one row each: the verb, the exit code, a fragment of the one-line message, and nothing left behind.

Every case runs the real command in-process and compares the whole folder before and after: a refused command
must neither write, change nor delete a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from delia.cli import main

ROW = {"messages": [{"role": "user", "content": "Is an apple a food?"},
                    {"role": "assistant", "content": '{"food": "yes"}'}]}
DIVERSE = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": f"A fairly long answer number {i}, in plain words."}]}
           for i in range(4)]
NO_REFERENCE = {"messages": [{"role": "user", "content": "Tell me something."}]}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _user_folder(path: Path) -> Path:
    """A folder of a user's own work: what a typo must never delete."""
    (path / "notes").mkdir(parents=True)
    (path / "notes" / "thesis.txt").write_text("months of work\n")
    (path / "results.csv").write_text("a,b\n1,2\n")
    return path


def _inputs(d: Path) -> tuple[str, str]:
    return str(_jsonl(d / "task.jsonl", [ROW, ROW])), str(_jsonl(d / "diverse.jsonl", DIVERSE))


def _manifest(d: Path, text: str) -> str:
    shard = _jsonl(d / "part0.jsonl", DIVERSE)
    (d / "part0.manifest.json").write_text(text)
    return str(shard)


def _task(**fields) -> dict:
    return {"train": "task.jsonl", "eval": "task.jsonl", **fields}


def _experiment(d: Path, **fields) -> str:
    _inputs(d)
    exp = {"name": "exp", "task": _task(), "arms": [{"name": "sft"}], **fields}
    (d / "exp.yaml").write_text(json.dumps(exp))
    return str(d / "exp.yaml")


@dataclass
class Case:
    id: str
    args: Callable[[Path], list[str]]  # builds the files in the folder, returns the command line
    code: int
    message: str


def _nested_yaml(d: Path) -> str:
    (d / "c.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    return str(d / "c.yaml")


def _latin1_yaml(d: Path) -> str:
    (d / "c.yaml").write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    return str(d / "c.yaml")


CASES = [
    # --- a user's folder or file is never deleted or replaced
    Case("convert-into-a-folder", lambda d: ["data", "convert", _inputs(d)[0], str(_user_folder(d / "mydata"))],
         2, "exists; set --overwrite"),
    Case("convert-into-a-folder-slash", lambda d: ["data", "convert", _inputs(d)[0],
                                                   str(_user_folder(d / "mydata")) + "/"], 2, "exists"),
    Case("convert-into-a-folder-dot", lambda d: ["data", "convert", _inputs(d)[0],
                                                 str(_user_folder(d / "mydata") / ".")], 2, "exists"),
    Case("convert-overwrite-a-user-folder", lambda d: ["data", "convert", _inputs(d)[0],
                                                       str(_user_folder(d / "mydata")), "--overwrite"],
         2, "is not a dataset folder that delia wrote"),
    Case("convert-into-the-folder-of-its-input", lambda d: ["data", "convert", _inputs(d)[0], str(d)],
         2, "holds the input"),
    Case("convert-onto-its-input", lambda d: ["data", "convert", _inputs(d)[0], _inputs(d)[0]],
         2, "is also an input"),
    Case("convert-onto-an-existing-file", lambda d: ["data", "convert", _inputs(d)[0], _inputs(d)[1]],
         2, "exists; set --overwrite"),
    Case("convert-to-dotdot", lambda d: ["data", "convert", _inputs(d)[0], str(d / "sub" / "..")], 2, "input"),
    Case("convert-under-a-file", lambda d: ["data", "convert", _inputs(d)[0], str(d / "task.jsonl" / "x.jsonl")],
         2, "is a file, not a folder"),
    Case("mix-into-a-folder", lambda d: ["mix", *_inputs(d), str(_user_folder(d / "project")), "--ratio", "1",
                                         "--tokenizer", ""], 2, "exists; set --overwrite"),
    Case("mix-overwrite-a-user-folder", lambda d: ["mix", *_inputs(d), str(_user_folder(d / "project")),
                                                   "--ratio", "1", "--tokenizer", "", "--overwrite"],
         2, "is not a dataset folder that delia wrote"),
    Case("mix-onto-its-task", lambda d: ["mix", *_inputs(d), _inputs(d)[0], "--ratio", "1", "--tokenizer", ""],
         2, "is also an input"),
    Case("mix-onto-an-existing-file", lambda d: ["mix", *_inputs(d), str(_jsonl(d / "old.jsonl", [ROW])),
                                                 "--ratio", "1", "--tokenizer", ""], 2, "exists; set --overwrite"),
    Case("mix-bad-tokenizer", lambda d: ["mix", *_inputs(d), str(d / "m.jsonl"), "--ratio", "1",
                                         "--tokenizer", str(d / "no-such-model")], 2, "no-such-model"),
    Case("mix-ratio-inf", lambda d: ["mix", *_inputs(d), str(d / "m.jsonl"), "--ratio", "inf"], 2, "--ratio"),
    Case("mix-ratio-huge", lambda d: ["mix", *_inputs(d), str(d / "m.jsonl"), "--ratio", "1e308",
                                      "--tokenizer", ""], 2, "more diverse rows than can be counted"),
    Case("pool-onto-its-source", lambda d: ["pool", _inputs(d)[1], "--out", _inputs(d)[1]], 2, "is also an input"),
    Case("pool-onto-an-existing-file", lambda d: ["pool", _inputs(d)[1], "--out", str(_jsonl(d / "p.jsonl", [ROW]))],
         2, "exists; set --overwrite"),
    Case("sample-onto-its-pool", lambda d: ["sample", _inputs(d)[1], _inputs(d)[1]], 2, "is also an input"),
    Case("merge-onto-a-shard", lambda d: ["sample-merge", _manifest(d, "{}"), "--out", str(d / "part0.jsonl")],
         2, "is also an input"),
    Case("eval-over-an-earlier-eval", lambda d: ["eval", _inputs(d)[0], str(_jsonl(d / "e" / "scores.json", [ROW])
                                                                         .parent)], 2, "exists; set --overwrite"),
    Case("probe-over-an-earlier-probe", lambda d: ["probe", str(_jsonl(d / "p" / "probe.json", [ROW]).parent),
                                                   "--token", "<x>=y"], 2, "exists; set --overwrite"),
    Case("train-into-a-user-folder", lambda d: ["train", _inputs(d)[0], str(_user_folder(d / "project"))],
         2, "holds files that delia's training did not write"),
    Case("run-into-a-user-folder", lambda d: ["run", _experiment(d), "--out", str(_user_folder(d / "project"))],
         2, "holds files that no delia run wrote"),
    Case("run-name-is-a-path", lambda d: ["run", _experiment(d, name="../../elsewhere")], 2, "is not a plain name"),
    Case("run-name-is-absolute", lambda d: ["run", _experiment(d, name="/tmp/x")], 2, "is not a plain name"),
    # --- an experiment is checked whole when it is loaded, before anything runs
    Case("run-unknown-metric", lambda d: ["run", _experiment(d, task=_task(metric="bleu"))], 2, "task.metric"),
    Case("run-bad-metric-config", lambda d: ["run", _experiment(d, task=_task(metric_config={"requird_keys": ["a"]}))],
         2, "requird_keys"),
    Case("run-bad-scheduler", lambda d: ["run", _experiment(d, train={"lr_scheduler": "cosin"})],
         2, "unknown scheduler 'cosin' (did you mean 'cosine'?)"),
    Case("run-bad-token-name", lambda d: ["run", _experiment(d, task=_task(add_tokens={" <x>": None}))],
         2, "no surrounding spaces"),
    Case("run-missing-general-file", lambda d: ["run", _experiment(d, general="nope.jsonl")],
         2, "exp.yaml:1: field 'general': "),
    Case("run-missing-task-file", lambda d: ["run", _experiment(d, task=_task(train="gone.jsonl"))],
         2, "field 'task.train'"),
    Case("run-unknown-prepared-file", lambda d: ["run", _experiment(d, general="demo-data:nope.jsonl")],
         2, "has no 'nope.jsonl'"),
    Case("run-no-seeds", lambda d: ["run", _experiment(d, seeds=[])], 2, "field 'seeds'"),
    Case("run-no-arms", lambda d: ["run", _experiment(d, arms=[])], 2, "field 'arms'"),
    Case("run-duplicate-key", lambda d: ["run", str(_text(d / "dup.yaml", "name: a\nseeds: [0]\nname: b\n"))],
         2, "dup.yaml: cannot read the experiment config: line 3, column 1: key 'name' is given twice"),
    Case("plan-duplicate-key", lambda d: ["run", str(_text(d / "dup.yaml", "name: a\nname: b\n")), "--plan"],
         2, "key 'name' is given twice"),
    Case("run-error-names-the-yaml-line", lambda d: ["run", str(_text(d / "l.yaml", "name: x\ntask:\n  train: t\n"
                                                                     "  eval: t\nseeds: [0]\narms:\n  - {name: a, "
                                                                     "kind: delia}\n"))],
         2, "l.yaml:7: field 'arms.0'"),
    # --- no traceback, whatever the input
    Case("pool-empty", lambda d: ["pool", str(_jsonl(d / "src.jsonl", [NO_REFERENCE])), "--out", str(d / "p.jsonl")],
         2, "no rows left for the pool (removed: no_reference: 1)"),
    Case("pool-unknown-script", lambda d: ["pool", _inputs(d)[1], "--out", str(d / "p.jsonl"), "--script",
                                           "KLINGON"], 2, "unknown Unicode script 'KLINGON'"),
    Case("pool-inverted-bounds", lambda d: ["pool", _inputs(d)[1], "--out", str(d / "p.jsonl"),
                                            "--min-query-tokens", "50", "--max-query-tokens", "5"],
         2, "--min-query-tokens 50 is above --max-query-tokens 5"),
    Case("merge-corrupt-manifest", lambda d: ["sample-merge", _manifest(d, "{not json"), "--out",
                                              str(d / "m.jsonl")], 2, "not a readable manifest"),
    Case("config-not-utf8", lambda d: ["mix", *_inputs(d), str(d / "m.jsonl"), "--config", _latin1_yaml(d)],
         2, "not UTF-8 text"),
    Case("config-nested-too-deeply", lambda d: ["mix", *_inputs(d), str(d / "m.jsonl"), "--config", _nested_yaml(d)],
         2, "nested too deeply"),
    Case("config-yaml-error-names-the-line", lambda d: ["mix", *_inputs(d), str(d / "m.jsonl"), "--config",
                                                        str(_text(d / "c.yaml", "ratio: 1\nseed: [1\n"))],
         2, "line 3, column 1"),
    Case("columns-empty-column", lambda d: ["data", "convert", _inputs(d)[0], "--out", str(d / "o.jsonl"),
                                            "-c", "prompt="], 2, "expects FIELD=COLUMN with both named"),
    Case("columns-unknown-field", lambda d: ["data", "convert", _inputs(d)[0], "--out", str(d / "o.jsonl"),
                                             "-c", "promt=question"], 2, "'promt' is no format's field (did you "
                                                                        "mean 'prompt'?)"),
    Case("json-error-names-the-column", lambda d: ["data", "convert", str(_text(d / "bad.jsonl", '{"messages": [}\n')),
                                                   "--out", str(d / "o.jsonl")], 2, "bad.jsonl:1: invalid JSON: "
                                                                                   "Expecting value (column 15)"),
    Case("sample-an-empty-pool", lambda d: ["sample", str(_text(d / "empty.jsonl", "")), "--out", str(d / "s.jsonl")],
         2, "empty.jsonl: no queries to sample"),
    Case("pool-missing-task-file", lambda d: ["pool", _inputs(d)[1], "--out", str(d / "p.jsonl"), "--task",
                                              str(d / "gone.jsonl")], 2, "--task "),
    Case("output-in-a-read-only-place", lambda d: ["data", "convert", _inputs(d)[0], "/proc/delia-out.jsonl"],
         1, "/proc"),
]


def _text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder below `folder` with its content (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a default output (runs/<name>) lands here, so it is watched too
    args = case.args(work)
    before = _tree(work)
    with pytest.raises(SystemExit) as exited:
        main(args)
    err = " ".join(capsys.readouterr().err.split())  # the message as one line, whatever the wrapping
    assert exited.value.code == case.code, err
    assert case.message in err
    assert "Traceback" not in err
    assert _tree(work) == before


def test_overwrite_replaces_delias_own_dataset_folder(tmp_path, capsys):
    task, _ = _inputs(tmp_path)
    out = tmp_path / "converted"
    main_ok = lambda *extra: main(["data", "convert", task, str(out), *extra])  # noqa: E731
    with pytest.raises(SystemExit) as exited:
        main_ok()
    assert exited.value.code == 0
    with pytest.raises(SystemExit) as exited:
        main_ok()
    assert exited.value.code == 2 and "exists; set --overwrite" in capsys.readouterr().err
    (out / "stale.txt").write_text("from the first run")
    with pytest.raises(SystemExit) as exited:
        main_ok("--overwrite")
    assert exited.value.code == 0
    assert not (out / "stale.txt").exists() and (out / "dataset_info.json").exists()


def test_unexpected_errors_print_one_line_and_a_crash_log(tmp_path, capsys, monkeypatch):
    import delia.data

    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))

    def boom(*_a, **_k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(delia.data, "read_chat", boom)
    with pytest.raises(SystemExit) as exited:
        main(["data", "inspect", _inputs(tmp_path)[0]])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "Traceback" not in err
    assert "unexpected ZeroDivisionError: a bug" in " ".join(err.split())
    (log,) = (tmp_path / "cache" / "crashes").iterdir()
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
    assert os.path.basename(str(log)) in err.replace("\n", "")


def test_out_is_an_option_on_every_writing_verb_and_the_old_argument_warns(tmp_path, capsys):
    task, diverse = _inputs(tmp_path)
    for out, args in ((tmp_path / "a.jsonl", ["--out"]), (tmp_path / "b.jsonl", [])):
        with pytest.raises(SystemExit) as exited:
            main(["mix", task, diverse, *args, str(out), "--ratio", "1", "--tokenizer", ""])
        assert exited.value.code == 0 and out.exists()
    assert "OUT as a positional argument is deprecated" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit) as exited:
        main(["mix", task, diverse, str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "d.jsonl"), "--ratio", "1"])
    assert exited.value.code == 2 and "give OUT once, as --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["mix", task, diverse, "--ratio", "1"])
    assert exited.value.code == 2 and "missing --out" in capsys.readouterr().err


def test_run_overwrite_removes_only_a_run_folder(tmp_path):
    from delia.errors import DeliaError
    from delia.run import claim_run_folder

    run = tmp_path / "run"
    claim_run_folder(run)
    (run / "stages").mkdir()
    (run / "stages" / "old").write_text("an earlier stage")
    claim_run_folder(run)  # a rerun resumes: nothing is removed
    assert (run / "stages" / "old").exists()
    claim_run_folder(run, overwrite=True)
    assert [p.name for p in run.iterdir()] == [".delia-output.json"]
    mine = _user_folder(tmp_path / "mine")
    with pytest.raises(DeliaError, match="holds files that no delia run wrote"):
        claim_run_folder(mine, overwrite=True)
    assert (mine / "notes" / "thesis.txt").read_text() == "months of work\n"
