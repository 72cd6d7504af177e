"""Real data for `delia demo`: a small downstream task and a diverse query pool, taken from a PyPI package.

Both come from OpenAI's `evals` wheel (MIT, 46 MB), fetched once with `pip download --no-deps
--require-hashes` into `$DELIA_CACHE/downloads` and read straight from the zip, never from a model or
data hub. Why this package: it holds ~1M chat-format samples over ~440 tasks with reference answers,
and a wheel any OS can fetch. (The `bigbench` sdist is 358 MB and pip >= 26 refuses to download it: its
metadata declares a `bleurt @ file://` dependency.)

- The task is its `sarcasm` eval (news headlines labelled 1/0), re-posed as a question whose answer is
  a one-key JSON object, `{"sarcastic": "yes"}`: a format SmolLM2 never produces unprompted, so plain SFT
  must learn it, and the format metric scores it (format and label accuracy).
- The pool takes queries whose reference is long-form text (>= 200 characters of mostly words, not
  numbers or grids), capped per task so that no task dominates. Most `evals` references are a few
  words; a pool of those teaches one-shot sampling a bare-word style.

The selection is deterministic (fixed seed, no timestamps): a rerun gives byte-identical files, whose
hashes SOURCES.json records with the package, licences, tasks, filters and counts. The folder is built
in a temporary sibling and renamed into place only after every file reads back cleanly.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from delia.errors import DeliaError
from delia.files import atomic_dir, sha256_file, write_json, write_jsonl

DEMO_VERSION = "1"
SEED = 0
PACKAGE: dict[str, Any] = {
    "name": "evals",
    "version": "3.0.1.post1",
    "registry": "PyPI",
    "file": "evals-3.0.1.post1-py3-none-any.whl",
    "sha256": "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
    "licence": "MIT",
    "licence_file": "evals-3.0.1.post1.dist-info/LICENSE.md",
}
DATA_PREFIX = "evals/registry/data/"
# The package's LICENSE.md: "This license applies to all parts of this repository except for the datasets
# specified below" -- these folders carry their sources' own licences (some non-commercial), so neither file
# takes anything from them.
OTHER_LICENCE_TASKS = (
    "already_said_that", "ballots", "sandbagging", "schelling_point", "steganography", "text_compression",
    "theory_of_mind",
)

TASK = "sarcasm"
TASK_FILE = f"{DATA_PREFIX}{TASK}/samples.jsonl"
TASK_PROMPT = "Is this news headline sarcastic?\n\nHeadline: {text}"
TASK_KEY = "sarcastic"
TASK_LABELS = {"1": "yes", "0": "no"}  # the eval's ideal answer -> the JSON label
TASK_TRAIN_ROWS = 80
TASK_EVAL_ROWS = 50
TASK_TEXT_CHARS = (20, 200)  # headline length bounds: drops fragments and the odd pasted paragraph
# What `delia eval --metric-config` / an experiment's `task.metric_config` needs to score the task.
TASK_METRIC: dict[str, Any] = {
    "kind": "format", "required_keys": [TASK_KEY], "exact_keys": True,
    "allowed_values": {TASK_KEY: sorted(set(TASK_LABELS.values()))}, "label_key": TASK_KEY,
}

POOL_MIN_REFERENCE_CHARS = 200
POOL_MAX_CHARS = 2000  # per query and per reference: keeps one-shot prompts (query, reference, query) CPU-sized
POOL_PER_TASK = 25
POOL_MIN_WORDS = 20
POOL_MIN_LETTER_SHARE = 0.7  # letters and spaces; drops grids, number lists, coordinates
POOL_MIN_DISTINCT_WORDS = 0.4  # distinct/total words; drops move lists like "[right, right, down, ...]"

FILES = ("task_train.jsonl", "task_eval.jsonl", "pool.jsonl")


@dataclass(frozen=True)
class Sample:
    """One row of an `evals` samples file, with where it came from."""

    task: str  # the folder under evals/registry/data/
    member: str  # the file inside the wheel
    line: int
    row: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{PACKAGE['name']}:{self.member.removeprefix(DATA_PREFIX)}:{self.line}"


def cache_dir() -> Path:
    """Where the prepared folder lives by default: `$DELIA_CACHE/data/demo-<version>`."""
    from delia.models import cache_root

    return cache_root() / "data" / f"demo-{DEMO_VERSION}"


# ----------------------------------------------------------------------------- the package


def fetch_wheel(downloads: Path) -> Path:
    """The pinned `evals` wheel in `downloads`, fetched with pip (hash-checked) unless already there."""
    wheel = downloads / PACKAGE["file"]
    if wheel.is_file() and sha256_file(wheel) == PACKAGE["sha256"]:
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{PACKAGE['name']}=={PACKAGE['version']}"
    print(f"delia: downloading {spec} from PyPI (46 MB, once) into {downloads}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{spec} --hash=sha256:{PACKAGE['sha256']}\n", encoding="utf-8")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes",
               "--disable-pip-version-check", "--quiet", "-r", str(req), "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / PACKAGE["file"]
        if done.returncode != 0 or not got.is_file():
            tail = (done.stderr or done.stdout).strip()[-800:]
            raise DeliaError(f"could not download {spec} from PyPI with pip: {tail or 'no wheel was saved'}")
        os.replace(got, wheel)
    return wheel


def iter_samples(wheel: Path, member: str | None = None, skip: tuple[str, ...] = ()) -> Iterator[Sample]:
    """Every JSON-object row of the wheel's samples files (or of the one `member`), in name order; tasks
    in `skip` are not read."""
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(n for n in zf.namelist() if n.startswith(DATA_PREFIX) and n.endswith(".jsonl")
                         and member in (None, n))
        if member is not None and not members:
            raise DeliaError(f"{wheel}: no {member} in the package")
        for name in members:
            task = name[len(DATA_PREFIX):].split("/", 1)[0]
            if task in skip:
                continue
            with zf.open(name) as fh:
                for line, raw in enumerate(fh, start=1):
                    try:
                        row = json.loads(raw)
                    except (ValueError, RecursionError):
                        continue
                    if isinstance(row, dict):
                        yield Sample(task, name, line, row)


def _query_and_reference(row: dict[str, Any]) -> tuple[str, str] | None:
    """(query, reference) of a single-turn sample: system and user messages folded into one query (the
    system text first, as the eval sent it); None for few-shot, multi-role or non-text samples."""
    inp, ideal = row.get("input"), row.get("ideal")
    if isinstance(ideal, list) and ideal and all(isinstance(x, str) for x in ideal):
        ideal = ideal[0]  # a list holds acceptable answers; the first is the canonical one
    if not isinstance(inp, list) or not inp or not isinstance(ideal, str):
        return None
    parts = []
    for m in inp:
        # a `name` marks a few-shot example (example_user/example_assistant) dressed as a system message
        if not isinstance(m, dict) or m.get("role") not in ("system", "user") or "name" in m:
            return None
        if not isinstance(m.get("content"), str):
            return None
        if m["content"].strip():
            parts.append(m["content"].strip())
    query, reference = "\n\n".join(parts), ideal.strip()
    return (query, reference) if query and reference else None


def is_prose(text: str) -> bool:
    """Mostly words, many of them distinct: long-form text rather than a grid, list of numbers or moves."""
    words = text.split()
    if len(words) < POOL_MIN_WORDS:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
    return letters >= POOL_MIN_LETTER_SHARE and len(set(words)) / len(words) >= POOL_MIN_DISTINCT_WORDS


def _stats(values: list[int]) -> dict[str, float | int]:
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"min": s[0], "p10": pick(0.1), "p50": pick(0.5), "p90": pick(0.9), "max": s[-1],
            "mean": round(sum(s) / len(s), 1)}


# ----------------------------------------------------------------------------- selection


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def select_task(samples: Iterator[Sample]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(train rows, eval rows, facts): a label-balanced seeded draw from the sarcasm headlines.

    Headlines that occur twice are kept once; one that occurs with both labels is dropped, as are rows
    outside `TASK_TEXT_CHARS`. The draw takes the same number per label, then train and eval are disjoint.
    """
    seen: dict[str, tuple[Sample, str, str]] = {}
    conflicting: set[str] = set()
    skipped = Counter()
    for s in samples:
        qr = _query_and_reference(s.row)
        msgs = s.row.get("input")
        user = [m["content"].strip() for m in msgs if m.get("role") == "user"] if qr else []
        if qr is None or len(user) != 1 or qr[1] not in TASK_LABELS:
            skipped["not_a_labelled_headline"] += 1
            continue
        text, label = user[0], TASK_LABELS[qr[1]]
        if not TASK_TEXT_CHARS[0] <= len(text) <= TASK_TEXT_CHARS[1]:
            skipped["length"] += 1
            continue
        key = _normalise(text)
        if key in seen:
            skipped["duplicate"] += 1
            if seen[key][2] != label:
                conflicting.add(key)
            continue
        seen[key] = (s, text, label)
    for key in conflicting:
        del seen[key]
    skipped["conflicting_labels"] = len(conflicting)

    per_label = {lab: sorted((v for v in seen.values() if v[2] == lab), key=lambda v: (v[0].member, v[0].line))
                 for lab in sorted(set(TASK_LABELS.values()))}
    n_train, n_eval = TASK_TRAIN_ROWS // len(per_label), TASK_EVAL_ROWS // len(per_label)
    rng = random.Random(f"{SEED}:task")
    train, evals = [], []
    for label, rows in per_label.items():
        if len(rows) < n_train + n_eval:
            raise DeliaError(f"{TASK_FILE}: only {len(rows)} usable rows labelled {label!r}, "
                             f"{n_train + n_eval} needed")
        drawn = rng.sample(rows, n_train + n_eval)
        train += drawn[:n_train]
        evals += drawn[n_train:]
    rng.shuffle(train)
    rng.shuffle(evals)

    def record(v: tuple[Sample, str, str]) -> dict[str, Any]:
        s, text, label = v
        return {"id": s.id, "messages": [
            {"role": "user", "content": TASK_PROMPT.format(text=text)},
            {"role": "assistant", "content": json.dumps({TASK_KEY: label})},
        ]}

    facts = {"usable_rows": {lab: len(rows) for lab, rows in per_label.items()}, "skipped": dict(skipped)}
    return [record(v) for v in train], [record(v) for v in evals], facts


