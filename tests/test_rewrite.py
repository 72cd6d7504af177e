"""`delia rewrite` (SDFT's self-distillation): the prompt, the check, the output rows and summary, resume, refusals.

A scripted back end (answers chosen per row) makes the check and resume exact; the tiny random model covers the
real transformers path.
"""

from __future__ import annotations

import json

import pytest

import delia.backends
from delia.backends import Completion, derive_seed
from delia.errors import DeliaError
from delia.metrics import MetricConfig, score
from delia.models import load_tokenizer
from delia.prompts import prompt_ids
from delia.rewrite import (
    BANNED_PHRASES,
    REASONS,
    SDFT_SYSTEM,
    RewriteConfig,
    RewriteSummary,
    check_rewrite,
    partial_path,
    rewrite,
    rewrite_prompt,
    summary_path,
)

FOOD = MetricConfig(kind="format", required_keys=["food"], exact_keys=True, allowed_values={"food": ["yes", "no"]},
                    label_key="food")
FOOD_YAML = ('kind: format\nrequired_keys: [food]\nexact_keys: true\nallowed_values: {food: ["yes", "no"]}\n'
             "label_key: food\n")


def food_rows(n):
    return [{"id": f"r{i}", "source": "test", "messages": [
        {"role": "user", "content": f"Is item {i} food?"},
        {"role": "assistant", "content": json.dumps({"food": "yes" if i % 2 else "no"})}]} for i in range(n)]


class Scripted:
    """A back end answering each row with `script[item number]` (default: the reference's label flipped)."""

    name = "hf"

    def __init__(self, tokenizer, script=None, fail_after=None):
        self.tokenizer = tokenizer
        self.script = script or {}
        self.fail_after = fail_after
        self.asked: list[int] = []
        self.seeds: list[int] = []
        self.params = None

    def generate(self, prompts, params, seeds=None):
        self.params = params
        for k, p in enumerate(prompts):
            if self.fail_after is not None and len(self.asked) == self.fail_after:
                raise KeyboardInterrupt  # a kill mid-run
            text = self.tokenizer.decode(p)
            item = int(text.split("Is item ")[1].split(" ")[0])
            self.asked.append(item)
            self.seeds.append(seeds[k])
            answer, finish = self.script.get(item, ('{"food": "maybe"}', "stop"))
            yield k, Completion(answer, finish, len(p), 3)


@pytest.fixture
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model, resolved=True)


@pytest.fixture
def scripted(monkeypatch, tokenizer):
    def install(script=None, fail_after=None):
        backend = Scripted(tokenizer, script, fail_after)
        monkeypatch.setattr(delia.backends, "get_backend", lambda name, model, **kw: backend)
        return backend
    return install


@pytest.fixture
def food_task(write_jsonl, tmp_path, tiny_model):
    """(task rows, options: the tiny model, whose tokenizer renders the prompts, and the food metric)."""
    metric = tmp_path / "metric.yaml"
    metric.write_text(FOOD_YAML)
    return write_jsonl("task.jsonl", food_rows(6)), {"model": str(tiny_model), "metric_config": metric}


# ----------------------------------------------------------------------------- the prompt


def test_prompt_is_sdft_distill_refer_in_chat_form(tokenizer):
    row = food_rows(1)[0]["messages"]
    text = tokenizer.decode(prompt_ids(tokenizer, rewrite_prompt(row)))
    assert text == (f"<|im_start|>system\n{SDFT_SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nIs item 0 food?\n\n### Reference Answer:\n{\"food\": \"no\"}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert SDFT_SYSTEM == ("Below are an instruction that describes a task along with a reference answer. "
                           "Refer to the reference answer and write your own response.")


