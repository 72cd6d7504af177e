"""The transformers back end on the tiny model: seeding, batching, padding, finish reasons, sampling law."""

from __future__ import annotations

import math

import pytest
import torch

from delia.backends import SamplingParams, derive_seed, get_backend, request_seeds
from delia.backends.hf import HFBackend, _sampler, plan_batches
from delia.chat import delia_prompt, prompt_ids
from delia.errors import DeliaError

QUERIES = ["What is the capital of France?", "Write a short poem about the sea.", "hi",
           "Translate to Icelandic: good morning, and a very good day to you all, friends.", "0 + 1 = ?"]


@pytest.fixture(scope="module")
def backend(tiny_model):
    return get_backend("hf", str(tiny_model), device="cpu", batch_size="auto")


@pytest.fixture(scope="module")
def prompts(backend):
    return [prompt_ids(backend.tokenizer, delia_prompt(q, None, "zero-shot")) for q in QUERIES]


def run(backend, prompts, params, seeds=None):
    out: dict[int, list] = {}
    for i, c in backend.generate(prompts, params, seeds):
        out.setdefault(i, []).append(c)
    return out


def test_same_seed_same_output_and_independent_of_batching(backend, prompts):
    params = SamplingParams(max_new_tokens=12, seed=3)
    a = run(backend, prompts, params)
    assert sorted(a) == list(range(len(prompts)))
    assert a == run(backend, prompts, params)
    one_at_a_time = run(HFBackend(backend.model, backend.tokenizer, batch_size=1), prompts, params)
    assert one_at_a_time == a  # a row's sample depends on its seed, not on its batch
    other = run(backend, prompts, SamplingParams(max_new_tokens=12, seed=4))
    assert [c[0].text for c in other.values()] != [c[0].text for c in a.values()]


def test_explicit_seeds_follow_the_row_not_its_position(backend, prompts):
    params = SamplingParams(max_new_tokens=10)
    seeds = [derive_seed(0, f"id{i}") for i in range(len(prompts))]
    a = run(backend, prompts, params, seeds)
    b = run(backend, prompts[::-1], params, seeds[::-1])
    assert all(a[i] == b[len(prompts) - 1 - i] for i in a)


def test_n_samples_per_prompt_differ(backend, prompts):
    out = run(backend, prompts[:2], SamplingParams(max_new_tokens=16, n=3))
    assert all(len(v) == 3 for v in out.values())
    assert len({c.text for c in out[0]}) > 1


def test_greedy_batched_equals_unbatched_generate(backend, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=8)
    out = run(backend, prompts, params)
    model, tok = backend.model, backend.tokenizer
    for i, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
        gen = ref[0, len(p):].tolist()
        if tok.eos_token_id in gen:
            gen = gen[: gen.index(tok.eos_token_id)]
        assert out[i][0].text == tok.decode(gen, skip_special_tokens=True)


def test_finish_reason_and_token_counts(backend, prompts):
    out = run(backend, prompts, SamplingParams(max_new_tokens=3, seed=1))
    for i, (c,) in out.items():
        assert c.prompt_tokens == len(prompts[i])
        assert 1 <= c.completion_tokens <= 3
        assert c.finish_reason == "length" or c.completion_tokens < 3 or c.text == ""
        if c.finish_reason == "length":
            assert c.completion_tokens == 3


def test_plan_batches_longest_first_and_within_limits():
    lengths = [5, 50, 7, 48, 6, 49]
    batches = plan_batches(lengths, n=2, max_new_tokens=10, max_rows=4, token_budget=10_000)
    assert batches == [[1, 5], [3, 2], [4, 0]]
    tight = plan_batches(lengths, n=1, max_new_tokens=10, max_rows=8, token_budget=130)
    assert sorted(i for b in tight for i in b) == list(range(6))
    assert all(len(b) * (lengths[b[0]] + 10) <= 130 or len(b) == 1 for b in tight)


def test_out_of_memory_splits_the_batch(backend, prompts, monkeypatch):
    real = HFBackend._generate_batch
    sizes = []

    def flaky(self, prompts_, batch, seeds, params):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(self, prompts_, batch, seeds, params)

    params = SamplingParams(max_new_tokens=4)
    expected = run(backend, prompts, params)
    monkeypatch.setattr(HFBackend, "_generate_batch", flaky)
    assert run(backend, prompts, params) == expected
    assert sizes == [5, 2, 2, 1]  # halved once, then every later batch stays within the new limit


@pytest.mark.parametrize("candidates", [256, 2])  # 2: the top-p cut lies beyond the candidates (full sort)
def test_sampler_draws_from_the_top_p_distribution(monkeypatch, candidates):
    monkeypatch.setattr("delia.backends.hf.TOP_P_CANDIDATES", candidates)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = torch.log(probs.clamp(min=1e-12)).repeat(4000, 1)
    seeds = request_seeds(4000, SamplingParams(), None)
    sampler = _sampler([s[0] for s in seeds], SamplingParams(temperature=1.0, top_p=1.0), 3, "cpu")
    picks = sampler(None, logits.clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / len(picks)
    assert freq[3] == 0  # beyond the tokenizer's vocabulary: never sampled
    assert torch.allclose(freq[:3], probs[:3], atol=0.03)
    top_p = _sampler([s[0] for s in seeds], SamplingParams(temperature=1.0, top_p=0.6), 4, "cpu")
    freq = torch.bincount(top_p(None, logits.clone()).argmax(-1), minlength=4).float() / 4000
    assert freq[2] == 0 and math.isclose(freq[0].item(), 0.5 / 0.8, abs_tol=0.03)
    hot = _sampler([s[0] for s in seeds], SamplingParams(temperature=2.0, top_p=1.0), 3, "cpu")
    freq = torch.bincount(hot(None, logits.clone()).argmax(-1), minlength=4).float() / 4000
    flat = probs[:3].sqrt() / probs[:3].sqrt().sum()
    assert torch.allclose(freq[:3], flat, atol=0.03)


def test_bad_settings_are_user_errors(backend):
    with pytest.raises(DeliaError):
        SamplingParams(top_p=0)
    with pytest.raises(DeliaError):
        HFBackend(backend.model, backend.tokenizer, batch_size=0)
    with pytest.raises(DeliaError, match="back end"):
        get_backend("tgi", "x")
