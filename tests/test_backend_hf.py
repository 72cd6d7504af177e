"""The transformers back end on the tiny model: seeding, batching, padding, finish reasons, sampling law."""

from __future__ import annotations

import math

import pytest
import torch

from delia.backends import SamplingParams, derive_seed, get_backend, request_seeds
from delia.backends.hf import HFBackend, draw
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
    return {i: sorted(v, key=lambda c: c.sample) for i, v in out.items()}


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


def test_rows_leave_and_join_the_batch_without_changing_answers(backend, prompts):
    params = SamplingParams(max_new_tokens=12, seed=2, n=2)
    whole = run(backend, prompts, params)
    small = HFBackend(backend.model, backend.tokenizer, batch_size=3)  # rows join as others end
    assert run(small, prompts, params) == whole
    tokens = sum(c.completion_tokens for v in whole.values() for c in v)
    assert small.stats["row_steps"] == tokens - 2 * len(prompts)  # each row's first token comes from its prefill
    assert small.stats["row_steps"] <= 3 * small.stats["decode_steps"]


def test_out_of_memory_halves_the_rows_and_redoes_unfinished_ones(backend, prompts, monkeypatch):
    real = HFBackend._forward
    widths = []

    def flaky(self, ids, mask, positions, cache):
        widths.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(self, ids, mask, positions, cache)

    params = SamplingParams(max_new_tokens=4)
    expected = run(backend, prompts, params)
    monkeypatch.setattr(HFBackend, "_forward", flaky)
    small = HFBackend(backend.model, backend.tokenizer, batch_size=8)
    assert run(small, prompts, params) == expected
    failed = [i for i, w in enumerate(widths) if w > 2]
    assert len(failed) == 2  # 8 rows fail, then 4 (a prefill runs in groups of similar length)
    assert max(widths[failed[-1] + 1:]) == 2  # then 2 rows fit, and every later forward holds at most 2


@pytest.mark.parametrize("candidates", [256, 2])  # 2: the top-p cut lies beyond the candidates (full sort)
def test_sampler_draws_from_the_top_p_distribution(monkeypatch, candidates):
    monkeypatch.setattr("delia.backends.hf.TOP_P_CANDIDATES", candidates)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = torch.log(probs.clamp(min=1e-12)).repeat(4000, 1)

    def freq(params, vocab):
        gens = [torch.Generator().manual_seed(s[0]) for s in request_seeds(4000, params, None)]
        return torch.bincount(draw(logits.clone(), gens, params, vocab), minlength=4).float() / 4000

    plain = freq(SamplingParams(temperature=1.0, top_p=1.0), 3)
    assert plain[3] == 0  # beyond the tokenizer's vocabulary: never sampled
    assert torch.allclose(plain[:3], probs[:3], atol=0.03)
    top_p = freq(SamplingParams(temperature=1.0, top_p=0.6), 4)
    assert top_p[2] == 0 and math.isclose(top_p[0].item(), 0.5 / 0.8, abs_tol=0.03)
    hot = freq(SamplingParams(temperature=2.0, top_p=1.0), 3)
    assert torch.allclose(hot[:3], probs[:3].sqrt() / probs[:3].sqrt().sum(), atol=0.03)
    greedy = draw(logits[:2].clone(), [], SamplingParams(temperature=0), 4)
    assert greedy.tolist() == [0, 0]


def test_bad_settings_are_user_errors(backend):
    with pytest.raises(DeliaError):
        SamplingParams(top_p=0)
    with pytest.raises(DeliaError):
        HFBackend(backend.model, backend.tokenizer, batch_size=0)
    with pytest.raises(DeliaError, match="back end"):
        get_backend("tgi", "x")


def test_length_groups_are_contiguous_runs_of_similar_length():
    from delia.backends.hf import length_groups

    lengths = [460, 246, 236, 235, 213, 211, 171, 149, 127, 119, 102, 79, 68, 63, 60]
    groups = length_groups(lengths)
    assert [j for g in groups for j in g] == list(range(len(lengths)))
    for g in groups:
        run_ = [lengths[j] for j in g]
        assert min(run_) >= 0.75 * max(run_)
    assert len(groups) == 5 and length_groups([]) == [] and length_groups([7, 7, 7]) == [range(0, 3)]
