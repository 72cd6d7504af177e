"""Training throughput of `delia.training.train` against a plain TRL SFTTrainer script, and padding waste.

On a realistic DELIA mixture (the authors' `<sep>` task rows, read in place from
../shared/data/delia-format, plus synthetic diverse rows with long answers), in one process, after
one discarded warm-up step:

1. trained tokens/s (non-padding tokens, TRL's `num_tokens`, over `train_runtime`) of delia and of a
   plain SFTTrainer script with the same model, data and settings, run alternately; ratio >= 0.95.
2. seconds per training step with one new token (`--add-token "<sep>"`) over the same step without it
   (target <= 1.1), and the adapter's size against LoRA-only + the new rows.
3. padding waste (padding / all positions over one epoch of the real dataloader), the share of
   positions that carry loss, and measured tokens/s for each batching mode (random order, length
   grouping, packing). Packing keeps rows whose response was cut off by max_length (TRL drops them
   otherwise), so its real tokens include context-only rows that train nothing.

    flock /tmp/delia-heavy.lock .venv/bin/python benchmarks/train_throughput.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "delia-format"
WORDS = ["the", "model", "answers", "each", "question", "with", "care", "and", "detail", "so", "that", "a",
         "reader", "can", "follow", "every", "step", "of", "its", "reasoning", "about", "history", "science",
         "language", "cooking", "travel", "music", "sport", "many", "other", "topics", "in", "turn"]


def build_mixture(folder: Path, ratio: int, seed: int = 0) -> Path:
    """The shared task rows (read in place) plus `ratio` synthetic diverse rows per task row, by `delia mix`."""
    from delia.data import read_chat
    from delia.mix import mix

    task = SHARED / "train.jsonl"
    rng = random.Random(seed)
    diverse = folder / "diverse.jsonl"
    with open(diverse, "w", encoding="utf-8") as fh:
        for i in range(len(read_chat(task).records) * ratio):
            query = " ".join(rng.choices(WORDS, k=rng.randint(6, 30))) + "?"
            n = min(int(rng.lognormvariate(5.0, 0.7)), 900)  # median ~150 words, long tail
            answer = " ".join(rng.choices(WORDS, k=max(n, 20))) + "."
            fh.write(json.dumps({"messages": [{"role": "user", "content": query},
                                              {"role": "assistant", "content": answer}],
                                 "id": f"d{i}", "meta": {}}) + "\n")
    out = folder / "mix.jsonl"
    mix(task, diverse, out, ratio=ratio, seed=seed, tokenizer="")
    return out


def common_settings(args: argparse.Namespace) -> dict:
    return {"max_steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
            "learning_rate": 2e-4, "warmup_steps": 0, "logging_steps": 1, "save_steps": 10_000, "seed": 0,
            "precision": "fp32"}  # as the plain TRL script (bf16=False), on any device


def tokens_per_s(log_history: list[dict]) -> tuple[int, float, float]:
    tokens = max(r["num_tokens"] for r in log_history if "num_tokens" in r)
    runtime = next(r["train_runtime"] for r in log_history if "train_runtime" in r)
    return int(tokens), runtime, tokens / runtime


def run_delia(data: Path, out: Path, model: str, settings: dict, batching: str) -> tuple[int, float, float]:
    from delia.training import TRAINER_LOG, train

    train(data, out, model=model, batching=batching, overwrite=True, **settings)
    return tokens_per_s([json.loads(x) for x in (out / TRAINER_LOG).read_text().splitlines()])


def new_token_cost(data: Path, tmp: Path, model: str, settings: dict, rounds: int) -> None:
    """Step time with one new token (`--add-token "<sep>"`, PEFT trainable tokens) over the same run without it.

    Same process, same rows, same settings, alternating the order each round; median over the rounds. With
    the token, `<sep>` in the task rows becomes one token instead of several, so tokens differ slightly: the
    ratio is of seconds per optimizer step. A third arm runs the token through PEFT's own path (whole-matrix
    merge, TRL's full head gradient; only the `bias` fix), without delia's row-only path, for comparison.
    Also the adapter sizes against the bound LoRA + the new rows.
    """
    import delia.training.token_rows as token_rows
    from delia.artifacts import TrainRecord

    times: dict[str, list[float]] = {"none": [], "token": [], "token-peft": []}
    sizes: dict[str, int] = {}
    payload: dict[str, int] = {}
    record: TrainRecord | None = None
    fast = token_rows._fast_token_rows
    for r in range(rounds):
        arms = [("none", {}), ("token", {"add_token": ["<sep>"]}), ("token-peft", {"add_token": ["<sep>"]})]
        for name, extra in arms[::-1] if r % 2 else arms:
            out = tmp / f"tok-{name}{r}"
            token_rows._fast_token_rows = fast if name != "token-peft" else (lambda trainer: None)
            try:
                tokens, runtime, tps = run_delia(data, out, model, {**settings, **extra}, "group_by_length")
            finally:
                token_rows._fast_token_rows = fast
            times[name].append(runtime / settings["max_steps"])
            sizes[name] = (out / "adapter_model.safetensors").stat().st_size
            payload[name] = tensor_bytes(out / "adapter_model.safetensors")
            if name == "token":
                record = TrainRecord.read(out)
            print(f"   round {r} {name:10s}: {runtime / settings['max_steps']:.3f} s/step, {tokens} tokens, "
                  f"{tps:.1f} tokens/s")
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["token"] / med["none"]
    print(f"   median s/step: with one new token {med['token']:.3f}, without {med['none']:.3f}: ratio {ratio:.3f} "
          f"({'PASS' if ratio <= 1.1 else 'FAIL'}: <= 1.1 required); PEFT's own path {med['token-peft']:.3f}: "
          f"ratio {med['token-peft'] / med['none']:.3f}")
    from transformers import AutoConfig

    assert record is not None and record.new_tokens is not None
    hidden = AutoConfig.from_pretrained(record.model.path).hidden_size
    rows = len(record.new_tokens.tokens) * (1 if record.new_tokens.tied_embeddings else 2)
    bound = payload["none"] + rows * hidden * 4
    print(f"   adapter_model.safetensors: LoRA only {sizes['none']:,} bytes ({payload['none']:,} of tensors); with the "
          f"token {sizes['token']:,} bytes ({payload['token']:,} of tensors); bound LoRA + {rows} fp32 row(s) of "
          f"{hidden} = {bound:,} bytes of tensors ({'PASS' if payload['token'] <= bound else 'FAIL'}; the file adds "
          f"{sizes['token'] - sizes['none'] - (payload['token'] - payload['none'])} bytes of header for the new entry)")


def tensor_bytes(path: Path) -> int:
    """Bytes of the tensors in a safetensors file (the file adds a JSON header naming them)."""
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(str(path)).values())


def run_plain_trl(data: Path, out: Path, model: str, settings: dict, batching: str) -> tuple[int, float, float]:
    """What a user would write by hand with TRL: same model, rows, LoRA and SFTConfig settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from delia.models import resolve_model

    set_seed(settings["seed"])
    path = resolve_model(model)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        processing_class=AutoTokenizer.from_pretrained(path),
        train_dataset=ds,
        peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        args=SFTConfig(output_dir=str(out), report_to=[], bf16=False, activation_checkpointing=False,
                       max_steps=settings["max_steps"], per_device_train_batch_size=settings["batch_size"],
                       max_length=settings["max_length"], learning_rate=settings["learning_rate"],
                       lr_scheduler_type="constant_with_warmup", warmup_steps=0, weight_decay=0.01,
                       logging_steps=1, save_strategy="no", seed=settings["seed"], data_seed=settings["seed"],
                       dataloader_pin_memory=False, packing=batching == "packing",
                       train_sampling_strategy="group_by_length" if batching == "group_by_length" else "random"),
    )
    trainer.train()
    return tokens_per_s(trainer.state.log_history)


