"""Generated tokens/s of the sampling engine behind `delia sample --backend hf` against a naive loop
(one prompt at a time through `model.generate`), same model, prompts, sampling settings and token
budget, in one process. Also prints the share of the machine's measured matmul FLOP/s each reaches
(2 x parameters x tokens/s), and how full the continuous batch stayed.

    flock /tmp/delia-heavy.lock .venv/bin/python benchmarks/sample_throughput.py
    .venv/bin/python benchmarks/sample_throughput.py --pool queries.jsonl --queries 64 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from delia.backends import SamplingParams
from delia.backends.hf import MAX_ROWS_CPU, HFBackend
from delia.data import first_turns, read_chat
from delia.models import DEFAULT_MODEL, load_model
from delia.prompts import delia_prompt, prompt_ids

# Diverse, real instructions (the kind of pool DELIA samples from), answered zero-shot here.
QUERIES = [
    "What causes the seasons on Earth?",
    "Write a haiku about autumn leaves.",
    "Explain the difference between a list and a tuple in Python.",
    "Give me three tips for a job interview.",
    "Translate 'Where is the train station?' into French.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do vaccines train the immune system?",
    "Write a SQL query that counts orders per customer.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Suggest a name for a bakery that sells only bread.",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
    "Write a short thank-you note to a colleague who helped me move.",
    "What is 15% of 240? Show the steps.",
    "Explain recursion to a ten-year-old.",
    "What are the health benefits of walking every day?",
    "Describe how a bill becomes a law in the United States.",
    "Write a limerick about a cat who loves boxes.",
    "What is the difference between weather and climate?",
    "Give a recipe for a simple tomato soup.",
    "How does a hash table work?",
    "What should I pack for a three-day hiking trip?",
    "Explain what inflation is in simple terms.",
    "Write a Python function that reverses a string.",
]


def matmul_flops(n: int = 1536, reps: int = 6) -> float:
    """Best measured fp32 matmul FLOP/s of this process's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def naive(model, tok, prompts: list[list[int]], params: SamplingParams) -> tuple[int, float]:
    """One prompt at a time, the way the authors' HF path and most scripts do it."""
    eos = tok.eos_token_id
    tokens, t = 0, time.perf_counter()
    torch.manual_seed(params.seed)
    for p in prompts:
        ids = torch.tensor([p])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=params.temperature, top_p=params.top_p,
                                 max_new_tokens=params.max_new_tokens, pad_token_id=tok.pad_token_id)
        gen = out[0, len(p):].tolist()
        tokens += gen.index(eos) + 1 if eos in gen else len(gen)
    return tokens, time.perf_counter() - t


def batched(backend: HFBackend, prompts: list[list[int]], params: SamplingParams) -> tuple[int, float, float]:
    """(tokens, seconds, mean rows per decode step)."""
    t = time.perf_counter()
    tokens = sum(c.completion_tokens for _, c in backend.generate(prompts, params))
    seconds = time.perf_counter() - t
    return tokens, seconds, backend.stats["row_steps"] / max(backend.stats["decode_steps"], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--pool", type=Path, help="query pool (any format delia reads); default: built-in queries")
    ap.add_argument("--queries", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--skip-stage", action="store_true", help="skip the end-to-end `sample()` run")
    args = ap.parse_args()

    model, tok = load_model(args.model, device="cpu")
    if args.pool:
        records = read_chat(args.pool, require_assistant=False).records
        queries = [first_turns(r)[0] for r in records][: args.queries]
    else:
        queries = (QUERIES * (args.queries // len(QUERIES) + 1))[: args.queries]
    prompts = [prompt_ids(tok, delia_prompt(q, None, "zero-shot")) for q in queries]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    backend = HFBackend(model, tok, batch_size)
    print(f"model {args.model}: {n_params / 1e6:.1f} M parameters, fp32, {torch.get_num_threads()} threads; "
          f"{len(prompts)} prompts, max_new_tokens={params.max_new_tokens}, temperature={params.temperature}, "
          f"top_p={params.top_p}")

    warm = SamplingParams(max_new_tokens=4)
    naive(model, tok, prompts[:1], warm)
    batched(backend, prompts[:2], warm)
    peak = matmul_flops()
    print(f"measured fp32 matmul: {peak / 1e9:.1f} GFLOP/s")

    n_tok, n_sec = naive(model, tok, prompts, params)
    b_tok, b_sec, occupancy = batched(backend, prompts, params)
    n_rate, b_rate = n_tok / n_sec, b_tok / b_sec
    for name, tokens, seconds, rate in (("naive loop", n_tok, n_sec, n_rate), ("delia hf", b_tok, b_sec, b_rate)):
        print(f"{name:>11}: {tokens:6d} tokens in {seconds:6.1f} s = {rate:7.1f} tokens/s, "
              f"{2 * n_params * rate / peak:6.1%} of measured matmul FLOP/s")
    print(f"speed-up: {b_rate / n_rate:.2f}x (mean rows per decode step: {occupancy:.1f} of at most "
          f"{min(len(prompts), MAX_ROWS_CPU)})")

    if not args.skip_stage:
        from delia.files import write_jsonl
        from delia.sample import sample

        with tempfile.TemporaryDirectory() as tmp:
            pool = Path(tmp) / "pool.jsonl"
            write_jsonl(pool, [{"messages": [{"role": "user", "content": q}]} for q in queries])
            s = sample(pool, Path(tmp) / "out.jsonl", model=args.model, mode="zero-shot", device="cpu",
                       max_new_tokens=params.max_new_tokens, batch_size=str(args.batch_size), progress=False)
        print(f"`delia sample` end to end (model load, prompts, filters, fsynced writes included): "
              f"{s['completion_tokens']} tokens in {s['wall_s']:.1f} s = {s['tokens_per_s']:.1f} tokens/s "
              f"({s['tokens_per_s'] / n_rate:.2f}x the naive loop); kept {s['kept']}, rejected {s['rejected']}")


if __name__ == "__main__":
    main()
