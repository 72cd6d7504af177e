import json
import os
import re

import pytest

from delia.errors import DeliaError
from delia.files import (
    OUTPUT_MARKER,
    JsonlAppender,
    atomic_dir,
    atomic_writer,
    beside,
    changed_settings,
    check_output,
    dumps,
    output_kind,
    read_complete_jsonl,
    read_yaml,
    sha256_file,
    sha256_json,
    write_jsonl,
)


def test_atomic_writer_leaves_nothing_on_failure_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError), atomic_writer(target) as fh:
        fh.write("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write_jsonl(target, [{"a": 1}])
    with pytest.raises(RuntimeError), atomic_writer(target) as fh:
        fh.write("x")
        raise RuntimeError("boom")
    assert target.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "folder"
    with atomic_dir(target, "kind") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target, "kind") as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "a"]
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]
    with atomic_dir(target, "kind") as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "c"]
    assert [p.name for p in tmp_path.iterdir()] == ["folder"] and output_kind(target) == "kind"


def test_atomic_dir_never_replaces_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DeliaError, match="is not a kind folder that delia wrote"), atomic_dir(mine, "kind"):
        pass
    with atomic_dir(tmp_path / "other", "other"):
        pass
    with pytest.raises(DeliaError, match="is not a kind folder"), atomic_dir(tmp_path / "other", "kind"):
        pass
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and output_kind(tmp_path / "other") == "other"
    with atomic_dir(mine, "kind", replace_unmarked=True) as tmp:  # delia's own cache
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in mine.iterdir()) == [OUTPUT_MARKER, "a"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty, "kind") as tmp:
        (tmp / "a").write_text("1")
    assert (empty / "a").exists()


@pytest.mark.parametrize(("out", "inputs", "overwrite", "message"), [
    ("in.jsonl", ["in.jsonl"], True, "is also an input"),
    ("sub/../in.jsonl", ["in.jsonl"], True, "is also an input"),
    (".", ["in.jsonl"], True, "holds the input"),
    ("data/out.jsonl", ["data"], True, "lies inside the input folder"),
    ("in.jsonl/x.jsonl", [], True, "is a file, not a folder"),
    ("in.jsonl", [], False, "exists; set `overwrite`"),
    ("data", [], True, "exists and is a folder"),
])
def test_check_output_refuses_what_would_lose_a_file(tmp_path, monkeypatch, out, inputs, overwrite, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text("{}\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.arrow").write_text("")
    with pytest.raises(DeliaError, match=re.escape(message)):
        check_output(out, inputs=inputs, overwrite=overwrite)


def test_check_output_lets_through_a_new_or_replaceable_output(tmp_path):
    (tmp_path / "old.jsonl").write_text("{}\n")
    assert check_output(tmp_path / "new.jsonl", inputs=[tmp_path / "in.jsonl"]) == tmp_path / "new.jsonl"
    assert check_output(tmp_path / "old.jsonl", overwrite=True) == tmp_path / "old.jsonl"
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", folder=True) == tmp_path / "empty"


def test_read_complete_jsonl_drops_and_truncates_a_torn_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": 1}\n{"i": 2, "te')
    assert read_complete_jsonl(path) == [{"i": 0}, {"i": 1}]
    assert path.read_bytes() == b'{"i": 0}\n{"i": 1}\n'
    with JsonlAppender(path) as out:
        out.write([{"i": 2}])
    assert [r["i"] for r in read_complete_jsonl(path)] == [0, 1, 2]
    assert read_complete_jsonl(tmp_path / "absent.jsonl") == []


def test_read_complete_jsonl_refuses_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": \n{"i": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_complete_jsonl(path)


def test_a_complete_last_line_without_newline_counts_as_torn(tmp_path):
    # Appends always end rows with a newline, so a row without one was cut mid-write, even if it parses.
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"i": 0}) + "\n" + json.dumps({"i": 1}))
    assert read_complete_jsonl(path) == [{"i": 0}]


def test_a_last_line_too_long_to_parse_is_torn_and_a_middle_one_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    huge = b'{"i": ' + b"1" * 5000 + b"}"  # json raises a plain ValueError for ints this long
    path.write_bytes(b'{"i": 0}\n' + huge)
    assert read_complete_jsonl(path) == [{"i": 0}] and path.read_bytes() == b'{"i": 0}\n'
    path.write_bytes(b'{"i": 0}\n' + huge + b'\n{"i": 2}\n')
    with pytest.raises(ValueError, match="line 2 is corrupt"):
        read_complete_jsonl(path)


def test_jsonl_appender_appends_batches_across_opens(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    with JsonlAppender(path) as out:
        out.write([{"i": 0}, {"i": 1}])
        out.write([])
        assert read_complete_jsonl(path) == [{"i": 0}, {"i": 1}]  # flushed per batch, before close
    with JsonlAppender(path) as out:
        out.write([{"i": 2, "text": "Góðan daginn"}])
    assert path.read_text(encoding="utf-8").splitlines()[-1] == '{"i": 2, "text": "Góðan daginn"}'
    assert [r["i"] for r in read_complete_jsonl(path)] == [0, 1, 2]


def test_dumps_writes_values_json_has_no_type_for_as_text():
    import datetime

    assert json.loads(dumps({"t": datetime.date(2024, 8, 20)})) == {"t": "2024-08-20"}
    assert sha256_json({"b": 1, "a": 2}) == sha256_json({"a": 2, "b": 1})


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3000)
    assert sha256_file(path, chunk=1024) == hashlib.sha256(b"x" * 3000).hexdigest()


def test_beside_names_a_file_next_to_the_output(tmp_path):
    assert beside(tmp_path / "diverse.jsonl", ".rejects.jsonl") == tmp_path / "diverse.rejects.jsonl"
    assert beside(tmp_path / "mixed.v2", ".summary.json") == tmp_path / "mixed.summary.json"
    kept = beside(tmp_path / "mixed.v2", ".summary.json", strip=(".jsonl", ".json"))
    assert kept == tmp_path / "mixed.v2.summary.json"
    assert beside(tmp_path / "mix.json", ".summary.json", strip=(".jsonl", ".json")) == tmp_path / "mix.summary.json"


def test_read_yaml_names_the_file_on_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\n")
    assert read_yaml(path) == {"a": 1}
    path.write_text("")
    assert read_yaml(path) == {}
    path.write_text("a: [1\n")
    with pytest.raises(DeliaError, match="^" + re.escape(f"{path}: cannot read the config: ")):
        read_yaml(path, "the config")
    with pytest.raises(DeliaError, match="^" + re.escape(f"{tmp_path / 'absent.yaml'}: ")):
        read_yaml(tmp_path / "absent.yaml")


def test_changed_settings_lists_differing_and_missing_keys():
    assert changed_settings({"a": 1, "b": 2, "c": None}, {"a": 1, "b": 3, "d": 4}) == ["b", "d"]
    assert changed_settings({}, {}) == []
