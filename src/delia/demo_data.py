"""Real data for `delia demo`, and the machinery every prepared data set shares, taken from PyPI packages.

Everything comes from OpenAI's `evals` wheel (MIT, 46 MB), fetched once with `pip download --no-deps
--require-hashes` into `$DELIA_CACHE/downloads` and read straight from the zip, never from a model or
data hub. Why this package: it holds ~1M chat-format samples over ~440 tasks with reference answers,
and a wheel any OS can fetch. (The `bigbench` sdist is 358 MB and pip >= 26 refuses to download it: its
metadata declares a `bleurt @ file://` dependency.) Version 3 adds general prompts from a second package,
`chatterbot-corpus` (BSD), fetched the same way, so that the general prompts do not all share one source.

- The task is its `food` eval (is this string a food item?), re-posed as a question whose answer is a
  one-key JSON object, `{"food": "yes"}`: a format SmolLM2 never produces unprompted, so plain SFT must
  learn it, and the format metric scores it (format and label accuracy). (Version 1 used `sarcasm`, whose
  labels a 135M model stays at chance on, so tuning showed no task gain to weigh against the damage.)
- The pool takes queries whose reference is long-form text (>= 200 characters of mostly words, not
  numbers or grids), capped per task so that no task dominates. Most `evals` references are a few
  words; a pool of those teaches one-shot sampling a bare-word style.
- `general.jsonl` holds held-out prompts of other tasks, to measure what tuning did to the model's general
  behaviour (format leakage, drift from the base model, answer quality).
- Version 3 adds `pool-broad.jsonl` (short and long references from many more tasks, <= 10 each: the
  paper's pool is broad, and a pool of 24 long-form tasks is not), more general prompts drawn evenly over
  their kinds (`prompt_kind`: yes/no, short answer, long form, a prescribed format of their own), and
  `general-outside.jsonl` (questions and requests from `chatterbot-corpus`). Versions 2 and 3 both build,
  byte for byte as before (`delia demo-data --version 2`); version 1 is gone with its task.

Every task belongs to at most one of the builders (`partition`), so the task, the pool, the general prompts
and the `<sep>` contexts of `delia.task_data` never share a task (version 3's broad pool reads the pool's
tasks and its own). The selection is deterministic (fixed seed, no timestamps): a rerun gives byte-identical
files, whose hashes SOURCES.json records with the packages, licences, tasks, filters and counts. A folder is
built in a temporary sibling and renamed into place only after every file reads back cleanly.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import heapq
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from delia.errors import DeliaError
from delia.files import atomic_dir, sha256_file, write_json, write_jsonl
from delia.general import SHORT_REFERENCE_WORDS
from delia.text import normalise, normalize_answer

log = logging.getLogger(__name__)

DEMO_VERSION = "3"  # the newest: what `delia demo-data` and `demo-data:NAME` build unless a version is named
SEED = 0
DATA_PREFIX = "evals/registry/data/"
# The package's LICENSE.md: "This license applies to all parts of this repository except for the datasets
# specified below" -- these folders carry their sources' own licences (some non-commercial), so no file
# takes anything from them.
OTHER_LICENCE_TASKS = (
    "already_said_that", "ballots", "sandbagging", "schelling_point", "steganography", "text_compression",
    "theory_of_mind",
)
PACKAGE: dict[str, Any] = {
    "name": "evals",
    "version": "3.0.1.post1",
    "registry": "PyPI",
    "file": "evals-3.0.1.post1-py3-none-any.whl",
    "sha256": "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
    "licence": "MIT",
    "licence_file": "evals-3.0.1.post1.dist-info/LICENSE.md",
    "licence_note": ("LICENSE.md (MIT, OpenAI 2023) covers all data except the folders it lists with their "
                     f"own licences: {', '.join(OTHER_LICENCE_TASKS)}. Nothing is taken from those. "
                     "Contributors agreed to release their eval data under MIT; the package does not "
                     "name an upstream origin for the tasks used here."),
}
# Version 3's second source of general prompts: a chatbot's training conversations, of which the files of
# factual questions and requests are read (the others are the bot's persona small talk: greetings, its
# feelings, gossip).
OUTSIDE_PACKAGE: dict[str, Any] = {
    "name": "chatterbot-corpus",
    "version": "1.3.3",
    "registry": "PyPI",
    "file": "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    "sha256": "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    "licence": "BSD",
    "licence_file": None,
    "licence_note": ("The wheel's metadata declares 'License :: OSI Approved :: BSD License' and ships no licence "
                     "text; its README says all of the corpus is user contributed."),
}
OUTSIDE_PREFIX = "chatterbot_corpus/data/english/"
OUTSIDE_CATEGORIES = ("trivia", "coding", "computers", "tech_support")  # files OUTSIDE_PREFIX + NAME.yml
OUTSIDE_PER_CATEGORY = 50  # so that trivia (260 questions) does not drown the requests

TASK = "food"
TASK_FILE = f"{DATA_PREFIX}{TASK}/samples.jsonl"
TASK_QUESTION = "Is the following string a food item or related to food?"  # the eval's user text, then the item
TASK_PROMPT = "Is this a food item or related to food?\n\nItem: {text}"
TASK_KEY = "food"
TASK_LABELS = {"Yes": "yes", "No": "no"}  # the eval's ideal answer -> the JSON label
TASK_TRAIN_ROWS = 40  # the demo trains 2 arms x 2 seeds on a 2-core CPU: rows cost time, not insight
TASK_EVAL_ROWS = 50
TASK_TEXT_CHARS = (2, 80)  # item length bounds: drops stray letters and the odd sentence
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

MIN_ASCII_LETTERS = 0.9  # share of a text's letters that are ASCII: a cheap test for Latin-script (English) text
GENERAL_ROWS = 40
GENERAL_PER_TASK = 2  # so that 40 prompts span at least 20 tasks
GENERAL_MAX_QUERY_CHARS = 400  # every model answers them: prompt tokens are the eval's cost
GENERAL_MAX_REFERENCE_CHARS = 600
GENERAL_ROWS_V3 = 120
GENERAL_PER_KIND = 30  # version 3 draws up to this many of each kind first, so that rare kinds are measurable
# Kinds of general prompt, for leakage by kind (`prompt_kind`). The names are what rows and reports carry.
KINDS = ("yes_no", "short_answer", "long_form", "own_format")
BINARY_ANSWERS = ("yes", "no", "y", "n", "true", "false")  # a reference that makes a prompt yes_no
_ANSWER_VERB = r"(?:answer|respond|reply|output|return|write|type|print|give|provide|state|include|say|contain)"
# Phrases by which a prompt prescribes the form of its answer ("Answer with exactly one letter", "Respond only
# with the number", "in the format (x, y)", "nothing else"); a verb must lead "one word" and the like, which
# otherwise describe the input ("You will be prompted with a single word").
FORMAT_CUES = re.compile(
    rf"\bonly\s+{_ANSWER_VERB}|\b{_ANSWER_VERB}\w*\s+(?:\w+\s+){{0,3}}only\b|\b{_ANSWER_VERB}\w*\s+with\b"
    rf"|\b{_ANSWER_VERB}\w*\s+(?:\w+\s+){{0,3}}(?:one|single)\s+(?:word|letter|number|digit|line|sentence|syllable)"
    r"|\bnothing\s+else\b|\b(?:no|without(?:\s+any)?)\s+(?:other\s+|additional\s+|further\s+)?"
    r"(?:explanation|text|comments?|words)\b"
    r"|\b(?:do\s+not|don't|never)\s+(?:explain|elaborate|include|add|provide|write|type|output|give|use)\b"
    r"|\b(?:format|syntax|template|json|brackets|quotes)\b|\bcomma[- ]separated\b|\bbullet|\benclos"
    r"|\bexactly\s+(?:one|\d+)\b|\b(?:in|using)\s+(?:all\s+)?(?:lower|upper)case\b"
    r"|\b(?:start|begin|end)\s+(?:your\s+)?(?:answer|response|reply)\s+with\b",
    re.IGNORECASE)
# `<sep>` contexts (built by delia.task_data; defined here because they decide the partition): English rows
# whose reference is a sentence or a paragraph, so that the reference of another task's row reads as an
# unrelated answer.
CONTEXT_MAX_QUERY_CHARS = 400
CONTEXT_REFERENCE_CHARS = (20, 600)
CONTEXTS_PER_TASK = 40
SEP_MIN_TASK_ROWS = 20  # a task with at least this many distinct context rows goes to the `<sep>` builder
# Version 3's broad pool: any single-turn row of an English query, short reference or long, capped per task.
BROAD_PER_TASK = 10

FILES = ("task_train.jsonl", "task_eval.jsonl", "pool.jsonl", "general.jsonl")
FILES_V3 = (*FILES, "pool-broad.jsonl", "general-outside.jsonl")

Rows = list[dict[str, Any]]  # messages rows, as the files hold them


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


class Pair(NamedTuple):
    """A single-turn sample as the builders use it: query (system and user text) and reference answer."""

    id: str
    task: str
    query: str
    reference: str


# ----------------------------------------------------------------------------- the package


def fetch_wheel(downloads: Path, package: dict[str, Any] = PACKAGE) -> Path:
    """The pinned wheel of `package` (default `evals`) in `downloads`, fetched with pip (hash-checked) unless
    already there."""
    wheel = downloads / package["file"]
    if wheel.is_file() and sha256_file(wheel) == package["sha256"]:
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{package['name']}=={package['version']}"
    log.info("downloading %s from PyPI (once) into %s", spec, downloads)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{spec} --hash=sha256:{package['sha256']}\n", encoding="utf-8")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes",
               "--disable-pip-version-check", "--quiet", "-r", str(req), "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / package["file"]
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


def query_and_reference(row: dict[str, Any]) -> tuple[str, str] | None:
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


def user_and_reference(row: dict[str, Any]) -> tuple[str, str] | None:
    """(user text, reference) of a single-turn sample with exactly one user message: for builders that
    write their own prompt around the user text and drop the eval's system message."""
    qr = query_and_reference(row)
    if qr is None:
        return None
    user = [m["content"].strip() for m in row["input"] if m["role"] == "user"]
    return (user[0], qr[1]) if len(user) == 1 else None