def test_prompt_keeps_the_rows_system_message_and_earlier_turns():
    row = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "hi"},
           {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Is bread food?"},
           {"role": "assistant", "content": "{\"food\": \"yes\"}"}]
    msgs = rewrite_prompt(row)
    assert msgs == [{"role": "system", "content": f"{SDFT_SYSTEM}\n\nAnswer in JSON."}, *row[1:3],
                    {"role": "user", "content": "Is bread food?\n\n### Reference Answer:\n{\"food\": \"yes\"}"}]
    assert row[3]["content"] == "Is bread food?"  # the row itself is untouched
    folded = rewrite_prompt(row, system_role=False)  # templates without a system role: it opens the first turn
    assert folded[0] == {"role": "user", "content": f"{SDFT_SYSTEM}\n\nAnswer in JSON.\n\nhi"}
    assert [m["role"] for m in folded] == ["user", "assistant", "user"]
    with pytest.raises(DeliaError, match="last assistant turn"):
        rewrite_prompt(row[:-1])


# ----------------------------------------------------------------------------- the check


@pytest.mark.parametrize(("text", "finish", "reason", "detail"), [
    ('{"food": "yes"}', "stop", "kept", "same food"),
    ("{'food': 'yes'}", "stop", "kept", "same food"),  # a Python literal is the metric's valid format too
    ('  {"food": "yes"}\n', "stop", "kept", "same food"),
    ('{"food": "no"}', "stop", "metric_failed", "food='no', the reference's 'yes'"),
    ('{"food": "maybe"}', "stop", "metric_failed", "invalid format"),
    ('{"food": "yes", "why": "bread"}', "stop", "metric_failed", "unexpected keys"),
    ('{"food": "yes"', "stop", "metric_failed", "invalid format"),
    ('Sure: {"food": "yes"}', "stop", "metric_failed", "text around the object"),
    ('Like the reference answer: {"food": "yes"}', "stop", "sdft_banned_phrase", "reference answer"),
    ('Your turn! {"food": "yes"}', "stop", "sdft_banned_phrase", "Your turn"),
    ('{"food": "yes"} NOW IT\'S YOUR TURN', "stop", "sdft_banned_phrase", "now it's your turn"),
    ('{"food": "yes"}', "length", "truncated", "max_new_tokens"),
    (" \n", "stop", "empty", "empty"),
])
def test_format_check(text, finish, reason, detail):
    verdict = check_rewrite(text, finish, '{"food": "yes"}', FOOD)
    assert (verdict.reason, verdict.kept) == (reason, reason == "kept")
    assert detail in verdict.detail


def test_format_check_strictness_follows_the_reference():
    fenced = '```json\n{"food": "yes"}\n```'
    assert check_rewrite('Sure: {"food": "yes"}', "stop", '{"food": "yes"}', FOOD, strict_format=False).kept
    assert check_rewrite(fenced, "stop", fenced, FOOD).kept  # the reference itself is fenced
    unlabelled = check_rewrite('{"food": "no"}', "stop", "no label here", FOOD)
    assert unlabelled.kept and "no readable 'food'" in unlabelled.detail
    schema_only = MetricConfig(kind="format", required_keys=["food"])
    assert check_rewrite('{"food": "no"}', "stop", '{"food": "yes"}', schema_only).kept


def test_every_sdft_banned_phrase_rejects_in_any_case():
    for phrase in BANNED_PHRASES:
        verdict = check_rewrite(f'{{"food": "yes"}} ({phrase.upper()})', "stop", '{"food": "yes"}', FOOD)
        assert verdict.reason == "sdft_banned_phrase", phrase
    assert check_rewrite('{"food": "yes"}', "stop", '{"food": "yes"}', FOOD).kept


def test_translation_check_is_chrf_against_min_chrf_on_both_sides():
    mt = MetricConfig(kind="translation")
    ref, text = "Good morning, my friends and neighbours.", "Good morning, my dear friends."
    chrf = score(mt, [text], [ref]).rows[0]["chrf"]
    assert 20 < chrf < 90
    assert check_rewrite(text, "stop", ref, mt, min_chrf=chrf).kept
    low = check_rewrite(text, "stop", ref, mt, min_chrf=chrf + 0.1)
    assert low.reason == "metric_failed" and f"chrF {chrf:.1f} <" in low.detail
    assert check_rewrite(ref, "stop", ref, mt, min_chrf=100).kept
    assert check_rewrite("Bonsoir", "stop", ref, mt).reason == "metric_failed"
    assert check_rewrite(text + " My response.", "stop", ref, mt, min_chrf=0).reason == "sdft_banned_phrase"


