"""Prefill in runs of similar length (`delia.backends.hf.PREFILL_MIN_SHARE`: prompts prefilled together, at most
`PREFILL_CHUNK_TOKENS` padded tokens, are within 75% of the longest) against groups of any lengths padded to their
longest prompt, in one process: the hf back end greedily answering prompts of mixed lengths (default: the demo's
general prompts, as `delia eval --general` does; or the demo pool's one-shot prompts, as `delia sample` does).
Checks that both give the same answers, and prints wall time, the ratio, and each run's share of the
machine's measured matmul FLOP/s (2 x parameters x prompt and generated tokens per second).

    .venv/bin/python benchmarks/prefill_grouping.py
    .venv/bin/python benchmarks/prefill_grouping.py --prompts pool --limit 64 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import time

import torch

import delia.backends.hf as hf
from delia.backends import SamplingParams
from delia.compute import measure_matmul_flops
from delia.data import first_turns, read_chat
from delia.models import DEFAULT_MODEL, load_model
from delia.prompts import delia_prompt, prompt_ids
from delia.task_data import resolve_data_path


def answer(backend: hf.HFBackend, prompts: list[list[int]], params: SamplingParams,
           min_share: float) -> tuple[dict[int, tuple[int, ...]], float]:
    """(answers' token ids by prompt, seconds) with prefill runs whose lengths are >= min_share of the longest."""
    hf.PREFILL_MIN_SHARE = min_share
    start = time.perf_counter()
    done = {i: c.token_ids for i, c in backend.generate(prompts, params)}
    return done, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", choices=["general", "pool"], default="general",
                    help="general: demo-data:general.jsonl as asked; pool: demo-data:pool.jsonl one-shot prompts")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    model, tok = load_model(args.model, device="cpu")
    name = "general.jsonl" if args.prompts == "general" else "pool.jsonl"
    records = read_chat(resolve_data_path(f"demo-data:{name}"), require_assistant=False).records[:args.limit]
    if args.prompts == "general":
        prompts = [prompt_ids(tok, r["messages"][:-1]) for r in records]
    else:
        prompts = [prompt_ids(tok, delia_prompt(*first_turns(r))) for r in records]
        prompts = [p for p in prompts if len(p) <= 512]  # the demo's --max-prompt-tokens
    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    backend = hf.HFBackend(model, tok)
    n_params = sum(p.numel() for p in model.parameters())
    lengths = sorted(len(p) for p in prompts)
    print(f"{len(prompts)} {args.prompts} prompts, {sum(lengths)} prompt tokens (shortest {lengths[0]}, median "
          f"{lengths[len(lengths) // 2]}, longest {lengths[-1]}), greedy, max_new_tokens={args.max_new_tokens}, "
          f"{torch.get_num_threads()} threads")
    answer(backend, prompts[:2], SamplingParams(temperature=0.0, max_new_tokens=2), hf.PREFILL_MIN_SHARE)  # warm-up
    peak = measure_matmul_flops()
    grouped_share = hf.PREFILL_MIN_SHARE
    one, t_one = answer(backend, prompts, params, 0.0)
    runs, t_runs = answer(backend, prompts, params, grouped_share)
    hf.PREFILL_MIN_SHARE = grouped_share
    same = one == runs
    tokens = sum(lengths) + sum(len(v) for v in runs.values())
    print(f"measured fp32 matmul: {peak / 1e9:.1f} GFLOP/s")
    for label, t in (("one padded group per batch", t_one), (f"runs >= {grouped_share:.0%} of longest", t_runs)):
        print(f"{label:>28}: {t:6.1f} s, {2 * n_params * tokens / t / peak:5.1%} of peak")
    print(f"speed-up {t_one / t_runs:.2f}x; same answers: {same}")


if __name__ == "__main__":
    main()
