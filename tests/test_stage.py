"""The stage protocol: `delia run`'s cache and the resumes inside train, sample and rewrite decide "same work" by
the same identity."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from delia.errors import DeliaError
from delia.stage import Stage, StageCache
from delia.training import CHECKPOINTS, TrainConfig, TrainStage, build_trainer
from delia.training.checkpoints import RESUME_KEY_FILE, check_resume_key


@dataclass
class Counting(Stage[dict]):
    name: ClassVar[str] = "count"
    value: int
    runs: list[int]
    label: str = ""

    def identity(self) -> dict[str, Any]:
        return {"value": self.value}

    def run(self, folder: Path, progress=None) -> dict:
        self.runs.append(self.value)
        (folder / "out.txt").write_text(str(self.value))
        return {"doubled": 2 * self.value}


def test_the_cache_runs_a_stage_once_per_identity(tmp_path):
    runs: list[int] = []
    cache = StageCache(tmp_path)
    folder, record = cache.run(Counting(1, runs, "one"))
    assert folder.name == f"count-{Counting(1, []).key()}" and record.result == {"doubled": 2}
    assert record.inputs == {"value": 1} and record.label == "one"
    assert cache.run(Counting(1, runs))[0] == folder  # found again, not run again
    other, _ = cache.run(Counting(2, runs))
    assert other != folder and runs == [1, 2]
    assert cache.done == ["count:one", "count:"] and cache.skipped == ["count:"]


def test_the_cache_computes_a_stage_identity_once_per_run(tmp_path):
    """An identity hashes the stage's input files (a pool of megabytes): the key and stage.json share one."""
    calls = []

    class Hashing(Counting):
        def identity(self) -> dict[str, Any]:
            calls.append(self.value)
            return super().identity()

    cache = StageCache(tmp_path)
    cache.run(Hashing(3, []))
    cache.run(Hashing(3, []))  # cached
    assert calls == [3, 3]


def test_a_stage_killed_before_its_record_runs_again(tmp_path):
    runs: list[int] = []
    stage = Counting(3, runs)
    (tmp_path / f"count-{stage.key()}").mkdir()  # a folder without stage.json: the stage did not finish
    assert stage.done(tmp_path / f"count-{stage.key()}") is None
    StageCache(tmp_path).run(stage)
    assert runs == [3]


def _train_stage(data: Path, tiny_model: Path, **options: Any) -> TrainStage:
    return TrainStage.of(data, TrainConfig.build(model=str(tiny_model), **options))


def test_resume_compares_options_by_value(tmp_path, tiny_model):
    """`epochs: 1` given or left at its default is the same work; another learning rate is not."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    saved = _train_stage(data, tiny_model, learning_rate=1e-3).resume_identity()
    assert _train_stage(data, tiny_model, learning_rate=0.001, epochs=1, resume=True).changes(saved) == []
    assert _train_stage(data, tiny_model, learning_rate=2e-3).changes(saved) == [
        "options.learning_rate: 0.001 -> 0.002"]
    data.write_text(data.read_text() * 2)
    assert [c.split(":")[0] for c in _train_stage(data, tiny_model, learning_rate=1e-3).changes(saved)] == ["data"]


def test_a_resume_key_from_before_the_protocol_is_compared_by_its_settings(tmp_path, tiny_model):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    stage = _train_stage(data, tiny_model)
    (tmp_path / RESUME_KEY_FILE).write_text(json.dumps({"data": str(data), "learning_rate": 2e-4, "seed": 0}))
    check_resume_key(tmp_path, stage, {"data": str(data), "learning_rate": 2e-4, "seed": 0, "resume": True},
                     tmp_path)
    with pytest.raises(DeliaError, match="learning_rate"):
        check_resume_key(tmp_path, stage, {"data": str(data), "learning_rate": 1e-3, "seed": 0}, tmp_path)


def test_train_resume_checks_the_identity_that_run_keys_its_stage_by(tmp_path, tiny_model, write_jsonl):
    """What `delia run` hashes into a train stage's folder name is what `delia train --resume` saved beside its
    checkpoints, and checks."""
    from delia.experiment import load_experiment
    from delia.run import run_experiment

    rows = [{"messages": [{"role": "user", "content": f"Is {i} even?"},
                          {"role": "assistant", "content": '{"even": "yes"}'}]} for i in range(4)]
    write_jsonl("train.jsonl", rows)
    write_jsonl("eval.jsonl", rows[:2])
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({
        "name": "t", "model": str(tiny_model), "task": {"train": "train.jsonl", "eval": "eval.jsonl"},
        "seeds": [0], "arms": [{"name": "sft", "kind": "sft"}], "eval_base": False,
        "train": {"max_steps": 1, "lora_r": 2, "max_length": 64, "batch_size": 2},
        "eval": {"max_new_tokens": 2}}))
    run_experiment(load_experiment(exp), tmp_path / "out")
    (folder,) = (tmp_path / "out" / "stages").glob("train-*")
    record = json.loads((folder / "stage.json").read_text())

    cfg = TrainConfig.build(model=str(tiny_model), max_steps=1, lora_r=2, max_length=64, batch_size=2, seed=0,
                            add_token=[])
    stage = TrainStage(tmp_path / "train.jsonl", cfg, record["inputs"]["model"])
    assert stage.identity() == record["inputs"] and folder.name == f"train-{stage.key()}"

    out = tmp_path / "standalone"
    build_trainer(tmp_path / "train.jsonl", out, cfg)  # writes the resume key, as a killed run leaves it
    saved = json.loads((out / CHECKPOINTS / RESUME_KEY_FILE).read_text())
    assert stage.changes(saved) == []
    with pytest.raises(DeliaError, match="options.lora_r: 2 -> 4"):
        build_trainer(tmp_path / "train.jsonl", out, cfg, lora_r=4, resume=True)


def test_a_changed_default_keys_new_work_apart_from_work_done_at_the_old_one(tmp_path):
    """`short_reference` was one-shot: an identity saved without it stands for one-shot, and the new default
    (zero-shot) is written into identities, so old cached or unfinished work is not taken for new."""
    from delia.sample import SampleConfig, SampleStage

    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    model = {"model": "m", "fingerprint": "f"}

    def stage(**options):
        return SampleStage(pool, SampleConfig.build(**options), model)

    assert stage().config.options() == {"short_reference": "zero-shot"}
    assert stage(short_reference="one-shot").config.options() == {"short_reference": "one-shot"}
    assert stage(mode="zero-shot").config.options() == {"mode": "zero-shot"}  # prompts it does not change
    before = {**stage().identity(), "options": {}}  # unset before the change: one-shot
    assert stage().changes(before) == ["options.short_reference: 'one-shot' -> 'zero-shot'"]
    assert stage(short_reference="one-shot").changes(before) == []
    assert stage(mode="zero-shot").changes({**before, "options": {"mode": "zero-shot"}}) == []
    assert stage().key() == stage(short_reference="zero-shot").key() != stage(short_reference="one-shot").key()
