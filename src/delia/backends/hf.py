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
MAX_ROWS_CPU = 64
MAX_ROWS_GPU = 512


# Candidates examined for the top-p cut before falling back to sorting the whole vocabulary.
TOP_P_CANDIDATES = 256


def _sampler(seeds: Sequence[int], params: SamplingParams, vocab: int, device: Any):
    """A logits processor that samples inside greedy decoding: it draws the token itself (top-p, then
    inverse-CDF with one uniform per row and step) and leaves only that token finite for the argmax.

    Each row draws from its own generator, so its sample is reproducible from its seed alone, whatever
    else is in the batch. The top-p cut is found among the top 256 tokens (a full sort per row and step
    costs more than the model's forward pass on CPU), sorting the whole row only when those 256 hold
    less than `top_p` of the mass. Token ids beyond the tokenizer (padding rows) are never chosen.
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
            probs = (scores / params.temperature).softmax(dim=-1)
            if params.top_p < 1:
                probs = probs * (probs >= self._cutoff(probs))
            cdf = probs.cumsum(dim=-1)
            u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in self.generators])
            token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=vocab - 1)
            return torch.full_like(scores, -float("inf")).scatter_(1, token, 0.0)

        @staticmethod
        def _cutoff(probs: torch.Tensor) -> torch.Tensor:
            """Per row, the smallest probability still kept: tokens are kept, most likely first, while the
            mass before them is below top_p (the most likely token always)."""
            k = min(TOP_P_CANDIDATES, probs.shape[-1])
            top, _ = probs.topk(k, dim=-1)
            short = top[:, :-1].sum(dim=-1) < params.top_p  # the cut may lie beyond the candidates
            if short.any():
                full, _ = probs[short].sort(dim=-1, descending=True)
                top = torch.cat([top, top.new_zeros(top.shape[0], probs.shape[-1] - k)], dim=-1)
                top[short] = full
            before = top.cumsum(dim=-1) - top
            kept = (before < params.top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
            return top.gather(1, kept - 1)

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
