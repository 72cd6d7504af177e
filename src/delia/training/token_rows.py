"""The new tokens' embedding rows as the only trained part of the embedding (`train_rows new`), at the cost of the rows.

`embedding_training` asks PEFT for trainable tokens (or, with `train_rows all`, a trainable copy of the matrix);
`train_token_rows` makes those rows train under TRL's fused LM head (`delia.patches.peft_head_bias`), keeps them out
of weight decay (`delia.patches.token_rows_decay`) and swaps PEFT's whole-matrix computation for delia's row-only
one (`_fast_token_rows`), which gives the same values and gradients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from delia.errors import DeliaError
from delia.patches.peft_head_bias import give_head_a_bias
from delia.patches.token_rows_decay import keep_token_rows_out_of_decay
from delia.tokens import embedding_module_names


def embedding_training(base: Any, tokens: dict[str, Any] | None,
                       train_rows: str) -> tuple[list[str] | None, list[int] | dict[str, list[int]] | None]:
    """(PEFT `modules_to_save`, PEFT `trainable_token_indices`) that train the embedding rows of `tokens`.

    `new`: only the tokens' rows are parameters (PEFT trainable tokens): on the input embedding, and on the
    output embedding too when untied (tied: PEFT ties the head's rows to the input's). `all`: a trainable
    copy of the whole matrix (and of the untied head).
    """
    if not tokens:
        return None, None
    in_name, out_name = embedding_module_names(base)
    untied_head = [out_name] if out_name and not tokens["tied_embeddings"] else []
    if train_rows == "all":
        return [in_name] + untied_head, None
    rows = [t["id"] for t in tokens["tokens"]]
    return None, ({in_name: rows, out_name: rows} if untied_head else rows)


def copy_token_rows(base: Any, tokenizer: Any, folder: Path, tokens: list[str]) -> None:
    """Write the rows that the training run in `folder` ended with for `tokens` into `base` (input embedding, and
    the output one when untied): a later phase starts from an earlier one's rows. The tokens must have the same
    ids in both tokenizers."""
    import torch

    from delia.models import load_trained

    if not (folder / "adapter_config.json").exists():
        raise DeliaError(f"`token_rows_from` {folder}: not a training run's folder (no adapter_config.json)")
    trained, trained_tokenizer = load_trained(folder, device="cpu")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    vocab = trained_tokenizer.get_vocab()
    if missing := [t for t, i in zip(tokens, ids, strict=True) if vocab.get(t) != i]:
        raise DeliaError(f"`token_rows_from` {folder}: its tokenizer lacks {', '.join(missing)} or gives them other "
                         "ids (its run must add the same tokens: `add_token`, `soft_prompt`)")
    index = torch.tensor(ids)
    with torch.no_grad():
        pairs = [(base.get_input_embeddings(), trained.get_input_embeddings())]
        if base.get_output_embeddings() is not None and base.get_output_embeddings().weight.data_ptr() != \
                base.get_input_embeddings().weight.data_ptr():
            pairs.append((base.get_output_embeddings(), trained.get_output_embeddings()))
        for mine, theirs in pairs:
            mine.weight[index] = theirs.weight[index].to(mine.weight.dtype)


def freeze_token_rows(model: Any, ids: list[int]) -> None:
    """Keep the trainable-token rows of `ids` as they are: their gradient is zeroed, so Adam never moves them
    (they are out of weight decay, `train_token_rows`), and they are saved with the adapter like the others."""
    import torch

    from delia.patches.token_rows_decay import TOKEN_ROWS

    seen: set[int] = set()
    for module in model.modules():
        deltas = getattr(module, TOKEN_ROWS, None)
        if deltas is None:
            continue
        for name, param in deltas.items():
            if id(param) in seen:  # a tied head shares the input's rows
                continue
            seen.add(id(param))
            keep = torch.tensor([float(i not in ids) for i in module.token_indices[name]], device=param.device)
            param.register_hook(lambda grad, keep=keep: grad * keep.unsqueeze(-1).to(grad.dtype))


def train_token_rows(trainer: Any) -> None:
    """Make PEFT trainable-token rows train under TRL's fused LM head, out of weight decay, at the cost of the rows
    (`train_rows new`; not with FSDP or ZeRO-3, which shard the embedding)."""
    if trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and
                                   trainer.accelerator.state.deepspeed_plugin.zero_stage == 3):
        raise DeliaError("`train_rows` new (PEFT trainable tokens) is not supported with FSDP or ZeRO-3, "
                         "which shard the embedding; set `train_rows` all with these")
    give_head_a_bias(trainer)
    keep_token_rows_out_of_decay(trainer)
    _fast_token_rows(trainer)


def _fast_token_rows(trainer: Any) -> None:
    """Train the token rows at the cost of the rows: same values, same gradients, without whole-matrix work.

    PEFT's trainable tokens compute with the merged matrix (a copy of the whole embedding with the rows
    written in). Its gradient is a whole matrix too: a dense embedding gradient on the input side, and on
    the output side TRL's fused head, seeing a `weight` that requires grad, computes the gradient of every
    head row (one more tokens x vocab x hidden matmul per step) to keep the new rows' part of it. Here:

    - input: the base embedding's lookup (frozen), with the new tokens' positions replaced by their rows;
    - output, in TRL's fused forward: the head is handed the merged matrix detached (the fused kernel then
      computes only the hidden-state gradient, with the trained rows' values in the softmax), and the new
      rows' gradient is added through a term that is exactly zero in value, `sum_r (1[target = r] - p_r)
      (z_r - sg(z_r))` per position, with z_r = sg(h) . row_r and p_r from the kernel's own log-normaliser
      (target logit - log-prob): the gradient of the log-probability with respect to row r.

    Log-probabilities and loss keep their values bit for bit. Used for plain heads only (no logit scale or
    softcap, TRL's temperature 1, no bias), otherwise PEFT's path runs unchanged; outside training
    (no grad, merged or disabled adapters) too. `entropy` from the fused head carries no gradient to the
    rows (SFT's loss does not use it).
    """
    import functools

    import torch
    from peft.utils.other import TrainableTokensWrapper

    base = trainer.model.get_base_model()
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if not isinstance(emb, TrainableTokensWrapper):
        return

    def active(layer: Any) -> list[str]:
        if layer.disable_adapters or layer.merged or not torch.is_grad_enabled():
            return []
        return [a for a in layer.active_adapters if a in layer.trainable_tokens_delta]

    layer_in = emb.token_adapter
    if type(layer_in.base_layer) is torch.nn.Embedding and layer_in._get_embed_scale() is None:
        peft_forward = layer_in.forward

        def embed(x: Any, *args: Any, **kwargs: Any) -> Any:
            names = active(layer_in)
            if not names or args or kwargs:
                return peft_forward(x, *args, **kwargs)
            out = layer_in.base_layer(x)
            for name in names:
                for j, i in enumerate(layer_in.token_indices[name]):
                    row = layer_in.trainable_tokens_delta[name][j].to(out.dtype)
                    out = torch.where((x == i).unsqueeze(-1), row, out)
            return out

        layer_in.forward = embed

    text = base.config.get_text_config()
    plain_head = (isinstance(head, TrainableTokensWrapper) and getattr(head, "bias", None) is None
                  and not any(getattr(text, k, None) is not None for k in (
                      "final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                      "logits_scaling")))
    if not plain_head or "forward" not in vars(base):  # TRL sets its fused forward on the model instance
        return
    fused, backbone, layer_out = base.forward, getattr(base, base.base_model_prefix), head.token_adapter

    @functools.wraps(fused)
    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        names = active(layer_out) if fused_lm_head else []
        call = dict(fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                    num_items_in_batch=num_items_in_batch)
        if not names:
            return fused(*args, **call, **kwargs)
        seen: list[Any] = []
        hook = backbone.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state))
        weight = layer_out.get_merged_weights(names).detach()
        object.__setattr__(head, "weight", weight)  # what the fused head reads, for this call only
        try:
            out = fused(*args, **call, **kwargs)
        finally:
            hook.remove()
            del head.__dict__["weight"]
        h = seen[-1][:, :-1] if shift_labels is None else seen[-1]
        targets = (labels[:, 1:] if shift_labels is None else shift_labels).to(weight.device)
        mask = out.label_mask
        hm, tm = h.to(weight.device)[mask].detach().float(), targets[mask]
        log_norm = (hm * weight[tm].float()).sum(-1) - out.log_probs[mask].detach().float()
        term = hm.new_zeros(hm.shape[0])
        for name in names:
            ids = torch.tensor(layer_out.token_indices[name], device=weight.device)
            z = hm @ layer_out.trainable_tokens_delta[name].float().t()
            p = torch.exp(z.detach() - log_norm.unsqueeze(-1))
            term = term + (((tm.unsqueeze(-1) == ids).float() - p) * (z - z.detach())).sum(-1)
        zero = out.log_probs.new_zeros(out.log_probs.shape).masked_scatter(mask, term.to(out.log_probs.dtype))
        out.log_probs = out.log_probs + zero
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        out.loss = out.loss - zero.sum() / count
        return out

    base.forward = forward
