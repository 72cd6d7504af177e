"""Generation back ends behind one interface: token-id prompts in, `(prompt index, Completion)` out.

`hf` (transformers, CPU or GPU), `vllm` (offline engine, optional extra) and `openai` (any
OpenAI-compatible server). Every request carries its own seed, derived from the base seed and the
prompt's index or id, so reruns, resumed runs and shards never repeat each other's randomness.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from delia.backends.base import Backend, Completion, FinishReason, SamplingParams, derive_seed, request_seeds
from delia.errors import DeliaError

BackendName = Literal["hf", "vllm", "openai"]
BACKENDS: tuple[str, ...] = get_args(BackendName)
__all__ = ["BACKENDS", "Backend", "BackendName", "Completion", "FinishReason", "SamplingParams", "derive_seed",
           "get_backend", "request_seeds"]


def get_backend(name: str, model: str, **options: Any) -> Backend:
    """Build back end `name` for `model` (a name `resolve_model` accepts; for `openai`, the model name the
    server knows). `options` go to the back end's constructor: see `hf.HFBackend.load`,
    `vllm.VLLMBackend` and `openai.OpenAIBackend`; vllm and openai take the prompts' `tokenizer` there.
    """
    if name == "hf":
        from delia.backends.hf import HFBackend

        return HFBackend.load(model, **options)
    if name == "vllm":
        from delia.backends.vllm import VLLMBackend

        return VLLMBackend(model, **options)
    if name == "openai":
        from delia.backends.openai import OpenAIBackend

        return OpenAIBackend(model=model, **options)
    raise DeliaError(f"unknown back end {name!r}; expected one of {', '.join(BACKENDS)}")
