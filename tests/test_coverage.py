import json

import numpy as np
import pytest

from delia.cli import main
from delia.coverage import coverage, pool_coverage
from delia.errors import DeliaError
from delia.pool import coverage_path, pool

# Pools whose directions are unchanged by a quarter turn: mean 0, the same spread in both dimensions, so the
# standardisation only scales them and cosines are those of the angles.
POOL = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # east, north, west, south


def unit(degrees):
    return np.array([[np.cos(np.radians(d)), np.sin(np.radians(d))] for d in degrees])


def quarter_turns(degrees):
    return unit([d + k * 90 for k in range(4) for d in degrees])


def test_nearest_query_similarity_and_index_on_hand_made_vectors():
    prompts = unit([10, 100, 200, 300])
    got = coverage(POOL, prompts, ["a", "b", "c", "d"])
    assert [n.query for n in got.per_prompt] == [0, 1, 2, 3]
    expected = np.cos(np.radians([10, 10, 20, 30]))
    assert [n.similarity for n in got.per_prompt] == pytest.approx(expected, abs=1e-4)
    assert (got.prompts, got.pool_queries) == (4, 4)


def test_quantiles_and_mean_of_the_nearest_similarities():
    degrees = [0, 9, 18, 27, 36, 45]  # all nearest to query 0 or 1, at 0..45 degrees
    got = coverage(POOL, unit(degrees), list("abcdef"))
    sims = np.cos(np.radians(degrees))
    for name, q in (("p10", 0.1), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p90", 0.9)):
        assert getattr(got.nearest, name) == pytest.approx(np.quantile(sims, q), abs=1e-4)
    assert got.nearest.mean == pytest.approx(sims.mean(), abs=1e-4)


def test_threshold_is_the_pools_own_median_nearest_similarity_leaving_each_query_out():
    # per quadrant queries at 0, 10 and 50 degrees: 8 of 12 have their nearest other query at 10 degrees, 4 at 40
    pool_vectors = quarter_turns([0, 10, 50])
    got = coverage(pool_vectors, unit([5, 30, 70]), ["close", "between 10 and 50", "between 50 and 90"])
    assert got.threshold_from == "pool median"
    assert got.threshold == pytest.approx(np.cos(np.radians(10)), abs=1e-4)
    assert got.pool_self.p10 == pytest.approx(np.cos(np.radians(40)), abs=1e-4)
    assert got.pool_self.p90 == pytest.approx(np.cos(np.radians(10)), abs=1e-4)  # no query counted itself
    assert (got.below, got.below_share) == (2, pytest.approx(2 / 3, abs=1e-4))  # both at 20 degrees
    assert "2 of 3" not in got.line("set.jsonl") and "67% of prompts are below the pool's own typical 0.98" in \
        got.line("set.jsonl")
    given = coverage(pool_vectors, unit([5, 30, 70]), ["x", "y", "z"], threshold=0.95)
    assert (given.threshold, given.threshold_from, given.below) == (0.95, "given", 2)
    assert "below the given 0.95" in given.line("set.jsonl")


def test_standardising_by_the_pool_makes_a_huge_constant_dimension_irrelevant():
    offset = np.array([[1000.0, 0.0, 0.0]])
    pool_vectors = np.hstack([POOL, np.zeros((4, 1))]) + offset  # raw cosines all near 1
    prompts = np.hstack([unit([45]), np.zeros((1, 1))]) + offset
    got = coverage(pool_vectors, prompts, ["between"])
    assert got.per_prompt[0].similarity == pytest.approx(np.cos(np.radians(45)), abs=1e-3)


def test_pools_compared_on_one_scale():
    """By its own scale a narrow pool looks close to a far prompt; standardised by both pools it does not."""
    narrow = np.array([[10.0, 0.0], [10.0, 0.1], [10.0, -0.1], [10.1, 0.0]])
    broad = np.vstack([POOL * 10, narrow])
    prompt = np.array([[0.0, 8.0]])
    both = np.vstack([narrow, broad])
    own = coverage(narrow, prompt, ["north"]).nearest.p50
    common = [coverage(p, prompt, ["north"], standardise_by=both).nearest.p50 for p in (narrow, broad)]
    assert common[1] > common[0] and common[0] < own
    assert coverage(broad, prompt, ["north"], standardise_by=broad).nearest.p50 == coverage(broad, prompt, [
        "north"]).nearest.p50
    with pytest.raises(DeliaError, match="at least 2"):
        coverage(broad, prompt, ["north"], standardise_by=broad[:1])


def test_least_covered_prompts_lowest_first_with_text_and_nearest_query():
    prompts = unit([0, 38, 5, 55, 20])  # 0, 38, 5, 35 and 20 degrees from their nearest query
    texts = ["close", "farthest " + "word " * 100, "close too", "far", "middle"]
    got = coverage(POOL, prompts, texts, pool_texts=["east", "north", "west", "south"], least=3)
    assert [u.prompt for u in got.least_covered] == [1, 3, 4]
    assert [u.query_text for u in got.least_covered] == ["east", "north", "east"]
    assert len(got.least_covered[0].text) == 200 and got.least_covered[0].text.endswith("…")
    line = got.line("general.jsonl")
    assert "least covered: 'farthest word" in line and len(line.split("least covered: ")[1]) == 82  # quoted


def test_ties_go_to_the_lowest_pool_index_and_keep_the_sets_order():
    pool_vectors = np.vstack([POOL, POOL])  # every query twice
    got = coverage(pool_vectors, np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), ["a", "b", "c"], least=3)
    assert [n.query for n in got.per_prompt] == [0, 0, 0]  # east, north and their twins tie: east comes first
    assert got.pool_self.p10 == pytest.approx(1.0)  # a twin is its twin's nearest other query
    assert [u.prompt for u in got.least_covered] == [0, 2, 1]