def test_exact_and_contains_checks():
    exact, contains = MetricConfig(kind="exact"), MetricConfig(kind="contains")
    assert check_rewrite("paris.", "stop", "Paris", exact).kept
    assert check_rewrite("It is Paris.", "stop", "Paris", exact).reason == "metric_failed"
    assert check_rewrite("It is Paris.", "stop", "Paris", contains).kept
    assert check_rewrite("It is Lyon.", "stop", "Paris", contains).reason == "metric_failed"


# ----------------------------------------------------------------------------- the stage


def test_rows_summary_and_seeds_with_a_scripted_model(scripted, food_task, tmp_path):
    data, opts = food_task
    backend = scripted({0: ('{"food": "no"}', "stop"), 1: ("{'food': 'yes'}", "stop"),
                        2: ('{"food": "yes"}', "stop"), 3: ('{"food": "yes"}', "length"),
                        4: ("My response: {\"food\": \"no\"}", "stop")})  # 5: invalid
    out = tmp_path / "rewritten.jsonl"
    events = []
    summary = rewrite(data, out, **opts, seed=7, progress=events.append)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    inputs = food_rows(6)
    assert [r["id"] for r in rows] == [r["id"] for r in inputs] and all(r["source"] == "test" for r in rows)
    assert [r["messages"][:-1] for r in rows] == [r["messages"][:-1] for r in inputs]
    assert [r["rewrite"]["reason"] for r in rows] == ["kept", "kept", "metric_failed", "truncated",
                                                      "sdft_banned_phrase", "metric_failed"]
    answers = [r["messages"][-1]["content"] for r in rows]
    assert answers[:2] == ['{"food": "no"}', "{'food': 'yes'}"]  # rewrites kept
    assert answers[2:] == [r["messages"][-1]["content"] for r in inputs[2:]]  # references kept
    assert rows[1]["rewrite"]["reference"] == '{"food": "yes"}' and rows[2]["rewrite"]["output"] == '{"food": "yes"}'
    assert summary.rows == 6 and summary.kept == 2 and summary.kept_share == pytest.approx(2 / 6)
    assert summary.kept_identical == 1  # row 0 rewrote the reference word for word
    assert summary.reasons == {"kept": 2, "empty": 0, "truncated": 1, "sdft_banned_phrase": 1, "metric_failed": 2}
    assert list(summary.reasons) == list(REASONS)
    assert summary.metric["label_key"] == "food" and summary.options["seed"] == 7
    assert summary.max_new_tokens == 32  # auto: twice the longest reference, at least 32
    assert backend.params.temperature == 0 and backend.params.max_new_tokens == 32
    assert backend.seeds == [derive_seed(7, i) for i in range(6)]
    assert summary.prompt_tokens > 0 and summary.completion_tokens == 18 and summary.resumed == 0
    assert RewriteSummary.read(summary_path(out)) == summary
    assert not partial_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metric.yaml", "rewritten.jsonl", "rewritten.summary.json",
                                                          "task.jsonl"]
    assert events[-1].done == events[-1].total == 6


def test_tiny_model_end_to_end_and_overwrite_refusal(food_task, tmp_path):
    data, opts = food_task
    out = tmp_path / "rewritten.jsonl"
    summary = rewrite(data, out, RewriteConfig(**opts, max_new_tokens=8))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 == summary.rows
    flags = [r["rewrite"]["kept"] for r in rows]
    assert summary.kept == sum(flags) and summary.kept_share == sum(flags) / 6
    assert sum(summary.reasons.values()) == 6 and summary.reasons["kept"] == summary.kept
    assert summary.max_new_tokens == 8 and 0 < summary.completion_tokens <= 6 * 8
    assert summary.model_path is not None and summary.finish_reasons
    assert RewriteSummary.read(summary_path(out)) == summary

    before = out.read_bytes()
    with pytest.raises(DeliaError, match="exists; set `overwrite`"):
        rewrite(data, out, **opts, max_new_tokens=8)
    assert out.read_bytes() == before
    again = rewrite(data, out, **opts, max_new_tokens=8, overwrite=True)
    assert out.read_bytes() == before and again.reasons == summary.reasons  # greedy: the same rows


