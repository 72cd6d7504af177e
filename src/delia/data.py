"""Chat datasets in the common formats, read into one conversation form and validated row by row.

Every record that comes out is `{"messages": [{"role", "content"}, ...], ...extra fields}` with
roles `system` (first only), then `user`/`assistant` alternating from `user`. Every record that
cannot be read becomes a `DataError` naming the file, the line (JSONL) or row index, and the field.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from delia.config import Flags, StageConfig
from delia.errors import DataError, DeliaError
from delia.files import atomic_dir, atomic_writer, beside, check_output, dumps, write_jsonl

Format = Literal["auto", "messages", "prompt-completion", "alpaca", "sharegpt"]


class ReadOptions(StageConfig):
    """How a stage reads its input rows (`read_chat`): the options stages that read chat files share."""

    format: Annotated[Format, Flags("--format", "-f")] = "auto"
    """Input format: auto, messages, prompt-completion, alpaca or sharegpt."""
    columns: Annotated[list[str] | None, Flags("--columns", "-c")] = None
    """FIELD=COLUMN, repeatable: map a format's field to the file's column."""
    skip_invalid: bool = False
    """Count and skip rows that cannot be read instead of stopping at the first."""
FORMATS: tuple[str, ...] = ("messages", "prompt-completion", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
# Keys each format is recognised by (auto-detection looks at the first readable row).
_FORMAT_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("prompt-completion", ("prompt", "completion")),
    ("alpaca", ("instruction", "output")),
)
# Keys a format consumes; any other key of a row is kept as an extra field.
_CONSUMED = {
    "messages": {"messages"},
    "sharegpt": {"conversations"},
    "prompt-completion": {"prompt", "completion"},
    "alpaca": {"instruction", "input", "output", "system"},
}


@dataclass
class ChatData:
    """What a read produced: the clean records, the rejected ones (with `skip_invalid`), and the format."""

    path: str
    format: str
    records: list[dict[str, Any]]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    # where each record came from, `{"line": n}` or `{"row": i}` (provenance for stages that merge sources)
    locations: list[dict[str, int]] = field(default_factory=list)

    def reject_counts(self) -> Counter[str]:
        return Counter(r["reason"] for r in self.rejects)


# ----------------------------------------------------------------------------- raw rows


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    """Strict JSON: NaN/Infinity are refused (they would make the output unreadable to other tools)."""
    return json.loads(text, parse_constant=_no_constant)


def _json_error(e: ValueError | RecursionError) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} (column {e.colno})"
    return str(e)  # e.g. an integer of over 4300 digits


def _iter_jsonl(path: Path) -> Iterator[tuple[dict[str, int], Any]]:
    """(location, parsed object or DataError) for each non-blank line; bytes decoded strictly."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            loc = {"line": lineno}
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield loc, DataError(path, f"invalid UTF-8 at byte {e.start}", line=lineno, reason="invalid_utf8")
                continue
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                yield loc, _loads(text)
            except (ValueError, RecursionError) as e:
                yield loc, DataError(path, f"invalid JSON: {_json_error(e)}", line=lineno, reason="invalid_json")


def _iter_json_array(path: Path) -> Iterator[tuple[dict[str, int], Any]]:
    try:
        data = _loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise DataError(path, f"invalid UTF-8 at byte {e.start}", line=line, reason="invalid_utf8") from None
    except (ValueError, RecursionError) as e:
        line = getattr(e, "lineno", None)
        raise DataError(path, f"invalid JSON: {_json_error(e)}", line=line, reason="invalid_json") from None
    if isinstance(data, dict):  # a single object, or {"data": [...]}
        data = data.get("data", [data]) if isinstance(data.get("data"), list) else [data]
    if not isinstance(data, list):
        raise DataError(path, "expected a JSON array of records", reason="not_object")
    for i, row in enumerate(data):
        yield {"row": i}, row