def select_pool(samples: Iterator[Sample]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(pool rows, facts): single-turn queries with long-form prose references, at most
    `POOL_PER_TASK` per task (a seeded draw), shuffled together so any prefix is still diverse."""
    per_task: dict[str, list[tuple[Sample, str, str]]] = {}
    seen: set[str] = set()
    dropped = Counter()
    scanned = 0
    for s in samples:
        scanned += 1
        qr = _query_and_reference(s.row)
        if qr is None:
            dropped["not_single_turn_text"] += 1
            continue
        query, ref = qr
        if len(ref) < POOL_MIN_REFERENCE_CHARS:
            dropped["reference_short"] += 1
        elif len(ref) > POOL_MAX_CHARS or len(query) > POOL_MAX_CHARS:
            dropped["too_long"] += 1
        elif not is_prose(ref):
            dropped["reference_not_prose"] += 1
        elif _normalise(query) in seen:
            dropped["duplicate_query"] += 1
        else:
            seen.add(_normalise(query))
            per_task.setdefault(s.task, []).append((s, query, ref))
    rows: list[dict[str, Any]] = []
    capped = 0
    for task in sorted(per_task):
        cands = per_task[task]
        take = random.Random(f"{SEED}:pool:{task}").sample(cands, min(POOL_PER_TASK, len(cands)))
        capped += len(cands) - len(take)
        rows += [{"id": s.id, "task": task, "messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": r}]}
                 for s, q, r in take]
    dropped["over_task_cap"] = capped
    random.Random(f"{SEED}:pool").shuffle(rows)
    refs = [len(r["messages"][1]["content"]) for r in rows]
    facts = {
        "rows_scanned": scanned,
        "dropped": dict(dropped),
        "tasks": dict(sorted(Counter(r["task"] for r in rows).items())),
        "reference_chars": _stats(refs),
        "query_chars": _stats([len(r["messages"][0]["content"]) for r in rows]),
    }
    return rows, facts


# ----------------------------------------------------------------------------- building the folder


def _validate(folder: Path, counts: dict[str, int]) -> None:
    """Every file reads back through `read_chat` with the expected rows; task answers pass the task metric."""
    from delia.data import read_chat
    from delia.metrics import MetricConfig, check_format, parse_output

    metric = MetricConfig(**TASK_METRIC)
    for name, n in counts.items():
        data = read_chat(folder / name, "messages")
        if len(data.records) != n:
            raise DeliaError(f"{folder / name}: read back {len(data.records)} rows, wrote {n}")
        if name.startswith("task_"):
            for i, rec in enumerate(data.records, start=1):
                value, _, err = parse_output(rec["messages"][-1]["content"], extract=False)
                why = err or check_format(value, metric)
                if why:
                    raise DeliaError(f"{folder / name}:{i}: the reference fails the task metric: {why}")


def _build(wheel: Path, folder: Path) -> dict[str, Any]:
    """Write the three files and SOURCES.json into `folder` (an empty temporary folder)."""
    train, evals, task_facts = select_task(iter_samples(wheel, member=TASK_FILE))
    pool, pool_facts = select_pool(iter_samples(wheel, skip=(*OTHER_LICENCE_TASKS, TASK)))
    counts = {"task_train.jsonl": write_jsonl(folder / "task_train.jsonl", train),
              "task_eval.jsonl": write_jsonl(folder / "task_eval.jsonl", evals),
              "pool.jsonl": write_jsonl(folder / "pool.jsonl", pool)}
    _validate(folder, counts)
    task_source = {
        "package": PACKAGE["name"], "tasks": [TASK], "member": TASK_FILE, "seed": SEED,
        "selection": (f"single-turn rows labelled {sorted(TASK_LABELS)}; headlines of {TASK_TEXT_CHARS[0]}-"
                      f"{TASK_TEXT_CHARS[1]} characters; duplicates kept once, headlines with both labels dropped; "
                      f"a seeded draw of {TASK_TRAIN_ROWS // len(set(TASK_LABELS.values()))} train and "
                      f"{TASK_EVAL_ROWS // len(set(TASK_LABELS.values()))} eval rows per label, disjoint"),
        "formatting": (f"user: {TASK_PROMPT!r} with the headline; assistant: a JSON object "
                       f"{{{TASK_KEY!r}: label}} with label {TASK_LABELS} (the eval's own answers are 1/0)"),
        **task_facts,
    }
    sources = {
        "version": DEMO_VERSION,
        "created_by": "delia.demo_data.prepare_demo_data",
        "seed": SEED,
        "package": {**PACKAGE, "size_bytes": wheel.stat().st_size,
                    "fetch": f"pip download --no-deps --only-binary :all: --require-hashes "
                             f"{PACKAGE['name']}=={PACKAGE['version']}",
                    "licence_note": ("LICENSE.md (MIT, OpenAI 2023) covers all data except the folders it lists with "
                                     f"their own licences: {', '.join(OTHER_LICENCE_TASKS)}. Nothing is taken from "
                                     "those. Contributors agreed to release their eval data under MIT; the package "
                                     "does not name an upstream origin for the tasks used here.")},
        "task_metric": TASK_METRIC,
        "files": {
            "task_train.jsonl": {**task_source, "rows": counts["task_train.jsonl"],
                                 "labels": dict(Counter(json.loads(r["messages"][1]["content"])[TASK_KEY]
                                                        for r in train))},
            "task_eval.jsonl": {**task_source, "rows": counts["task_eval.jsonl"],
                                "labels": dict(Counter(json.loads(r["messages"][1]["content"])[TASK_KEY]
                                                       for r in evals))},
            "pool.jsonl": {
                "package": PACKAGE["name"], "rows": counts["pool.jsonl"], "seed": SEED,
                "selection": (f"every samples file except {TASK} and the other-licence folders; single-turn rows "
                              "(system and user messages, folded into one query; no few-shot turns); reference "
                              f"(first ideal answer) of {POOL_MIN_REFERENCE_CHARS}-{POOL_MAX_CHARS} characters and "
                              f"prose (>= {POOL_MIN_WORDS} words, >= {POOL_MIN_LETTER_SHARE:.0%} letters and spaces, "
                              f">= {POOL_MIN_DISTINCT_WORDS:.0%} distinct words); query <= {POOL_MAX_CHARS} "
                              f"characters and not a duplicate; a seeded draw of at most {POOL_PER_TASK} rows per "
                              "task, then shuffled"),
                **pool_facts,
            },
        },
    }
    for name in FILES:
        sources["files"][name]["sha256"] = sha256_file(folder / name)
    write_json(folder / "SOURCES.json", sources)
    return sources


def _intact(folder: Path) -> bool:
    """The folder holds every file with the hash its SOURCES.json records (a finished, untouched build)."""
    try:
        sources = json.loads((folder / "SOURCES.json").read_text(encoding="utf-8"))
        return sources.get("version") == DEMO_VERSION and all(
            sha256_file(folder / name) == sources["files"][name]["sha256"] for name in FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_demo_data(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder to write (default: "
                                             "$DELIA_CACHE/data/demo-<version>, DELIA_CACHE defaulting to "
                                             "~/.cache/delia).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the folder is already prepared.")] = False,
) -> Path:
    """Build (once) and return the demo's data folder: task_train/task_eval/pool JSONL and SOURCES.json.

    The data comes from the PyPI package `evals` (MIT), downloaded once with pip into
    $DELIA_CACHE/downloads. A prepared folder whose files match SOURCES.json is reused as is.

    Examples:\n
      delia demo-data\n
      delia demo-data --out data/demo --force
    """
    from delia.models import cache_root

    folder = Path(out) if out is not None else cache_dir()
    if not force and _intact(folder):
        return folder
    if folder.exists() and not force and any(folder.iterdir()):
        print(f"delia: {folder} is incomplete or changed; rebuilding it", file=sys.stderr)
    wheel = fetch_wheel(cache_root() / "downloads")
    with atomic_dir(folder) as tmp:
        sources = _build(wheel, tmp)
    counts = ", ".join(f"{name} {sources['files'][name]['rows']}" for name in FILES)
    print(f"delia: demo data in {folder} ({counts})", file=sys.stderr)
    return folder


def main(argv: list[str] | None = None) -> None:
    """`python -m delia.demo_data [--out DIR] [--force]`: prepare the folder, print its path and row counts."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m delia.demo_data", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=None, help="folder to write (default: the cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args(argv)
    try:
        folder = prepare_demo_data(args.out, args.force)
    except DeliaError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    sources = json.loads((folder / "SOURCES.json").read_text(encoding="utf-8"))
    print(folder)
    for name in FILES:
        print(f"  {name}: {sources['files'][name]['rows']} rows")


if __name__ == "__main__":
    main()