def test_a_killed_run_resumes_and_other_settings_are_refused(scripted, food_task, tmp_path):
    data, opts = food_task
    out = tmp_path / "rewritten.jsonl"
    scripted(fail_after=0)
    with pytest.raises(KeyboardInterrupt):
        rewrite(data, out, **opts, seed=3)
    scripted(fail_after=4)  # nothing was generated: other settings start again
    with pytest.raises(KeyboardInterrupt):
        rewrite(data, out, **opts)
    assert not out.exists() and not summary_path(out).exists()  # OUT appears only when complete
    with open(partial_path(out), "a") as fh:
        fh.write('{"index": 5, "te')  # a torn last line
    with pytest.raises(DeliaError, match="other settings.*seed: 0 -> 1"):
        rewrite(data, out, **opts, seed=1)
    backend = scripted({5: ('{"food": "yes"}', "stop")})
    summary = rewrite(data, out, **opts, min_chrf=10)  # the check may change on a resume
    assert backend.asked == [4, 5] and summary.resumed == 4 and summary.kept == 1
    assert len(out.read_text().splitlines()) == 6 and not partial_path(out).exists()

    scripted(fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        rewrite(data, out, **opts, overwrite=True, seed=2)
    backend = scripted()
    rewrite(data, out, **opts, overwrite=True)  # other settings: overwrite starts again
    assert backend.asked == list(range(6))


def test_refusals_name_the_file(scripted, food_task, write_jsonl, tmp_path):
    data, opts = food_task
    scripted()
    bad = write_jsonl("bad.jsonl", [*food_rows(2), {"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(DeliaError, match=r"bad\.jsonl:3: .*last turn must be from the assistant"):
        rewrite(bad, tmp_path / "o.jsonl", **opts)
    with pytest.raises(DeliaError, match="is also an input"):
        rewrite(data, data, **opts, overwrite=True)
    out = tmp_path / "o.jsonl"
    summary_path(out).write_text("my notes")
    with pytest.raises(DeliaError, match="o.summary.json: exists"):
        rewrite(data, out, **opts)
    with pytest.raises(DeliaError, match="not a delia rewrite summary"):
        rewrite(data, out, **opts, overwrite=True)
    assert summary_path(out).read_text() == "my notes"
    summary_path(out).unlink()
    partial_path(out).write_text('{"mine": true}\n')
    with pytest.raises(DeliaError, match="not an unfinished delia rewrite"):
        rewrite(data, out, **opts, overwrite=True)
    assert partial_path(out).read_text() == '{"mine": true}\n' and not out.exists()
    with pytest.raises(DeliaError, match="disagrees"):
        rewrite(data, tmp_path / "p.jsonl", metric="exact", **opts)
    with pytest.raises(DeliaError, match="max_new_tokens"):
        RewriteConfig.build(max_new_tokens=0)
    assert RewriteConfig.build(max_new_tokens="12").max_new_tokens == 12


def test_the_cli_verb(scripted, food_task, tmp_path, capsys):
    """`delia rewrite DATA --out OUT ...`: the verb writes the rows and says how many the model rewrote."""
    from delia.cli import main

    data, opts = food_task
    scripted({0: ('{"food": "no"}', "stop")})
    out = tmp_path / "cli.jsonl"
    with pytest.raises(SystemExit) as done:
        main(["rewrite", str(data), "--out", str(out), "-m", opts["model"], "--metric", "format",
              "--metric-config", str(opts["metric_config"]), "--max-new-tokens", "16"])
    assert done.value.code == 0
    said = " ".join(capsys.readouterr().err.split())  # what a verb says goes to stderr; stdout is for results
    assert RewriteSummary.read(summary_path(out)).reasons["kept"] == 1
    assert f"rows to {out}: 1 rewritten by the model" in said and "the others keep their reference" in said
    assert RewriteSummary.read(summary_path(out)).max_new_tokens == 16