def _iter_table(path: Path) -> Iterator[tuple[dict[str, int], Any]]:
    import datasets

    from delia.models import cache_root

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()  # its "Generating train split" lines are not a user's business
    cache = str(cache_root() / "datasets")  # the Arrow copies of CSV and Parquet files, beside delia's other caches
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds))
                ds = ds[split]
        elif path.suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path), cache_dir=cache)
        else:
            # CSV has no types: keep every cell as the text it is ("0012" stays "0012", "4" is not an int)
            with open(path, newline="", encoding="utf-8-sig") as fh:
                header = next(csv.reader(fh), [])
            features = datasets.Features({c: datasets.Value("string") for c in header})
            ds = datasets.Dataset.from_csv(str(path), keep_default_na=False, features=features, cache_dir=cache)
    except Exception as e:  # the library's own message names what is wrong with the file
        raise DataError(path, f"cannot read as a table: {e}", reason="unreadable") from None
    for i, row in enumerate(ds):
        row = {k: v for k, v in row.items() if v is not None}  # a null cell is an absent field
        if isinstance(row.get("meta"), str):  # write_chat stores `meta` as JSON text (its keys vary by row)
            try:
                meta = _loads(row["meta"])
            except (ValueError, RecursionError):
                meta = None
            if isinstance(meta, dict):
                row["meta"] = meta
        yield {"row": i}, row


def _iter_raw(path: Path) -> Iterator[tuple[dict[str, int], Any]]:
    if not path.exists():
        raise DeliaError(f"{path}: no such file or folder")
    if path.is_dir() or path.suffix in (".parquet", ".csv"):
        return _iter_table(path)
    if path.suffix == ".json" and not _is_jsonl(path):
        return _iter_json_array(path)  # one document: an array, or an object (maybe pretty-printed)
    return _iter_jsonl(path)


def _is_jsonl(path: Path) -> bool:
    """A `.json` file is JSONL under another name when its first non-blank line is a whole JSON object."""
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip(b"\xef\xbb\xbf \t\r\n"):
                try:
                    return isinstance(_loads(raw.decode("utf-8-sig")), dict)
                except (ValueError, RecursionError):
                    return False
    return True  # blank: no records either way


# ----------------------------------------------------------------------------- normalisation


def detect_format(row: Mapping[str, Any]) -> str | None:
    for name, keys in _FORMAT_KEYS:
        if all(k in row for k in keys):
            return name
    return None


def _text(value: Any, err: _Err, fld: str) -> str:
    if value is None:
        raise err(fld, "is null", "missing_key")
    if not isinstance(value, str):
        raise err(fld, f"must be a string, got {type(value).__name__}", "non_string_content")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise err(fld, "is not valid Unicode (lone surrogate)", "invalid_utf8") from None
    return value


class _Err:
    """Builds DataErrors for one row, so every check names the same place."""

    def __init__(self, path: Path, loc: Mapping[str, int]):
        self.path, self.loc = path, loc

    def __call__(self, fld: str | None, message: str, reason: str) -> DataError:
        return DataError(self.path, message, field=fld, reason=reason, **self.loc)


def _messages(value: Any, err: _Err, fld: str, *, role_key="role", content_key="content", roles=None):
    if not isinstance(value, list):
        raise err(fld, f"must be a list of messages, got {type(value).__name__}", "bad_type")
    out = []
    for i, m in enumerate(value):
        where = f"{fld}[{i}]"
        if not isinstance(m, Mapping):
            raise err(where, f"must be an object, got {type(m).__name__}", "bad_type")
        for k in (role_key, content_key):
            if k not in m:
                raise err(where, f"missing key '{k}'", "missing_key")
        role = m[role_key]
        role = roles.get(role) if roles is not None and isinstance(role, str) else role
        if role not in ROLES:
            allowed = sorted(roles) if roles is not None else list(ROLES)
            raise err(f"{where}.{role_key}", f"unknown role {m[role_key]!r} (expected one of {allowed})",
                      "unknown_role")
        out.append({"role": role, "content": _text(m[content_key], err, f"{where}.{content_key}")})
    return out


def _to_messages(fmt: str, row: Mapping[str, Any], err: _Err, columns: Mapping[str, str] | None = None
                 ) -> list[dict[str, str]]:
    for k in dict(_FORMAT_KEYS)[fmt]:
        if k not in row:
            source = (columns or {}).get(k)  # name the file's column the user mapped, which is what is missing
            where = f"; `columns` maps it to column '{source}', which this row lacks" if source else ""
            raise err(source or k, f"missing key '{k}' (format {fmt}{where})", "missing_key")
    if fmt == "messages":
        return _messages(row["messages"], err, "messages")
    if fmt == "sharegpt":
        return _messages(row["conversations"], err, "conversations", role_key="from", content_key="value",
                         roles=SHAREGPT_ROLES)
    if fmt == "prompt-completion":
        msgs = []
        for key, role in (("prompt", "user"), ("completion", "assistant")):
            v = row[key]
            if isinstance(v, list):
                msgs += _messages(v, err, key)
            else:
                msgs.append({"role": role, "content": _text(v, err, key)})
        return msgs
    # alpaca
    instruction = _text(row["instruction"], err, "instruction")
    extra_input = row.get("input") or ""
    extra_input = _text(extra_input, err, "input")
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": _text(row["system"], err, "system")})
    return [*msgs, {"role": "user", "content": user},
            {"role": "assistant", "content": _text(row["output"], err, "output")}]


