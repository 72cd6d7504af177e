"""New special tokens with an explicit, seeded, recorded embedding initialisation.

The DELIA authors' trainer wrote its random init into the padding rows past the tokenizer, so the
new token's own row got whatever the installed transformers version did. Here every new row is set
explicitly, on the input embeddings and, when untied, on the output embeddings too.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from delia.errors import DeliaError

TokenInit = Literal["random", "mean", "mean-noise", "description"]  # how a new token's row starts
INIT_METHODS = get_args(TokenInit)
# Noise of `mean-noise`, as a fraction of the embedding matrix's std: small enough that the row stays
# near the mean (no large logit at start), large enough that several new tokens do not start identical.
MEAN_NOISE_SCALE = 0.1


def parse_token_specs(specs: list[str] | None, option: str = "add_token") -> list[tuple[str, str | None]]:
    """`["<sep>", "<x>=what x stands for"]` -> `[("<sep>", None), ("<x>", "what x stands for")]`.

    The description follows the first `=` after a non-empty token; duplicates are an error. `option` is the
    name of the option the specs come from, for the errors.
    """
    out: list[tuple[str, str | None]] = []
    for spec in specs or []:
        cut = spec.find("=", 1)
        token, desc = (spec, None) if cut == -1 else (spec[:cut], spec[cut + 1:].strip() or None)
        if not token.strip() or token != token.strip():
            raise DeliaError(f"`{option}` {spec!r}: the token must be non-empty and have no surrounding spaces")
        if token in (t for t, _ in out):
            raise DeliaError(f"`{option}` {token!r} is given twice")
        out.append((token, desc))
    return out


def _init_rows(matrix: Any, n_ref: int, rows: list[int], method: str, descriptions: list[list[int] | None],
               generator: Any) -> None:
    """Write the initialisation of `rows` into `matrix`, using only the first `n_ref` rows as reference."""
    import torch

    ref = matrix[:n_ref].float()
    mean, std = ref.mean(0), ref.std()
    for row, desc_ids in zip(rows, descriptions, strict=True):
        if method == "random":  # drawn on the CPU from the seeded generator: the same rows on any device
            value = torch.randn(ref.shape[1], generator=generator).to(ref.device) * std
        elif method == "mean":
            value = mean.clone()
        elif method == "mean-noise":
            value = mean + torch.randn(ref.shape[1], generator=generator).to(ref.device) * std * MEAN_NOISE_SCALE
        else:  # description
            value = ref[torch.tensor(desc_ids, device=ref.device)].mean(0)
        matrix[row] = value.to(matrix.dtype)


def add_tokens(model: Any, tokenizer: Any, specs: list[tuple[str, str | None]], method: str = "random",
               seed: int = 0) -> dict[str, Any]:
    """Add `specs` to the tokenizer as special tokens and initialise their rows; returns what was done.

    New ids that fall in the padding rows past `len(tokenizer)` reuse those rows (no resize); otherwise
    the embeddings are resized to exactly `len(tokenizer)`, which is what `AutoPeftModelForCausalLM`
    does when it loads the adapter with its tokenizer. Tied embeddings are initialised once (one matrix);
    untied output rows get the same method applied to the output matrix. A token already in the
    vocabulary keeps its trained row and is recorded as `existing`.
    """
    import torch
    from tokenizers import AddedToken

    if method not in INIT_METHODS:
        raise DeliaError(f"unknown token init {method!r}; expected one of {', '.join(INIT_METHODS)}")
    n_before = len(tokenizer)
    emb_in = model.get_input_embeddings()
    emb_out = model.get_output_embeddings()
    rows_before = emb_in.weight.shape[0]
    tied = emb_out is not None and emb_out.weight.data_ptr() == emb_in.weight.data_ptr()
    vocab = tokenizer.get_vocab()
    existing = [t for t, _ in specs if t in vocab]
    new = [(t, d) for t, d in specs if t not in vocab]

    desc_ids: list[list[int] | None] = []
    for token, desc in new:
        if method != "description":
            desc_ids.append(None)
            continue
        if not desc:
            raise DeliaError(f"token {token!r}: init 'description' needs a description (`add_token` '{token}=...')")
        ids = tokenizer(desc, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DeliaError(f"token {token!r}: its description tokenizes to nothing")
        desc_ids.append(ids)

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t, _ in new], special_tokens=True)
    resized = len(tokenizer) > rows_before
    if resized:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = [tokenizer.convert_tokens_to_ids(t) for t, _ in new]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _init_rows(model.get_input_embeddings().weight, n_before, ids, method, desc_ids, generator)
        if not tied and model.get_output_embeddings() is not None:
            _init_rows(model.get_output_embeddings().weight, n_before, ids, method, desc_ids, generator)

    weight = model.get_input_embeddings().weight.detach()
    return {
        "init": method,
        "seed": seed,
        "tied_embeddings": tied,
        "tokenizer_len": {"before": n_before, "after": len(tokenizer)},
        "embedding_rows": {"before": rows_before, "after": weight.shape[0], "resized": resized},
        "tokens": [
            {"token": t, "id": i, "description": d, "init": method, "padding_row_reused": i < rows_before,
             "init_norm": round(float(weight[i].float().norm()), 6)}
            for (t, d), i in zip(new, ids, strict=True)
        ] + [{"token": t, "id": vocab[t], "init": "existing"} for t in existing],
    }


def joined_tokens(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """What two `add_tokens` calls, `first` then `then`, did together (each token says its own init)."""
    rows_before, rows_after = first["embedding_rows"], then["embedding_rows"]
    return {**first,
            "tokenizer_len": {"before": first["tokenizer_len"]["before"], "after": then["tokenizer_len"]["after"]},
            "embedding_rows": {"before": rows_before["before"], "after": rows_after["after"],
                               "resized": rows_before["resized"] or rows_after["resized"]},
            "tokens": first["tokens"] + then["tokens"]}


def embedding_module_names(model: Any) -> tuple[str, str | None]:
    """Leaf names of the input and output embedding modules (e.g. `embed_tokens`, `lm_head`) for PEFT."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    out = model.get_output_embeddings()
    return names[id(model.get_input_embeddings())], (names[id(out)] if out is not None else None)


SOFT_TOKEN = "<soft_{}>"  # the name of a soft prompt's i-th token (`train.soft_prompt`, ProMoT)


def soft_prompt_tokens(n: int) -> list[str]:
    """The `n` tokens of a soft prompt, in the order they stand before a task prompt."""
    return [SOFT_TOKEN.format(i) for i in range(n)]


def with_soft_prompt(messages: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """`messages` with `prefix` (a soft prompt's tokens) put before the first user turn's content."""
    if not prefix:
        return messages
    i = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if i is None:
        return messages
    return [*messages[:i], {**messages[i], "content": prefix + messages[i]["content"]}, *messages[i + 1:]]
