"""The sampling stage: output rows, manifest, filters, resume, shards and merge.

A scripted back end (answers chosen per query) makes the filter and resume checks exact; the tiny
random model covers the real transformers path and seeding.
"""

from __future__ import annotations

import json
import re

import pytest

import delia.backends
from delia.backends import Completion
from delia.errors import DeliaError
from delia.files import read_complete_jsonl
from delia.filters import copies_reference, is_repetitive, mentions_reference
from delia.models import load_tokenizer
from delia.sample import SampleConfig, in_shard, manifest_path, merge, parse_shard, sample

PROSE = ("Paris is the capital of France. It lies on the Seine, has about two million people, and is known for "
         "its museums, its cafes, the Eiffel Tower and a long history as a centre of art and science.")


class Scripted:
    """A back end that answers each query with a scripted text (default: a distinct sentence)."""

    name = "hf"

    def __init__(self, tokenizer, script=None):
        self.tokenizer = tokenizer
        self.script = script or {}
        self.asked: list[str] = []

    def generate(self, prompts, params, seeds=None):
        for i, p in enumerate(prompts):
            text = self.tokenizer.decode(p)
            query = text.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
            self.asked.append(query)
            for k in range(params.n):
                answer, finish = self.script.get(query, (f"Answer {k} to {query}, seed {seeds[i]}.", "stop"))
                yield i, Completion(answer, finish, len(p), len(answer.split()), k)


@pytest.fixture
def scripted(monkeypatch, tiny_model):
    tok = load_tokenizer(tiny_model, resolved=True)
    backend = Scripted(tok)
    monkeypatch.setattr(delia.backends, "get_backend", lambda name, model, **kw: backend)
    return backend


def pool_rows(n, reference=True):
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Question number {i}?"}]
        if reference:
            msgs.append({"role": "assistant", "content": f"Reference answer {i}, long enough to show."})
        rows.append({"messages": msgs})
    return rows


def ids_in(out):
    rows = read_complete_jsonl(out) + read_complete_jsonl(out.with_name(out.stem + ".rejects.jsonl"))
    return sorted(r["meta"]["query_id"] for r in rows)


def test_output_rows_manifest_and_summary(tiny_model, write_jsonl, tmp_path):
    pool = write_jsonl("pool.jsonl", [*pool_rows(5), {"id": "custom-7", **pool_rows(1)[0]}])
    out = tmp_path / "diverse.jsonl"
    summary = sample(pool, out, model=str(tiny_model), max_new_tokens=6, drop_truncated=False)
    rows = read_complete_jsonl(out)
    assert summary.queries == 6 and summary.generated == 6
    assert summary.kept == len(rows) and summary.kept + sum(summary.rejected.values()) == 6
    row = next(r for r in rows if r["id"] == "custom-7")
    assert row["messages"][0] == {"role": "user", "content": "Question number 0?"}
    assert row["messages"][1]["role"] == "assistant"
    meta = row["meta"]
    assert meta["query_id"] == "custom-7" and meta["backend"] == "hf" and meta["model"] == str(tiny_model)
    assert meta["seed"] == 0 and meta["finish_reason"] in ("stop", "length")
    assert meta["prompt_tokens"] > 10 and 1 <= meta["completion_tokens"] <= 6
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["status"] == "complete" and manifest["settings"]["temperature"] == 0.7
    assert manifest["settings"]["top_p"] == 0.95 and manifest["versions"]["torch"]
    assert manifest["summary"]["kept"] == summary.kept and manifest_path(out).name == "diverse.manifest.json"
    assert manifest["model_path"] == str(tiny_model) and manifest["backend"] == "hf"


def test_same_seed_same_file_and_shards_reproduce_the_whole_run(tiny_model, write_jsonl, tmp_path):
    pool = write_jsonl("pool.jsonl", pool_rows(8))
    kw = {"model": str(tiny_model), "max_new_tokens": 5, "drop_truncated": False}
    sample(pool, tmp_path / "a.jsonl", **kw)
    sample(pool, tmp_path / "b.jsonl", **kw)
    a = read_complete_jsonl(tmp_path / "a.jsonl")
    assert a == read_complete_jsonl(tmp_path / "b.jsonl")
    sample(pool, tmp_path / "s0.jsonl", shard="0/2", **kw)
    sample(pool, tmp_path / "s1.jsonl", shard="1/2", **kw)
    merged = merge([tmp_path / "s1.jsonl", tmp_path / "s0.jsonl"], tmp_path / "m.jsonl")
    assert merged.queries == 8
    by_id = {r["id"]: r["messages"] for r in a}
    assert {r["id"]: r["messages"] for r in read_complete_jsonl(tmp_path / "m.jsonl")} == by_id
    other = sample(pool, tmp_path / "c.jsonl", seed=1, **kw)
    assert other.kept and read_complete_jsonl(tmp_path / "c.jsonl") != a


