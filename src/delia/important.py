"""The paper's diagnostic: loss on chosen ("important") tokens of the task's eval rows, at every evaluation.

Like the authors' trainer, every position of the rendered conversation whose target is an important
token counts (prompt and response: a new token such as `<sep>` usually sits in the instruction), and
the JSONL row splits the mean by where the token sits, and by token, so the report can plot each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from delia.errors import DeliaError
from delia.files import JsonlAppender, read_complete_jsonl, write_jsonl


def important_ids(tokenizer: Any, tokens: list[str]) -> dict[int, str]:
    """id -> chosen string, for every vocabulary token whose decoded text contains a chosen string, as the
    authors matched them: `'` takes every token with a quote in it; an added token such as `<sep>` only itself.
    """
    decoded = list(enumerate(tokenizer.batch_decode([[i] for i in range(len(tokenizer))])))
    out: dict[int, str] = {}
    for token in tokens:
        hits = [i for i, text in decoded if token in text]
        if not hits:
            raise DeliaError(f"important token {token!r} matches no token of the vocabulary")
        out.update(dict.fromkeys(hits, token))
    return out


def encode_rows(tokenizer: Any, records: list[dict[str, Any]], max_length: int | None) -> list[tuple[list[int], int]]:
    """(ids of the whole conversation, number of prompt tokens) per record, rendered with the chat template."""
    rows = []
    for r in records:
        msgs = r["messages"]
        full = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        rows.append((full[:max_length] if max_length else full, len(prompt)))
    return rows


class ImportantTokenLoss:
    """A `TrainerCallback` (built by `make_callback`) writing one JSONL row per evaluation.

    Kept free of a transformers base class at import time so `delia --help` stays fast.
    """

    def __init__(self, rows: list[tuple[list[int], int]], ids: dict[int, str], path: Path):
        self.rows, self.ids, self.path = rows, ids, Path(path)
        self.last_step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Drop rows from beyond the step a resumed run restarts at (they will be recomputed)."""
        if not state.is_world_process_zero:
            return
        kept = [r for r in read_complete_jsonl(self.path) if r["step"] <= state.global_step]
        write_jsonl(self.path, kept)
        self.last_step = kept[-1]["step"] if kept else None

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or state.global_step == self.last_step:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **self.measure(model)}
        if state.is_world_process_zero:
            with JsonlAppender(self.path) as out:
                out.write([row])
        self.last_step = state.global_step

    def measure(self, model: Any) -> dict[str, Any]:
        """Mean cross-entropy of the important targets: overall, in prompt/response, and per chosen token."""
        import torch

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total: dict[str, list[float]] = {"all": [], "prompt": [], "response": []}
        per_token: dict[str, list[float]] = {}
        chosen = torch.tensor(sorted(self.ids), device=device)
        try:
            with torch.no_grad():
                for ids, n_prompt in self.rows:
                    x = torch.tensor([ids], device=device)
                    logits = model(input_ids=x).logits[0, :-1].float()
                    targets = x[0, 1:]
                    pos = torch.isin(targets, chosen).nonzero().flatten()
                    if not len(pos):
                        continue
                    losses = torch.nn.functional.cross_entropy(logits[pos], targets[pos], reduction="none")
                    for p, loss in zip(pos.tolist(), losses.tolist(), strict=True):
                        where = "response" if p + 1 >= n_prompt else "prompt"
                        total["all"].append(loss)
                        total[where].append(loss)
                        per_token.setdefault(self.ids[int(targets[p])], []).append(loss)
        finally:
            model.train(was_training)
        mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
        return {
            "loss": mean(total["all"]), "count": len(total["all"]),
            "prompt_loss": mean(total["prompt"]), "response_loss": mean(total["response"]),
            "per_token": {t: {"loss": mean(v), "count": len(v)} for t, v in sorted(per_token.items())},
        }


def make_callback(rows: list[tuple[list[int], int]], ids: dict[int, str], path: Path) -> Any:
    """An `ImportantTokenLoss` that is also a `transformers.TrainerCallback`."""
    from transformers import TrainerCallback

    cls = type("ImportantTokenLossCallback", (ImportantTokenLoss, TrainerCallback), {})
    return cls(rows, ids, path)
