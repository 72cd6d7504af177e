"""File helpers shared by every stage: atomic writes, appendable JSONL that survives a crash, hashing,
the files written beside an output, YAML reading and the resume check against saved settings."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from delia.errors import DeliaError


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside `path` and rename it into place only on success.

    A crash or an exception leaves the old file (or no file), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file owner-only; give it a normal file's mode
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Fill a temporary folder beside `path`; on success it replaces `path` whole, on failure it vanishes.

    Readers never see a half-written folder: they see the old one or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dumps(row: dict[str, Any]) -> str:
    """One JSONL line. Values JSON has no type for (dates from a Parquet table) are written as text."""
    return json.dumps(row, ensure_ascii=False, default=str)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL atomically; returns the row count."""
    n = 0
    with atomic_writer(path) as fh:
        for row in rows:
            fh.write(dumps(row) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_writer(path) as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=2, default=str)
        fh.write("\n")


def read_complete_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file that another run of ours appended to, dropping a torn last line.

    A process killed mid-write leaves at most one partial line at the end (rows are written
    whole and flushed). That line is cut off the file so the next append starts cleanly.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    good_end = 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl == -1:
            break  # torn last line: no newline was written
        chunk = data[pos:nl]
        try:
            rows.append(json.loads(chunk.decode("utf-8")) if chunk.strip() else None)
        except (ValueError, RecursionError):  # bad UTF-8, bad JSON, or an integer too long to convert
            if data.find(b"\n", nl + 1) != -1:
                raise ValueError(f"{path}: line {len(rows) + 1} is corrupt (not the last line)") from None
            break
        good_end = nl + 1
        pos = nl + 1
    if good_end != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return [r for r in rows if r is not None]


class JsonlAppender:
    """Appends whole rows to a JSONL file and flushes after each batch, so a kill loses at most one batch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close()/__exit__)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        self._fh.write("".join(dumps(r) + "\n" for r in rows))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_path(path: str | Path) -> str:
    """SHA-256 of a file, or of the relative names and contents of a folder's files (a saved dataset)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return sha256_json({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})


def beside(out: str | Path, suffix: str, *, strip: Iterable[str] | None = None) -> Path:
    """The file `NAME{suffix}` in `out`'s folder, NAME being `out`'s name without its extension
    (`diverse.jsonl` -> `diverse.rejects.jsonl`). With `strip`, only those extensions are removed:
    any other name (a dataset folder `mixed` or `mixed.v2`) is kept whole.
    """
    out = Path(out)
    name = out.stem if strip is None or out.suffix in strip else out.name
    return out.with_name(f"{name}{suffix}")


def read_yaml(path: str | Path, what: str | None = None) -> Any:
    """The parsed YAML of `path` (`{}` for an empty file), any shape: callers check it.

    A file that cannot be read or parsed raises DeliaError naming it: `PATH: cannot read WHAT: ERROR`,
    or `PATH: ERROR` without `what`.
    """
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DeliaError(f"{path}: cannot read {what}: {e}" if what else f"{path}: {e}") from None


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Sorted keys whose values differ between saved and current settings (a missing key counts as None):
    what a resume or a merge must refuse to mix.
    """
    return sorted(k for k in {*saved, *now} if saved.get(k) != now.get(k))