def test_filters_reject_with_reasons_and_can_be_switched_off(scripted, write_jsonl, tmp_path):
    scripted.script = {
        "Question number 0?": ("  \n ", "stop"),
        "Question number 1?": ("A long answer that ran out of", "length"),
        "Question number 2?": ("the cat sat on the mat " * 12, "stop"),
        "Question number 3?": ("Reference answer 3, long enough to show.", "stop"),
        "Question number 4?": ("As in the reference answer, the result is four.", "stop"),
        "Question number 5?": (PROSE, "stop"),
        "Question number 6?": (PROSE.upper(), "stop"),
    }
    pool = write_jsonl("pool.jsonl", pool_rows(8))
    out = tmp_path / "o.jsonl"
    summary = sample(pool, out)
    assert summary.rejected == {"empty": 1, "truncated": 1, "repetition": 1, "copies_reference": 1,
                                   "mentions_reference": 1, "duplicate": 1}
    kept = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in read_complete_jsonl(out)}
    assert kept == {"Question number 5?": PROSE, "Question number 7?": kept["Question number 7?"]}
    rejects = {r["messages"][0]["content"]: r["reason"] for r in read_complete_jsonl(tmp_path / "o.rejects.jsonl")}
    assert rejects["Question number 1?"] == "truncated" and rejects["Question number 6?"] == "duplicate"
    assert summary.kept == 2
    off = sample(pool, tmp_path / "off.jsonl", drop_empty=False, drop_truncated=False, drop_repetitive=False,
                 drop_reference_copies=False, drop_duplicates=False)
    assert off.kept == 8 and off.rejected == {}


def test_filter_heuristics():
    assert not is_repetitive(PROSE) and not is_repetitive("Yes.") and not is_repetitive("")
    assert is_repetitive("I am a bot. " * 20)
    assert is_repetitive(PROSE + " " + "and then " * 40)
    assert is_repetitive("!" * 300)
    numbers = " ".join(str(i) for i in range(1, 80))
    assert not is_repetitive(numbers)
    assert mentions_reference("As I said before, it is 4.") and mentions_reference("The reference answer says 4")
    assert not mentions_reference("The answer is 4; refer to page 2 for a reference.")
    assert copies_reference("reference  Answer 3.", "Reference answer 3.")
    assert copies_reference("Sure! " + PROSE + " Hope it helps.", PROSE)
    assert not copies_reference("Yes.", "Yes, it is.") and not copies_reference("Yes.", None)


def test_resume_skips_done_rows_drops_a_torn_line_and_redoes_half_written_queries(scripted, write_jsonl, tmp_path):
    pool = write_jsonl("pool.jsonl", pool_rows(6))
    out = tmp_path / "o.jsonl"
    sample(pool, out, samples_per_query=2)
    full = read_complete_jsonl(out)
    assert len(full) == 12 and len({r["id"] for r in full}) == 12
    lines = out.read_bytes().splitlines(keepends=True)
    # a crash: the last query lost one of its two samples and a third sample was half written
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])
    scripted.asked.clear()
    summary = sample(pool, out, samples_per_query=2)
    assert scripted.asked == [full[-1]["messages"][0]["content"]]
    assert summary.resumed == 5 and summary.generated == 2
    again = read_complete_jsonl(out)
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in full)
    assert sorted(json.dumps(r, sort_keys=True) for r in again) == sorted(json.dumps(r, sort_keys=True) for r in full)
    scripted.asked.clear()
    assert sample(pool, out, samples_per_query=2).generated == 0 and scripted.asked == []


