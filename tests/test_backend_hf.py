"""The transformers back end on the tiny model: seeding, batching, padding, finish reasons, sampling law."""

from __future__ import annotations

import math

import pytest
import torch

from delia.backends import SamplingParams, derive_seed, get_backend, request_seeds
from delia.backends.hf import HFBackend, continuous_batching_supported, draw
from delia.errors import DeliaError
from delia.prompts import delia_prompt, prompt_ids

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
    assert draw(logits[:2].clone(), [], SamplingParams(temperature=0), 4, banned=[0]).tolist() == [1, 1]
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    banned = torch.bincount(draw(logits.clone(), gens, SamplingParams(temperature=1.0), 4, banned=[0, 2]), minlength=4)
    assert banned[0] == banned[2] == 0 < banned[1]


def test_token_budget_bounds_the_batch_and_never_changes_the_answers(backend, prompts, monkeypatch):
    params = SamplingParams(max_new_tokens=12, seed=6, n=2)
    free = run(backend, prompts, params)  # auto: every row fits at once
    real = HFBackend._forward
    calls = []  # (rows, tokens of cache the forward attends to, padding included)

    def record(self, ids, mask, positions, cache):
        calls.append((ids.shape[0], mask.numel()))
        return real(self, ids, mask, positions, cache)

    monkeypatch.setattr(HFBackend, "_forward", record)
    longest = max(map(len, prompts)) + params.max_new_tokens
    for budget in (longest, 2 * longest + 5, 3 * longest):
        calls.clear()
        small = HFBackend(backend.model, backend.tokenizer, batch_tokens=budget)
        assert run(small, prompts, params) == free  # a row's answer depends on its seed alone
        assert small.stats["max_tokens_in_flight"] <= budget
        assert max(tokens for _, tokens in calls) <= budget
        rows_at_once = max(rows for rows, _ in calls)
        assert rows_at_once <= budget // (min(map(len, prompts)) + params.max_new_tokens)
        assert rows_at_once < 2 * len(prompts)  # the budget, not the row count, held rows back


