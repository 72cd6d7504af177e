"""Chat-dataset I/O: every format round-trips, every bad record names its file, line or row, and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from delia.data import ROLES, describe, first_turns, read_chat, row_id, write_chat, write_rejects
from delia.errors import DataError, DeliaError

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name?"},
        {"role": "assistant", "content": "Delia."}]
META = {"source": "unit", "tags": ["a", "b"], "n": 3}
GOOD = {"messages": CONV[1:3]}


def _u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _json(path: Path, obj, indent: int | None = None) -> Path:
    path.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- every format, read and round trip
# Each case writes a file and returns (path, columns, format, the records read_chat must give).

ALPACA = [{"instruction": "Translate.", "input": "hello", "output": "halló", "id": "a1", "meta": META},
          {"instruction": "Say hi.", "output": "Hi!", "system": "You are kind.", "id": "a2"},  # no `input`
          {"instruction": "Count.", "input": "", "output": "1 2 3", "id": "a3"}]
ALPACA_RECORDS = [
    {"messages": [_u("Translate.\n\nhello"), _a("halló")], "id": "a1", "meta": META},
    {"messages": [{"role": "system", "content": "You are kind."}, _u("Say hi."), _a("Hi!")], "id": "a2"},
    {"messages": [_u("Count."), _a("1 2 3")], "id": "a3"},
]


def _messages_jsonl(tmp: Path):
    rows = [{"messages": CONV, "id": "r1", "meta": META}, {"messages": CONV[1:3], "id": "r2"}]
    return _jsonl(tmp / "m.jsonl", rows), None, "messages", rows


def _prompt_completion(tmp: Path):
    rows = [{"prompt": "Hi?", "completion": "Hello.", "id": "p1", "meta": META},
            {"prompt": CONV[:4], "completion": [CONV[4]], "id": "p2"}]
    return (_jsonl(tmp / "pc.jsonl", rows), None, "prompt-completion",
            [{"messages": CONV[1:3], "id": "p1", "meta": META}, {"messages": CONV, "id": "p2"}])


def _alpaca_array(tmp: Path):
    return _json(tmp / "a.json", ALPACA), None, "alpaca", ALPACA_RECORDS


def _alpaca_pretty_object(tmp: Path):  # {"data": [...]}, pretty-printed over many lines
    return _json(tmp / "a.json", {"data": ALPACA}, indent=2), None, "alpaca", ALPACA_RECORDS


def _alpaca_jsonl(tmp: Path):
    return _jsonl(tmp / "a.jsonl", ALPACA), None, "alpaca", ALPACA_RECORDS


def _sharegpt(tmp: Path):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                               {"from": "gpt", "value": "Hello."}, {"from": "user", "value": "Name?"},
                               {"from": "assistant", "value": "Delia."}], "id": 7, "meta": META}]
    return _jsonl(tmp / "s.jsonl", rows), None, "sharegpt", [{"messages": CONV, "id": 7, "meta": META}]


QA = {"question": ["What is 2+2?", "What is 5+5?", "Pad 12 to four digits."], "answer": ["4", "10", "0012"],
      "id": ["q1", "q2", "q3"]}
QA_COLUMNS = {"prompt": "question", "completion": "answer"}
QA_ROWS = list(zip(QA["question"], QA["answer"], QA["id"], strict=True))
QA_RECORDS = [{"messages": [_u(q), _a(a)], "id": i} for q, a, i in QA_ROWS]


def _parquet(tmp: Path):
    import datasets

    datasets.Dataset.from_dict({**QA, "meta": [META] * 3}).to_parquet(str(tmp / "t.parquet"))
    return tmp / "t.parquet", QA_COLUMNS, "prompt-completion", [{**r, "meta": META} for r in QA_RECORDS]


def _csv(tmp: Path):  # all-digit answers stay the text they are ("4", "0012"), as CSV has no types
    lines = ["question,answer,id"] + [f"{q},{a},{i}" for q, a, i in QA_ROWS]
    (tmp / "t.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp / "t.csv", QA_COLUMNS, "prompt-completion", QA_RECORDS


def _saved_dataset(tmp: Path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict(QA)}).save_to_disk(str(tmp / "saved"))
    return tmp / "saved", QA_COLUMNS, "prompt-completion", QA_RECORDS


CASES = [_messages_jsonl, _prompt_completion, _alpaca_array, _alpaca_pretty_object, _alpaca_jsonl, _sharegpt,
         _parquet, _csv, _saved_dataset]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_each_format_reads_detects_and_round_trips_with_extra_fields(case, tmp_path):
    path, columns, fmt, expected = case(tmp_path)
    data = read_chat(path, columns=columns)
    assert (data.format, data.records, data.rejects) == (fmt, expected, [])
    assert read_chat(path, fmt, columns=columns).records == expected  # the explicit format reads the same
    for out in (tmp_path / "out.jsonl", tmp_path / "out_dataset"):  # messages JSONL and a saved HF dataset
        write_chat(out, data.records)
        again = read_chat(out)
        assert (again.format, again.records) == ("messages", expected)


def test_an_explicit_format_that_does_not_fit_names_the_missing_key(tmp_path):
    path = _json(tmp_path / "a.json", ALPACA)
    with pytest.raises(DataError) as e:
        read_chat(path, "sharegpt")
    assert (e.value.row, e.value.field, e.value.reason) == (0, "conversations", "missing_key")
    with pytest.raises(DeliaError, match="unknown format 'chatml'"):
        read_chat(path, "chatml")  # type: ignore[arg-type]


def test_a_json_file_holding_jsonl_is_read_line_by_line(tmp_path):
    path = _jsonl(tmp_path / "lines.json", [GOOD, {"messages": [_u("a"), _u("b")]}])
    with pytest.raises(DataError) as e:
        read_chat(path)
    assert (e.value.line, e.value.reason) == (2, "role_order")


def test_saved_dataset_output_keeps_fields_that_only_some_rows_have(tmp_path):
    records = [{**GOOD, "id": "x"}, {**GOOD, "meta": {"k": 1}}, {**GOOD, "meta": {"other": [1, 2]}, "score": 0.5}]
    write_chat(tmp_path / "ds", records)
    assert read_chat(tmp_path / "ds").records == records


def test_saved_dataset_output_refuses_fields_of_mixed_types_instead_of_crashing(tmp_path):
    with pytest.raises(DeliaError, match="write a .jsonl file instead"):
        write_chat(tmp_path / "ds", [{**GOOD, "id": 1}, {**GOOD, "id": "two"}])
    assert not (tmp_path / "ds").exists()


# ----------------------------------------------------------------------------- each validation error

def _msgs(*messages) -> bytes:
    return json.dumps({"messages": list(messages)}).encode()


BAD = [
    ("invalid_json", b'{"messages": [', None),
    ("invalid_json", b'{"messages": NaN}', None),  # not JSON, and would write an unreadable output
    ("invalid_json", b'{"messages": ' + b"1" * 5000 + b"}", None),  # Python refuses ints this long
    ("invalid_utf8", b'{"messages": "\xff\xfe"}', None),
    ("invalid_utf8", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    ("invalid_utf8", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
                     b'"note": "\\udfff"}', "note"),  # an extra field that could not be written back
    ("not_object", b"[1, 2]", None),
    ("missing_key", b'{"text": "hi"}', "messages"),  # the format was detected from line 1
    ("missing_key", _msgs({"role": "user"}), "messages[0]"),
    ("unknown_role", _msgs({"role": "bot", "content": "x"}), "messages[0].role"),
    ("empty_content", _msgs(_u("  "), _a("x")), "messages[0].content"),
    ("non_string_content", _msgs(_u("a"), {"role": "assistant", "content": ["b"]}), "messages[1].content"),
    ("missing_key", _msgs(_u("a"), {"role": "assistant", "content": None}), "messages[1].content"),
    ("role_order", _msgs(_u("a"), _u("b")), "messages[1].role"),
    ("role_order", _msgs(_a("a"), _u("b")), "messages[0].role"),
    ("role_order", _msgs(_u("a"), {"role": "system", "content": "late"}), "messages[1].role"),
    ("last_turn", _msgs(_u("a")), "messages[0].role"),
    ("last_turn", _msgs(_u("a"), _a("b"), _u("c")), "messages[2].role"),
    ("empty_conversation", _msgs(), "messages"),
    ("empty_conversation", _msgs({"role": "system", "content": "s"}), "messages"),
]


@pytest.mark.parametrize("reason,line,field", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_each_bad_record_names_file_line_field_and_reason(reason, line, field, write_jsonl):
    path = write_jsonl("bad.jsonl", [GOOD, "", line])  # the bad record is on line 3 (line 2 is blank)
    with pytest.raises(DataError) as e:
        read_chat(path)
    err = e.value
    assert (err.reason, err.line, err.field) == (reason, 3, field)
    assert str(err).startswith(f"{path}:3:")
    if field:
        assert f"field '{field}':" in str(err)


@pytest.mark.parametrize("row,field,reason", [
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from", "unknown_role"),
    ({"conversations": [{"from": "human"}]}, "conversations[0]", "missing_key"),
    ({"prompt": "q", "completion": 3}, "completion", "non_string_content"),
    ({"prompt": [{"role": "user", "content": ""}], "completion": "a"}, "messages[0].content", "empty_content"),
    ({"instruction": "do", "output": "x", "input": 5}, "input", "non_string_content"),
    ({"instruction": "do", "output": "x", "system": ["s"]}, "system", "non_string_content"),
])
def test_errors_in_other_formats_name_their_own_fields(row, field, reason, tmp_path):
    fmt = {"conversations": "sharegpt", "prompt": "prompt-completion", "instruction": "alpaca"}[next(iter(row))]
    with pytest.raises(DataError) as e:
        read_chat(_jsonl(tmp_path / "x.jsonl", [row]), fmt)  # type: ignore[arg-type]
    assert (e.value.line, e.value.field, e.value.reason) == (1, field, reason)


def test_an_undetectable_first_row_says_which_keys_it_expected(write_jsonl):
    with pytest.raises(DataError) as e:
        read_chat(write_jsonl("t.jsonl", [{"text": "hi"}]))
    assert (e.value.reason, e.value.line) == ("unknown_format", 1)
    assert "'text'" in str(e.value) and "`format`" in str(e.value)


def test_json_documents_name_the_row_or_the_line(tmp_path):
    path = _json(tmp_path / "a.json", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 5}])
    with pytest.raises(DataError) as e:
        read_chat(path)
    assert (e.value.row, e.value.field, e.value.reason) == (1, "output", "non_string_content")
    assert str(e.value).startswith(f"{path}[row 1]: field 'output':")
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(DataError) as e:
        read_chat(path)
    assert (e.value.line, e.value.reason) == (3, "invalid_json")
    path.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "\xff", "output": "b"}]')
    with pytest.raises(DataError) as e:
        read_chat(path)
    assert (e.value.line, e.value.reason) == (3, "invalid_utf8")
    path.write_text("[1]")
    with pytest.raises(DataError) as e:
        read_chat(path)
    assert (e.value.row, e.value.reason) == (0, "not_object")


def test_table_errors_name_the_row_index(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("question,answer\nWhat?,yes\nWhy?,\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_chat(path, columns=QA_COLUMNS)
    assert (e.value.row, e.value.field, e.value.reason) == (1, "messages[1].content", "empty_content")
    with pytest.raises(DataError) as e:
        read_chat(path)  # no column mapping: the columns name no format
    assert (e.value.row, e.value.reason) == (0, "unknown_format")


def test_a_mapped_column_that_is_absent_is_named(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("question,answer\nWhat?,yes\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_chat(path, "prompt-completion", columns={"prompt": "question", "completion": "answr"})
    assert (e.value.row, e.value.field, e.value.reason) == (0, "answr", "missing_key")
    assert "`columns` maps it to column 'answr'" in str(e.value)


def test_output_formats_that_are_only_read_are_refused(tmp_path):
    with pytest.raises(DeliaError, match="cannot write .csv"):
        write_chat(tmp_path / "out.csv", [GOOD])
    assert list(tmp_path.iterdir()) == []


def test_conversations_ending_on_a_user_turn_are_accepted_when_asked(write_jsonl):
    path = write_jsonl("q.jsonl", [{"messages": [_u("a query")]}, {"prompt": "another", "completion": "x"}])
    with pytest.raises(DataError, match="last turn must be from the assistant"):
        read_chat(path)
    data = read_chat(path, require_assistant=False, skip_invalid=True)
    assert data.records == [{"messages": [_u("a query")]}]  # row 2 is another format, so it is rejected
    assert data.reject_counts() == {"missing_key": 1}


def test_skip_invalid_counts_reasons_and_writes_rejects_beside_the_output(write_jsonl, tmp_path):
    path = write_jsonl("mixed.jsonl", [GOOD, b"{oops", {"messages": [{"role": "bot", "content": "x"}]}, GOOD,
                                       b'{"messages": "\xff"}', _msgs(_u("\ud800"), _a("b")), b"[3]"])
    data = read_chat(path, skip_invalid=True)
    assert data.records == [GOOD, GOOD]
    assert data.reject_counts() == {"invalid_json": 1, "unknown_role": 1, "invalid_utf8": 2, "not_object": 1}
    assert [r["line"] for r in data.rejects] == [2, 3, 5, 6, 7]
    rejects = write_rejects(tmp_path / "out" / "clean.jsonl", data.rejects)
    assert rejects == tmp_path / "out" / "clean.rejects.jsonl"
    rows = [json.loads(x) for x in rejects.read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["reason"]) for r in rows] == [(2, "invalid_json"), (3, "unknown_role"),
                                                          (5, "invalid_utf8"), (6, "invalid_utf8"), (7, "not_object")]
    assert rows[1]["field"] == "messages[0].role" and rows[1]["raw"]["messages"][0]["role"] == "bot"
    assert all(r["error"].startswith(f"{path}:{r['line']}:") for r in rows)
    assert rows[3]["raw"]["messages"][0]["content"] == "\ud800"  # kept as written, though not valid UTF-8


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DeliaError, match="no such file"):
        read_chat(tmp_path / "nope.jsonl")


def test_row_id_is_the_data_id_or_a_stable_hash():
    rec = {"messages": CONV}
    assert row_id({**rec, "id": 12}) == "12"
    assert row_id(rec) == row_id({"messages": [dict(m) for m in CONV], "meta": {"x": 1}}) != row_id(
        {"messages": CONV[:3]})


def test_first_turns_are_the_query_and_its_reference():
    assert first_turns({"messages": CONV}) == ("Hi?", "Hello.")
    assert first_turns({"messages": [_u("q")]}) == ("q", None)


def test_describe_counts_and_token_lengths(write_jsonl, tiny_model):
    from delia.models import load_tokenizer

    tok = load_tokenizer(tiny_model, resolved=True)
    path = write_jsonl("m.jsonl", [{"messages": CONV}, {"messages": CONV[1:3]}, b"{bad"])
    info = describe(read_chat(path, skip_invalid=True), tok)
    assert info["rows"] == 2 and info["turns"] == {2: 1, 5: 1}
    assert info["roles"] == {"system": 1, "user": 3, "assistant": 3} and info["rejected"] == {"invalid_json": 1}
    short = len(tok.apply_chat_template([CONV[1]], add_generation_prompt=True, tokenize=True)["input_ids"])
    long = len(tok.apply_chat_template(CONV[:4], add_generation_prompt=True, tokenize=True)["input_ids"])
    assert (info["prompt_tokens"]["min"], info["prompt_tokens"]["max"]) == (short, long)
    responses = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in ("Hello.", "Delia.")]
    assert (info["response_tokens"]["min"], info["response_tokens"]["max"]) == (min(responses), max(responses))
    assert info["total_tokens"] == short + long + sum(responses)


# ----------------------------------------------------------------------------- fuzzing

def _check_valid(record: dict) -> None:
    msgs = record["messages"]
    assert msgs and msgs[-1]["role"] == "assistant"
    start = 1 if msgs[0]["role"] == "system" else 0
    assert len(msgs) > start
    for i, m in enumerate(msgs[start:]):
        assert m["role"] == ("user", "assistant")[i % 2] and m["role"] in ROLES
        assert isinstance(m["content"], str) and m["content"].strip()
    json.loads(json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8"))


def _read_and_check(path: Path, tmp_path: Path):
    """Whatever the input: a DataError, or valid records that write and read back unchanged (and rejects that write)."""
    try:
        strict = read_chat(path)
    except DataError as e:
        assert e.reason and e.path == str(path)
        strict = None
    try:
        data = read_chat(path, skip_invalid=True)
    except DataError:  # a file-level error (a JSON document that does not parse): strict mode stopped too
        assert strict is None
        return None
    assert strict is None or (strict.records == data.records and not data.rejects)
    for r in data.records:
        _check_valid(r)
    assert all(r["reason"] and r["error"] for r in data.rejects)
    out = tmp_path / "fuzz_out.jsonl"
    write_chat(out, data.records)
    assert read_chat(out).records == data.records
    write_rejects(out, data.rejects)
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".json"]))
def test_fuzz_arbitrary_bytes_give_clean_errors_or_valid_records(tmp_path, blob, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(blob)
    _read_and_check(path, tmp_path)


_text = st.one_of(st.text(max_size=12), st.sampled_from(["", "  ", "ok", "\ud800", "\x00", "[bold]x", "\u2028"]))
_role = st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot", "", 3, None])
_content = st.one_of(_text, st.integers(), st.none(), st.lists(_text, max_size=2),
                  st.floats(allow_nan=False, allow_infinity=False))
_message = st.one_of(
    st.fixed_dictionaries({"role": _role, "content": _content}),
    st.fixed_dictionaries({"from": _role, "value": _content}),
    st.dictionaries(st.sampled_from(["role", "content", "from", "value", "x"]), st.one_of(_role, _content),
                    max_size=4),
)
_extras = st.dictionaries(st.sampled_from(["id", "meta", "\udc80", "x"]), _content, max_size=2)
_record = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(_message, max_size=5)}),
    st.fixed_dictionaries({"conversations": st.lists(_message, max_size=5)}),
    st.fixed_dictionaries({"prompt": st.one_of(_content, st.lists(_message, max_size=3)),
                           "completion": st.one_of(_content, st.lists(_message, max_size=2))}),
    st.fixed_dictionaries({"instruction": _content, "output": _content},
                          optional={"input": _content, "system": _content}),
    st.dictionaries(st.text(max_size=5), _content, max_size=3),
    _content,
).flatmap(lambda r: _extras.map(lambda e: {**e, **r}) if isinstance(r, dict) else st.just(r))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_record, min_size=1, max_size=4), array=st.booleans())
def test_fuzz_near_valid_records(tmp_path, records, array):
    path = tmp_path / ("near.json" if array else "near.jsonl")
    text = json.dumps(records) if array else "\n".join(json.dumps(r) for r in records)
    path.write_text(text, encoding="utf-8")
    data = _read_and_check(path, tmp_path)
    assert data is not None and len(data.records) + len(data.rejects) == len(records)
