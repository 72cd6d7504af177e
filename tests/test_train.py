"""Training on the tiny fixtures (seconds each); one end-to-end run on SmolLM2-135M is marked e2e."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from delia.errors import DeliaError
from delia.models import load_trained
from delia.training import CHECKPOINTS, TRAIN_RECORD, TRAINER_LOG, build_trainer, train
from delia.training.checkpoints import LEGACY_RESUME_KEY_FILE, RESUME_KEY_FILE

FAST = {"max_length": 256, "batch_size": 4, "warmup_steps": 0, "learning_rate": 1e-2, "logging_steps": 1}


def _conversation(i):
    return {"messages": [{"role": "user", "content": f"Check item {i} in the <sep> format."},
                         {"role": "assistant", "content": f"{{'thought': 'item {i} is fine', 'hallucination': 'no'}}"}],
            "source": "task" if i % 2 else "diverse"}


@pytest.fixture
def rows(write_jsonl):
    return write_jsonl("train.jsonl", [_conversation(i) for i in range(16)]), write_jsonl(
        "eval.jsonl", [_conversation(100 + i) for i in range(3)])


def _settings(data, out, model, **kw):
    return {**FAST, "data": str(data), "out": str(out), "model": str(model), **kw}


def test_labels_mask_prompt_tokens(rows, tmp_path, tiny_model):
    data, _ = rows
    run = build_trainer(**_settings(data, tmp_path / "run", tiny_model))
    tok = run.tokenizer
    example = run.trainer.train_dataset[0]
    conv = _conversation(0)["messages"]
    n_prompt = len(tok.apply_chat_template(conv[:1], add_generation_prompt=True, return_dict=True)["input_ids"])
    ids, labels = example["input_ids"], example["labels"]
    assert ids[:n_prompt] == tok.apply_chat_template(conv[:1], add_generation_prompt=True,
                                                     return_dict=True)["input_ids"]
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and len(ids) > n_prompt
    assert tok.decode(ids[n_prompt:]).startswith("{'thought': 'item 0")
    batch = next(iter(run.trainer.get_train_dataloader()))
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding carries no loss either


def _embedding_matrices(state: dict, tied: bool) -> dict[str, torch.Tensor]:
    emb = next(v for k, v in state.items() if k.endswith("embed_tokens.weight"))
    return {"embed_tokens": emb, "lm_head": emb if tied else state["lm_head.weight"]}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("padding_rows", [8, 0], ids=["padding-row", "resize"])
def test_train_new_token_tied_and_untied(rows, tmp_path, tied, padding_rows):
    """Only the new rows are parameters and only they are saved; every other embedding row stays bit-identical."""
    from conftest import build_tiny_model

    data, eval_data = rows
    model_dir = build_tiny_model(tmp_path / "base", tie=tied, padding_rows=padding_rows)
    run = build_trainer(**_settings(data, tmp_path / "run", model_dir, eval_data=eval_data, add_token=["<sep>"],
                             max_steps=4, eval_steps=2, merge=True, weight_decay=0.5, precision="fp32"))
    out = run.fit()
    record = json.loads((out / TRAIN_RECORD).read_text())
    token = record["new_tokens"]["tokens"][0]
    sid = token["id"]
    assert token["padding_row_reused"] == (padding_rows > 0)
    assert record["new_tokens"]["embedding_rows"]["resized"] == (padding_rows == 0)
    assert record["steps"] == 4 and record["data"]["sources"] == {"task": 8, "diverse": 8}
    assert record["peft"]["modules_to_save"] is None
    assert record["peft"]["trainable_token_indices"] == ([sid] if tied else {"embed_tokens": [sid], "lm_head": [sid]})
    hidden = 64
    lora = sum(p.numel() for n, p in run.trainer.model.named_parameters() if "lora_" in n)
    assert record["peft"]["trainable_params"] == lora + hidden * (1 if tied else 2)
    assert {"torch", "transformers", "trl", "peft"} <= set(record["versions"]) and record["data"]["sha256"]
    assert record["tokens_trained"] > 0 and not (out / "checkpoints").exists()

    saved = load_file(str(out / "adapter_model.safetensors"))  # LoRA and the new rows, nothing else
    rows_saved = {k: v for k, v in saved.items() if "lora_" not in k}
    assert {k.split(".")[-3]: tuple(v.shape) for k, v in rows_saved.items()} == (
        {"embed_tokens": (1, hidden)} if tied else {"embed_tokens": (1, hidden), "lm_head": (1, hidden)})
    assert all(k.endswith("token_adapter.trainable_tokens_delta") for k in rows_saved)
    assert sum(v.numel() for v in saved.values()) == record["peft"]["trainable_params"]
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["trainable_token_indices"] == record["peft"]["trainable_token_indices"]

    base = _embedding_matrices(load_file(str(model_dir / "model.safetensors")), tied)
    merged_state = load_file(str(out / "merged" / "model.safetensors"))
    merged = _embedding_matrices(merged_state, tied or "lm_head.weight" not in merged_state)
    for name in ("embed_tokens", "lm_head"):
        n_base = base[name].shape[0]
        assert merged[name].shape[0] == (n_base if padding_rows else n_base + 1)
        keep = [i for i in range(min(n_base, merged[name].shape[0])) if i != sid]
        assert torch.equal(merged[name][keep], base[name][keep])  # bit-identical: no update, no weight decay
        row = rows_saved[next(k for k in rows_saved if name in k)] if not tied or name == "embed_tokens" else None
        if row is not None:
            assert torch.equal(merged[name][sid], row[0])
    emb_row = merged["embed_tokens"][sid]
    assert abs(float(emb_row.norm()) - token["init_norm"]) > 1e-4  # the new row was trained from its init
    assert torch.equal(merged["embed_tokens"][sid], merged["lm_head"][sid]) == tied

    log = [json.loads(x) for x in (out / TRAINER_LOG).read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    important = [json.loads(x) for x in (out / "important_token_loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in important] == [0, 2, 4]
    assert all(r["count"] == 3 and r["per_token"]["<sep>"]["count"] == 3 and r["prompt_loss"] for r in important)
    assert important[0]["loss"] != important[-1]["loss"]

    # the trained model in memory, the reloaded adapter and the merged model score the new token alike
    trained = run.trainer.model.eval().to("cpu")  # compared on the CPU, also after training on a GPU
    model, tok = load_trained(out, device="cpu")
    assert tok.convert_tokens_to_ids("<sep>") == sid and not model.training
    merged_model = type(model.get_base_model()).from_pretrained(out / "merged")
    x = torch.tensor([tok("Check <sep> now <sep>")["input_ids"]])
    assert sid in x[0].tolist()
    with torch.no_grad():
        expected = trained(input_ids=x).logits
        torch.testing.assert_close(model(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged_model(input_ids=x).logits, expected, atol=1e-4, rtol=1e-4)
    # generation that must emit the new token: the same greedy choice after reload
    prompt = tok.apply_chat_template([{"role": "user", "content": "Check item 1 in the <sep> format."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        lp = [torch.log_softmax(m(**prompt).logits[0, -1], -1)[sid] for m in (trained, model, merged_model)]
    torch.testing.assert_close(lp[1], lp[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp[2], lp[0], atol=1e-4, rtol=1e-4)
    if tied:
        assert merged_model.get_input_embeddings().weight.data_ptr() == \
            merged_model.get_output_embeddings().weight.data_ptr()
    model.merge_adapter()  # what `delia eval --adapter` does before generating
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_token_rows_fast_path_matches_peft(rows, tmp_path, tiny_model, tiny_model_untied, tied, monkeypatch):
    """delia's row-only path gives PEFT's loss bit for bit and its gradients (new rows, LoRA) to rounding."""
    import delia.training.token_rows as token_rows

    data, _ = rows
    model_dir = tiny_model if tied else tiny_model_untied

    def loss_and_grads(name):
        run = build_trainer(**_settings(data, tmp_path / name, model_dir, add_token=["<sep>", "<x>"]))
        trainer = run.trainer
        base = trainer.model.get_base_model()
        fast_parts = ["_fast_token_rows" in f.__code__.co_qualname for f in (
            base.get_input_embeddings().token_adapter.forward, vars(base)["forward"])]
        assert fast_parts == [name == "fast"] * 2
        batch = next(iter(trainer.get_train_dataloader()))
        batch["input_ids"][:, 3] = run.record["new_tokens"]["tokens"][1]["id"]  # a new token as input
        batch["labels"][:, -2] = run.record["new_tokens"]["tokens"][0]["id"]  # and as a target
        trainer.model.train()
        torch.manual_seed(0)
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    fast_loss, fast = loss_and_grads("fast")
    monkeypatch.setattr(token_rows, "_fast_token_rows", lambda trainer: None)
    peft_loss, reference = loss_and_grads("peft")
    assert torch.equal(fast_loss, peft_loss)
    assert fast.keys() == reference.keys() and sum("trainable_tokens_delta" in n for n in fast) == (1 if tied else 2)
    for name in fast:
        assert reference[name].abs().sum() > 0 or "lora_A" in name, name  # lora_B starts at zero
        torch.testing.assert_close(fast[name], reference[name], atol=1e-6, rtol=1e-4, msg=name)


def test_train_rows_all_keeps_the_matrix_copy(rows, tmp_path, tiny_model_untied):
    """`--train-rows all`: PEFT modules_to_save copies of the embedding and the untied head, all rows trained."""
    data, _ = rows
    out = train(**_settings(data, tmp_path / "run", tiny_model_untied, add_token=["<sep>"], train_rows="all",
                            max_steps=2))
    record = json.loads((out / TRAIN_RECORD).read_text())
    assert record["peft"]["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert record["peft"]["trainable_token_indices"] is None
    saved = load_file(str(out / "adapter_model.safetensors"))
    emb = next(v for k, v in saved.items() if k.endswith("embed_tokens.weight"))
    base = load_file(str(tiny_model_untied / "model.safetensors"))["model.embed_tokens.weight"]
    assert emb.shape == base.shape and not torch.equal(emb[:-8], base[:-8])  # old rows trained too
    model, tok = load_trained(out, device="cpu")
    assert tok.convert_tokens_to_ids("<sep>") == record["new_tokens"]["tokens"][0]["id"]


def _check_plain_peft(out, cwd):
    """Load the adapter in a fresh interpreter with transformers + peft only; it generates and its logits match."""
    reference, tok = load_trained(out, device="cpu")
    x = tok("Check <sep> now")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([x])).logits[0, -1].tolist()
    script = textwrap.dedent(f"""
        import json, sys, torch
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer
        model = AutoPeftModelForCausalLM.from_pretrained({str(out)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        ids = tok.apply_chat_template([{{"role": "user", "content": "Check <sep> now"}}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
        with torch.no_grad():
            last = model(input_ids=torch.tensor([{x}])).logits[0, -1].tolist()
        print(json.dumps({{"delia": any(m.split(".")[0] == "delia" for m in sys.modules), "new": gen.shape[1] -
                          ids["input_ids"].shape[1], "last": last}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["delia"] is False and got["new"] >= 1
    torch.testing.assert_close(torch.tensor(got["last"]), torch.tensor(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_adapter_loads_with_plain_peft(rows, tmp_path, tiny_model, tiny_model_untied, tied):
    data, _ = rows
    out = train(**_settings(data, tmp_path / "run", tiny_model if tied else tiny_model_untied, add_token=["<sep>"],
                            max_steps=2))
    _check_plain_peft(out, tmp_path)


def test_resume_after_a_crash(rows, tmp_path, tiny_model, monkeypatch):
    from transformers import Trainer

    data, _ = rows
    kw = {"max_steps": 6, "save_steps": 2, "add_token": ["<sep>"]}
    full = train(**_settings(data, tmp_path / "full", tiny_model, **kw))

    real_step, calls = Trainer.training_step, {"n": 0}

    def crash_after_five(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("killed")
        return real_step(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", crash_after_five)
    with pytest.raises(RuntimeError, match="killed"):
        train(**_settings(data, tmp_path / "cut", tiny_model, **kw))
    monkeypatch.setattr(Trainer, "training_step", real_step)
    assert not (tmp_path / "cut" / TRAIN_RECORD).exists()
    with pytest.raises(DeliaError, match="`resume`"):
        train(**_settings(data, tmp_path / "cut", tiny_model, **kw))
    with pytest.raises(DeliaError, match="max_steps"):
        train(**_settings(data, tmp_path / "cut", tiny_model, **{**kw, "max_steps": 7}, resume=True))

    out = train(**_settings(data, tmp_path / "cut", tiny_model, **kw, resume=True))
    record = json.loads((out / TRAIN_RECORD).read_text())
    assert record["steps"] == 6 and record["resumed_from"].endswith("checkpoint-4")
    _assert_same_six_steps(full, out)
    with pytest.raises(DeliaError, match="finished training run"):
        train(**_settings(data, tmp_path / "cut", tiny_model, **kw))


_KILL_SCRIPT = textwrap.dedent("""
    import io, json, os, shutil, signal, sys
    from pathlib import Path
    import torch
    from delia.training import train

    settings, kill_at = json.loads(sys.argv[1]), sys.argv[2]
    real_save, real_rmtree = torch.save, shutil.rmtree

    def save(obj, f, *a, **k):  # the trainer writes half of checkpoint-4's optimizer state, then the process dies
        if kill_at == "optimizer" and str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            with open(f, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)

    def rmtree(path, *a, **k):  # checkpoint-4 is complete; the process dies while removing checkpoint-2
        if kill_at == "prune" and Path(path).name == ".checkpoint-2.deleting" and Path(path).exists():
            next(p for p in Path(path).iterdir() if p.is_file()).unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *a, **k)

    torch.save, shutil.rmtree = save, rmtree
    train(**settings)
""")


@pytest.mark.parametrize("kill_at", ["optimizer", "prune"])
def test_sigkill_mid_save_then_resume(rows, tmp_path, tiny_model, kill_at):
    """A SIGKILL inside the checkpoint save (or inside the removal of the older one) leaves a usable checkpoint:
    the resumed run ends with the same steps, each logged once, and the same weights as an uninterrupted run."""
    import signal

    import delia

    data, _ = rows
    kw = {"max_steps": 6, "save_steps": 2, "add_token": ["<sep>"]}
    full = train(**_settings(data, tmp_path / "full", tiny_model, **kw, keep_checkpoints=True))
    full_record = json.loads((full / TRAIN_RECORD).read_text())
    def held(folder):  # what is in OUT/checkpoints but the model card the trainer writes there
        return sorted(p.name for p in (folder / CHECKPOINTS).iterdir() if p.name != "README.md")

    assert held(full) == ["checkpoint-6", RESUME_KEY_FILE]
    newest = full / CHECKPOINTS / "checkpoint-6"
    assert full_record["checkpoint_bytes"] == sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()
                                                  and f.name != "delia_checkpoint.json")
    # what --resume needs: the adapter (LoRA + the new row), its optimizer state, small trainer files
    assert full_record["checkpoint_bytes"] < 3 * (full / "adapter_model.safetensors").stat().st_size + 200_000

    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(delia.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, json.dumps(_settings(data, cut, tiny_model, **kw)),
                           kill_at], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    left = held(cut)
    if kill_at == "optimizer":  # the previous checkpoint, and the one the kill cut short
        assert left == ["checkpoint-2", "checkpoint-4", RESUME_KEY_FILE]
        assert not (cut / CHECKPOINTS / "checkpoint-4" / "delia_checkpoint.json").exists()
    else:  # the new, complete checkpoint, and what was left of the older one
        assert left == [".checkpoint-2.deleting", "checkpoint-4", RESUME_KEY_FILE]

    out = train(**_settings(data, cut, tiny_model, **kw, resume=True))
    record = json.loads((out / TRAIN_RECORD).read_text())
    assert record["steps"] == 6
    assert record["resumed_from"].endswith("checkpoint-2" if kill_at == "optimizer" else "checkpoint-4")
    _assert_same_six_steps(full, out)


def _assert_same_six_steps(full: Path, out: Path) -> None:
    """A resumed run logged steps 1-6 once each and ends with the uninterrupted run's adapter."""
    log = [json.loads(x) for x in (out / TRAINER_LOG).read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [RESUME_KEY_FILE, LEGACY_RESUME_KEY_FILE])
def test_resume_key_read_under_its_name_and_its_earlier_one(rows, tmp_path, tiny_model, name):
    data, _ = rows
    kw = _settings(data, tmp_path / "run", tiny_model, max_steps=6)
    ckpt = tmp_path / "run" / CHECKPOINTS
    build_trainer(**kw)  # writes the resume key of these settings
    key = (ckpt / RESUME_KEY_FILE).read_text()

    def only_under_name() -> None:
        (ckpt / RESUME_KEY_FILE).unlink()
        (ckpt / name).write_text(key)

    only_under_name()
    build_trainer(**kw, resume=True)  # the same settings, read from `name`: accepted
    only_under_name()
    with pytest.raises(DeliaError, match="max_steps"):
        build_trainer(**{**kw, "max_steps": 7}, resume=True)


def test_cli_yaml_config(rows, tmp_path, tiny_model):
    from delia.cli import main

    data, _ = rows
    cfg = tmp_path / "train.yaml"
    cfg.write_text(textwrap.dedent(f"""
        model: {tiny_model}
        add_token: ["<sep>=answer as a dict with a thought and a label"]
        token_init: description
        lora_r: 4
        max_steps: 1
        max_length: 128
        batching: random
    """))
    with pytest.raises(SystemExit) as done:
        main(["train", str(data), str(tmp_path / "run"), "--config", str(cfg), "--lora-alpha", "8"])
    assert done.value.code == 0
    record = json.loads((tmp_path / "run" / TRAIN_RECORD).read_text())
    assert record["settings"]["lora_r"] == 4 and record["settings"]["lora_alpha"] == 8
    assert record["new_tokens"]["tokens"][0]["description"] == "answer as a dict with a thought and a label"
    assert record["new_tokens"]["init"] == "description"
    adapter_cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and sorted(adapter_cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


@pytest.mark.e2e
def test_smollm2_sep_task(delia_format_data, tmp_path):
    """The authors' <sep> task on SmolLM2-135M: a new row beyond the vocabulary (resize), a few steps."""
    out = train(delia_format_data / "train.jsonl", tmp_path / "run", eval_data=delia_format_data / "eval.jsonl",
                add_token=["<sep>"], max_steps=3, eval_steps=3, batch_size=2, max_length=512, warmup_steps=0)
    record = json.loads((out / TRAIN_RECORD).read_text())
    assert record["steps"] == 3 and record["new_tokens"]["tokens"][0]["token"] == "<sep>"
    important = [json.loads(x) for x in (out / "important_token_loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in important] == [0, 3] and important[0]["count"] > 0
    model, tok = load_trained(out, device="cpu")
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hi. <sep>"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    weights = load_file(str(out / "adapter_model.safetensors"))  # LoRA + the trained embedding copies only
    assert not [k for k in weights if "original_module" in k or "lora" not in k and "embed_tokens" not in k
                and "lm_head" not in k]
    _check_plain_peft(out, tmp_path)  # the base is resized to the saved tokenizer by PEFT itself


def test_two_cpu_processes_with_accelerate(rows, tmp_path, tiny_model):
    """`accelerate launch -m delia train` with the shipped CPU config: two gloo processes, one adapter."""
    data, eval_data = rows
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu.yaml"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "delia", "train",
           str(data), str(out), "--model", str(tiny_model), "--eval-data", str(eval_data), "--add-token", "<sep>",
           "--max-steps", "2", "--eval-steps", "2", "--batch-size", "2", "--max-length", "128"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})  # CPU processes
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / TRAIN_RECORD).read_text())
    assert record["processes"] == 2 and record["steps"] == 2
    important = [json.loads(x) for x in (out / "important_token_loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in important] == [0, 2]  # written once, by the main process
    model, tok = load_trained(out, device="cpu")
    assert tok.convert_tokens_to_ids("<sep>") == record["new_tokens"]["tokens"][0]["id"]


def test_progress_callback_and_logs_instead_of_printing(rows, tmp_path, tiny_model, caplog, capsys):
    """Training reports optimizer steps to the caller's callback and its logs to the `delia.training.trainer` logger;
    transformers prints nothing."""
    import logging

    data, _ = rows
    events = []
    with caplog.at_level(logging.INFO, logger="delia"):
        train(**_settings(data, tmp_path / "run", tiny_model, max_steps=3), progress=events.append)
    assert [(e.task, e.done, e.total) for e in events] == [("training", i, 3) for i in (1, 2, 3)]
    assert any(r.name == "delia.training.trainer" and r.getMessage().startswith("step 1: loss=")
               for r in caplog.records)
    assert "'loss'" not in capsys.readouterr().out  # transformers' PrinterCallback would print the log dicts


def test_train_config_errors_name_the_field():
    from delia.config import ConfigError
    from delia.training import TrainConfig

    with pytest.raises(ConfigError, match="field 'lora_r': lora_r must be >= 1, got 0"):
        TrainConfig.build(lora_r=0)
    with pytest.raises(ConfigError, match=r"unknown batching 'pack'; .*\(did you mean 'packing'\?\)"):
        TrainConfig(batching="random").build(batching="pack")
    with pytest.raises(ConfigError, match="'lerning_rate' is not an option of delia train .did you mean"):
        TrainConfig.build(lerning_rate=1e-3)
    cfg = TrainConfig.build(TrainConfig.build(lora_r=4), seed=3)  # options set on top of a config
    assert (cfg.lora_r, cfg.seed, cfg.lora_alpha) == (4, 3, 16)


@pytest.mark.parametrize(("spec", "layers"), [("upper-half", [1]), ("lower-half", [0]), ("1", [1]), ("0-1", [0, 1])])
def test_layers_leaves_the_other_layers_without_lora(rows, tmp_path, tiny_model, spec, layers):
    from safetensors.torch import load_file


    data, _ = rows
    out = train(**_settings(data, tmp_path / "run", tiny_model, max_steps=1, layers=spec))
    keys = load_file(out / "adapter_model.safetensors").keys()
    adapted = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in keys if "lora_" in k})
    assert adapted == layers
    assert json.loads((out / TRAIN_RECORD).read_text())["peft"]["layers"] == (layers if spec != "0-1" else [0, 1])


def test_layers_names_the_model_s_layers_when_out_of_range(rows, tmp_path, tiny_model):
    from delia.errors import DeliaError
    from delia.training import layer_indices

    assert layer_indices(None, 4) is None and layer_indices("upper-half", 5) == [2, 3, 4]
    with pytest.raises(DeliaError, match="the model has layers 0 to 1"):
        layer_indices("1-3", 2)
    with pytest.raises(DeliaError, match="layers"):
        train(**_settings(rows[0], tmp_path / "bad", tiny_model, max_steps=1, layers="upper"))
