"""The typed stage records: each writes what its stage wrote as a dict (same keys, values and order), reads it
back, loads the files earlier versions wrote, and names the file and the field when one is missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from delia.artifacts import (
    CostPlan,
    EvalScores,
    MergeManifest,
    MixSummary,
    PoolSummary,
    SampleManifest,
    SampleSummary,
    StageRecord,
    TrainRecord,
    adapter_base,
)
from delia.errors import DataError, DeliaError

# delia_train.json as the first version of `delia train` wrote it (commit e93184b): no anchor rows or tokens, no
# processes, no PEFT layers, trainable token indices or mask dropout, no forward-only tokens, no checkpoint size
OLD_TRAIN = {
    "settings": {"data": "mix.jsonl", "out": "runs/a", "model": "smollm2-135m", "seed": 1, "add_token": ["<sep>=sep"]},
    "model": {"name": "smollm2-135m", "path": "/cache/models/SmolLM2-135M"},
    "seed": 1,
    "data": {"path": "mix.jsonl", "sha256": "ab" * 32, "rows": 12, "train_tokens": 900,
             "sources": {"task": 4, "diverse": 8}, "dropped_too_long": {"train": 0, "eval": 0}},
    "eval_data": {"path": None, "sha256": None, "rows": 0},
    "versions": {"python": "3.11.7", "delia": "0.1.0"},
    "device": "cpu",
    "precision": "fp32",
    "peft": {"target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"], "modules_to_save": None,
             "trainable_params": 1000, "total_params": 135000000},
    "new_tokens": {"init": "random", "seed": 1, "tied_embeddings": True,
                   "tokenizer_len": {"before": 49152, "after": 49153},
                   "embedding_rows": {"before": 49152, "after": 49153, "resized": True},
                   "tokens": [{"token": "<sep>", "id": 49152, "description": "sep", "init": "random",
                               "padding_row_reused": False, "init_norm": 0.61},
                              {"token": "<|im_end|>", "id": 2, "init": "existing"}]},
    "important_tokens": [],
    "steps": 3,
    "epochs_run": 1.0,
    "resumed_from": None,
    "tokens_trained": 900,
    "metrics": {"train_runtime": 1.5, "train_loss": 2.25},
    "outputs": ["adapter_config.json", "adapter_model.safetensors", "delia_train.json"],
}
# what this version adds, each in its place
NEW_TRAIN = {
    **OLD_TRAIN,
    "data": {"path": "mix.jsonl", "sha256": "ab" * 32, "rows": 12, "train_tokens": 900, "anchor_rows": 8,
             "anchor_tokens": 600, "sources": {"task": 4, "diverse": 8}, "dropped_too_long": None},
    "processes": 2,
    "peft": {"target_modules": ["q_proj"], "layers": [1], "modules_to_save": None,
             "trainable_token_indices": {"embed_tokens": [49152], "lm_head": [49152]}, "mask_dropout_layers": 4,
             "trainable_params": 1000, "total_params": 135000000},
    "tokens_forward_only": 600,
    "checkpoint_bytes": 123456,
}
NEW_TRAIN = {k: NEW_TRAIN[k] for k in ["settings", "model", "seed", "data", "eval_data", "versions", "device",
                                       "processes", "precision", "peft", "new_tokens", "important_tokens", "steps",
                                       "epochs_run", "resumed_from", "tokens_trained", "tokens_forward_only",
                                       "metrics", "checkpoint_bytes", "outputs"]}

SCORES = {
    "kind": "format", "primary": "format_accuracy", "metrics": {"format_accuracy": 1.0, "n": 2},
    "row_means": {"format_accuracy": "format_ok"}, "notes": [], "metric_config": {"kind": "format"}, "rows": 2,
    "data": "eval.jsonl", "data_sha256": None, "model": "a (adapter)", "adapter_scale": 0.5,
    "sampling": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16, "seed": 0},
    "finish_reasons": {"stop": 2}, "tokens": {"prompt": 40, "completion": 8}, "generation_s": 0.5,
    "tokens_per_s": 16.0, "versions": {"python": "3.11.7"},
    "general_sets": {"evals": {"metrics": {"leakage": 0.5}, "row_means": {"leakage": "leak"},
                               "higher_is_better": {"leakage": False}, "n": 2, "data": "g.jsonl", "base_model": "b",
                               "max_new_tokens": 12, "new_token_ids": [], "leakage_by_kind": {
                                   "yes_no": {"n": 2, "leaked": 1, "share": 0.5}}}},
    "contrast": {"metrics": {"contrast_obey": 1.0}, "row_means": {"contrast_obey": "obey"},
                 "higher_is_better": {"contrast_obey": True}, "n": 1, "data": "c.jsonl"},
}
SAMPLE_SUMMARY = {"out": "s.jsonl", "pool_rows": 10, "skipped": {"prompt_too_long": 1}, "shard": "0/1", "queries": 9,
                  "resumed": 0, "generated": 9, "kept": 8, "rejected": {"duplicate": 1},
                  "by_prompt": {"zero-shot": {"queries": 9, "kept": 8, "rejected": {"duplicate": 1}}},
                  "prompt_tokens": 500, "completion_tokens": 90, "wall_s": 2.5, "tokens_per_s": 36.0}
SAMPLE_MANIFEST = {"stage": "sample", "status": "complete", "settings": {"pool": "p.jsonl", "shard": "0/1"},
                   "limit": None, "backend": "hf", "versions": {"python": "3.11.7"}, "started": "2026-12-01T00:00:00",
                   "finished": "2026-12-01T00:01:00", "model_path": "/m", "query_ids_sha256": "cd" * 32,
                   "summary": SAMPLE_SUMMARY}
MERGE_MANIFEST = {"stage": "sample-merge", "status": "complete", "settings": {"pool": "p.jsonl"},
                  "shards": ["a.jsonl", "b.jsonl"], "finished": "2026-12-01T00:02:00",
                  "summary": {"out": "m.jsonl", "shards": 2, "queries": 9, "kept": 8, "rejected": {"duplicate": 1},
                              "cross_shard_duplicates": 0, "by_prompt": {"zero-shot": {"kept": 8, "rejected": {}}}},
                  "query_ids_sha256": "cd" * 32, "versions": {"python": "3.11.7"}}
MIX = {"out": "m.jsonl", "seed": 0, "ratio": 1.0, "diverse_count": None, "diverse_asked": 4, "short": False, "rows": 8,
       "tokenizer": None, "sources": {"task": {"rows": 4}, "diverse": {"rows": 4}},
       "inputs": {"task": {"path": "t.jsonl", "sha256": "ef" * 32, "rows": 4},
                  "diverse": {"path": "d.jsonl", "sha256": None, "rows": 9}}}
POOL = {"out": "p.jsonl", "rows": 3, "rows_read": 5, "seed": 0, "steps": {"invalid": 1, "contaminated": 1},
        "sources": [{"source": "a.jsonl", "path": "a.jsonl", "sha256": "ab" * 32, "format": "messages",
                     "licence": None, "rows_read": 5, "rows_usable": 4}],
        "decontamination": {"enabled": True, "ngram": 8, "overlap": 0.5, "removed": 1, "targets": []},
        "selection": {"method": "all", "rows": 3, "cluster_sizes": {"0": 3}, "per_source": {"a.jsonl": {"rows": 3}}},
        "settings": {"size": None}, "files": {"removed": "p.removed.jsonl", "plot": None, "coverage": None},
        "coverage": {}}
# a plan from before `diverse_asked`, `short` and `pool_note` (commit 880e788)
OLD_PLAN = {"model": "m", "seeds": 1, "task_rows": 4, "sampling_run": None, "matmul_peak_flops": 1.5e11,
            "flops_per_s": None, "rates": {"sample": 5e10, "train": 6e10},
            "arms": [{"arm": "sft", "kind": "sft", "ratio": 0.0, "diverse_rows": 0, "sampled_queries": 0.0,
                      "prompt_tokens": 0.0, "generated_tokens": 0.0, "sample_flops": 0.0, "trained_tokens": 900,
                      "forward_only_tokens": 0, "train_flops": 1e12, "flops": 1e12, "est_wall_s": 16.7}]}


def _as_written(obj: Any) -> str:
    """The bytes delia.files.write_json writes for `obj`."""
    return json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n"


@pytest.mark.parametrize("record, data, where", [
    (TrainRecord, NEW_TRAIN, "adapter"),
    (TrainRecord, OLD_TRAIN, "adapter"),
    (EvalScores, SCORES, "eval"),
    (SampleManifest, SAMPLE_MANIFEST, "diverse.jsonl"),
    (MergeManifest, MERGE_MANIFEST, "merged.jsonl"),
    (MixSummary, MIX, "mixed.jsonl"),
    (PoolSummary, POOL, "pool.jsonl"),
])
def test_a_record_writes_the_writers_bytes_and_reads_them_back(tmp_path, record, data, where):
    where = tmp_path / where
    if record in (TrainRecord, EvalScores):
        where.mkdir()
    parsed = record.model_validate(data)
    path = parsed.write(where)
    assert path.read_text(encoding="utf-8") == _as_written(data)  # keys, values and their order
    again = record.read(where)
    assert again == parsed and again.dump() == data
    assert record.read(path) == parsed  # the file itself, too


def test_records_beside_an_output_take_its_name():
    assert SampleManifest.path("runs/diverse.jsonl") == Path("runs/diverse.manifest.json")
    assert MixSummary.path("runs/mixed") == Path("runs/mixed.summary.json")  # a dataset folder
    assert MixSummary.path("runs/mixed.v2") == Path("runs/mixed.v2.summary.json")
    assert PoolSummary.path("pool.jsonl") == Path("pool.sources.json")
    assert TrainRecord.path("runs/adapter") == Path("runs/adapter/delia_train.json")  # a folder not yet made


def test_an_old_train_record_loads_with_the_defaults_of_what_it_lacks(tmp_path):
    (tmp_path / "delia_train.json").write_text(json.dumps(OLD_TRAIN))
    record = TrainRecord.read(tmp_path)
    assert record.processes == 1 and record.tokens_forward_only == 0 and record.data.anchor_rows == 0
    assert record.peft.layers is None and record.peft.mask_dropout_layers == 0 and record.checkpoint_bytes is None
    assert record.trained_tokens().model_dump() == {"rows": 12, "train_tokens": 900, "tokens_trained": 900,
                                                    "tokens_forward_only": 0}
    assert "processes" not in record.dump() and "anchor_rows" not in record.dump()["data"]  # written back as read


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    later = {**MIX, "sources": {"task": {"rows": 4, "mean_tokens": 12.5}}, "added_later": [1, 2]}
    (tmp_path / "m.summary.json").write_text(_as_written(later))
    summary = MixSummary.read(tmp_path / "m.jsonl")
    assert summary.added_later == [1, 2] and summary.sources["task"].mean_tokens == 12.5
    assert summary.write(tmp_path / "m.jsonl").read_text() == _as_written(later)


def test_an_int_stays_an_int_and_a_float_a_float(tmp_path):
    plan = CostPlan.model_validate(OLD_PLAN)
    arm = plan.arms[0]
    assert type(arm.trained_tokens) is int and type(arm.est_wall_s) is float and type(arm.ratio) is float
    assert (arm.diverse_asked, arm.short, plan.pool_note) == (0, False, None)  # older plans lack them
    assert plan.short_arms() == [] and plan.estimates() == {"sft": 16.7}
    assert _as_written(plan.dump()) == _as_written(OLD_PLAN)


@pytest.mark.parametrize("record, data, name, field", [
    (TrainRecord, {**OLD_TRAIN, "model": {"path": "/m"}}, "delia_train.json", "model.name"),
    (TrainRecord, {k: v for k, v in OLD_TRAIN.items() if k != "tokens_trained"}, "old.json", "tokens_trained"),
    (EvalScores, {"primary": "format_accuracy"}, "scores.json", "metrics"),
    (MixSummary, {k: v for k, v in MIX.items() if k != "sources"}, "m.summary.json", "sources"),
])
def test_a_missing_field_names_the_file_and_the_field_in_one_line(tmp_path, record, data, name, field):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as caught:
        record.read(path)
    message = str(caught.value)
    assert message == f"{path}: field '{field}': missing" and "\n" not in message
    assert isinstance(caught.value, DeliaError)


def test_a_file_that_is_not_a_record_is_a_delia_error(tmp_path):
    with pytest.raises(DeliaError, match=r"delia_train.json: no such file"):
        TrainRecord.read(tmp_path)
    (tmp_path / "delia_train.json").write_text("{not json")
    with pytest.raises(DataError, match=r"delia_train.json: not JSON"):
        TrainRecord.read(tmp_path)
    (tmp_path / "delia_train.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"delia_train.json: not a TrainRecord"):
        TrainRecord.read(tmp_path)
    with pytest.raises(DataError, match=r"field 'steps': Input should be a valid integer"):
        TrainRecord.parse({**OLD_TRAIN, "steps": "three"}, tmp_path / "delia_train.json")


def test_adapter_base_is_the_trained_records_model_else_the_adapter_configs(tmp_path):
    assert TrainRecord.model_validate(OLD_TRAIN).adapter_base() == "smollm2-135m"
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/elsewhere/base"}))
    TrainRecord.model_validate(OLD_TRAIN).write(trained)
    assert adapter_base(trained) == "smollm2-135m"  # the name given to training, resolved again where it loads
    plain = tmp_path / "plain"  # a PEFT adapter trained without delia
    plain.mkdir()
    (plain / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/elsewhere/base"}))
    assert adapter_base(plain) == "/elsewhere/base"
    (plain / "adapter_config.json").write_text("{}")
    with pytest.raises(DeliaError, match="names no base model"):
        adapter_base(plain)


def test_the_train_records_tokens():
    record = TrainRecord.model_validate(OLD_TRAIN)
    assert record.new_token_ids() == [49152, 2] and record.token_descriptions() == {"<sep>": "sep"}
    no_tokens = TrainRecord.model_validate({**OLD_TRAIN, "new_tokens": None})
    assert no_tokens.new_token_ids() == [] and no_tokens.token_descriptions() == {}
    assert TrainRecord.find(None) is None


def test_scores_sections_and_a_minimal_scores_file(tmp_path):
    scores = EvalScores.model_validate(SCORES)
    assert [name for name, _ in scores.scored_sets()] == ["evals"]
    assert scores.general_sets["evals"].leakage_by_kind["yes_no"].leaked == 1 and scores.contrast.n == 1
    (tmp_path / "scores.json").write_text(json.dumps({"primary": "exact", "metrics": {"exact": 0.5}}))
    minimal = EvalScores.read(tmp_path)  # the report needs no more
    assert minimal.scored_sets() == [] and minimal.row_means == {} and minimal.sampling.max_new_tokens is None


def test_a_stage_record_reads_its_result_as_the_stages_record(tmp_path):
    mixed = MixSummary.model_validate(MIX)
    StageRecord(stage="mix", label="delia seed 0", inputs={"ratio": 1.0}, wall_s=0.5, result=mixed).write(tmp_path)
    text = (tmp_path / "stage.json").read_text()
    assert text == _as_written({"stage": "mix", "label": "delia seed 0", "inputs": {"ratio": 1.0}, "wall_s": 0.5,
                                "result": MIX})
    record = StageRecord[MixSummary].read(tmp_path)
    assert isinstance(record.result, MixSummary) and record.result.diverse_rows() == 4
    sampled = StageRecord[SampleSummary].model_validate({**json.loads(text), "result": SAMPLE_SUMMARY})
    assert sampled.result.sampled_tokens().skipped == {"prompt_too_long": 1}
    StageRecord(stage="train", label="sft", inputs={}, wall_s=1.0, result=tmp_path / "adapter").write(tmp_path)
    assert StageRecord[str].read(tmp_path).result == str(tmp_path / "adapter")  # a path is written as text
    with pytest.raises(DataError, match=r"stage.json: field 'result.out': missing"):
        StageRecord[MixSummary].parse({**json.loads(text), "result": {}}, tmp_path / "stage.json")
