"""Throughput of the sampling engine behind `delia sample --backend hf` against a naive loop (one prompt at a
time through `model.generate`), same model, prompts, sampling settings and token limit, in one process: tokens/s,
achieved FLOP/s (2 x parameters x prompt and generated tokens per second) and its share of the machine's
measured fp32 matmul FLOP/s, and how full the continuous batch stayed.

The default workload is the demo's own: every query of the demo pool (`demo-data:pool.jsonl`) as the paper's
one-shot prompt (delia.prompts), with the demo config's `sample` lengths (max_prompt_tokens, max_new_tokens),
temperature 0.7, top_p 0.95. `--workload builtin` answers 24 built-in queries zero-shot instead.

    flock /tmp/delia-heavy.lock .venv/bin/python benchmarks/sample_throughput.py
    flock /tmp/delia-heavy.lock .venv/bin/python benchmarks/sample_throughput.py --workload builtin --max-new-tokens 96
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
from delia.compute import measure_matmul_flops
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


def naive(model, tok, prompts: list[list[int]], params: SamplingParams) -> tuple[int, float]:
    """(generated tokens, seconds), one prompt at a time, the way the authors' HF path and most scripts do it."""
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


ANSWERS: dict[int, tuple[int, ...]] = {}  # the last `batched` run's answers (token ids) by prompt


