"""Chat-dataset I/O: every format round-trips, every bad record names its file, line or row, and field."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from delia.data import ROLES, describe, read_chat, row_id, write_chat, write_rejects
from delia.errors import DataError, DeliaError

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Delia."}]


def _roundtrip(data, tmp_path):
    out = tmp_path / "out.jsonl"
    write_chat(out, data.records)
    again = read_chat(out)
    assert again.format == "messages" and again.records == data.records
    return again


def test_messages_jsonl_roundtrip_keeps_extra_fields(write_jsonl, tmp_path):
    path = write_jsonl("m.jsonl", [{"messages": CONV, "id": "a", "meta": {"k": 1}}])
    data = read_chat(path)
    assert data.format == "messages" and data.records == [{"messages": CONV, "id": "a", "meta": {"k": 1}}]
    _roundtrip(data, tmp_path)


def test_prompt_completion_strings_and_message_lists(write_jsonl, tmp_path):
    path = write_jsonl("pc.jsonl", [
        {"prompt": "Hi?", "completion": "Hello."},
        {"prompt": CONV[:4], "completion": [CONV[4]]},
    ])
    data = read_chat(path)
    assert data.format == "prompt-completion"
    assert data.records[0]["messages"] == [{"role": "user", "content": "Hi?"},
                                           {"role": "assistant", "content": "Hello."}]
    assert data.records[1]["messages"] == CONV
    _roundtrip(data, tmp_path)


@pytest.mark.parametrize("array", [True, False])
def test_alpaca_json_array_and_jsonl(array, tmp_path):
    rows = [{"instruction": "Translate.", "input": "hello", "output": "halló"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "You are kind."}]
    path = tmp_path / ("a.json" if array else "a.jsonl")
    path.write_text(json.dumps(rows) if array else "\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    data = read_chat(path)
    assert data.format == "alpaca"
    assert data.records[0]["messages"][0] == {"role": "user", "content": "Translate.\n\nhello"}
    assert data.records[1]["messages"] == [{"role": "system", "content": "You are kind."},
                                           {"role": "user", "content": "Say hi."},
                                           {"role": "assistant", "content": "Hi!"}]
    _roundtrip(data, tmp_path)


def test_sharegpt(write_jsonl, tmp_path):
    path = write_jsonl("s.jsonl", [{"conversations": [{"from": "human", "value": "Hi?"},
                                                      {"from": "gpt", "value": "Hello."}], "id": 7}])
    data = read_chat(path)
    assert data.format == "sharegpt" and data.records[0]["id"] == 7
    assert [m["role"] for m in data.records[0]["messages"]] == ["user", "assistant"]
    _roundtrip(data, tmp_path)


@pytest.mark.parametrize("kind", ["parquet", "csv", "saved"])
def test_tables_with_a_column_mapping(kind, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"question": ["What is 2+2?", "Capital of France?"], "answer": ["4", "Paris"]})
    path = tmp_path / {"parquet": "t.parquet", "csv": "t.csv", "saved": "t_ds"}[kind]
    {"parquet": ds.to_parquet, "csv": lambda p: ds.to_csv(p, index=False), "saved": ds.save_to_disk}[kind](str(path))
    data = read_chat(path, columns={"prompt": "question", "completion": "answer"})
    assert data.format == "prompt-completion" and len(data.records) == 2
    assert data.records[1]["messages"][1] == {"role": "assistant", "content": "Paris"}
    _roundtrip(data, tmp_path)


def test_explicit_format_and_saved_dataset_output(write_jsonl, tmp_path):
    path = write_jsonl("pc.jsonl", [{"prompt": "Hi?", "completion": "Hello.", "meta": {"a": 1}}])
    with pytest.raises(DataError, match="missing key 'messages'"):
        read_chat(path, "messages")
    data = read_chat(path, "prompt-completion")
    out = write_chat(tmp_path / "ds", data.records)
    assert read_chat(out).records[0]["messages"] == data.records[0]["messages"]
    with pytest.raises(DeliaError, match="unknown format"):
        read_chat(path, "chatml")  # type: ignore[arg-type]


BAD = [
    ("invalid_json", b'{"messages": [', None),
    ("invalid_utf8", b'{"messages": "\xff\xfe"}', None),
    ("not_object", b'[1, 2]', None),
    ("missing_key", b'{"text": "hi"}', "messages"),  # the format was detected from line 1
    ("missing_key", json.dumps({"messages": [{"role": "user"}]}).encode(), "messages[0]"),
    ("unknown_role", json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(), "messages[0].role"),
    ("empty_content", json.dumps({"messages": [{"role": "user", "content": "  "},
                                               {"role": "assistant", "content": "x"}]}).encode(),
     "messages[0].content"),
    ("non_string_content", json.dumps({"messages": [{"role": "user", "content": 3},
                                                    {"role": "assistant", "content": "x"}]}).encode(),
     "messages[0].content"),
    ("role_order", json.dumps({"messages": [{"role": "user", "content": "a"},
                                            {"role": "user", "content": "b"}]}).encode(), "messages[1].role"),
    ("last_turn", json.dumps({"messages": [{"role": "user", "content": "a"}]}).encode(), "messages[0].role"),
]


@pytest.mark.parametrize("reason,line,field", BAD, ids=[b[0] for b in BAD])
def test_each_bad_record_names_file_line_field_and_reason(reason, line, field, write_jsonl):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl("bad.jsonl", [good, "", line])  # the bad record is on line 3 (line 2 blank)
    with pytest.raises(DataError) as e:
        read_chat(path)
    err = e.value
    assert (err.reason, err.line, err.field) == (reason, 3, field)
    assert str(err).startswith(f"{path}:3:")
    if field:
        assert f"field '{field}'" in str(err)


def test_an_undetectable_first_row_says_which_keys_it_expected(write_jsonl):
    with pytest.raises(DataError) as e:
        read_chat(write_jsonl("t.jsonl", [{"text": "hi"}]))
    assert (e.value.reason, e.value.line) == ("unknown_format", 1) and "--format" in str(e.value)


def test_json_array_errors_name_the_row(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 5}]))
    with pytest.raises(DataError) as e:
        read_chat(path)
    assert (e.value.row, e.value.field, e.value.reason) == (1, "output", "non_string_content")
    assert str(e.value).startswith(f"{path}[row 1]:")


def test_conversations_ending_on_a_user_turn_are_accepted_when_asked(write_jsonl):
    path = write_jsonl("q.jsonl", [{"messages": [{"role": "user", "content": "a query"}]}])
    assert read_chat(path, require_assistant=False).records[0]["messages"][0]["content"] == "a query"


def test_skip_invalid_counts_reasons_and_writes_rejects(write_jsonl, tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl("mixed.jsonl", [good, b"{oops", {"messages": [{"role": "bot", "content": "x"}]}, good,
                                       b'{"messages": "\xff"}'])
    data = read_chat(path, skip_invalid=True)
    assert len(data.records) == 2
    assert data.reject_counts() == {"invalid_json": 1, "unknown_role": 1, "invalid_utf8": 1}
    assert [r["line"] for r in data.rejects] == [2, 3, 5]
    rejects = write_rejects(tmp_path / "out.jsonl", data.rejects)
    assert rejects.name == "out.rejects.jsonl"
    rows = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert rows[1]["reason"] == "unknown_role" and rows[1]["raw"]["messages"][0]["role"] == "bot"


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DeliaError, match="no such file"):
        read_chat(tmp_path / "nope.jsonl")


def test_row_id_is_the_data_id_or_a_stable_hash():
    rec = {"messages": CONV}
    assert row_id({**rec, "id": 12}) == "12"
    assert row_id(rec) == row_id({"messages": [dict(m) for m in CONV]}) != row_id({"messages": CONV[:3]})


def test_describe_counts_and_token_lengths(write_jsonl, tiny_model):
    from delia.models import load_tokenizer

    path = write_jsonl("m.jsonl", [{"messages": CONV}, {"messages": CONV[1:3]}])
    info = describe(read_chat(path), load_tokenizer(tiny_model, resolved=True))
    assert info["rows"] == 2 and info["turns"] == {2: 1, 5: 1}
    assert info["roles"] == {"system": 1, "user": 3, "assistant": 3}
    assert info["prompt_tokens"]["max"] > info["prompt_tokens"]["min"] > 0
    assert info["total_tokens"] > 0


def _check_valid(record):
    msgs = record["messages"]
    assert msgs and msgs[-1]["role"] == "assistant"
    start = 1 if msgs[0]["role"] == "system" else 0
    for i, m in enumerate(msgs[start:]):
        assert m["role"] == ("user", "assistant")[i % 2] and m["role"] in ROLES
        assert isinstance(m["content"], str) and m["content"].strip()
    json.dumps(record, ensure_ascii=False).encode("utf-8")


def _read_and_check(path):
    """Only a DataError (file-level) or valid records may come out of the reader, whatever the input."""
    try:
        data = read_chat(path, skip_invalid=True)
    except DataError:
        return None
    for r in data.records:
        _check_valid(r)
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_give_clean_errors_or_valid_records(tmp_path, blob):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(blob)
    data = _read_and_check(path)
    assert data is None or all(r["reason"] and r["error"] for r in data.rejects)


_role = st.sampled_from(["user", "assistant", "system", "bot", "", 3, None])
_content = st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))
_message = st.dictionaries(st.sampled_from(["role", "content", "from", "value", "x"]),
                           st.one_of(_role, _content), max_size=4)
_record = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(_message, max_size=5)}),
    st.fixed_dictionaries({"conversations": st.lists(_message, max_size=5)}),
    st.fixed_dictionaries({"prompt": st.one_of(_content, st.lists(_message, max_size=3)),
                           "completion": st.one_of(_content, st.lists(_message, max_size=2))}),
    st.fixed_dictionaries({"instruction": _content, "output": _content, "input": _content}),
    st.dictionaries(st.text(max_size=5), _content, max_size=3),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_record, min_size=1, max_size=4))
def test_fuzz_near_valid_records(tmp_path, records):
    path = tmp_path / "near.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    data = _read_and_check(path)
    assert data is None or len(data.records) + len(data.rejects) == len(records)
