"""The `sep` and `mt` data sets and `NAME-data:` paths, on the small fake `evals` wheel of test_demo_data."""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import test_demo_data
from test_demo_data import read

from delia import demo_data as dd
from delia import task_data as td
from delia.errors import DeliaError
from delia.files import OUTPUT_MARKER, sha256_file

fake_wheel = test_demo_data.fake_wheel  # the fixture: a fake wheel instead of a download, the cache in tmp_path
LAYOUT = re.compile(r"\n'relatives' : \n'user_query' : (.*)\n'chatgpt_response' : (.*)\n\n\n(.*)", re.DOTALL)


def parts(row: dict) -> tuple[str, str, str]:
    """(query, response, instruction) of a `<sep>` row's user turn."""
    m = LAYOUT.fullmatch(row["messages"][0]["content"])
    assert m, row["messages"][0]["content"]
    return m.group(1), m.group(2), m.group(3)


def source_rows(wheel: Path) -> dict[str, dict]:
    """The wheel's rows by id: what a `<sep>` row's query and response must come from."""
    return {s.id: s.row for s in dd.iter_samples(wheel)}


def normal(text: str) -> str:
    return " ".join(text.lower().split())


def test_sep_rows_have_the_authors_layout_balanced_labels_and_right_answers(fake_wheel, tmp_path):
    folder = td.SEP.prepare()
    assert folder == tmp_path / "cache" / "data" / f"sep-{td.SEP_VERSION}"
    assert sorted(p.name for p in folder.iterdir()) == [OUTPUT_MARKER, "SOURCES.json", "contrast.jsonl",
                                                        "heldout.jsonl"]
    heldout, contrast = read(folder / "heldout.jsonl"), read(folder / "contrast.jsonl")
    assert (len(heldout), len(contrast)) == (240, 60)
    sources = source_rows(tmp_path / dd.PACKAGE["file"])  # where fake_wheel put it
    part = json.loads((folder / "SOURCES.json").read_text())["partition"]
    ids = [r["id"] for r in heldout + contrast]
    assert len(set(ids)) == len(ids)  # every row its own context
    for rows, instructions in ((heldout, td.HELDOUT_INSTRUCTIONS), (contrast, td.CONTRAST_INSTRUCTIONS)):
        assert Counter(r["meta"]["label"] for r in rows) == {"yes": len(rows) // 2, "no": len(rows) // 2}
        per_phrasing = Counter((r["meta"]["phrasing"], r["meta"]["label"]) for r in rows)
        assert {p for p, _ in per_phrasing} == set(range(len(instructions)))
        assert len(set(per_phrasing.values())) == 1  # each phrasing as often with either label
        assert [r["meta"]["label"] for r in rows] != sorted(r["meta"]["label"] for r in rows)  # shuffled
        for r in rows:
            query, response, instruction = parts(r)
            assert instruction == instructions[r["meta"]["phrasing"]]
            assert r["task"] in part["sep"] and r["id"].startswith(f"evals:{r['task']}/")
            own, donor = sources[r["id"]], sources[r["meta"]["response_id"]]
            assert query == dd.query_and_reference(own)[0]
            assert response == dd.query_and_reference(donor)[1]
            if r["meta"]["label"] == "no":
                assert r["meta"]["response_id"] == r["id"]
            else:  # a reference from another task: an answer to something else
                assert r["meta"]["response_id"].split("/")[0] != r["id"].split("/")[0]
    for r in heldout:
        answer = ast.literal_eval(r["messages"][1]["content"])
        assert list(answer) == ["thought", "hallucination"] and answer["hallucination"] == r["meta"]["label"]
        assert answer["thought"] in td.THOUGHTS[r["meta"]["label"]]


def test_sep_references_score_perfectly_and_match_the_authors_metric(fake_wheel):
    from delia.metrics import MetricConfig, check_format, parse_output

    assert MetricConfig(**td.SEP_METRIC) == MetricConfig.delia_format()
    folder = td.SEP.prepare()
    for row in read(folder / "heldout.jsonl"):
        value, strict, err = parse_output(row["messages"][1]["content"])
        assert strict and err is None and check_format(value, MetricConfig.delia_format()) is None


def test_contrast_rows_forbid_the_format_and_answer_in_prose(fake_wheel):
    from delia.metrics import parse_output

    assert len(td.CONTRAST_INSTRUCTIONS) >= 10 and len(set(td.CONTRAST_INSTRUCTIONS)) == len(td.CONTRAST_INSTRUCTIONS)
    for text in td.CONTRAST_INSTRUCTIONS:
        low = text.lower()
        assert "<sep>" in low and "dict" in low and "json" in low and "hallucinat" in low
        assert re.search(r"\b(do not|not in|without|ignore)\b[^.:;]*<sep>", low), text
    for row in read(td.SEP.prepare() / "contrast.jsonl"):
        answer = row["messages"][1]["content"]
        value, _, _ = parse_output(answer)
        assert not isinstance(value, dict) and "{" not in answer
        assert ("no hallucination" in answer) == (row["meta"]["label"] == "no")


def test_heldout_phrasings_are_new(delia_format_data):
    assert len(td.HELDOUT_INSTRUCTIONS) >= 30 and len(set(td.HELDOUT_INSTRUCTIONS)) == len(td.HELDOUT_INSTRUCTIONS)
    for text in td.HELDOUT_INSTRUCTIONS:
        assert "<sep>" in text and "hallucinat" in text.lower()
    authors = set()
    for name in ("train.jsonl", "eval.jsonl"):
        for line in (delia_format_data / name).read_text(encoding="utf-8").splitlines():
            user = json.loads(line)["messages"][0]["content"]
            assert LAYOUT.fullmatch(user)  # our layout is theirs
            authors.add(normal(user.rsplit("\n\n\n", 1)[1]))
            answer = ast.literal_eval(json.loads(line)["messages"][1]["content"])
            assert list(answer) == ["thought", "hallucination"]  # their key order is ours
    ours = {normal(t) for t in (*td.HELDOUT_INSTRUCTIONS, *td.CONTRAST_INSTRUCTIONS)}
    assert len(authors) > 30 and not ours & authors


def test_mt_reverses_bubbles_and_leaves_the_manga_out_of_the_pool(fake_wheel):
    folder = td.MT.prepare()
    assert sorted(p.name for p in folder.iterdir()) == [OUTPUT_MARKER, "SOURCES.json", "general.jsonl", "pool.jsonl",
                                                        "task_eval.jsonl", "task_train.jsonl"]
    train, evals = read(folder / "task_train.jsonl"), read(folder / "task_eval.jsonl")
    assert (len(train), len(evals)) == (td.MT_TRAIN_ROWS, td.MT_EVAL_ROWS)
    assert not {r["id"] for r in train} & {r["id"] for r in evals}
    for r in train + evals:
        user, answer = (m["content"] for m in r["messages"])
        english = user.removeprefix("Translate into Japanese:\n\n")
        n = int(english.removeprefix("speech bubble number "))
        assert answer == f"吹き出し{n}番"
        assert r["id"] == f"evals:manga-translation/bubbles.jsonl:{n + 1}"
    sources = json.loads((folder / "SOURCES.json").read_text())
    task_facts = sources["files"]["task_train.jsonl"]
    assert task_facts["skipped"] == {"length": 1, "duplicate": 1} and task_facts["usable_rows"] == 230
    assert "OpenMantra" in task_facts["licence_note"] and sources["task_metric"]["kind"] == "translation"

    demo = dd.prepare_demo_data(version="2")  # mt's pool and general prompts are version 2's
    pool = read(folder / "pool.jsonl")
    assert pool == [r for r in read(demo / "pool.jsonl") if r["task"] != "manga-translation"]
    assert len(pool) < len(read(demo / "pool.jsonl"))
    assert (folder / "general.jsonl").read_bytes() == (demo / "general.jsonl").read_bytes()
    for name in td.MT_FILES:
        assert sources["files"][name]["sha256"] == sha256_file(folder / name)


def test_mt_metric_is_a_valid_translation_config():
    from delia.metrics import MetricConfig

    assert MetricConfig(**td.MT_METRIC).target_scripts == ["HIRAGANA", "KATAKANA", "CJK"]


@pytest.mark.parametrize("data", [td.SEP, td.MT])
def test_rebuilds_are_byte_identical_and_reruns_reuse_the_folder(fake_wheel, tmp_path, data):
    folder = data.prepare()
    assert data.prepare() == folder and len(fake_wheel) == 1
    other = data.prepare(out=tmp_path / "elsewhere")
    for name in (*data.files, "SOURCES.json"):
        assert (other / name).read_bytes() == (folder / name).read_bytes()


def test_resolve_data_path(fake_wheel, tmp_path):
    cache = tmp_path / "cache" / "data"
    assert td.resolve_data_path("demo-data:pool.jsonl") == cache / f"demo-{dd.DEMO_VERSION}" / "pool.jsonl"
    assert td.resolve_data_path("demo-data@2:general.jsonl") == cache / "demo-2" / "general.jsonl"
    assert td.resolve_data_path("demo-data:pool-broad.jsonl").is_file()
    assert td.resolve_data_path(Path("sep-data:heldout.jsonl")) == cache / f"sep-{td.SEP_VERSION}" / "heldout.jsonl"
    assert td.resolve_data_path("mt-data:task_eval.jsonl").is_file()
    assert td.resolve_data_path("data/train.jsonl") == Path("data/train.jsonl")
    assert td.resolve_data_path(Path("other-data:x.jsonl")) == Path("other-data:x.jsonl")
    with pytest.raises(DeliaError, match=r"the sep data set \(version 1\) has no 'pool.jsonl'"):
        td.resolve_data_path("sep-data:pool.jsonl")
    with pytest.raises(DeliaError, match=r"the demo data set \(version 2\) has no 'pool-broad.jsonl'"):
        td.resolve_data_path("demo-data@2:pool-broad.jsonl")
    with pytest.raises(DeliaError, match="the demo data set has no version '1'; it has 2, 3"):
        td.resolve_data_path("demo-data@1:pool.jsonl")


def test_cli_set_option(fake_wheel, tmp_path):
    from delia.cli import main

    with pytest.raises(SystemExit) as done:
        main(["demo-data", "--set", "sep", "--out", str(tmp_path / "via-cli")])
    assert done.value.code == 0
    assert len(read(tmp_path / "via-cli" / "heldout.jsonl")) == 240


@pytest.mark.e2e
def test_real_sep_and_mt_from_pypi(tmp_path):
    """The real wheel (downloaded once into $DELIA_CACHE/downloads, 46 MB; ~20 s per set to build from it)."""
    sep = td.SEP.prepare(out=tmp_path / "sep")
    facts = json.loads((sep / "SOURCES.json").read_text())["files"]
    assert facts["heldout.jsonl"]["labels"] == {"no": 120, "yes": 120} and facts["heldout.jsonl"]["phrasings"] == 40
    assert facts["contrast.jsonl"]["labels"] == {"no": 30, "yes": 30}
    assert len(facts["heldout.jsonl"]["context_tasks"]) >= 10
    mt = td.MT.prepare(out=tmp_path / "mt")
    sources = json.loads((mt / "SOURCES.json").read_text())
    assert {name: sources["files"][name]["rows"] for name in td.MT_FILES} == {
        "task_train.jsonl": 100, "task_eval.jsonl": 100, "pool.jsonl": 300, "general.jsonl": 40}
    assert "manga-translation" not in sources["files"]["pool.jsonl"]["tasks"]
    assert not any(row["messages"][1]["content"].isascii() for row in read(mt / "task_eval.jsonl"))  # Japanese