def validate_messages(msgs: list[dict[str, str]], err: _Err, fld: str, require_assistant: bool) -> None:
    if not msgs:
        raise err(fld, "has no messages", "empty_conversation")
    for i, m in enumerate(msgs):
        if not m["content"].strip():
            raise err(f"{fld}[{i}].content", f"{m['role']} content is empty", "empty_content")
    start = 1 if msgs[0]["role"] == "system" else 0
    for i, m in enumerate(msgs[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise err(f"{fld}[{i}].role", f"role order: expected '{expected}', got '{m['role']}'", "role_order")
    if len(msgs) == start:
        raise err(fld, "has only a system message", "empty_conversation")
    if require_assistant and msgs[-1]["role"] != "assistant":
        raise err(f"{fld}[{len(msgs) - 1}].role", "last turn must be from the assistant", "last_turn")


def _check_extras(extras: Mapping[str, Any], err: _Err) -> None:
    """Extra fields are written back as UTF-8 JSON, which a lone surrogate (a valid JSON escape) cannot be."""
    for k, v in extras.items():
        try:
            dumps({k: v}).encode("utf-8")
        except UnicodeEncodeError:
            raise err(k, "is not valid Unicode (lone surrogate)", "invalid_utf8") from None


def parse_columns(pairs: list[str] | None) -> dict[str, str] | None:
    """`["prompt=question", ...]` (the `columns` option) as the mapping `read_chat` takes."""
    if not pairs:
        return None
    out = {}
    known = sorted({"id", *(field for fields in _CONSUMED.values() for field in fields)})
    for p in pairs:
        k, _, v = (part.strip() for part in p.partition("="))
        if not k or not v:
            raise DeliaError(f"`columns` expects FIELD=COLUMN with both named, got {p!r}")
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            raise DeliaError(f"`columns` {p!r}: {k!r} is no format's field" + (
                f" (did you mean {close[0]!r}?)" if close else f"; the fields are {', '.join(known)}"))
        out[k] = v
    return out


def _apply_columns(row: Mapping[str, Any], columns: Mapping[str, str] | None) -> dict[str, Any]:
    if not columns:
        return dict(row)
    out = {k: v for k, v in row.items() if k not in columns.values()}
    for target, source in columns.items():
        if source in row:
            out[target] = row[source]
    return out


def read_chat(
    path: str | Path,
    format: Format = "auto",
    *,
    columns: Mapping[str, str] | None = None,
    require_assistant: bool = True,
    skip_invalid: bool = False,
) -> ChatData:
    """Read a chat dataset and normalise it to `{"messages": [...]}` records.

    `columns` maps the fields a format expects to the names the file uses, e.g.
    `{"prompt": "question", "completion": "answer"}`. With `skip_invalid=False` the first bad
    record raises `DataError`; otherwise bad records are collected in `ChatData.rejects`.
    """
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise DeliaError(f"unknown format {format!r}; expected auto or one of {', '.join(FORMATS)}")
    fmt = None if format == "auto" else format
    records: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    locations: list[dict[str, int]] = []
    fld_name = {"messages": "messages", "sharegpt": "conversations"}

    for loc, raw in _iter_raw(path):
        err = _Err(path, loc)
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, Mapping):
                raise err(None, f"record must be a JSON object, got {type(raw).__name__}", "not_object")
            row = _apply_columns(raw, columns)
            if fmt is None:
                fmt = detect_format(row)
                if fmt is None:
                    raise err(None, f"cannot detect the format from keys {sorted(row)[:8]}; expected "
                              "'messages', 'conversations', 'prompt'+'completion' or 'instruction'+'output' "
                              "(or set `format` / `columns`)", "unknown_format")
            msgs = _to_messages(fmt, row, err, columns)
            validate_messages(msgs, err, fld_name.get(fmt, "messages"), require_assistant)
            extras = {k: v for k, v in row.items() if k not in _CONSUMED[fmt]}
            _check_extras(extras, err)
        except DataError as e:
            if not skip_invalid:
                raise
            rejects.append({**loc, "field": e.field, "reason": e.reason, "error": str(e),
                            "raw": raw if not isinstance(raw, DataError) else None})
            continue
        records.append({"messages": msgs, **extras})
        locations.append(loc)
    return ChatData(str(path), fmt or (format if format != "auto" else "messages"), records, rejects, locations)


# ----------------------------------------------------------------------------- writing and helpers


def check_chat_output(path: str | Path, *, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> Path:
    """Refuse, before any work, an output `write_chat` cannot write or that would replace a user's file or folder
    (see `files.check_output`)."""
    path = Path(path)
    if path.suffix in (".csv", ".parquet"):  # read, but not written: a folder named out.csv would surprise
        raise DeliaError(f"{path}: cannot write {path.suffix}; write messages JSONL (.jsonl) or a folder "
                         "(a saved Hugging Face dataset)")
    return check_output(path, inputs=inputs, overwrite=overwrite, folder=path.suffix not in (".jsonl", ".json"))


def write_chat(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Write records as messages JSONL (`.jsonl`/`.json`) or a saved HF dataset (any other path), atomically.

    A folder replaces only a dataset folder that delia wrote (see `files.atomic_dir`)."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        write_jsonl(path, records)
        return path
    check_chat_output(path, overwrite=True)
    import datasets

    datasets.disable_progress_bars()
    # `meta` dicts differ in keys from row to row, which one table schema cannot hold: store them as JSON text
    # (read_chat turns it back into a dict)
    rows = [{**r, "meta": json.dumps(r["meta"])} if isinstance(r.get("meta"), dict) else r for r in records]
    keys = dict.fromkeys(k for r in rows for k in r)  # every row's fields, not just the first row's
    try:
        table = datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in keys})
    except (ValueError, TypeError) as e:  # pyarrow: a field whose type differs between rows
        raise DeliaError(f"{path}: the records' extra fields do not fit one table ({e}); "
                         "write a .jsonl file instead") from None
    with atomic_dir(path, "dataset") as tmp:
        table.save_to_disk(str(tmp))
    return path


def rejects_path(out: str | Path) -> Path:
    return beside(out, ".rejects.jsonl")


def write_rejects(out: str | Path, rejects: list[dict[str, Any]]) -> Path:
    """Rejected rows with their reasons, beside `out`. ASCII JSON: a rejected row may hold lone surrogates."""
    p = rejects_path(out)
    with atomic_writer(p) as fh:
        for r in rejects:
            fh.write(json.dumps(r, default=str) + "\n")
    return p


def row_id(record: Mapping[str, Any]) -> str:
    """The record's own `id` when it has one, else a hash of its conversation (stable across runs)."""
    if record.get("id") not in (None, ""):
        return record["id"] if isinstance(record["id"], str) else dumps(record["id"])  # an object id as JSON
    return hashlib.sha256(dumps({"m": record["messages"]}).encode()).hexdigest()[:16]


def first_turns(record: Mapping[str, Any]) -> tuple[str, str | None]:
    """(first user message, first assistant message or None): a query and its reference."""
    msgs = record["messages"]
    user = next(m["content"] for m in msgs if m["role"] == "user")
    ref = next((m["content"] for m in msgs if m["role"] == "assistant"), None)
    return user, ref


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"min": s[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": s[-1]}


def describe(data: ChatData, tokenizer: Any = None) -> dict[str, Any]:
    """Counts of rows, turns and roles; with a tokenizer, token lengths of prompts and responses.

    The prompt is everything before the last assistant turn rendered with the chat template (what
    training feeds as context), the response that last turn: together they guide `max_length`.
    """
    turns = Counter(len(r["messages"]) for r in data.records)
    roles = Counter(m["role"] for r in data.records for m in r["messages"])
    out: dict[str, Any] = {
        "path": data.path, "format": data.format, "rows": len(data.records),
        "rejected": dict(data.reject_counts()), "turns": dict(sorted(turns.items())), "roles": dict(roles),
    }
    if tokenizer is not None and data.records:
        prompt_lens, response_lens = [], []
        for r in data.records:
            msgs = r["messages"]
            if msgs[-1]["role"] == "assistant":
                prompt, response = msgs[:-1], msgs[-1]["content"]
                response_lens.append(len(tokenizer(response, add_special_tokens=False)["input_ids"]))
            else:
                prompt = msgs
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            prompt_lens.append(len(ids["input_ids"] if isinstance(ids, Mapping) else ids))
        out["prompt_tokens"] = _percentiles(prompt_lens)
        out["response_tokens"] = _percentiles(response_lens)
        out["total_tokens"] = sum(prompt_lens) + sum(response_lens)
    return out
