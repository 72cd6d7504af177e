"""What every generation back end shares: sampling parameters in, completions out, and per-request seeds.

The back ends (`hf`, `vllm`, `openai`) and the package face (`delia.backends`) import these from here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from delia.errors import DeliaError

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are the paper's. temperature 0 means greedy; `n` samples per prompt, each with its own seed."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    n: int = 1

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise DeliaError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DeliaError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise DeliaError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise DeliaError(f"n must be >= 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    sample: int = 0  # which of the prompt's n samples: its seed is derive_seed(prompt seed, sample)
    # The generated ids, end-of-sequence included (hf only): what `text` hides, e.g. special tokens, and
    # what teacher-forced scoring needs to replay the answer exactly.
    token_ids: tuple[int, ...] = ()


class Backend(Protocol):
    name: str
    tokenizer: Any  # what prompts are rendered with: hf loads it with the model, vllm and openai are given it

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> Iterator[tuple[int, Completion]]:
        """Yield `(index into prompts, completion)`, `params.n` per prompt, as they finish (any order).

        The caller writes each answer as it arrives, so a back end yields as early as it can: the work a
        kill loses and the wait for the first row are what it holds before yielding.

        `seeds[i]` is prompt i's seed (default: derived from `params.seed` and i); sample k of a
        prompt uses `derive_seed(seeds[i], k)`.
        """
        ...


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (base seed, row id, sample index): stable across runs and machines."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def request_seeds(n_prompts: int, params: SamplingParams, seeds: Sequence[int] | None) -> list[list[int]]:
    """Per prompt, the seeds of its `params.n` samples."""
    if seeds is not None and len(seeds) != n_prompts:
        raise ValueError(f"got {len(seeds)} seeds for {n_prompts} prompts")
    base = list(seeds) if seeds is not None else [derive_seed(params.seed, i) for i in range(n_prompts)]
    return [[derive_seed(s, k) for k in range(params.n)] for s in base]
