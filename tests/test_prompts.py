"""Prompt building: the DELIA conversation, chat-template rendering to ids, BOS and system-role handling."""

from __future__ import annotations

import pytest
from tokenizers import processors

from delia.errors import DeliaError
from delia.models import load_tokenizer
from delia.prompts import delia_prompt, prompt_ids, supports_system

GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture
def tok(tiny_model):
    return load_tokenizer(tiny_model, resolved=True)


def test_one_shot_prompt_repeats_the_query_after_the_reference():
    msgs = delia_prompt("Q?", "A.", "one-shot")
    assert msgs == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."},
                    {"role": "user", "content": "Q?"}]
    assert delia_prompt("Q?", None, "zero-shot", system="S") == [{"role": "system", "content": "S"},
                                                                {"role": "user", "content": "Q?"}]
    with pytest.raises(DeliaError, match="reference"):
        delia_prompt("Q?", None, "one-shot")
    with pytest.raises(DeliaError, match="mode"):
        delia_prompt("Q?", "A", "two-shot")  # type: ignore[arg-type]
    assert delia_prompt("Q?", "Other A.", example_query="Other Q?") == [  # another row's example
        {"role": "user", "content": "Other Q?"}, {"role": "assistant", "content": "Other A."},
        {"role": "user", "content": "Q?"}]


def test_prompt_ids_match_the_rendered_template(tok):
    msgs = delia_prompt("What is the capital of France?", "Paris.", "one-shot")
    ids = prompt_ids(tok, msgs)
    text = tok.decode(ids)
    assert text == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis."
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert not text.endswith("<|im_end|>\n") and prompt_ids(tok, msgs, add_generation_prompt=False) != ids


def test_no_second_bos_when_template_and_tokenizer_both_add_one(tok):
    tok.bos_token = "<|endoftext|>"
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                   special_tokens=[("<|endoftext|>", bos)])
    tok.chat_template = GEMMA_LIKE
    assert tok("x")["input_ids"][0] == bos  # the trap: plain tokenization adds a BOS of its own
    ids = prompt_ids(tok, [{"role": "user", "content": "hi"}])
    assert ids[0] == bos and ids.count(bos) == 1


def test_system_message_dropped_for_templates_that_reject_it(tok):
    msgs = delia_prompt("Q?", "A.", "one-shot", system="Be brief.")
    assert supports_system(tok)
    assert "Be brief." in tok.decode(prompt_ids(tok, msgs))
    tok.chat_template = GEMMA_LIKE
    assert not supports_system(tok)
    ids = prompt_ids(tok, msgs)
    assert ids == prompt_ids(tok, msgs[1:]) and "Be brief." not in tok.decode(ids)


def test_template_errors_without_a_system_message_are_not_hidden(tok):
    tok.chat_template = "{{ raise_exception('broken template') }}"
    with pytest.raises(Exception, match="broken template"):
        prompt_ids(tok, [{"role": "user", "content": "hi"}])
    tok.chat_template = None
    with pytest.raises(DeliaError, match="chat template"):
        prompt_ids(tok, [{"role": "user", "content": "hi"}])
