import json
from pathlib import Path

import pytest

from delia.cli import main
from delia.errors import DeliaError
from delia.pool import Contamination, pool, removed_path, sources_path

EVAL_Q = ("Explain why the sky appears blue during the day but turns red and orange at sunset, in simple terms "
          "that a ten year old child could follow.")
PARAPHRASE = ("Could you explain why the sky appears blue during the day but turns red and orange at sunset, "
              "in words that a ten year old child could follow?")
LONG_Q = ("Write a short story about a lighthouse keeper who finds a message in a bottle that was written by "
          "her grandmother fifty years ago, and decides to sail to the island it describes.")
REF = "Here is a long enough reference answer that teaches something: " + "it explains the idea carefully. " * 3


def chat(query, reference=REF, **extra):
    msgs = [{"role": "user", "content": query}]
    if reference is not None:
        msgs.append({"role": "assistant", "content": reference})
    return {"messages": msgs, **extra}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def cache(request, tmp_path, monkeypatch):
    """Unit tests cache embeddings in their own folder; the e2e test uses the prepared demo data and model."""
    if "e2e" not in request.keywords:
        monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))


def test_each_filter_on_hand_made_rows(write_jsonl, tmp_path, tiny_model):
    task = write_jsonl("task_eval.jsonl", [chat(EVAL_Q, "Because of Rayleigh scattering.")])
    src = write_jsonl("src.jsonl", [
        chat("What is the tallest mountain in Europe, and how was its height first measured?", id="keep-me"),
        chat("  what is the TALLEST mountain in europe, and how was its height first measured?"),  # exact dup
        chat(LONG_Q),
        chat(LONG_Q.replace("fifty years ago", "sixty years ago")),  # near duplicate
        chat(PARAPHRASE),  # contaminated: a light paraphrase of the eval question
        chat("Name three rivers that flow through Germany and describe where each one starts."),
        {"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "  "}]},  # empty
        {"messages": [{"role": "user", "content": "a long enough first question here"},
                      {"role": "assistant", "content": REF}, {"role": "user", "content": "and then?"},
                      {"role": "assistant", "content": REF}]},  # multi-turn
        chat("Tell me about the history of the printing press in Europe.", None),  # no reference
        chat("Summarise the plot of a famous opera in two sentences.", "Ok."),  # reference too short
        chat("Привет, как дела у тебя сегодня вечером, мой старый друг?"),  # not LATIN script
    ])
    out = tmp_path / "out" / "pool.jsonl"
    summary = pool([str(src)], out=out, task=[task], model=str(tiny_model), min_reference_tokens=5,
                   script=["LATIN"], licence=[f"{src}=CC0-1.0"])
    steps = {k: v for k, v in summary.steps.items() if v}
    assert steps == {"empty": 1, "multi_turn": 1, "no_reference": 1, "contaminated": 1, "script": 1,
                     "reference_too_short": 1, "duplicate": 1, "near_duplicate": 1}
    rows = read(out)
    assert [r["messages"][0]["content"][:20] for r in rows] == [
        "What is the tallest ", LONG_Q[:20], "Name three rivers th"]
    assert rows[0] == {**chat(rows[0]["messages"][0]["content"]), "id": f"{src}:1", "source": str(src),
                       "source_line": 1, "source_id": "keep-me", "licence": "CC0-1.0"}
    removed = {r["reason"]: r for r in read(removed_path(out))}
    hit = removed["contaminated"]
    assert hit["messages"][0]["content"] == PARAPHRASE and hit["source_line"] == 5
    assert hit["match"]["task"] == {"file": str(task), "line": 1} and hit["match"]["overlap"] >= 0.5
    assert removed["near_duplicate"]["duplicate_of"] == f"{src}:3"
    assert removed["duplicate"]["duplicate_of"] == f"{src}:1"
    assert removed["empty"]["source_line"] == 7 and "content is empty" in removed["empty"]["error"]
    facts = json.loads(sources_path(out).read_text())
    assert facts["rows"] == 3 and facts["rows_read"] == 11 and facts["decontamination"]["removed"] == 1
    assert facts["sources"][0]["sha256"] and facts["sources"][0]["licence"] == "CC0-1.0"


def test_decontamination_is_more_than_exact_matching():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        task = Path(d) / "t.jsonl"
        task.write_text(json.dumps(chat(EVAL_Q)) + "\n" + json.dumps(chat("What is 2 plus 2?")) + "\n")
        c = Contamination([task], 8)
        assert c.match(EVAL_Q)["overlap"] == 1.0
        assert c.match(PARAPHRASE)["overlap"] >= 0.5
        assert c.match("Before you answer: " + EVAL_Q.upper() + " Thanks a lot!")["overlap"] == 1.0  # contained
        assert c.match("Quick maths: what is 2 plus 2? Show your working.")["overlap"] == 1.0  # short prompt
        assert c.match("Why is grass green in summer but brown in a dry autumn?") is None


def test_selection_is_seeded_and_covers_every_cluster(write_jsonl, tmp_path, tiny_model):
    topics = ["cooking", "astronomy", "football", "poetry", "chemistry", "gardening", "banking", "music"]
    src = write_jsonl("src.jsonl", [chat(f"Question {i} about {t}: describe {t} number {i} with an example.")
                                    for i in range(6) for t in topics])
    run = lambda name, seed: pool([str(src)], out=tmp_path / name, model=str(tiny_model), size=12, clusters=4,  # noqa: E731
                                  seed=seed, near_dedup=False)
    first, again = run("a.jsonl", 0), run("b.jsonl", 0)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    sel = first.selection
    assert first.rows == 12 and first.steps["not_selected"] == 36
    assert sel["clusters"] == 4 and sel["clusters_covered"] == sel["nonempty_clusters"]
    assert sum(sel["selected_per_cluster"].values()) == 12 and sel["per_source"][str(src)]["share"] == 1.0
    assert not sel["embedding"]["cached"] and again.selection["embedding"]["cached"]  # embedded once
    assert (tmp_path / "a.selection.png").stat().st_size > 1000
    assert run("c.jsonl", 1).rows == 12


def test_hf_source_from_a_saved_dataset_and_an_unreachable_hub(tmp_path, tiny_model, monkeypatch):
    import datasets

    rows = {"instruction": ["Describe a calm lake at dawn.", "List the planets of the solar system."],
            "context": ["", "In order from the sun."], "response": [REF, REF], "category": ["creative", "qa"]}
    folder = tmp_path / "dolly_like"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()}),
                          "test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))
    spec = f"hf:{folder}:test"
    summary = pool([spec], out=tmp_path / "p.jsonl", model=str(tiny_model),
                   columns=["output=response", "input=context"])
    got = read(tmp_path / "p.jsonl")
    assert summary.sources[0].kind == "hf" and summary.sources[0].rows == 2
    assert got[1]["messages"][0]["content"] == "List the planets of the solar system.\n\nIn order from the sun."
    assert got[1]["id"] == f"{spec}[row 1]" and got[1]["source_row"] == 1
    with pytest.raises(DeliaError, match=rf"{spec}\[row 0\]: field 'answer': missing key 'output'"):
        pool([spec], out=tmp_path / "q.jsonl", model=str(tiny_model), columns=["output=answer"], format="alpaca")

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DeliaError, match="hub could not provide the dataset 'org/absent' .ConnectionError"):
        pool(["hf:org/absent"], out=tmp_path / "r.jsonl", model=str(tiny_model))
    assert not (tmp_path / "q.jsonl").exists() and not (tmp_path / "r.jsonl").exists()


