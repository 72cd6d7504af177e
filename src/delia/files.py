"""File helpers shared by every stage: atomic writes, appendable JSONL that survives a crash, hashing,
the files written beside an output, YAML reading and the resume check against saved settings."""

from __future__ import annotations

import contextlib
import functools
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


OUTPUT_MARKER = ".delia-output.json"  # in every folder delia writes whole: what kind of output it is


def output_kind(path: str | Path) -> str | None:
    """The kind of output folder delia wrote at `path` (its marker), or None for anything else."""
    try:
        return json.loads((Path(path) / OUTPUT_MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def holds_other_files(folder: Path, kind: str) -> bool:
    """Whether `folder` holds files and is not marked as delia's output of `kind`. The marker alone, or its
    temporary file while another process writes it, is no user's file."""
    if not folder.is_dir() or output_kind(folder) == kind:
        return False
    return any(OUTPUT_MARKER not in p.name for p in folder.iterdir())


def mark_output(folder: str | Path, kind: str) -> None:
    """Mark `folder` as delia's output of `kind`, so that a later run may replace it (with `overwrite`)."""
    write_json(Path(folder) / OUTPUT_MARKER, {"kind": kind, "written_by": "delia"})


def _move_aside(path: Path) -> Path:
    """Rename `path` into a new hidden folder beside it (returned, for removal): a kill while it is removed then
    never leaves a half-deleted folder under its name."""
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    os.replace(path, old / path.name)
    return old


def discard_output(path: str | Path, kind: str) -> None:
    """Remove a folder that delia wrote as an output of `kind` (its marker says so); refuse anything else."""
    path = Path(os.path.abspath(path))
    if output_kind(path) != kind:
        raise DeliaError(f"{path}: is not a {kind} folder that delia wrote; refusing to remove it")
    shutil.rmtree(_move_aside(path), ignore_errors=True)


def _replaceable(path: Path, kind: str, replace_unmarked: bool) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    return replace_unmarked or output_kind(path) == kind or not any(path.iterdir())


@contextlib.contextmanager
def atomic_dir(path: str | Path, kind: str, *, replace_unmarked: bool = False) -> Iterator[Path]:
    """Fill a temporary folder beside `path`; on success it replaces `path` whole, on failure it vanishes.

    Readers never see a half-written folder: they see the old one or the complete new one. The folder is
    marked as delia's output of `kind`. An existing `path` is replaced only when it is an empty folder or
    delia's output of the same kind (any folder with `replace_unmarked`, for delia's own cache): a user's
    folder is never deleted.
    """
    path = Path(os.path.abspath(path))  # `out/.` and `out/` name the folder itself
    if path.exists() and not _replaceable(path, kind, replace_unmarked):
        raise DeliaError(f"{path}: exists and is not a {kind} folder that delia wrote; refusing to replace it "
                         "(move it away or choose another path)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only
        yield tmp
        mark_output(tmp, kind)
        old = _move_aside(path) if path.exists() else None
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(out: str | Path, *, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                 folder: bool = False) -> Path:
    """Refuse, before any work, an output that would lose a user's file: one that is an input, holds one or lies
    inside an input folder; one under a path component that is a file; an existing one without `overwrite`.

    `folder`: the output is a folder written whole (`atomic_dir`), else a file. Returns `out`.
    """
    out = Path(out)
    target = Path(os.path.abspath(out))
    for p in inputs:
        src = Path(os.path.abspath(p))
        if target == src or target.resolve() == src.resolve():
            raise DeliaError(f"{out}: is also an input; choose another output path")
        if target in src.parents or target.resolve() in src.resolve().parents:
            raise DeliaError(f"{out}: holds the input {p}; choose another output path")
        if src.is_dir() and src in target.parents:
            raise DeliaError(f"{out}: lies inside the input folder {p}; choose another output path")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DeliaError(f"{out}: {parent} is a file, not a folder")
            break
    if os.path.lexists(target) and not (folder and target.is_dir() and not any(target.iterdir())):
        if target.is_dir() != folder:
            raise DeliaError(f"{out}: exists and is a {'file' if folder else 'folder'}; choose another path")
        if not overwrite:
            raise DeliaError(f"{out}: exists; set `overwrite` to replace it, or choose another path")
    return out


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


@functools.cache
def _unique_keys_loader() -> Any:
    """yaml's safe loader, except that a key given twice in one mapping is an error (safe_load keeps the last)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, list | dict):
                    continue  # unhashable: the base constructor reports it
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeys


def read_yaml(path: str | Path, what: str | None = None) -> Any:
    """The parsed YAML of `path` (`{}` for an empty file), any shape: callers check it.

    A file that cannot be read or parsed raises DeliaError naming it: `PATH: cannot read WHAT: ERROR`,
    or `PATH: ERROR` without `what`.
    """
    import yaml

    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_unique_keys_loader()) or {}
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 text (byte {e.start})"
    except RecursionError:
        problem = "nested too deeply"
    except yaml.MarkedYAMLError as e:  # names the line and column where the parser stopped
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = f"{where}{e.problem or e.context}"
    except (OSError, yaml.YAMLError) as e:
        problem = str(e)
    raise DeliaError(f"{path}: cannot read {what}: {problem}" if what else f"{path}: {problem}")


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Sorted keys whose values differ between saved and current settings (a missing key counts as None):
    what a resume or a merge must refuse to mix.
    """
    return sorted(k for k in {*saved, *now} if saved.get(k) != now.get(k))
