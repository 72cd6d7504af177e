"""KL anchoring: diverse rows trained towards the base model's next-token distribution instead of their text.

A self-sampled answer gives the anchor one token per position; the base model's whole distribution at
that position gives it far more. With LoRA the base model is the same network with the adapter switched
off, so the anchor costs one forward pass without gradient and no second copy of the model.

The loss of a batch is `(sum of CE over task answer tokens + kl_coef * sum of KL over anchor answer tokens)
/ answer tokens`: the same per-token weighting as plain SFT on the same mixture, so `kl_coef=1` gives an
anchor row the weight a diverse row has in `delia`. KL(base || tuned) is computed in chunks of positions,
each checkpointed, so neither model's `[positions, vocab]` logits exist in full at any time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from trl import SFTTrainer

from delia.training.config import ANCHOR_COLUMN


def chunked_kl(h_tuned: torch.Tensor, h_base: torch.Tensor, tuned_head: Callable[[torch.Tensor], torch.Tensor],
               base_head: Callable[[torch.Tensor], torch.Tensor], temperature: float = 1.0,
               chunk: int = 1024) -> torch.Tensor:
    """Sum over positions of KL(softmax(base/T) || softmax(tuned/T)) * T^2, from final hidden states `[N, H]`.

    Each chunk is checkpointed: its logits are recomputed in the backward pass instead of kept, so memory
    holds `chunk x vocab` logits at a time, whatever N is. T^2 keeps gradient sizes comparable across T.
    """
    if h_tuned.shape != h_base.shape:
        raise ValueError(f"hidden states differ in shape: {tuple(h_tuned.shape)} vs {tuple(h_base.shape)}")

    def part(ht: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            base = F.log_softmax(base_head(hb).float() / temperature, dim=-1)
        tuned = F.log_softmax(tuned_head(ht).float() / temperature, dim=-1)
        return F.kl_div(tuned, base, log_target=True, reduction="sum") * temperature**2

    total = h_tuned.new_zeros((), dtype=torch.float32)
    for i in range(0, h_tuned.shape[0], chunk):
        ht, hb = h_tuned[i:i + chunk], h_base[i:i + chunk]
        total = total + (checkpoint(part, ht, hb, use_reentrant=False) if ht.requires_grad else part(ht, hb))
    return total


class AnchorCollator:
    """TRL's collator, plus the per-row anchor flag it would drop (False for rows that lack it)."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        flags = [bool(e.get(ANCHOR_COLUMN, False)) for e in examples]
        batch = self.inner([{k: v for k, v in e.items() if k != ANCHOR_COLUMN} for e in examples])
        batch[ANCHOR_COLUMN] = torch.tensor(flags)
        return batch


class AnchoredSFTTrainer(SFTTrainer):
    """SFTTrainer whose anchor rows are trained by KL to the base model (the PEFT model, adapter disabled).

    One forward pass of the tuned model serves both losses: task rows go through TRL's fused LM head,
    while a hook on the backbone keeps the final hidden states that the KL of the anchor rows needs.
    """

    def __init__(self, *args: Any, kl_coef: float = 1.0, kl_temperature: float = 1.0, kl_chunk: int = 1024,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if kl_coef < 0 or kl_temperature <= 0 or kl_chunk < 1:
            raise ValueError("kl_coef must be >= 0, kl_temperature > 0 and kl_chunk >= 1")
        self.kl_coef, self.kl_temperature, self.kl_chunk = kl_coef, kl_temperature, kl_chunk
        self.data_collator = AnchorCollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if ANCHOR_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ANCHOR_COLUMN]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        anchor = inputs.pop(ANCHOR_COLUMN, None)
        if anchor is None or not bool(anchor.any()) or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        anchor = anchor.to(labels.device)
        answer = labels[:, 1:] != -100  # positions whose next token is an answer token
        if num_items_in_batch is None:
            num_items_in_batch = answer.sum()
        peft_model = self.accelerator.unwrap_model(model)
        hf_model = peft_model.get_base_model()
        with _keep_hidden(hf_model.base_model) as kept:
            loss = super().compute_loss(model, {**inputs, "labels": labels.masked_fill(anchor[:, None], -100)},
                                        num_items_in_batch=num_items_in_batch)
        rows = anchor.nonzero().flatten()
        ids, mask = inputs["input_ids"][rows], inputs.get("attention_mask")
        mask = mask[rows] if mask is not None else None
        with torch.no_grad(), peft_model.disable_adapter():
            h_base = hf_model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        where = answer[rows]
        h_tuned = kept["h"][rows][:, :-1][where]
        head = hf_model.get_output_embeddings()

        def base_head(h: torch.Tensor) -> torch.Tensor:
            with peft_model.disable_adapter():
                return head(h)

        kl = chunked_kl(h_tuned, h_base[:, :-1][where], head, base_head, self.kl_temperature, self.kl_chunk)
        scale = torch.as_tensor(num_items_in_batch, device=kl.device).clamp(min=1)
        if self.args.average_tokens_across_devices:  # as TRL scales its CE term, given num_items_in_batch
            scale = scale / (self.accelerator.num_processes // self.get_tp_size())
        mode = "train" if model.training else "eval"
        self._metrics[mode]["anchor_kl"].append(float(kl.detach()) / max(int(where.sum()), 1))
        return loss + self.kl_coef * kl / scale


@contextlib.contextmanager
def _keep_hidden(backbone: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the backbone's last hidden state of the forward pass run inside the block."""
    kept: dict[str, torch.Tensor] = {}
    handle = backbone.register_forward_hook(lambda _m, _a, out: kept.__setitem__("h", out.last_hidden_state))
    try:
        yield kept
    finally:
        handle.remove()