def is_prose(text: str) -> bool:
    """Mostly words, many of them distinct: long-form text rather than a grid, list of numbers or moves."""
    words = text.split()
    if len(words) < POOL_MIN_WORDS:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
    return letters >= POOL_MIN_LETTER_SHARE and len(set(words)) / len(words) >= POOL_MIN_DISTINCT_WORDS


def mostly_ascii(text: str) -> bool:
    """At least `MIN_ASCII_LETTERS` of the text's letters are ASCII (and it has letters)."""
    if text.isascii():  # most texts: no need to count letter by letter (~800k texts per build)
        return any(c.isalpha() for c in text)
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) / len(letters) >= MIN_ASCII_LETTERS


def stats(values: list[int]) -> dict[str, float | int]:
    """min, p10, p50, p90, max and mean of `values` (empty for none), for SOURCES.json."""
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"min": s[0], "p10": pick(0.1), "p50": pick(0.5), "p90": pick(0.9), "max": s[-1],
            "mean": round(sum(s) / len(s), 1)}


def chat_row(pair: Pair, **extra: Any) -> dict[str, Any]:
    """A messages row (user = query, assistant = reference) with its id, task and `extra` fields."""
    return {"id": pair.id, "task": pair.task, **extra, "messages": [
        {"role": "user", "content": pair.query}, {"role": "assistant", "content": pair.reference}]}


