"""vLLM offline-engine back end (the `vllm` extra, GPU). The request building is pure so it is tested
without vLLM: every sample is its own request with its own seed, so no two rows, shards or reruns
share a random stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from delia.backends.base import Completion, SamplingParams, request_seeds
from delia.errors import DeliaError

# Requests handed to the engine per call: vLLM batches within a call; results are yielded (and
# written) between calls, so this bounds the work a crash loses.
CHUNK = 1024


def build_requests(prompts: Sequence[Sequence[int]], params: SamplingParams,
                   seeds: Sequence[int] | None = None) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    """(prompt index, engine prompt, `vllm.SamplingParams` keyword arguments) for each of `params.n`
    samples per prompt. Prompts go as token ids, so vLLM adds no second BOS.
    """
    out = []
    for i, (prompt, sample_seeds) in enumerate(zip(prompts, request_seeds(len(prompts), params, seeds), strict=True)):
        for seed in sample_seeds:
            kwargs = {"n": 1, "max_tokens": params.max_new_tokens, "seed": seed,
                      "temperature": params.temperature, "top_p": 1.0 if params.greedy else params.top_p}
            out.append((i, {"prompt_token_ids": list(prompt)}, kwargs))
    return out


def to_completion(output: Any, sample: int = 0) -> Completion:
    """A `vllm.RequestOutput` as a Completion ("length" when cut at max_tokens, else "stop")."""
    first = output.outputs[0]
    finish = "length" if first.finish_reason == "length" else "stop"
    return Completion(first.text, finish, len(output.prompt_token_ids), len(first.token_ids), sample,
                      tuple(first.token_ids))


class VLLMBackend:
    """vLLM's offline `LLM` engine; `tensor_parallel_size` splits the model across that many GPUs.
    `tokenizer` is kept for the caller that renders the prompts (the engine itself takes token ids).
    """

    name = "vllm"

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, dtype: str = "auto", tokenizer: Any = None):
        try:
            import vllm
        except ImportError:
            raise DeliaError("the vllm back end needs vLLM: pip install 'delia[vllm]' (Linux with a GPU)") from None
        from delia.models import resolve_model

        self._vllm = vllm
        self.tokenizer = tokenizer
        kwargs: dict[str, Any] = {"tensor_parallel_size": tensor_parallel_size, "dtype": dtype,
                                  "gpu_memory_utilization": gpu_memory_utilization}
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(model=resolve_model(model), **kwargs)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> Iterator[tuple[int, Completion]]:
        requests = build_requests(prompts, params, seeds)
        samples = [k for i in range(len(prompts)) for k in range(params.n)]  # requests come in this order
        for start in range(0, len(requests), CHUNK):
            chunk = requests[start:start + CHUNK]
            outputs = self.llm.generate([r[1] for r in chunk],
                                        [self._vllm.SamplingParams(**r[2]) for r in chunk], use_tqdm=False)
            for j, ((i, _prompt, _kw), output) in enumerate(zip(chunk, outputs, strict=True), start=start):
                yield i, to_completion(output, samples[j])
