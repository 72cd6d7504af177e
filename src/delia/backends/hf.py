"""transformers back end: batched `generate` with left padding, prompts bucketed by length, batch size
fitted to memory, and per-row seeded sampling so a row's answer depends on its seed, not its batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from delia.backends import Completion, SamplingParams, request_seeds
from delia.errors import DeliaError

# Upper bound on rows per batch: beyond this a CPU gains nothing and a GPU runs out of other limits first.
MAX_ROWS_CPU = 32
MAX_ROWS_GPU = 512


def _sampler(seeds: Sequence[int], params: SamplingParams, vocab: int, device: Any):
    """A logits processor that makes greedy decoding sample: argmax(logits/T + Gumbel noise) is a draw from
    softmax(logits/T) (the Gumbel-max trick). Each row draws its noise from its own generator, so its
    sample is reproducible from its seed alone, whatever else is in the batch. It also keeps the model
    from picking the padding rows beyond the tokenizer's vocabulary, which decode to nothing.
    """
    import torch
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        def __init__(self) -> None:
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores = scores.float()
            if scores.shape[-1] > vocab:
                scores[:, vocab:] = -float("inf")
            if params.greedy:
                return scores
            scores = scores / params.temperature
            if params.top_p < 1:
                sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
                cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
                remove = cumulative <= 1 - params.top_p
                remove[:, -1] = False  # always keep the most likely token
                scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
            u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device)
                             for g in self.generators])
            gumbel = -torch.log(-torch.log(u.clamp_(min=1e-20, max=1 - 1e-7)))
            return scores + gumbel

    return SeededSampler()


def plan_batches(lengths: Sequence[int], n: int, max_new_tokens: int, max_rows: int,
                 token_budget: int) -> list[list[int]]:
    """Prompt indices grouped into batches: longest first (memory trouble shows in the first batch), similar
    lengths together (less padding), each batch within `max_rows` rows and `token_budget` padded tokens.
    A prompt's `n` samples always share a batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = (lengths[current[0]] if current else lengths[i]) + max_new_tokens
        rows = (len(current) + 1) * n
        if current and (rows > max_rows or rows * width > token_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class HFBackend:
    """transformers `generate` on a loaded model, CPU or GPU."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int | str = "auto"):
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise DeliaError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        gen_eos = model.generation_config.eos_token_id
        eos = {tokenizer.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = sorted(e for e in eos if e is not None)
        if not self.eos_ids:
            raise DeliaError("the model and tokenizer define no end-of-sequence token")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]

    @classmethod
    def load(cls, model: str, *, batch_size: int | str = "auto", device: str | None = None,
             dtype: str = "auto") -> HFBackend:
        """Resolve and load `model` (see `delia.models.load_model`) and wrap it."""
        from delia.models import load_model

        m, tok = load_model(model, dtype=dtype, device=device)
        return cls(m, tok, batch_size)

    # ------------------------------------------------------------------ memory

    def _kv_bytes_per_token(self) -> int:
        c = self.model.config
        c = getattr(c, "text_config", c)
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        itemsize = next(self.model.parameters()).element_size()
        return 2 * c.num_hidden_layers * heads * head_dim * itemsize

    def _free_bytes(self) -> int:
        import torch

        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return free
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 4 << 30

    def _limits(self) -> tuple[int, int]:
        """(max rows, padded-token budget) per batch. Each padded token costs its KV cache plus a share of
        the activations; a third of free memory is used so the estimate's slack absorbs the rest.
        """
        max_rows = MAX_ROWS_GPU if self.device.type == "cuda" else MAX_ROWS_CPU
        if self.batch_size != "auto":
            return int(self.batch_size), 1 << 62
        c = getattr(self.model.config, "text_config", self.model.config)
        itemsize = next(self.model.parameters()).element_size()
        per_token = self._kv_bytes_per_token() + 8 * c.hidden_size * itemsize
        return max_rows, max(1, self._free_bytes() // 3 // per_token)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> Iterator[tuple[int, Completion]]:
        """Yield `(prompt index, completion)`, `params.n` per prompt, one batch at a time (longest prompts first)."""
        if not prompts:
            return
        if any(len(p) == 0 for p in prompts):
            raise DeliaError("empty prompt (no token ids)")
        sample_seeds = request_seeds(len(prompts), params, seeds)
        max_rows, budget = self._limits()
        max_rows = max(max_rows, params.n)
        lengths = [len(p) for p in prompts]
        queue = plan_batches(lengths, params.n, params.max_new_tokens, max_rows, budget)
        while queue:
            batch = queue.pop(0)
            try:
                done = self._generate_batch(prompts, batch, sample_seeds, params)
            except Exception as e:
                if not _is_oom(e) or len(batch) == 1:
                    raise
                _free_cache()  # the estimate was too generous: halve the rows for this and every later batch
                max_rows = len(batch) // 2 * params.n
                rest = [*batch, *(i for b in queue for i in b)]
                queue = [[rest[j] for j in b] for b in plan_batches(
                    [lengths[i] for i in rest], params.n, params.max_new_tokens, max_rows, budget)]
                continue
            yield from done

    def _generate_batch(self, prompts: Sequence[Sequence[int]], batch: list[int], sample_seeds: list[list[int]],
                        params: SamplingParams) -> list[tuple[int, Completion]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        rows = [(i, k) for i in batch for k in range(params.n)]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (i, _k) in enumerate(rows):
            p = prompts[i]
            ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = 1
        config = GenerationConfig(do_sample=False, max_new_tokens=params.max_new_tokens,
                                  eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        sampler = _sampler([sample_seeds[i][k] for i, k in rows], params, len(self.tokenizer), self.device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=config, logits_processor=LogitsProcessorList([sampler]))
        generated = out[:, width:].tolist()
        eos = set(self.eos_ids)
        results = []
        for r, (i, _k) in enumerate(rows):
            tokens = generated[r]
            end = next((j for j, t in enumerate(tokens) if t in eos), None)
            finish = "stop" if end is not None else "length"
            kept = tokens[:end] if end is not None else tokens[: params.max_new_tokens]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            n_tokens = len(kept) + (1 if end is not None else 0)
            results.append((i, Completion(text, finish, len(prompts[i]), n_tokens)))
        return results


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