def test_bad_source_exits_2_names_file_line_and_field_and_writes_nothing(write_jsonl, tmp_path, tiny_model, capsys):
    src = write_jsonl("bad.jsonl", [chat("A fine question about rivers?"),
                                    {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}])
    out = tmp_path / "out" / "pool.jsonl"
    with pytest.raises(SystemExit) as done:
        main(["pool", str(src), "--out", str(out), "--model", str(tiny_model)])
    assert done.value.code == 2
    assert f"{src}:2: field 'messages[1].role': unknown role 'bot'" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    with pytest.raises(SystemExit) as done:  # --skip-invalid counts it instead
        main(["pool", str(src), "--out", str(out), "--model", str(tiny_model), "--skip-invalid",
              "--min-reference-tokens", "1"])
    assert done.value.code == 0 and json.loads(sources_path(out).read_text())["steps"]["invalid"] == 1


def test_bad_options_are_refused_by_name(tmp_path, capsys):
    import re

    from delia.pool import PoolConfig

    out = tmp_path / "p.jsonl"
    for options, text in (({"size": 0}, "field 'size': size must be >= 1, got 0"),
                          ({"overlap": 2}, "field 'overlap': overlap must be <= 1, got 2"),
                          ({"near_treshold": 0.5}, "'near_treshold' is not an option of delia pool (did you mean "
                                                   "'near_threshold'?)"),
                          ({"licence": ["nosuch=MIT"]}, "`licence` expects SOURCE=LICENCE with SOURCE one of")):
        with pytest.raises(DeliaError, match=re.escape(text)):
            pool(["src.jsonl"], out=out, **options)
        assert not out.exists()
    assert PoolConfig.build(size=5).size == 5
    with pytest.raises(SystemExit) as done:  # the command names its flags
        main(["pool", "src.jsonl", "--out", str(out), "--licence", "nosuch=MIT"])
    assert done.value.code == 2 and "--licence expects SOURCE=LICENCE" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit) as done:
        main(["pool", "src.jsonl", "-o", str(out), "--size", "0"])
    assert done.value.code == 2 and "--size: size must be >= 1, got 0" in capsys.readouterr().err