def test_no_prompts_or_a_one_query_pool_is_refused():
    with pytest.raises(DeliaError, match="no prompts"):
        coverage(POOL, np.zeros((0, 2)), [])
    with pytest.raises(DeliaError, match="at least 2"):
        coverage(POOL[:1], unit([0]), ["a"])


def test_the_record_is_json():
    got = coverage(POOL, unit([10]), ["a"])
    assert json.loads(got.model_dump_json())["per_prompt"] == [{"similarity": 0.9848, "query": 0}]


# ----------------------------------------------------------------------------- with a model


def chat(query):
    return {"messages": [{"role": "user", "content": query},
                         {"role": "assistant", "content": "A long enough reference answer, " * 4}]}


QUERIES = ["What is the tallest mountain in Europe and how tall is it?",
           "Write a short poem about the sea and the sky.",
           "Translate good morning into Icelandic for me please.",
           "Explain why the quick brown fox jumps over the lazy dog.",
           "Name three rivers in Germany and where each one starts."]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))


def test_pool_with_coverage_writes_the_record_beside_the_pool(write_jsonl, tmp_path, tiny_model, caplog):
    src = write_jsonl("src.jsonl", [chat(q) for q in QUERIES])
    general = write_jsonl("general.jsonl", [{"prompt": "What is the capital?", "completion": "Paris."},
                                            {"prompt": "Write a poem about the sky.", "completion": "ok"}])
    out = tmp_path / "pool.jsonl"
    with caplog.at_level("INFO", logger="delia"):
        summary = pool([str(src)], out=out, model=str(tiny_model), min_reference_tokens=1, near_dedup=False,
                       coverage=[general])
    record = json.loads(coverage_path(out).read_text())
    got = record["files"][str(general)]
    assert record["pool"] == str(out) and got["prompts"] == 2 and got["pool_queries"] == 5
    assert len(got["per_prompt"]) == 2 and got["least_covered"][0]["text"] in ("What is the capital?",
                                                                               "Write a poem about the sky.")
    assert summary.files["coverage"] == str(coverage_path(out))
    assert summary.coverage[str(general)]["below"] == got["below"] and "per_prompt" not in summary.coverage[
        str(general)]
    assert any(r.getMessage().startswith(f"{general}: median nearest similarity ") for r in caplog.records)
    # the same pool checked afterwards, by the verb's function: the same numbers
    again = pool_coverage(out, [general], model=str(tiny_model))
    assert again["files"][str(general)]["nearest"] == pytest.approx(got["nearest"], abs=1e-3)


def test_pool_refuses_a_coverage_file_as_its_output(write_jsonl, tmp_path, tiny_model):
    src = write_jsonl("src.jsonl", [chat(q) for q in QUERIES])
    out = tmp_path / "pool.jsonl"
    with pytest.raises(DeliaError, match="is also an input"):
        pool([str(src)], out=out, model=str(tiny_model), coverage=[coverage_path(out)])


def test_coverage_verb_refuses_an_existing_out_without_overwrite(write_jsonl, tmp_path, tiny_model, capsys):
    pool_file = write_jsonl("pool.jsonl", [chat(q) for q in QUERIES])
    prompts = write_jsonl("task.jsonl", [chat("Translate good night into Icelandic.")])
    out = tmp_path / "cov.json"
    out.write_text("{}")
    argv = ["coverage", str(pool_file), str(prompts), "--model", str(tiny_model), "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "set --overwrite" in capsys.readouterr().err
    assert out.read_text() == "{}"
    with pytest.raises(SystemExit) as e:
        main([*argv, "--overwrite"])
    assert e.value.code in (0, None)
    printed = capsys.readouterr()
    assert printed.out.startswith(f"{prompts}: median nearest similarity ") and "least covered:" in printed.out
    assert json.loads(out.read_text())["files"][str(prompts)]["prompts"] == 1