def test_resume_refuses_other_settings_and_foreign_files(scripted, write_jsonl, tmp_path):
    pool = write_jsonl("pool.jsonl", pool_rows(3))
    out = tmp_path / "o.jsonl"
    assert sample(pool, out, limit=2).generated == 2
    extended = sample(pool, out)  # a larger `limit` extends the run
    assert (extended.resumed, extended.generated, extended.kept) == (2, 1, 3)
    with pytest.raises(DeliaError, match=r"temperature: 0.7 -> 0.3"):
        sample(pool, out, temperature=0.3)
    assert sample(pool, out, temperature=0.3, overwrite=True).generated == 3
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"messages": []}\n')
    with pytest.raises(DeliaError, match="not a delia sample output"):
        sample(pool, foreign)


def test_modes_and_references(scripted, write_jsonl, tmp_path):
    refless = write_jsonl("refless.jsonl", pool_rows(3, reference=False))
    with pytest.raises(DeliaError, match="zero-shot"):
        sample(refless, tmp_path / "a.jsonl")
    assert sample(refless, tmp_path / "b.jsonl", mode="zero-shot").kept == 3
    prompt = scripted.tokenizer.decode(scripted_prompt(scripted, write_jsonl, tmp_path))
    assert prompt.count("Question number 0?") == 2 and "Reference answer 0, long enough to show." in prompt
    mixed = write_jsonl("mixed.jsonl", [*pool_rows(2), *pool_rows(3, reference=False)[2:]])
    summary = sample(mixed, tmp_path / "c.jsonl")
    assert summary.skipped == {"no_reference": 1} and summary.kept == 2
    with pytest.raises(DeliaError, match="mode"):
        sample(mixed, tmp_path / "d.jsonl", mode="few-shot")


def scripted_prompt(scripted, write_jsonl, tmp_path):
    seen = []
    real = scripted.generate

    def spy(prompts, params, seeds=None):
        seen.extend(prompts)
        return real(prompts, params, seeds)

    scripted.generate = spy
    sample(write_jsonl("one.jsonl", pool_rows(1)), tmp_path / "one-out.jsonl")
    scripted.generate = real
    return seen[0]


def spy_prompts(scripted) -> list[str]:
    """The decoded prompts the scripted back end is asked, collected as it is asked."""
    seen: list[str] = []
    real = scripted.generate

    def spy(prompts, params, seeds=None):
        seen.extend(scripted.tokenizer.decode(p) for p in prompts)
        return real(prompts, params, seeds)

    scripted.generate = spy
    return seen


def rendered(tokenizer, messages) -> str:
    from delia.prompts import prompt_ids

    return tokenizer.decode(prompt_ids(tokenizer, messages))


def short_and_long_pool(write_jsonl):
    """Queries q0-q2 with short references ("Short answer i."), q3 with a long one (PROSE)."""
    rows = [{"id": f"q{i}", **row} for i, row in enumerate(pool_rows(4))]
    for i, row in enumerate(rows):
        row["messages"][1]["content"] = PROSE if i == 3 else f"Short answer {i}."
    return write_jsonl("pool.jsonl", rows)


def test_short_references_one_shot_are_prompted_as_the_paper_does(scripted, write_jsonl, tmp_path):
    from delia.prompts import delia_prompt

    pool, out = short_and_long_pool(write_jsonl), tmp_path / "o.jsonl"
    asked = spy_prompts(scripted)
    scripted.script = {"Question number 0?": ("Short answer 0.", "stop")}  # a copy of the reference
    summary = sample(pool, out, short_reference="one-shot")
    rows = read_complete_jsonl(out) + read_complete_jsonl(tmp_path / "o.rejects.jsonl")
    refs = ["Short answer 0.", "Short answer 1.", "Short answer 2.", PROSE]
    assert sorted(asked) == sorted(rendered(scripted.tokenizer, delia_prompt(f"Question number {i}?", ref))
                                   for i, ref in enumerate(refs))
    assert all(set(r["meta"]) == {"query_id", "backend", "model", "seed", "sample", "finish_reason",
                                  "prompt_tokens", "completion_tokens"} for r in rows)  # as before the option
    assert summary.rejected == {"copies_reference": 1}
    assert summary.dump()["by_prompt"] == {"one-shot": {"queries": 4, "kept": 3, "rejected": {"copies_reference": 1}}}
    settings = json.loads(manifest_path(out).read_text())["settings"]
    assert "short_reference" not in settings and "short_reference_words" not in settings