def padding_waste(data: Path, out: Path, model: str, settings: dict, batching: str) -> dict:
    """Padding share over one epoch of the dataloader delia builds for this batching mode."""
    from delia.training import build_trainer

    run = build_trainer(data, out, **{**settings, "model": model, "batching": batching, "overwrite": True,
                                      "max_steps": -1})
    real = total = batches = loss = 0
    for batch in run.trainer.get_train_dataloader():
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real += int(mask.sum()) if mask is not None else ids.numel()
        loss += int((batch["labels"] != -100).sum())
        total += ids.numel()
        batches += 1
    return {"real_tokens": real, "loss_tokens": loss, "positions": total, "batches": batches,
            "waste": 1 - real / total, "loss_share": loss / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=int, default=3, help="diverse rows per task row")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="alternating delia/TRL pairs (median taken)")
    p.add_argument("--only", choices=["all", "new-token"], default="all", help="new-token: section 2 only")
    args = p.parse_args()

    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    settings = common_settings(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = build_mixture(tmp, args.ratio)
        rows = [json.loads(x) for x in data.read_text().splitlines()]
        default = "group_by_length"
        n_task = sum(r["source"] == "task" for r in rows)
        print(f"model {args.model}; {n_task} task rows + {len(rows) - n_task} diverse rows; "
              f"{args.steps} steps x batch {args.batch_size}, max_length {args.max_length}; "
              f"torch threads {torch.get_num_threads()}")

        run_plain_trl(data, tmp / "warmup", args.model, {**settings, "max_steps": 1}, default)  # one-time costs
        if args.only == "new-token":
            print("\n2. one new token (PEFT trainable tokens) vs none: seconds per step, same process and data")
            new_token_cost(data, tmp, args.model, settings, args.rounds)
            print(f"\ntotal {time.perf_counter() - t0:.0f} s")
            return
        print("\n1. delia train vs plain TRL SFTTrainer (same settings, batching = group_by_length)")
        delia_tps, trl_tps = [], []
        for r in range(args.rounds):
            pair = [("trl", run_plain_trl, trl_tps), ("delia", run_delia, delia_tps)]
            for name, fn, acc in pair[::-1] if r % 2 else pair:  # alternate who goes first
                tokens, runtime, tps = fn(data, tmp / f"{name}{r}", args.model, settings, default)
                acc.append(tps)
                print(f"   round {r} {name:5s}: {tokens} tokens in {runtime:.2f} s = {tps:.1f} tokens/s")
        ratio = statistics.median(delia_tps) / statistics.median(trl_tps)
        print(f"   median delia {statistics.median(delia_tps):.1f} tokens/s, TRL {statistics.median(trl_tps):.1f}"
              f" tokens/s: ratio {ratio:.3f} ({'PASS' if ratio >= 0.95 else 'FAIL'}: >= 0.95 required)")
        from delia.compute import TRAIN_FORWARDS, forward_flops, measure_matmul_flops
        from delia.models import resolve_model

        # the peak of the device that trained (fp32, as the runs above): a GPU's, or this CPU's
        peak = measure_matmul_flops(8192, device="cuda") if torch.cuda.is_available() else measure_matmul_flops()
        path = resolve_model(args.model)
        per_token = TRAIN_FORWARDS * forward_flops(path, args.max_length)
        achieved = per_token * statistics.median(delia_tps)
        print(f"   delia {achieved / 1e9:.1f} GFLOP/s ({TRAIN_FORWARDS} forwards per trained token, delia.compute) = "
              f"{100 * achieved / peak:.1f}% of the measured {peak / 1e9:.0f} GFLOP/s matmul peak (target 40%)")
        # on CPU delia's LM head projects only the positions with a label (delia.patches.trl_label_positions): less
        # is executed
        config = transformers.AutoConfig.from_pretrained(path).get_text_config()
        head = TRAIN_FORWARDS * 2 * config.hidden_size * config.vocab_size
        waste = padding_waste(data, tmp / "pad-share", args.model, settings, default)
        executed = (per_token - head * (1 - waste["loss_tokens"] / waste["real_tokens"])) * statistics.median(
            delia_tps)
        print(f"   executed, without the LM head at the {100 - 100 * waste['loss_tokens'] / waste['real_tokens']:.0f}%"
              f" of tokens that have no label: {executed / 1e9:.1f} GFLOP/s = {100 * executed / peak:.1f}% of peak")

        print("\n2. one new token (PEFT trainable tokens) vs none: seconds per step, same process and data")
        new_token_cost(data, tmp, args.model, settings, args.rounds)

        print("\n3. padding waste over one epoch and measured throughput per batching mode (delia train)")
        results = {}
        for mode in ("random", "group_by_length", "packing"):
            waste = padding_waste(data, tmp / f"pad-{mode}", args.model, settings, mode)
            tps = statistics.median(delia_tps) if mode == default else run_delia(
                data, tmp / f"tps-{mode}", args.model, settings, mode)[2]
            loss_tps = tps * waste["loss_tokens"] / waste["real_tokens"]
            results[mode] = loss_tps
            print(f"   {mode:16s}: {waste['batches']:3d} batches, {waste['positions']:6d} positions, "
                  f"{waste['real_tokens']:6d} real tokens ({waste['loss_tokens']:6d} with loss), padding waste "
                  f"{100 * waste['waste']:5.1f}%, positions with loss {100 * waste['loss_share']:5.1f}%, "
                  f"{tps:.1f} tokens/s = {loss_tps:.1f} loss tokens/s")
        print(f"   most loss tokens/s: {max(results, key=results.__getitem__)}; delia's default: {default}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
