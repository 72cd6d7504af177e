"""Compute accounting: the tokens each arm costs and their estimated FLOPs, measured after a run.

Per-token forward FLOPs come from TRL's `compute_flops_per_token` (matmuls of every layer, attention
scores at the stage's mean sequence length, the LM head; embeddings are lookups). TRL counts a full
training step as 3 forwards; LoRA skips the weight gradients of the frozen weights, so a trained token is
counted as 2 forwards (forward, and the backward pass to the activations), a forward-only token (the
base model's pass under `diverse_loss kl`) as 1, and a sampled token (prompt or generated) as 1.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from delia.artifacts import SampledTokens, TrainedTokens

TRAIN_FORWARDS = 2  # forward + backward to the activations (LoRA: no weight gradients for frozen weights)
# Share of the measured matmul peak each stage reached on a 2-core CPU with SmolLM2-135M in fp32, for wall-time
# estimates: sampling 36% on the demo's one-shot prompts (benchmarks/sample_throughput.py --skip-stage), LoRA
# training about 38% with delia's CPU paths (`delia.patches.peft_mask_dropout`, `delia.patches.trl_label_positions`;
# the demo's sft train stage: 1.2 TFLOPs in 8.0 s with the model's loading, about 150 GFLOP/s;
# benchmarks/train_throughput.py reaches 42-46% without it; 27-35% before those changes). A GPU reaches other
# shares: pass the rate you see (`--flops-per-s`).
STAGE_SHARE_OF_PEAK = {"sample": 0.36, "train": 0.38}


def measure_matmul_flops(n: int = 1536, reps: int = 6, device: str = "cpu") -> float:
    """Best measured fp32 matmul FLOP/s on `device` (the peak shares refer to): on the CPU, this process's
    threads; on a GPU, pass a larger `n` (e.g. 8192) to reach its peak."""
    import time

    import torch

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.matmul(a, b)
    sync()
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


@cache
def _config(model_path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path)


def forward_flops(model_path: str | Path, seq_len: float) -> float:
    """FLOPs of one token's forward pass in a sequence of `seq_len` tokens."""
    from trl.trainer.utils import compute_flops_per_token

    return compute_flops_per_token(_config(str(model_path)), max(1, round(seq_len))) / 3


def sampling_cost(model_path: str | Path, run: SampledTokens, share: float = 1.0) -> dict[str, float]:
    """Tokens and FLOPs of `share` of a sampling run (its `delia sample` summary's counts): an arm that mixes 40
    of 100 kept answers costs 40% of the run, since a run of 40 queries would have given it the same rows."""
    prompt, generated = run.prompt_tokens, run.completion_tokens
    rows = max(1, run.generated)
    flops = forward_flops(model_path, (prompt + generated) / rows) * (prompt + generated)
    sampled = run.queries - sum(run.skipped.values())  # not those left out (too long, ...)
    return {"sampled_queries": sampled * share, "prompt_tokens": prompt * share,
            "generated_tokens": generated * share, "sample_flops": flops * share}


def training_cost(model_path: str | Path, run: TrainedTokens) -> dict[str, float]:
    """Tokens and FLOPs of a training run: a finished one's (`TrainRecord.trained_tokens`), or a plan's."""
    fwd = forward_flops(model_path, run.train_tokens / max(1, run.rows))
    trained, forward_only = run.tokens_trained, run.tokens_forward_only
    return {"trained_tokens": trained, "forward_only_tokens": forward_only,
            "train_flops": fwd * (TRAIN_FORWARDS * trained + forward_only)}


def sum_trained(runs: list[TrainedTokens]) -> TrainedTokens:
    """The token counts of an arm's trainings together (a `promot` arm trains twice)."""
    return TrainedTokens(**{k: sum(getattr(r, k) for r in runs) for k in TrainedTokens.model_fields})


def arm_cost(model_path: str | Path, training: TrainedTokens, sampling: SampledTokens | None = None,
             share: float = 0.0, rewriting: SampledTokens | None = None) -> dict[str, float]:
    """One arm at one seed: its share of sampling (none for arms without self-samples), the rewriting of its task
    rows (arms that train on them as the model rewrote them: all of it, which every seed needs; a `delia rewrite`
    run counts as sampling, one generation per task row), and its training."""
    cost = {"sampled_queries": 0.0, "prompt_tokens": 0.0, "generated_tokens": 0.0, "sample_flops": 0.0}
    if sampling is not None and share > 0:
        cost = sampling_cost(model_path, sampling, share)
    if rewriting is not None:
        cost = {k: v + w for (k, v), w in zip(cost.items(), sampling_cost(model_path, rewriting).values(),
                                              strict=True)}
    cost.update(training_cost(model_path, training))
    cost["flops"] = cost["sample_flops"] + cost["train_flops"]
    return cost