def test_short_references_zero_shot_by_default_ask_the_query_alone_and_keep_a_right_answer(scripted, write_jsonl,
                                                                                           tmp_path):
    from delia.prompts import delia_prompt

    pool, out = short_and_long_pool(write_jsonl), tmp_path / "o.jsonl"
    asked = spy_prompts(scripted)
    scripted.script = {"Question number 0?": ("Short answer 0.", "stop"),  # right, though never shown
                       "Question number 3?": (PROSE, "stop")}  # a copy of the reference it was shown
    summary = sample(pool, out)
    zero = {rendered(scripted.tokenizer, delia_prompt(f"Question number {i}?", None, "zero-shot")) for i in range(3)}
    assert set(asked) == zero | {rendered(scripted.tokenizer, delia_prompt("Question number 3?", PROSE))}
    rows = {r["id"]: r for r in read_complete_jsonl(out) + read_complete_jsonl(tmp_path / "o.rejects.jsonl")}
    assert {q: r["meta"]["prompt"] for q, r in rows.items()} == {
        "q0": "zero-shot", "q1": "zero-shot", "q2": "zero-shot", "q3": "one-shot"}
    assert rows["q0"]["messages"][1]["content"] == "Short answer 0." and "reason" not in rows["q0"]
    assert summary.dump()["by_prompt"] == {"one-shot": {"queries": 1, "kept": 0, "rejected": {"copies_reference": 1}},
                                    "zero-shot": {"queries": 3, "kept": 3, "rejected": {}}}
    settings = json.loads(manifest_path(out).read_text())["settings"]
    assert (settings["short_reference"], settings["short_reference_words"]) == ("zero-shot", 5)
    with pytest.raises(DeliaError, match="other settings"):  # the paper's prompt is another run
        sample(pool, out, short_reference="one-shot")
    assert sample(pool, out, short_reference="zero-shot").by_prompt == summary.by_prompt  # counted on resume
    parts = [tmp_path / f"s{i}.jsonl" for i in range(2)]
    for i, part in enumerate(parts):
        sample(pool, part, short_reference="zero-shot", shard=f"{i}/2")
    merged = merge(parts, tmp_path / "m.jsonl")
    assert merged.dump()["by_prompt"] == {p: {k: v for k, v in c.items() if k != "queries"}
                                          for p, c in summary.dump()["by_prompt"].items()}


def test_short_references_other_example_shows_a_long_row_drawn_by_seed(scripted, write_jsonl, tmp_path):
    from delia.prompts import delia_prompt
    from delia.sample import plan_shots

    pool, out = short_and_long_pool(write_jsonl), tmp_path / "o.jsonl"
    asked = spy_prompts(scripted)
    scripted.script = {"Question number 0?": (PROSE, "stop"),  # a copy of the example's reference
                       "Question number 1?": ("Short answer 1.", "stop")}  # its own, never shown: kept
    summary = sample(pool, out, short_reference="other-example")
    example = {rendered(scripted.tokenizer, delia_prompt(f"Question number {i}?", PROSE,
                                                         example_query="Question number 3?")) for i in range(3)}
    assert set(asked) == example | {rendered(scripted.tokenizer, delia_prompt("Question number 3?", PROSE))}
    rows = read_complete_jsonl(out) + read_complete_jsonl(tmp_path / "o.rejects.jsonl")
    short = [r for r in rows if r["id"] != "q3"]
    assert all(r["meta"]["prompt"] == "other-example" and r["meta"]["example_id"] == "q3" for r in short)
    assert next(r for r in rows if r["id"] == "q3")["meta"]["prompt"] == "one-shot"
    assert summary.by_prompt["other-example"].dump() == {"queries": 3, "kept": 2, "rejected": {"copies_reference": 1}}

    queries = [(f"q{i}", f"Q{i}?", "short") for i in range(40)]
    longs = [(f"l{i}", f"L{i}?", PROSE) for i in range(3)]
    draw = lambda **kw: {q: s.example[0] for q, s in plan_shots(  # noqa: E731
        queries, queries + longs, SampleConfig(short_reference="other-example", **kw)).items()}
    assert draw() == draw() and draw() != draw(seed=1) and set(draw().values()) == {"l0", "l1", "l2"}
    assert draw(short_reference_words=0) == {q[0]: q[0] for q in queries}  # "short" is then a long reference
    with pytest.raises(DeliaError, match="the pool has none"):
        plan_shots(queries, queries, SampleConfig(short_reference="other-example"))
    with pytest.raises(DeliaError, match="`mode` is zero-shot"):
        SampleConfig.build(short_reference="other-example", mode="zero-shot")


