"""The vLLM back end without vLLM: request building, per-request seeds, and the engine calls (faked)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from delia.backends import SamplingParams, derive_seed, get_backend
from delia.backends.vllm import build_requests, to_completion
from delia.errors import DeliaError


def test_requests_are_token_prompts_with_one_distinct_seed_each():
    reqs = build_requests([[1, 2, 3], [4]], SamplingParams(n=3, seed=7, max_new_tokens=64))
    assert [r[0] for r in reqs] == [0, 0, 0, 1, 1, 1]
    assert reqs[0][1] == {"prompt_token_ids": [1, 2, 3]}
    assert reqs[0][2] == {"n": 1, "max_tokens": 64, "seed": reqs[0][2]["seed"], "temperature": 0.7, "top_p": 0.95}
    assert len({r[2]["seed"] for r in reqs}) == 6
    again = build_requests([[1, 2, 3], [4]], SamplingParams(n=3, seed=7, max_new_tokens=64))
    assert again == reqs  # reruns reproduce
    other = build_requests([[1, 2, 3], [4]], SamplingParams(n=3, seed=8, max_new_tokens=64))
    assert not {r[2]["seed"] for r in reqs} & {r[2]["seed"] for r in other}


def test_seeds_follow_row_ids_so_shards_never_share_a_stream():
    ids = [f"q{i}" for i in range(6)]
    seeds = [derive_seed(0, i) for i in ids]
    whole = build_requests([[i] for i in range(6)], SamplingParams(), seeds)
    shard = build_requests([[1], [4]], SamplingParams(), [seeds[1], seeds[4]])
    assert [r[2]["seed"] for r in shard] == [whole[1][2]["seed"], whole[4][2]["seed"]]


def test_greedy_requests_and_output_conversion():
    (req,) = build_requests([[5]], SamplingParams(temperature=0))
    assert req[2]["temperature"] == 0 and req[2]["top_p"] == 1.0
    out = SimpleNamespace(prompt_token_ids=[1, 2], outputs=[SimpleNamespace(text="hi", finish_reason="length",
                                                                               token_ids=[7, 8, 9])])
    c = to_completion(out)
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("hi", "length", 2, 3)
    out.outputs[0].finish_reason = "stop"
    assert to_completion(out).finish_reason == "stop"


def fake_vllm(calls: list) -> types.ModuleType:
    """A stand-in `vllm` module whose engine records its calls and answers "s<seed>"."""

    class LLM:
        def __init__(self, model, **kwargs):
            calls.append(("init", model, kwargs))

        def generate(self, prompts, sampling, use_tqdm):
            calls.append(("generate", len(prompts)))
            return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                    outputs=[SimpleNamespace(text=f"s{sp.kw['seed']}", finish_reason="stop",
                                                             token_ids=[1])])
                    for p, sp in zip(prompts, sampling, strict=True)]

    fake = types.ModuleType("vllm")
    fake.LLM = LLM
    fake.SamplingParams = lambda **kw: SimpleNamespace(kw=kw)
    return fake


def test_engine_calls_with_a_fake_vllm(monkeypatch, tiny_model):
    calls: list = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    monkeypatch.setattr("delia.backends.vllm.CHUNK", 4)
    backend = get_backend("vllm", str(tiny_model), tensor_parallel_size=2)
    assert calls[0] == ("init", str(tiny_model), {"tensor_parallel_size": 2, "dtype": "auto",
                                                  "gpu_memory_utilization": 0.9})
    out = list(backend.generate([[1], [2, 3], [4]], SamplingParams(n=2)))
    assert [c for c in calls if c[0] == "generate"] == [("generate", 4), ("generate", 2)]
    assert [i for i, _ in out] == [0, 0, 1, 1, 2, 2] and out[2][1].prompt_tokens == 2
    assert len({c.text for _, c in out}) == 6


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(DeliaError, match="pip install"):
        get_backend("vllm", "x")