def batched(backend: HFBackend, prompts: list[list[int]], params: SamplingParams) -> tuple[int, float, float]:
    """(tokens, seconds, mean rows per decode step); the answers are left in ANSWERS."""
    ANSWERS.clear()
    t = time.perf_counter()
    for i, c in backend.generate(prompts, params):
        ANSWERS[i] = c.token_ids
    seconds = time.perf_counter() - t
    tokens = sum(map(len, ANSWERS.values()))
    return tokens, seconds, backend.stats["row_steps"] / max(backend.stats["decode_steps"], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--workload", choices=["demo", "builtin"], default="demo",
                    help="demo: the demo pool's one-shot prompts at the demo config's lengths; builtin: 24 queries")
    ap.add_argument("--pool", type=Path, help="another query pool (any format delia reads), answered zero-shot")
    ap.add_argument("--queries", type=int, default=None, help="at most this many queries (builtin: 24)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the demo config's (builtin: 96)")
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the demo config's")
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--batch-tokens", default="auto")
    ap.add_argument("--skip-stage", action="store_true", help="skip the end-to-end `sample()` run")
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive loop (e.g. timing another checkout)")
    ap.add_argument("--compare-budget", type=int, default=None,
                    help="also answer with this --batch-tokens and check that every answer is the same")
    args = ap.parse_args()

    model, tok = load_model(args.model, device="cpu")
    demo = args.workload == "demo" and not args.pool
    mode = "one-shot" if demo else "zero-shot"
    if demo:
        import yaml

        from delia.demo import DEMO_CONFIG
        from delia.task_data import resolve_data_path

        lengths = yaml.safe_load(DEMO_CONFIG.read_text())["sample"]
        pool_path = resolve_data_path("demo-data:pool.jsonl")
        turns = [first_turns(r) for r in read_chat(pool_path, require_assistant=False).records]
        limit = args.max_prompt_tokens or lengths["max_prompt_tokens"]
        pairs = [(q, ref) for q, ref in turns if ref is not None]
        rendered = [(q, ref, prompt_ids(tok, delia_prompt(q, ref, mode))) for q, ref in pairs]
        chosen = [(q, ref, p) for q, ref, p in rendered if len(p) <= limit][: args.queries]
        queries, refs, prompts = [c[0] for c in chosen], [c[1] for c in chosen], [c[2] for c in chosen]
        max_new = args.max_new_tokens or lengths["max_new_tokens"]
        print(f"demo workload: {len(prompts)} of the pool's {len(turns)} queries as one-shot prompts of at most "
              f"{limit} tokens (demo config), {sum(map(len, prompts))} prompt tokens")
    else:
        if args.pool:
            queries = [first_turns(r)[0] for r in read_chat(args.pool, require_assistant=False).records]
            queries = queries[: args.queries]
        else:
            n = args.queries or 24
            queries = (QUERIES * (n // len(QUERIES) + 1))[:n]
        refs = [None] * len(queries)
        prompts = [prompt_ids(tok, delia_prompt(q, None, mode)) for q in queries]
        max_new, limit = args.max_new_tokens or 96, None
    params = SamplingParams(max_new_tokens=max_new, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    batch_tokens = args.batch_tokens if args.batch_tokens == "auto" else int(args.batch_tokens)
    budget = {} if batch_tokens == "auto" else {"batch_tokens": batch_tokens}  # also runs code from before budgets
    backend = HFBackend(model, tok, batch_size, **budget)
    print(f"model {args.model}: {n_params / 1e6:.1f} M parameters, fp32, {torch.get_num_threads()} threads; "
          f"{len(prompts)} prompts, max_new_tokens={params.max_new_tokens}, temperature={params.temperature}, "
          f"top_p={params.top_p}")

    warm = SamplingParams(max_new_tokens=4)
    naive(model, tok, prompts[:1], warm)
    batched(backend, prompts[:2], warm)
    peak = measure_matmul_flops()
    print(f"measured fp32 matmul: {peak / 1e9:.1f} GFLOP/s")

    n_tok, n_sec = (1, float("nan")) if args.skip_naive else naive(model, tok, prompts, params)
    b_tok, b_sec, occupancy = batched(backend, prompts, params)
    n_rate, b_rate = n_tok / n_sec, b_tok / b_sec
    prompt_tokens = sum(map(len, prompts))
    runs = [("naive loop", n_tok, n_sec)] * (not args.skip_naive) + [("delia hf", b_tok, b_sec)]
    for name, tokens, seconds in runs:
        flops = 2 * n_params * (prompt_tokens + tokens) / seconds
        print(f"{name:>11}: {tokens:6d} generated tokens in {seconds:6.1f} s = {tokens / seconds:7.1f} tokens/s; "
              f"{flops / 1e9:6.1f} GFLOP/s = {flops / peak:6.1%} of measured matmul FLOP/s")
    print(f"speed-up: {b_rate / n_rate:.2f}x (wall time {n_sec / b_sec:.2f}x; mean rows per decode step: "
          f"{occupancy:.1f} of at most {min(len(prompts), MAX_ROWS_CPU)}; KV tokens held at most "
          f"{backend.stats.get('max_tokens_in_flight', 'n/a')})")

    if args.compare_budget:
        first = dict(ANSWERS)
        other = HFBackend(model, tok, batch_size, batch_tokens=args.compare_budget)
        _, seconds, occupancy = batched(other, prompts, params)
        same = sum(first[i] == ANSWERS[i] for i in first)
        print(f"--batch-tokens {args.compare_budget}: {seconds:.1f} s, mean rows per decode step {occupancy:.1f}; "
              f"same answers (token ids) for {same} of {len(first)} prompts")

    if not args.skip_stage:
        from delia.files import write_jsonl
        from delia.sample import sample

        with tempfile.TemporaryDirectory() as tmp:
            pool = Path(tmp) / "pool.jsonl"
            write_jsonl(pool, [{"messages": [{"role": "user", "content": q}]
                                + ([{"role": "assistant", "content": r}] if r is not None else [])}
                               for q, r in zip(queries, refs, strict=True)])
            s = sample(pool, Path(tmp) / "out.jsonl", model=args.model, mode=mode, device="cpu",
                       max_new_tokens=params.max_new_tokens, max_prompt_tokens=limit,
                       batch_size=str(args.batch_size), batch_tokens=str(args.batch_tokens))
        print(f"`delia sample` end to end (model load, prompts, filters, fsynced writes included): "
              f"{s.completion_tokens} tokens in {s.wall_s:.1f} s = {s.tokens_per_s:.1f} tokens/s "
              f"({s.tokens_per_s / n_rate:.2f}x the naive loop); kept {s.kept}, rejected {s.rejected}")


if __name__ == "__main__":
    main()