def test_long_prompts_are_prefilled_in_chunks_with_the_same_answers(backend, prompts, monkeypatch):
    params = SamplingParams(max_new_tokens=10, seed=1)
    whole = run(backend, prompts, params)
    greedy = run(backend, prompts, SamplingParams(temperature=0, max_new_tokens=10))
    monkeypatch.setattr("delia.backends.hf.PREFILL_CHUNK_TOKENS", 8)  # every prompt is longer
    assert min(map(len, prompts)) > 8
    assert run(backend, prompts, params) == whole
    assert backend.stats["prefills"] == len(prompts)
    assert backend.stats["prefill_forwards"] >= sum(-(-len(p) // 8) for p in prompts)
    assert run(backend, prompts, SamplingParams(temperature=0, max_new_tokens=10)) == greedy


def test_rows_finish_and_are_yielded_while_later_prompts_wait(backend, prompts):
    params = SamplingParams(max_new_tokens=3, seed=0, n=2)
    small = HFBackend(backend.model, backend.tokenizer, batch_tokens=max(map(len, prompts)) + 3)  # one row at a time
    stream = small.generate(prompts, params)
    first = next(stream)
    assert small.stats["prefills"] == 1  # one row prefilled, decoded and handed over; nine still queued
    stream.close()
    assert first == next(iter(small.generate(prompts, params)))


def test_bad_settings_are_user_errors(backend, prompts):
    with pytest.raises(DeliaError):
        SamplingParams(top_p=0)
    with pytest.raises(DeliaError):
        HFBackend(backend.model, backend.tokenizer, batch_size=0)
    for bad in (0, -5, "many", True, 2.5):
        with pytest.raises(DeliaError, match="batch_tokens must be a positive integer or 'auto'"):
            HFBackend(backend.model, backend.tokenizer, batch_tokens=bad)
    tight = HFBackend(backend.model, backend.tokenizer, batch_tokens=max(map(len, prompts)) + 3)
    with pytest.raises(DeliaError, match=r"cannot hold the longest prompt .*`max_prompt_tokens`"):
        list(tight.generate(prompts, SamplingParams(max_new_tokens=4)))
    with pytest.raises(DeliaError, match="back end"):
        get_backend("tgi", "x")


# ----------------------------------------------------------------------------- caches continuous batching cannot edit


@pytest.fixture(scope="module", params=["mistral", "qwen2-hybrid"])
def sliding(request, backend):
    """A tiny random model whose layers attend through an 8-token window (all of them, or one of two), with
    the tiny model's tokenizer; prompts are longer than the window."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = backend.tokenizer
    shape = {"vocab_size": len(tok) + 8, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
             "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    if request.param == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=8, **shape))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                             **shape))
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    return HFBackend(model, tok)


def test_the_cache_kind_picks_the_loop(backend, sliding):
    assert continuous_batching_supported(backend.model) and backend.batching == "continuous"
    assert not continuous_batching_supported(sliding.model) and sliding.batching == "static"


def test_static_loop_decodes_sliding_window_models_exactly(sliding, prompts):
    assert min(map(len, prompts)) > sliding.model.config.sliding_window
    greedy = run(sliding, prompts, SamplingParams(temperature=0, max_new_tokens=8))
    for i, p in enumerate(prompts):  # the truth: each prompt alone, recomputed without a cache at every step
        seq = list(p)
        with torch.inference_mode():
            while len(seq) - len(p) < len(greedy[i][0].token_ids):
                logits = sliding.model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                seq.append(int(logits[:len(sliding.tokenizer)].argmax()))
        assert greedy[i][0].token_ids == tuple(seq[len(p):])
    assert sliding.stats["prefills"] == 1 and sliding.stats["decode_steps"] == 7


def test_static_loop_is_deterministic_per_seed(sliding, prompts):
    params = SamplingParams(max_new_tokens=12, seed=3, n=2)
    a = run(sliding, prompts, params)
    assert sorted(a) == list(range(len(prompts))) and all(len(v) == 2 for v in a.values())
    assert a == run(sliding, prompts, params)
    pairs = HFBackend(sliding.model, sliding.tokenizer, batch_size=2)
    assert run(pairs, prompts, params) == a  # a row's sample depends on its seed, not on its batch
    assert pairs.stats["prefills"] == len(prompts)  # 10 rows, 2 at a time
    seeds = [derive_seed(0, f"id{i}") for i in range(len(prompts))]
    forward, backward = run(sliding, prompts, params, seeds), run(sliding, prompts[::-1], params, seeds[::-1])
    assert all(forward[i] == backward[len(prompts) - 1 - i] for i in forward)  # seeds follow the row
    other = run(sliding, prompts, SamplingParams(max_new_tokens=12, seed=4, n=2))
    assert [c[0].text for c in other.values()] != [c[0].text for c in a.values()]


def test_static_loop_samples_what_the_continuous_one_does(backend, prompts):
    params = SamplingParams(max_new_tokens=12, seed=2, n=2)
    static = HFBackend(backend.model, backend.tokenizer, batch_size=3)
    static.batching = "static"  # the same full-attention model through the fallback loop
    assert run(static, prompts, params) == run(backend, prompts, params)


def test_static_loop_out_of_memory_halves_the_rows_and_redoes_unfinished_ones(sliding, prompts, monkeypatch):
    real = HFBackend._forward
    calls = []

    def flaky(self, ids, mask, positions, cache):
        calls.append(ids.shape[0])
        if len(calls) in (2, 7):  # 8 rows fail at their first decode step; 4 rows at their prefill, after
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")  # 4 others finished
        return real(self, ids, mask, positions, cache)

    params = SamplingParams(max_new_tokens=4, n=2)
    expected = run(sliding, prompts, params)
    monkeypatch.setattr(HFBackend, "_forward", flaky)
    small = HFBackend(sliding.model, sliding.tokenizer, batch_size=8)
    assert run(small, prompts, params) == expected  # every sample once, none lost or repeated
    assert calls[:7] == [8, 8, 4, 4, 4, 4, 4] and calls[7:] == [2] * 12  # then 6 rows, 2 at a time