def test_max_prompt_tokens_skips_long_queries_before_generating(scripted, write_jsonl, tmp_path):
    rows = pool_rows(4)
    rows[1]["messages"][0]["content"] = "A much longer question " * 30 + "?"
    pool = write_jsonl("pool.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary = sample(pool, out, max_prompt_tokens=120)
    assert summary.skipped == {"prompt_too_long": 1} and summary.kept == 3 and summary.resumed == 0
    assert not any("much longer" in q for q in scripted.asked)
    again = sample(pool, out, max_prompt_tokens=120)  # a resume does not retry it either
    assert again.skipped == {"prompt_too_long": 1} and again.generated == 0 and again.resumed == 3


def test_shards_split_deterministically_and_merge_checks(scripted, write_jsonl, tmp_path):
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) == (0, 1)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(DeliaError, match="i/N"):
            parse_shard(bad)
    ids = [f"q{i}" for i in range(200)]
    assert all(sum(in_shard(q, i, 3) for i in range(3)) == 1 for q in ids)
    assert 40 < sum(in_shard(q, 0, 3) for q in ids) < 95
    pool = write_jsonl("pool.jsonl", pool_rows(12))
    parts = [tmp_path / f"p{i}.jsonl" for i in range(3)]
    for i, p in enumerate(parts):
        sample(pool, p, shard=f"{i}/3")
    assert sorted(sum((ids_in(p) for p in parts), [])) == ids_in_whole(pool, tmp_path)
    summary = merge(parts, tmp_path / "all.jsonl")
    assert summary.queries == 12 and summary.kept == 12
    with pytest.raises(DeliaError, match=r"missing \[2\]"):
        merge(parts[:2], tmp_path / "x.jsonl")
    with pytest.raises(DeliaError, match=r"given twice \[0\]"):
        merge([*parts, parts[0]], tmp_path / "x.jsonl")
    lines = parts[1].read_text().splitlines(keepends=True)
    parts[1].write_text("".join(lines[:-1]))  # a row lost after the run finished
    with pytest.raises(DeliaError, match="do not cover"):
        merge(parts, tmp_path / "x.jsonl")
    sample(pool, tmp_path / "other.jsonl", shard="1/3", seed=9)
    with pytest.raises(DeliaError, match="other settings"):
        merge([parts[0], tmp_path / "other.jsonl", parts[2]], tmp_path / "x.jsonl")
    m = json.loads(manifest_path(parts[2]).read_text())
    manifest_path(parts[2]).write_text(json.dumps({**m, "status": "running"}))
    with pytest.raises(DeliaError, match="did not finish"):
        merge(parts, tmp_path / "x.jsonl")


def ids_in_whole(pool, tmp_path):
    sample(pool, tmp_path / "whole.jsonl")
    return ids_in(tmp_path / "whole.jsonl")


def test_merge_rejects_duplicate_answers_across_shards(scripted, write_jsonl, tmp_path, caplog):
    from delia.cli import main

    scripted.script = {f"Question number {i}?": ("The same answer for everyone.", "stop") for i in range(6)}
    pool = write_jsonl("pool.jsonl", pool_rows(6))
    parts = [tmp_path / f"p{i}.jsonl" for i in range(2)]
    for i, p in enumerate(parts):
        assert sample(pool, p, shard=f"{i}/2").kept == 1
    summary = merge(parts, tmp_path / "all.jsonl")
    assert summary.kept == 1 and summary.cross_shard_duplicates == 1 and summary.rejected == {"duplicate": 5}
    with caplog.at_level("INFO", logger="delia"), pytest.raises(SystemExit) as done:  # the command: --out or -o
        main(["sample-merge", *map(str, parts), "-o", str(tmp_path / "cli.jsonl")])
    assert done.value.code == 0 and f"merged 2 shards: 6 queries, 1 kept, 5 rejected -> {tmp_path}" in caplog.text