def row_facts(rows: Rows) -> dict[str, Any]:
    """Rows per task and query/reference length stats of messages rows, for SOURCES.json."""
    return {"tasks": dict(sorted(Counter(r["task"] for r in rows).items())),
            "query_chars": stats([len(r["messages"][0]["content"]) for r in rows]),
            "reference_chars": stats([len(r["messages"][1]["content"]) for r in rows])}


# ----------------------------------------------------------------------------- one pass over the wheel


class SeededDraw:
    """A seeded sample of at most `k` rows of distinct queries per task, kept while streaming.

    It keeps the `k` rows whose normalised query hashes lowest (the hash salted with SEED and `salt`): a
    uniform draw that holds O(k) rows per task however many the task has (two have over 200k), and a
    duplicate query hashes the same, so it is kept once (its first row).
    """

    def __init__(self, k: int, salt: str):
        self.k, self.salt = k, salt
        self._heaps: dict[str, list[tuple[int, Pair]]] = {}  # per task: (-hash, pair), a max-heap on the hash

    def add(self, pair: Pair) -> None:
        digest = hashlib.sha256(f"{SEED}:{self.salt}:{normalise(pair.query)}".encode()).digest()
        key = -int.from_bytes(digest[:8], "big")
        heap = self._heaps.setdefault(pair.task, [])
        if any(h == key for h, _ in heap):
            return
        if len(heap) < self.k:
            heapq.heappush(heap, (key, pair))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, pair))

    def tasks(self) -> set[str]:
        return set(self._heaps)

    def rows(self, task: str) -> list[Pair]:
        """The task's sample in file order."""
        return sorted((p for _, p in self._heaps.get(task, [])), key=lambda p: p.id)


@dataclass
class Scan:
    """What one pass over the wheel found: each builder's candidate rows and the partition of tasks."""

    pool: dict[str, list[Pair]]  # every long-form row, per task, deduplicated by query across tasks
    general: SeededDraw  # rows fit to be general prompts (English query, reference <= 600 characters)
    contexts: SeededDraw  # English rows fit to be `<sep>` contexts
    broad: SeededDraw  # rows fit for the broad pool (version 3)
    dropped: Counter[str]  # why rows are not in `pool`
    scanned: int
    roles: dict[str, str]  # task -> "pool", "sep" or "general": the one builder that may use it (version 2's)


def _pool_reason(pair: Pair) -> str | None:
    """Why a row cannot be in the pool, or None when it can."""
    if len(pair.reference) < POOL_MIN_REFERENCE_CHARS:
        return "reference_short"
    if len(pair.reference) > POOL_MAX_CHARS or len(pair.query) > POOL_MAX_CHARS:
        return "too_long"
    return None if is_prose(pair.reference) else "reference_not_prose"


def task_shaped(text: str) -> bool:
    """Text the task metrics take for task output: an object (the demo's JSON answers) or any kana or CJK
    ideograph (mt's Japanese). A general prompt whose right answer looks so would count as format leakage."""
    return text.lstrip().startswith("{") or any("\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" for c in text)


def prompt_kind(query: str, reference: str) -> str:
    """The kind of a general prompt, for leakage by kind: the task's shape may leak into some kinds more
    than others (a yes/no question is closest to a yes/no task; a prompt that sets its own format is where
    a reply in the task's format disobeys most plainly).

    yes_no: the reference is yes, no, y, n, true or false (after `normalize_answer`), whatever the prompt says;
    own_format: else, the prompt prescribes the form of its answer (`FORMAT_CUES`); short_answer: else, a
    reference of at most SHORT_REFERENCE_WORDS words; long_form: the rest.
    """
    if normalize_answer(reference) in BINARY_ANSWERS:
        return "yes_no"
    if FORMAT_CUES.search(query):
        return "own_format"
    return "short_answer" if len(reference.split()) <= SHORT_REFERENCE_WORDS else "long_form"