def test_too_few_rows_for_the_size_is_logged(write_jsonl, tmp_path, tiny_model, caplog):
    src = write_jsonl("src.jsonl", [chat(LONG_Q)])
    with caplog.at_level("INFO", logger="delia"):
        summary = pool([str(src)], out=tmp_path / "p.jsonl", model=str(tiny_model), size=5)
    assert summary.rows == 1
    assert ("WARNING", "1 rows left after cleaning, fewer than size 5") in [(r.levelname, r.getMessage())
                                                                             for r in caplog.records]
    assert any(r.getMessage().startswith(f"wrote 1 of 1 rows to {tmp_path / 'p.jsonl'}") for r in caplog.records)


@pytest.mark.e2e
def test_demo_pool_through_the_pool_stage(tmp_path):
    """The demo's pool (prepared once from the `evals` wheel) against its task, with SmolLM2-135M's tokenizer and
    hidden states: nothing of the task is in it, and the counts add up."""
    from delia.task_data import resolve_data_path

    names = ("pool.jsonl", "task_train.jsonl", "task_eval.jsonl")
    src, train, evalset = (resolve_data_path(f"demo-data:{n}") for n in names)
    summary = pool([str(src)], out=tmp_path / "pool.jsonl", task=[train, evalset], size=100, min_reference_tokens=16)
    assert summary.rows_read == 325 and summary.steps["contaminated"] == 0
    assert {k: v for k, v in summary.steps.items() if v} == {
        "query_too_long": 7, "near_duplicate": 104, "not_selected": 114}  # the numbers in docs/results/demo-pool.md
    assert summary.rows + sum(summary.steps.values()) == 325 and summary.rows == 100
    assert summary.selection["clusters_covered"] == summary.selection["clusters"] == 10
    assert len(summary.selection["per_source"]) == 1


def test_experiment_builds_its_pool_as_a_cached_stage(write_jsonl, tmp_path, tiny_model):
    import yaml

    from delia.experiment import load_experiment
    from delia.run import run_experiment

    write_jsonl("train.jsonl", [chat(f"Is item {i} a fruit? Answer yes or no.", '{"food": "yes"}') for i in range(4)])
    write_jsonl("eval.jsonl", [chat(EVAL_Q, '{"food": "no"}'), chat("Is a stone a fruit?", '{"food": "no"}')])
    write_jsonl("src.jsonl", [chat(f"Question {i}: tell me something about topic {i * 7} in detail.")
                              for i in range(12)] + [chat(PARAPHRASE)])
    config = {"model": str(tiny_model), "task": {"train": "train.jsonl", "eval": "eval.jsonl", "metric": "format",
                                                 "metric_config": {"required_keys": ["food"]}},
              "pool": {"sources": ["src.jsonl"], "size": 6, "near_dedup": False},
              "arms": [{"name": "sft", "ratio": 0}, {"name": "delia", "ratio": 1}], "eval_base": False,
              "bootstrap": 100, "mix": {"allow_short": True}, "train": {"max_steps": 1, "batch_size": 2},
              "sample": {"max_new_tokens": 4, "drop_truncated": False, "drop_repetitive": False,
                         "drop_reference_copies": False}, "eval": {"max_new_tokens": 4}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    exp = load_experiment(path)
    assert exp.pool == {"sources": [str(tmp_path / "src.jsonl")], "size": 6, "near_dedup": False}
    first = run_experiment(exp, tmp_path / "out")
    assert first["stages_run"][:3] == ["pool:pool", "plan:costs", "sample:pool"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "13 rows read, 6 kept; 1 removed for overlapping the task's train or eval prompts" in report
    assert "| contaminated | 1 |" in report and "| not_selected | 6 |" in report
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["pool"]["decontaminated"] == 1 and manifest["pool"]["selection"]["rows"] == 6
    again = run_experiment(load_experiment(path), tmp_path / "out")
    assert not again["stages_run"] and "pool:pool" in again["stages_cached"]

    path.write_text(yaml.safe_dump({**config, "pool": {"sources": ["src.jsonl"], "near_treshold": 0.8}}))
    with pytest.raises(DeliaError, match="'near_treshold' is not an option of delia pool .did you mean 'near_thres"):
        load_experiment(path)
    path.write_text(yaml.safe_dump({**config, "pool": {"size": 3}}))
    with pytest.raises(DeliaError, match="needs `sources`"):
        load_experiment(path)


def test_embedding_reports_progress_to_the_callback(write_jsonl, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))  # embed, not a cached file
    src = write_jsonl("src.jsonl", [chat(f"Question {i}: describe topic {i} with an example, please.")
                                    for i in range(10)])
    events = []
    pool([str(src)], out=tmp_path / "p.jsonl", model=str(tiny_model), size=4, clusters=2, batch_size=3,
         near_dedup=False, progress=events.append)
    assert [(e.task, e.done, e.total) for e in events] == [("embedding", d, 10) for d in (3, 6, 9, 10)]