def test_sigkill_mid_run_then_rerun_gives_every_query_exactly_once(tiny_model, write_jsonl, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    pool = write_jsonl("pool.jsonl", pool_rows(120))
    out = tmp_path / "o.jsonl"
    args = ["--model", str(tiny_model), "--max-new-tokens", "4", "--no-drop-truncated"]
    proc = subprocess.Popen([sys.executable, "-m", "delia", "sample", str(pool), str(out), *args,
                             "--batch-size", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(manifest_path(out).read_text())["status"] == "running"
    before = len(ids_in(out))
    assert 10 <= before < 120
    summary = sample(pool, out, model=str(tiny_model), max_new_tokens=4, drop_truncated=False)
    assert summary.resumed == before and summary.generated == 120 - before
    ids = ids_in(out)
    assert len(ids) == 120 and len(set(ids)) == 120


def test_rows_are_written_as_they_finish_and_an_interrupt_keeps_them(tiny_model, write_jsonl, tmp_path, monkeypatch):
    from delia.backends.hf import HFBackend

    pool = write_jsonl("pool.jsonl", pool_rows(12))
    out = tmp_path / "o.jsonl"
    settings = {"model": str(tiny_model), "max_new_tokens": 4, "drop_truncated": False}
    real = HFBackend.generate
    written = []

    def interrupted(self, prompts, params, seeds=None):  # the back end's stream, cut after its third answer
        for k, item in enumerate(real(self, prompts, params, seeds)):
            if k == 3:
                written.append(len(ids_in(out)))
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(HFBackend, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample(pool, out, batch_tokens="100", **settings)  # one row in flight at a time
    assert written == [3] and len(ids_in(out)) == 3  # each answer was on disk before the next was asked for
    monkeypatch.setattr(HFBackend, "generate", real)
    summary = sample(pool, out, batch_tokens="auto", **settings)  # another budget resumes the same run
    assert summary.resumed == 3 and summary.generated == 9
    whole = tmp_path / "whole.jsonl"
    sample(pool, whole, **settings)
    assert sorted(map(json.dumps, read_complete_jsonl(out))) == sorted(map(json.dumps, read_complete_jsonl(whole)))


def test_bad_batch_options_are_refused_before_any_file_is_touched(scripted, write_jsonl, tmp_path):
    pool = write_jsonl("pool.jsonl", pool_rows(2))
    for option, value in (("batch_tokens", "0"), ("batch_tokens", "lots"), ("batch_size", "-1")):
        with pytest.raises(DeliaError, match=f"`{option}` must be a positive integer or 'auto'"):
            sample(pool, tmp_path / "o.jsonl", **{option: value})
        assert not (tmp_path / "o.jsonl").exists() and not manifest_path(tmp_path / "o.jsonl").exists()


def test_bad_options_are_refused_by_name_before_any_file_is_touched(write_jsonl, tmp_path):
    pool = write_jsonl("pool.jsonl", pool_rows(2))
    out = tmp_path / "o.jsonl"
    for options, text in (({"backend": "tgi"}, "field 'backend': unknown backend 'tgi'; expected one of hf, vllm"),
                          ({"mode": "one-shoot"}, "(did you mean 'one-shot'?)"),
                          ({"samples_per_query": 0}, "field 'samples_per_query': samples_per_query must be >= 1"),
                          ({"top_p": 1.5}, "field 'top_p': top_p must be <= 1, got 1.5"),
                          ({"backend": "openai"}, "`backend` openai needs `base_url`"),
                          ({"shard": "4/4"}, "field 'shard': `shard` expects i/N"),
                          ({"max_new_token": 9}, "'max_new_token' is not an option of delia sample (did you mean")):
        with pytest.raises(DeliaError, match=re.escape(text)):
            SampleConfig.build(**options)
        with pytest.raises(DeliaError, match=re.escape(text)):
            sample(pool, out, **options)
        assert not out.exists() and not manifest_path(out).exists()
    with pytest.raises(DeliaError, match="'progress' is not an option of delia sample"):  # the CLI's bar now
        SampleConfig.build(progress=False)
    config = SampleConfig(max_new_tokens=7, seed=3)
    assert SampleConfig.build(config, seed=4).model_dump(exclude_defaults=True) == {"max_new_tokens": 7, "seed": 4}


def test_progress_reports_every_finished_query_and_the_command_shows_the_summary(scripted, write_jsonl, tmp_path,
                                                                                  capsys):
    from delia.cli import show_sample

    events = []
    summary = sample(write_jsonl("pool.jsonl", pool_rows(5)), tmp_path / "o.jsonl", samples_per_query=2,
                     progress=events.append)
    done = [e.done for e in events]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 5 and len(done) == 6
    assert {(e.task, e.total, e.unit) for e in events} == {("sampling", 5, "queries")}
    assert events[-1].counts["tok"] == summary.completion_tokens > 0
    show_sample(summary)
    table = capsys.readouterr().err
    title, *rows = table.splitlines()
    assert title == f"delia sample -> {tmp_path / 'o.jsonl'}"  # a path is never broken
    assert "queries to sample" in table and "samples generated now" in table and max(map(len, rows)) <= 80


def test_command_help_and_errors_name_flags(write_jsonl, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "delia", "sample", "--help"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0 and "--no-drop-empty" in done.stdout and "--batch-tokens" in done.stdout
    assert "Example" in done.stdout and "--progress" not in done.stdout
    pool = write_jsonl("pool.jsonl", pool_rows(2))
    for flags, text in ((["--backend", "openai"], "--backend openai needs --base-url"),
                        (["--batch-tokens", "0"], "--batch-tokens must be a positive integer or 'auto', got 0")):
        command = [sys.executable, "-m", "delia", "sample", str(pool), str(tmp_path / "o.jsonl"), *flags]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        assert done.returncode == 2 and text in " ".join(done.stderr.split())


@pytest.mark.e2e
def test_smollm2_one_shot_sampling_end_to_end(write_jsonl, tmp_path):
    from delia.models import DEFAULT_MODEL
    from delia.prompts import delia_prompt, prompt_ids

    pool = write_jsonl("pool.jsonl", [
        {"id": "sky", "messages": [{"role": "user", "content": "Why is the sky blue?"},
                                   {"role": "assistant", "content": "Air scatters blue light more than red light."}]},
        {"id": "haiku", "messages": [{"role": "user", "content": "Write a haiku about rain."},
                                     {"role": "assistant", "content": "Soft rain on the roof / ..."}]},
        {"id": "py", "messages": [{"role": "user", "content": "How do I reverse a list in Python?"},
                                  {"role": "assistant", "content": "Use my_list[::-1] or my_list.reverse()."}]},
    ])
    out = tmp_path / "o.jsonl"
    summary = sample(pool, out, max_new_tokens=48, device="cpu", drop_truncated=False)
    assert summary.generated == 3 and summary.completion_tokens > 10
    rows = read_complete_jsonl(out)
    assert rows and all(r["messages"][1]["content"].strip() for r in rows)
    tok = load_tokenizer(DEFAULT_MODEL)
    reference = "Air scatters blue light more than red light."
    ids = prompt_ids(tok, delia_prompt("Why is the sky blue?", reference, "one-shot"))
    sky = next((r for r in rows if r["id"] == "sky"), None)
    assert sky is None or sky["meta"]["prompt_tokens"] == len(ids)
    start = tok.convert_tokens_to_ids("<|im_start|>")  # also SmolLM2's BOS: it must not be doubled
    assert ids.count(start) == 5 and ids[1] != start  # default system, user, assistant, user, generation prompt


def test_stage_on_the_openai_and_vllm_back_ends(tiny_model, write_jsonl, tmp_path, monkeypatch):
    import sys

    from test_backend_openai import FakeServer
    from test_backend_vllm import fake_vllm

    pool = write_jsonl("pool.jsonl", pool_rows(5))
    server = FakeServer(fail_every=4)
    try:
        summary = sample(pool, tmp_path / "api.jsonl", model=str(tiny_model), backend="openai", base_url=server.url,
                         served_model="served", concurrency=2, max_retries=3)
    finally:
        server.close()
    assert summary.kept == 5 and {r["model"] for r in server.requests} == {"served"}
    rows = read_complete_jsonl(tmp_path / "api.jsonl")
    assert {r["meta"]["backend"] for r in rows} == {"openai"} and rows[0]["meta"]["completion_tokens"] == 7
    with pytest.raises(DeliaError, match="`base_url`"):
        sample(pool, tmp_path / "nourl.jsonl", model=str(tiny_model), backend="openai")

    calls: list = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    summary = sample(pool, tmp_path / "vllm.jsonl", model=str(tiny_model), backend="vllm", tensor_parallel=2,
                     samples_per_query=2)
    assert calls[0][2]["tensor_parallel_size"] == 2 and summary.kept == 10
    texts = [r["messages"][1]["content"] for r in read_complete_jsonl(tmp_path / "vllm.jsonl")]
    assert len(set(texts)) == 10  # "s<seed>": a distinct seed for each of the 10 samples