def _is_general(pair: Pair) -> bool:
    return (len(pair.query) <= GENERAL_MAX_QUERY_CHARS and len(pair.reference) <= GENERAL_MAX_REFERENCE_CHARS
            and mostly_ascii(pair.query) and not task_shaped(pair.reference))


def _is_context(pair: Pair) -> bool:
    return (len(pair.query) <= CONTEXT_MAX_QUERY_CHARS
            and CONTEXT_REFERENCE_CHARS[0] <= len(pair.reference) <= CONTEXT_REFERENCE_CHARS[1]
            and mostly_ascii(pair.query) and mostly_ascii(pair.reference))


def _is_broad(pair: Pair) -> bool:
    """A row fit for the broad pool: an English query, and a reference that is not in the task's shape
    (self-sampled answers in that shape would teach it), both within the pool's length bound."""
    return (len(pair.query) <= POOL_MAX_CHARS and len(pair.reference) <= POOL_MAX_CHARS
            and mostly_ascii(pair.query) and not task_shaped(pair.reference))


def scan_wheel(wheel: Path) -> Scan:
    """Read every samples file once (the task's and the other-licence folders' excepted) and partition
    the tasks: one with a long-form row goes to the pool (so the pool is what it was before the partition),
    else one with at least `SEP_MIN_TASK_ROWS` distinct `<sep>` context rows to the `<sep>` builder, else
    to the general prompts.

    A process scans a wheel file once (the scan takes most of a set's build: an experiment that names two
    prepared sets builds both from one scan); each caller gets its own copy."""
    stat = wheel.stat()
    return copy.deepcopy(_scan_once(wheel.resolve(), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)  # the real wheel stays while tests scan small fake ones
def _scan_once(wheel: Path, size: int, mtime_ns: int) -> Scan:
    """`scan_wheel`'s pass, kept for the file at that size and time."""
    pool: dict[str, list[Pair]] = {}
    general, contexts = SeededDraw(GENERAL_PER_TASK, "general"), SeededDraw(CONTEXTS_PER_TASK, "contexts")
    broad = SeededDraw(BROAD_PER_TASK, "broad")
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    scanned = 0
    for s in iter_samples(wheel, skip=(*OTHER_LICENCE_TASKS, TASK)):
        scanned += 1
        qr = query_and_reference(s.row)
        if qr is None:
            dropped["not_single_turn_text"] += 1
            continue
        pair = Pair(s.id, s.task, *qr)
        if _is_broad(pair):
            broad.add(pair)
        reason = _pool_reason(pair)
        if reason is None:
            if normalise(pair.query) in seen:
                dropped["duplicate_query"] += 1
            else:
                seen.add(normalise(pair.query))
                pool.setdefault(s.task, []).append(pair)
            continue
        dropped[reason] += 1
        if _is_general(pair):
            general.add(pair)
        if _is_context(pair):
            contexts.add(pair)
    roles = {}
    for task in sorted(set(pool) | general.tasks() | contexts.tasks()):
        roles[task] = ("pool" if task in pool else
                       "sep" if len(contexts.rows(task)) >= SEP_MIN_TASK_ROWS else "general")
    return Scan(pool, general, contexts, broad, dropped, scanned, roles)


def broad_roles(scan: Scan, general: Rows) -> dict[str, str]:
    """Version 3's partition: version 2's, except that the general tasks none of the drawn `general` prompts
    comes from go to "broad", as does every task with a broad-pool row and no role yet."""
    drawn = {r["task"] for r in general}
    roles = {t: "broad" if role == "general" and t not in drawn else role for t, role in scan.roles.items()}
    return dict(sorted({**{t: "broad" for t in scan.broad.tasks()}, **roles}.items()))


def partition_record(scan: Scan, roles: dict[str, str] | None = None) -> dict[str, Any]:
    """The partition as SOURCES.json records it: the rule and each builder's tasks (`roles`, default the scan's)."""
    roles = scan.roles if roles is None else roles
    rule = (f"{TASK} is the task; the other-licence folders are read by no builder; a task with a pool row "
            f"goes to the pool; else one with at least {SEP_MIN_TASK_ROWS} distinct rows fit for a <sep> "
            "context goes to the <sep> builder (delia.task_data); every other task with a usable single-turn "
            "row goes to the general prompts. No task is in two of them.")
    names = ("pool", "sep", "general")
    if "broad" in roles.values():
        rule += (" Version 3: the general tasks that none of the drawn general prompts comes from, and every task "
                 "with a row fit for the broad pool and no role above, go to 'broad'; pool-broad.jsonl reads the "
                 "'pool' and 'broad' tasks.")
        names += ("broad",)
    return {"rule": rule, "task": [TASK], "excluded": list(OTHER_LICENCE_TASKS),
            **{role: sorted(t for t, r in roles.items() if r == role) for role in names}}


# ----------------------------------------------------------------------------- selection


def select_task(samples: Iterable[Sample]) -> tuple[Rows, Rows, dict[str, Any]]:
    """(train rows, eval rows, facts): a label-balanced seeded draw from the food eval's items.

    Items that occur twice are kept once; one that occurs with both labels is dropped, as are rows outside
    `TASK_TEXT_CHARS`. The draw takes the same number per label, then train and eval are disjoint.
    """
    seen: dict[str, tuple[Sample, str, str]] = {}
    conflicting: set[str] = set()
    skipped: Counter[str] = Counter()
    for s in samples:
        ur = user_and_reference(s.row)
        if ur is None or not ur[0].startswith(TASK_QUESTION) or ur[1] not in TASK_LABELS:
            skipped["not_a_labelled_item"] += 1
            continue
        text, label = ur[0][len(TASK_QUESTION):].strip(), TASK_LABELS[ur[1]]
        if not TASK_TEXT_CHARS[0] <= len(text) <= TASK_TEXT_CHARS[1]:
            skipped["length"] += 1
            continue
        key = normalise(text)
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


def select_pool(scan: Scan) -> tuple[Rows, dict[str, Any]]:
    """(pool rows, facts): single-turn queries with long-form prose references, at most
    `POOL_PER_TASK` per task (a seeded draw), shuffled together so any prefix is still diverse."""
    rows: Rows = []
    capped = 0
    for task in sorted(scan.pool):
        cands = scan.pool[task]
        take = random.Random(f"{SEED}:pool:{task}").sample(cands, min(POOL_PER_TASK, len(cands)))
        capped += len(cands) - len(take)
        rows += [chat_row(p) for p in take]
    random.Random(f"{SEED}:pool").shuffle(rows)
    return rows, {"rows_scanned": scan.scanned, "dropped": {**scan.dropped, "over_task_cap": capped},
                  **row_facts(rows)}


def tally(rows: Rows, key: str) -> dict[str, int]:
    """Rows per value of `key`, in value order, for SOURCES.json."""
    return dict(sorted(Counter(r[key] for r in rows).items()))


def general_row(pair: Pair, kind: bool = True) -> dict[str, Any]:
    """A general prompt's row: whether its reference is short and (unless not `kind`: version 2) its kind."""
    return chat_row(pair, reference_kind="short" if len(pair.reference.split()) <= SHORT_REFERENCE_WORDS else "long",
                    **({"kind": prompt_kind(pair.query, pair.reference)} if kind else {}))


def draw_by_kind(cands: list[Pair], n: int, per_kind: int, rng: random.Random) -> list[Pair]:
    """`n` of `cands`: a seeded draw of up to `per_kind` of each kind, the rest drawn from all the others;
    shuffled. A uniform draw would leave the rare kinds (few evals references are long) a handful of rows."""
    take = []
    for kind in KINDS:
        of_kind = [p for p in cands if prompt_kind(p.query, p.reference) == kind]
        take += rng.sample(of_kind, min(per_kind, len(of_kind)))
    chosen = set(take)
    take += rng.sample([p for p in cands if p not in chosen], n - len(take))
    rng.shuffle(take)
    return take


def select_general(scan: Scan, n: int = GENERAL_ROWS, per_kind: int = 0) -> tuple[Rows, dict[str, Any]]:
    """(general rows, facts): `n` prompts drawn (seeded) from the general tasks' samples of at most
    `GENERAL_PER_TASK` rows each, so they span many tasks; each row says whether its reference is short.
    With `per_kind` (version 3) the draw is `draw_by_kind`'s and each row carries its kind."""
    cands = sorted((p for t, role in scan.roles.items() if role == "general" for p in scan.general.rows(t)),
                   key=lambda p: p.id)
    if len(cands) < n:
        raise DeliaError(f"{PACKAGE['file']}: only {len(cands)} general prompts, {n} needed")
    rng = random.Random(f"{SEED}:general")
    take = draw_by_kind(cands, n, per_kind, rng) if per_kind else rng.sample(cands, n)
    rows = [general_row(p, kind=bool(per_kind)) for p in take]
    kinds = {"kinds": tally(rows, "kind")} if per_kind else {}
    return rows, {"candidates": len(cands), "reference_kinds": tally(rows, "reference_kind"), **kinds,
                  **row_facts(rows)}


def select_broad(scan: Scan, roles: dict[str, str]) -> tuple[Rows, dict[str, Any]]:
    """(broad pool rows, facts): the seeded draw of at most `BROAD_PER_TASK` rows of each task `roles` gives
    to the pool or to "broad", short references and long; a query an earlier task (in name order) already
    gave is dropped; shuffled together so any prefix is still diverse."""
    cands = [p for t in sorted(t for t, role in roles.items() if role in ("pool", "broad")) for p in scan.broad.rows(t)]
    rows: Rows = []
    seen: set[str] = set()
    for p in cands:
        if normalise(p.query) not in seen:
            seen.add(normalise(p.query))
            rows.append(chat_row(p))
    random.Random(f"{SEED}:broad").shuffle(rows)
    short = sum(len(r["messages"][1]["content"].split()) <= SHORT_REFERENCE_WORDS for r in rows)
    return rows, {"candidates": len(cands), "reference_kinds": {"long": len(rows) - short, "short": short},
                  **row_facts(rows)}


def outside_pairs(wheel: Path) -> Iterator[Pair]:
    """(question, answer) of every conversation of the outside corpus's `OUTSIDE_CATEGORIES` files (its first
    two turns), each category a task; conversations whose turns are not text are skipped."""
    import yaml

    name = OUTSIDE_PACKAGE["name"]
    with zipfile.ZipFile(wheel) as zf:
        for category in OUTSIDE_CATEGORIES:
            member = f"{OUTSIDE_PREFIX}{category}.yml"
            if member not in zf.namelist():
                raise DeliaError(f"{wheel}: no {member} in the package")
            conversations = yaml.safe_load(zf.read(member)).get("conversations") or []
            for i, turns in enumerate(conversations, start=1):
                if (isinstance(turns, list) and len(turns) >= 2
                        and all(isinstance(t, str) and t.strip() for t in turns[:2])):
                    yield Pair(f"{name}:{member.removeprefix('chatterbot_corpus/data/')}:{i}", f"{name}/{category}",
                               turns[0].strip(), turns[1].strip())


def select_outside(wheel: Path) -> tuple[Rows, dict[str, Any]]:
    """(general rows, facts): the outside corpus's questions and requests that pass the general prompts'
    filters, a seeded draw of at most `OUTSIDE_PER_CATEGORY` distinct questions per category, shuffled."""
    draw = SeededDraw(OUTSIDE_PER_CATEGORY, "outside")
    read = 0
    for pair in outside_pairs(wheel):
        read += 1
        if _is_general(pair):
            draw.add(pair)
    rows = [general_row(p) for task in sorted(draw.tasks()) for p in draw.rows(task)]
    random.Random(f"{SEED}:outside").shuffle(rows)
    return rows, {"conversations_read": read, "reference_kinds": tally(rows, "reference_kind"),
                  "kinds": tally(rows, "kind"), **row_facts(rows)}


def check_disjoint(general: Rows, others: Rows) -> None:
    """Raise DeliaError if a general prompt's query (normalised) is the query of a pool or task row: the
    partition keeps their tasks apart, but two tasks (or two packages) may share a text."""
    taken = {normalise(r["messages"][0]["content"]) for r in others}
    clash = [r["id"] for r in general if normalise(r["messages"][0]["content"]) in taken]
    if clash:
        raise DeliaError(f"general prompts {', '.join(clash)} repeat a pool or task query")


# ----------------------------------------------------------------------------- prepared folders


def write_files(folder: Path, files: dict[str, Rows]) -> dict[str, int]:
    """Write each file's rows as JSONL into `folder`; returns the row counts."""
    return {name: write_jsonl(folder / name, rows) for name, rows in files.items()}


def validate(folder: Path, counts: dict[str, int], metrics: dict[str, dict[str, Any]] | None = None) -> None:
    """Every file reads back through `read_chat` with the expected rows; the references of a file named in
    `metrics` pass its format metric (MetricConfig fields), so a model that learns them exactly scores 100%."""
    from delia.data import read_chat
    from delia.metrics import MetricConfig, check_format, parse_output

    for name, n in counts.items():
        data = read_chat(folder / name, "messages")
        if len(data.records) != n:
            raise DeliaError(f"{folder / name}: read back {len(data.records)} rows, wrote {n}")
        if metrics and name in metrics:
            config = MetricConfig(**metrics[name])
            for i, rec in enumerate(data.records, start=1):
                value, _, err = parse_output(rec["messages"][-1]["content"], extract=False)
                why = err or check_format(value, config)
                if why:
                    raise DeliaError(f"{folder / name}:{i}: the reference fails the task metric: {why}")


@dataclass(frozen=True)
class DataSet:
    """A data set prepared from the wheel into `$DELIA_CACHE/data/<name>-<version>/`.

    `build(wheel, folder)` writes `files` into the empty `folder` and returns what SOURCES.json records
    about them (`files` maps each file to its facts); `prepare` adds the package, version and hashes.
    """

    name: str
    version: str
    files: tuple[str, ...]
    build: Callable[[Path, Path], dict[str, Any]]

    def cache_dir(self) -> Path:
        from delia.models import cache_root

        return cache_root() / "data" / f"{self.name}-{self.version}"

    def intact(self, folder: Path) -> bool:
        """The folder holds every file with the hash its SOURCES.json records (a finished, untouched build)."""
        try:
            sources = json.loads((folder / "SOURCES.json").read_text(encoding="utf-8"))
            return sources.get("version") == self.version and all(
                sha256_file(folder / name) == sources["files"][name]["sha256"] for name in self.files)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def prepare(self, out: Path | None = None, force: bool = False) -> Path:
        """Build the folder (`out`, default the cache) unless it is already intact; returns it."""
        from delia.models import cache_root

        folder = Path(out) if out is not None else self.cache_dir()
        if not force and self.intact(folder):
            return folder
        if folder.exists() and not force and any(folder.iterdir()):
            log.warning("%s is incomplete or changed; rebuilding it", folder)
        wheel = fetch_wheel(cache_root() / "downloads")
        sources_file = folder / "SOURCES.json"  # a folder built before folders were marked says who built it
        legacy = sources_file.is_file() and '"created_by": "delia demo-data' in sources_file.read_text("utf-8")
        with atomic_dir(folder, "demo-data", replace_unmarked=out is None or legacy) as tmp:
            built = self.build(wheel, tmp)
            for name in self.files:
                built["files"][name]["sha256"] = sha256_file(tmp / name)
            sources = {"version": self.version, "created_by": f"delia demo-data --set {self.name}", "seed": SEED,
                       "package": package_record(wheel), **built}
            write_json(tmp / "SOURCES.json", sources)
        counts = ", ".join(f"{name} {sources['files'][name]['rows']}" for name in self.files)
        log.info("%s data in %s (%s)", self.name, folder, counts)
        return folder


def package_record(wheel: Path, package: dict[str, Any] = PACKAGE) -> dict[str, Any]:
    """SOURCES.json's account of a package: name, version, hash, how it was fetched, its licence."""
    return {**{k: v for k, v in package.items() if k != "licence_note"}, "size_bytes": wheel.stat().st_size,
            "fetch": f"pip download --no-deps --only-binary :all: --require-hashes "
                     f"{package['name']}=={package['version']}",
            "licence_note": package["licence_note"]}


GENERAL_FILTERS = (
    f"query <= {GENERAL_MAX_QUERY_CHARS} characters, >= {MIN_ASCII_LETTERS:.0%} of its letters ASCII; reference "
    f"1-{GENERAL_MAX_REFERENCE_CHARS} characters, neither starting with '{{' nor holding kana or CJK (so a right "
    "answer never reads as format leakage)"
)
GENERAL_SELECTION = (
    f"tasks the partition gives to the general prompts; single-turn rows (system and user messages folded into "
    f"one query) whose query has <= {GENERAL_MAX_QUERY_CHARS} characters, >= {MIN_ASCII_LETTERS:.0%} of its "
    f"letters ASCII, and whose reference (first ideal answer) has 1-{GENERAL_MAX_REFERENCE_CHARS} characters and "
    f"neither starts with '{{' nor holds kana or CJK (so a right answer never reads as format leakage); "
    f"per task a seeded draw of at most {GENERAL_PER_TASK} distinct queries, then a seeded draw of "
    f"{GENERAL_ROWS} rows from all of them, in drawn order; reference_kind is 'short' for a reference of "
    f"<= {SHORT_REFERENCE_WORDS} words, else 'long'; no query equals (normalised) a pool or task query"
)
KIND_RULE = (
    f"kind (delia.demo_data.prompt_kind): yes_no if the reference is one of {', '.join(BINARY_ANSWERS)} (any case "
    "or punctuation), else own_format if the query prescribes the form of its answer (phrases such as 'answer "
    "with', 'respond only', 'nothing else', 'no explanation', 'do not explain', 'format', 'one word' after a verb "
    f"of answering), else short_answer for a reference of <= {SHORT_REFERENCE_WORDS} words, else long_form; "
    f"reference_kind is 'short' for a reference of <= {SHORT_REFERENCE_WORDS} words, else 'long'"
)


def _task_source() -> dict[str, Any]:
    """What SOURCES.json says of both task files."""
    n_label = len(set(TASK_LABELS.values()))
    return {
        "package": PACKAGE["name"], "tasks": [TASK], "member": TASK_FILE, "seed": SEED,
        "selection": (f"single-turn rows whose user text is {TASK_QUESTION!r} and an item, labelled "
                      f"{sorted(TASK_LABELS)}; items of {TASK_TEXT_CHARS[0]}-{TASK_TEXT_CHARS[1]} characters; "
                      "duplicates kept once, items with both labels dropped; a seeded draw of "
                      f"{TASK_TRAIN_ROWS // n_label} train and {TASK_EVAL_ROWS // n_label} eval rows per label, "
                      "disjoint"),
        "formatting": (f"user: {TASK_PROMPT!r} with the item (the eval's system message dropped); assistant: a "
                       f"JSON object {{{TASK_KEY!r}: label}} with label {TASK_LABELS}"),
    }


def _build(wheel: Path, folder: Path, version: str) -> dict[str, Any]:
    """Write the demo's files of `version` into `folder`; return their facts for SOURCES.json.

    Version 3 writes version 2's task and pool files unchanged, draws more general prompts (by kind), and
    adds the broad pool and the outside general prompts."""
    train, evals, task_facts = select_task(iter_samples(wheel, member=TASK_FILE))
    scan = scan_wheel(wheel)
    pool, pool_facts = select_pool(scan)
    v3 = version == "3"
    general, general_facts = select_general(scan, GENERAL_ROWS_V3, GENERAL_PER_KIND) if v3 else select_general(scan)
    files = {"task_train.jsonl": train, "task_eval.jsonl": evals, "pool.jsonl": pool, "general.jsonl": general}
    roles = broad_roles(scan, general) if v3 else scan.roles
    if v3:
        outside_wheel = fetch_wheel(wheel.parent, OUTSIDE_PACKAGE)
        broad, broad_facts = select_broad(scan, roles)
        outside, outside_facts = select_outside(outside_wheel)
        files |= {"pool-broad.jsonl": broad, "general-outside.jsonl": outside}
    check_disjoint(general + files.get("general-outside.jsonl", []),
                   pool + train + evals + files.get("pool-broad.jsonl", []))
    counts = write_files(folder, files)
    validate(folder, counts, {"task_train.jsonl": TASK_METRIC, "task_eval.jsonl": TASK_METRIC})
    task_source = {**_task_source(), **task_facts}

    def labels(rows: Rows) -> dict[str, int]:
        return dict(Counter(json.loads(r["messages"][1]["content"])[TASK_KEY] for r in rows))

    facts = {
        "task_train.jsonl": {**task_source, "rows": counts["task_train.jsonl"], "labels": labels(train)},
        "task_eval.jsonl": {**task_source, "rows": counts["task_eval.jsonl"], "labels": labels(evals)},
        "pool.jsonl": {
            "package": PACKAGE["name"], "rows": counts["pool.jsonl"], "seed": SEED,
            "selection": ("tasks the partition gives to the pool; single-turn rows (system and user messages, "
                          "folded into one query; no few-shot turns); reference (first ideal answer) of "
                          f"{POOL_MIN_REFERENCE_CHARS}-{POOL_MAX_CHARS} characters and prose (>= "
                          f"{POOL_MIN_WORDS} words, >= {POOL_MIN_LETTER_SHARE:.0%} letters and spaces, "
                          f">= {POOL_MIN_DISTINCT_WORDS:.0%} distinct words); query <= {POOL_MAX_CHARS} "
                          f"characters and not a duplicate; a seeded draw of at most {POOL_PER_TASK} rows per "
                          "task, then shuffled"),
            **pool_facts,
        },
        "general.jsonl": {"package": PACKAGE["name"], "rows": counts["general.jsonl"], "seed": SEED,
                          "selection": GENERAL_SELECTION, **general_facts},
    }
    built = {"task_metric": TASK_METRIC, "partition": partition_record(scan, roles), "files": facts}
    if v3:
        facts["general.jsonl"]["selection"] = (
            f"tasks the partition gives to the general prompts; single-turn rows (system and user messages folded "
            f"into one query): {GENERAL_FILTERS}; per task a seeded draw of at most {GENERAL_PER_TASK} distinct "
            f"queries, then a seeded draw of up to {GENERAL_PER_KIND} rows of each kind ({', '.join(KINDS)}) and "
            f"the rest of {GENERAL_ROWS_V3} from all the others, shuffled; {KIND_RULE}; no query equals "
            "(normalised) a task, pool or broad pool query")
        facts["pool-broad.jsonl"] = {
            "package": PACKAGE["name"], "rows": counts["pool-broad.jsonl"], "seed": SEED,
            "selection": ("tasks the partition gives to the pool or to 'broad'; single-turn rows (system and user "
                          f"messages folded into one query) whose query and reference have <= {POOL_MAX_CHARS} "
                          f"characters, the query >= {MIN_ASCII_LETTERS:.0%} ASCII letters, the reference neither "
                          "starting with '{' nor holding kana or CJK; per task a seeded draw of at most "
                          f"{BROAD_PER_TASK} distinct queries; a query already taken by a task earlier in name "
                          "order dropped; shuffled"),
            **broad_facts,
        }
        facts["general-outside.jsonl"] = {
            "package": OUTSIDE_PACKAGE["name"], "rows": counts["general-outside.jsonl"], "seed": SEED,
            "members": [f"{OUTSIDE_PREFIX}{c}.yml" for c in OUTSIDE_CATEGORIES],
            "selection": ("the first two turns (question, answer) of each conversation of the members, each member "
                          f"a task; {GENERAL_FILTERS}; per member a seeded draw of at most {OUTSIDE_PER_CATEGORY} "
                          f"distinct questions; shuffled; {KIND_RULE}; no query equals (normalised) a task, pool "
                          "or broad pool query"),
            **outside_facts,
        }
        built["outside_package"] = package_record(outside_wheel, OUTSIDE_PACKAGE)
    return built


DEMO_SETS = {v: DataSet("demo", v, files, partial(_build, version=v)) for v, files in (("2", FILES), ("3", FILES_V3))}


def prepare_demo_data(out: Path | None = None, force: bool = False, version: str = DEMO_VERSION) -> Path:
    """Build (once) and return the demo's data folder of `version` (2 or 3): its JSONL files and SOURCES.json.

    A prepared folder whose files match SOURCES.json is reused as is. `delia demo-data` is its CLI.
    """
    return DEMO_SETS[version].prepare(out, force)
