"""Prompt building shared by sampling and evaluation: conversations rendered through the model's own
chat template into token ids, so every back end sees exactly the prompt the model was tuned on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from delia.errors import DeliaError

Mode = Literal["one-shot", "zero-shot"]
MODES: tuple[str, ...] = ("one-shot", "zero-shot")


def delia_prompt(query: str, reference: str | None, mode: Mode = "one-shot",
                 system: str | None = None, example_query: str | None = None) -> list[dict[str, str]]:
    """The DELIA sampling conversation (paper section 3): the model sees its reference answer once,
    then is asked again, so it answers in its own style at the reference's level of detail.

    one-shot: user=query, assistant=reference, user=query. zero-shot: user=query (pools without references).
    With `example_query`, one-shot shows another row's example instead: user=example_query,
    assistant=reference (that row's), user=query.
    """
    if mode not in MODES:
        raise DeliaError(f"unknown prompt mode {mode!r}; expected one of {', '.join(MODES)}")
    head = [{"role": "system", "content": system}] if system else []
    if mode == "zero-shot":
        return [*head, {"role": "user", "content": query}]
    if reference is None:
        raise DeliaError("one-shot prompts need a reference answer (use zero-shot for pools without one)")
    first = query if example_query is None else example_query
    return [*head, {"role": "user", "content": first}, {"role": "assistant", "content": reference},
            {"role": "user", "content": query}]


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template, ready for any back end.

    The template already writes BOS where the model wants it, so the text is tokenized without
    special tokens (a second BOS measurably changes outputs). A system message is dropped for
    templates that reject the system role (Gemma raises "System role not supported").
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DeliaError("the tokenizer has no chat template; delia needs a chat (instruct) model")
    try:
        text = _render(tokenizer, messages, add_generation_prompt)
    except Exception:
        if not messages or messages[0].get("role") != "system":
            raise
        text = _render(tokenizer, messages[1:], add_generation_prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return list(ids)


def supports_system(tokenizer: Any) -> bool:
    """Whether the chat template accepts a system message (so callers can say when one is dropped)."""
    try:
        _render(tokenizer, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], True)
    except Exception:
        return False
    return True
