"""transformers back end with continuous batching: prompts join the batch longest first, each decode step
interleaved with one prefill forward of at most `PREFILL_CHUNK_TOKENS` prompt tokens (a run of similar-length
prompts left-padded together, or a chunk of one long prompt), so the first rows decode, finish and are
yielded while later prompts are still being prefilled. Rows decode together over one KV cache, and each row
leaves the batch the step it ends, its slot refilled from the queue, so short answers never wait for long
ones. The batch is sized by a token budget (each row reserves its prompt plus `max_new_tokens` of KV cache,
padding to the batch's widest row included), fitted to memory by default; every row samples from its own
seeded generator, so its answer depends on its seed, not on its batch or the budget.

Continuous batching edits the cache's key and value tensors in place, which is sound only for plain
full-attention layers; a model with other layers (sliding-window, chunked, linear-attention or
recurrent state) is decoded by a static loop instead: one batch at a time (within the same token budget),
prefilled together in one forward and decoded until its last row ends (see `continuous_batching_supported`).
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from delia.backends.base import Completion, SamplingParams, request_seeds
from delia.errors import DeliaError

# Upper bound on rows decoded together: beyond this a CPU gains little per row and holds more work
# in flight (lost on a crash); a GPU runs into other limits first.
MAX_ROWS_CPU = 64
MAX_ROWS_GPU = 512


# Tokens of KV cache a CPU batch holds at most when the budget is fitted to memory: more rows hold more work
# in flight (lost on a kill) for little gain. Not much less, though: a batch's cache is padded to its widest
# row, so with long prompts a smaller budget means few rows per decode step (docs/benchmarks.md's long-prompt
# command on SmolLM2: 109 s at 32768 tokens, 83 s at 65536, peak memory 2.8 and 3.0 GiB;
# `benchmarks/sample_first_row.py`).
MAX_TOKENS_CPU = 65536

# Prompt tokens per prefill forward (rows x columns): short prompts are prefilled several together, a
# longer one in chunks of this many tokens, one chunk between two decode steps, so decoding rows are never
# held up for long by a prefill and rows start finishing while the rest are still being prefilled.
PREFILL_CHUNK_TOKENS = 512

# Rows prefilled together are at least this share of the longest one's length, so padding wastes at most a
# quarter of a prefill forward (see `HFBackend._admit`; `benchmarks/prefill_grouping.py`).
PREFILL_MIN_SHARE = 0.75

# Candidates examined for the top-p cut before falling back to sorting the whole vocabulary.
TOP_P_CANDIDATES = 256


def draw(scores: Any, generators: Sequence[Any], params: SamplingParams, vocab: int,
         banned: Sequence[int] = ()) -> Any:
    """Next token per row: greedy, or top-p then inverse-CDF sampling with one uniform per row from
    that row's own generator (so a row's draw depends on its seed alone).

    The top-p cut is found among the top 256 tokens (a full sort per row and step costs more than the
    model's forward pass on CPU), sorting the whole row only when those hold less than `top_p` of the
    mass. Token ids beyond the tokenizer (padding rows of the embedding) and `banned` ids are never chosen.
    """
    import torch

    with torch.inference_mode():
        scores = scores.float()
        if scores.shape[-1] > vocab:
            scores = scores[:, :vocab]
        if banned:
            scores = scores.index_fill(1, torch.tensor(banned, device=scores.device), float("-inf"))
        if params.greedy:
            return scores.argmax(dim=-1)
        probs = (scores / params.temperature).softmax(dim=-1)
        if params.top_p < 1:
            probs = probs * (probs >= _top_p_cutoff(probs, params.top_p))
        cdf = probs.cumsum(dim=-1)
        u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])
        return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp_(max=vocab - 1)


def _top_p_cutoff(probs: Any, top_p: float) -> Any:
    """Per row, the smallest probability kept: tokens are kept, most likely first, while the mass before
    them is below top_p (the most likely token always)."""
    import torch

    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    top, _ = probs.topk(k, dim=-1)
    short = top[:, :-1].sum(dim=-1) < top_p  # the cut may lie beyond the candidates
    if short.any():
        full, _ = probs[short].sort(dim=-1, descending=True)
        top = torch.cat([top, top.new_zeros(top.shape[0], probs.shape[-1] - k)], dim=-1)
        top[short] = full
    before = top.cumsum(dim=-1) - top
    kept = (before < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
    return top.gather(1, kept - 1)


@dataclass
class _Row:
    index: int  # into prompts
    sample: int
    seed: int
    generator: Any
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Filling:
    """Rows being prefilled: their left-padded prompt ids and mask, their own cache, the columns done so far."""

    rows: list[_Row]
    ids: Any
    mask: Any
    cache: Any
    done: int = 0


def continuous_batching_supported(model: Any) -> bool:
    """Whether `model`'s KV cache is one the continuous loop may merge and trim (`_merge`, `_select`): every
    layer of the `DynamicCache` transformers builds for its config a plain full-attention `DynamicLayer`.
    Sliding-window and chunked layers keep only a window (and a count of tokens seen), linear-attention
    and recurrent layers keep states, and shared-KV layers keep nothing: editing those would corrupt them.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if getattr(model, "_is_stateful", False):  # recurrent state (mamba and the like)
        return False
    try:
        layers = DynamicCache(config=model.config).layers
    except (KeyError, AttributeError, TypeError, ValueError):  # layer kinds DynamicCache does not know
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def auto_or_positive(name: str, value: Any) -> int | str:
    """`value` if it is 'auto' or a positive integer (a batch size, a token budget), else a DeliaError."""
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DeliaError(f"{name} must be a positive integer or 'auto', got {value!r}")
    return value


class HFBackend:
    """A loaded transformers model decoded by the continuous-batching loop above, on CPU or GPU, or by the
    static loop where its cache does not allow continuous batching (`batching` says which).
    """

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int | str = "auto", batch_tokens: int | str = "auto"):
        for name, value in (("batch_size", batch_size), ("batch_tokens", batch_tokens)):
            auto_or_positive(name, value)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.device = next(model.parameters()).device
        gen_eos = model.generation_config.eos_token_id
        eos = {tokenizer.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = sorted(e for e in eos if e is not None)
        if not self.eos_ids:
            raise DeliaError("the model and tokenizer define no end-of-sequence token")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.batching = "continuous" if continuous_batching_supported(model) else "static"
        # tokens never to generate, as transformers' `generate` reads them (e.g. a soft prompt's: input-only)
        self.banned = sorted(set(getattr(model.generation_config, "suppress_tokens", None) or []))

    @classmethod
    def load(cls, model: str, *, batch_size: int | str = "auto", batch_tokens: int | str = "auto",
             device: str | None = None, dtype: str = "auto") -> HFBackend:
        """Resolve and load `model` (see `delia.models.load_model`) and wrap it."""
        from delia.models import load_model

        m, tok = load_model(model, dtype=dtype, device=device)
        return cls(m, tok, batch_size, batch_tokens)

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
        """(max rows, token budget) of a batch: `batch_size` and `batch_tokens`, or fitted to memory. Each
        token of the budget costs its KV cache plus a share of the activations; a third of free memory is
        used so the estimate's slack absorbs the rest (on CPU at most `MAX_TOKENS_CPU` tokens).
        """
        cpu = self.device.type != "cuda"
        max_rows = int(self.batch_size) if self.batch_size != "auto" else MAX_ROWS_CPU if cpu else MAX_ROWS_GPU
        if self.batch_tokens != "auto":
            return max_rows, int(self.batch_tokens)
        c = getattr(self.model.config, "text_config", self.model.config)
        itemsize = next(self.model.parameters()).element_size()
        per_token = self._kv_bytes_per_token() + 8 * c.hidden_size * itemsize
        budget = max(1, self._free_bytes() // 3 // per_token)
        return max_rows, min(budget, MAX_TOKENS_CPU) if cpu else budget

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> Iterator[tuple[int, Completion]]:
        """Yield `(prompt index, completion)`, `params.n` per prompt, each as soon as its row ends."""
        if not prompts:
            return
        if any(len(p) == 0 for p in prompts):
            raise DeliaError("empty prompt (no token ids)")
        sample_seeds = request_seeds(len(prompts), params, seeds)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # memory trouble shows first
        queue = deque((i, k, s) for i in order for k, s in enumerate(sample_seeds[i]))
        max_rows, budget = self._limits()
        need = len(prompts[order[0]]) + params.max_new_tokens
        if self.batch_tokens != "auto" and need > budget:
            raise DeliaError(f"a batch of {budget} tokens cannot hold the longest prompt ({len(prompts[order[0]])} "
                             f"tokens) and its {params.max_new_tokens} new tokens: raise the token budget "
                             f"(`batch_tokens`) to at least {need} or leave long prompts out (`max_prompt_tokens`)")
        # prefills and prefill forwards, decode steps, rows decoded summed over steps, most KV tokens held
        self.stats: Counter[str] = Counter()
        decode = self._decode if self.batching == "continuous" else self._decode_static
        while queue:
            try:
                yield from decode(prompts, queue, params, max_rows, budget)
            except Exception as e:
                if not _is_oom(e) or max_rows == 1:
                    raise
                _free_cache()  # the estimate was too generous: halve the rows; unfinished rows start again
                max_rows //= 2

    def _decode(self, prompts: Sequence[Sequence[int]], queue: deque[tuple[int, int, int]], params: SamplingParams,
                max_rows: int, budget: int) -> Iterator[tuple[int, Completion]]:
        """Decode until `queue` (prompt index, sample, seed) is empty: each step, one prefill forward of the rows
        joining (`_admit`, `_prefill_step`), then one decode step of the rows in the batch. On an exception the
        rows in flight go back to the front of the queue, to be redone from their seeds."""
        import torch

        eos = set(self.eos_ids)
        vocab = len(self.tokenizer)
        rows: list[_Row] = []
        filling: _Filling | None = None
        cache = mask = None
        last = pos = torch.zeros(0, dtype=torch.long, device=self.device)
        finished: list[tuple[_Row, Completion]] = []  # ended, not yet yielded

        def take(start: int) -> list[int]:
            """Take each row's new token (rows from `start` on); the rows that go on (those that ended are
            moved to `finished`)."""
            keep = list(range(start))
            for j, t in enumerate(last[start:].tolist(), start=start):
                done = self._take(prompts, rows[j], t, eos, params)
                if done is None:
                    keep.append(j)
                else:
                    finished.append((rows[j], done))
            return keep

        try:
            while queue or rows or filling:
                if filling is None and queue:
                    filling = self._admit(prompts, queue, rows, params, max_rows, budget)
                for step in ("prefill", "decode"):
                    if step == "prefill":
                        if filling is None:
                            continue
                        first = self._prefill_step(filling, params, vocab)
                        self._count_in_flight(mask if rows else None, filling)
                        if first is None:
                            continue
                        # prompts done: the rows join the batch with their first tokens
                        cache, mask = _merge(cache, mask, filling.cache, filling.mask)
                        lengths = [len(prompts[r.index]) for r in filling.rows]
                        last = torch.cat([last, first])
                        pos = torch.cat([pos, torch.tensor(lengths, dtype=torch.long, device=self.device)])
                        fresh, rows, filling = len(rows), rows + filling.rows, None
                    else:
                        if not rows:
                            continue
                        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                        logits = self._forward(last.unsqueeze(1), mask, pos.unsqueeze(1), cache)
                        self.stats["decode_steps"] += 1
                        self.stats["row_steps"] += len(rows)
                        self._count_in_flight(mask, filling)
                        pos = pos + 1
                        last = draw(logits, [r.generator for r in rows], params, vocab, self.banned)
                        fresh = 0
                    keep = take(fresh)
                    if len(keep) < len(rows):
                        rows = [rows[j] for j in keep]
                        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
                        last, pos = last[idx], pos[idx]
                        cache, mask = _select(cache, mask, idx)
                    while finished:
                        yield finished[0][0].index, finished[0][1]
                        finished.pop(0)
        except BaseException:
            pending = [r for r, _ in finished] + rows + (filling.rows if filling is not None else [])
            queue.extendleft((r.index, r.sample, r.seed) for r in reversed(pending))
            raise

    def _admit(self, prompts: Sequence[Sequence[int]], queue: deque[tuple[int, int, int]], rows: list[_Row],
               params: SamplingParams, max_rows: int, budget: int) -> _Filling | None:
        """The next rows to prefill, from the front of `queue` (longest first), or None if none fits yet.

        Rows join while every row in flight can still reserve the widest one's prompt plus `max_new_tokens` of
        cache within `budget` (the batch's cache is padded to its widest row), up to `max_rows`; rows prefilled
        together are a run of similar length (`PREFILL_MIN_SHARE`) within `PREFILL_CHUNK_TOKENS` padded tokens,
        or a single longer prompt, prefilled in chunks. With nothing in flight, one row always joins.
        """
        new = params.max_new_tokens
        reserve = max((len(prompts[r.index]) + new for r in rows), default=0)
        taken: list[tuple[int, int, int]] = []
        while queue and len(rows) + len(taken) < max_rows:
            length = len(prompts[queue[0][0]])
            if taken:
                width = len(prompts[taken[0][0]])
                if length < PREFILL_MIN_SHARE * width or (len(taken) + 1) * width > PREFILL_CHUNK_TOKENS:
                    break
            if (len(rows) + len(taken) + 1) * max(reserve, length + new) > budget and (rows or taken):
                break
            taken.append(queue.popleft())
            reserve = max(reserve, length + new)
        if not taken:
            return None
        from transformers import DynamicCache

        group = [self._row(*t) for t in taken]
        ids, mask = self._left_padded(prompts, group)
        self.stats["prefills"] += 1
        return _Filling(group, ids, mask, DynamicCache())

    def _prefill_step(self, f: _Filling, params: SamplingParams, vocab: int) -> Any:
        """Prefill the next columns of `f` (at most `PREFILL_CHUNK_TOKENS` tokens); the rows' first sampled
        tokens once their prompts are done, else None."""
        end = min(f.ids.shape[1], f.done + max(1, PREFILL_CHUNK_TOKENS // len(f.rows)))
        mask = f.mask[:, :end]
        positions = (mask.cumsum(dim=1) - 1).clamp_(min=0)[:, f.done:end]
        logits = self._forward(f.ids[:, f.done:end], mask, positions, f.cache)
        self.stats["prefill_forwards"] += 1
        self.stats["prefill_tokens"] += len(f.rows) * (end - f.done)
        f.done = end
        if end < f.ids.shape[1]:
            return None
        return draw(logits, [r.generator for r in f.rows], params, vocab, self.banned)

    def _count_in_flight(self, mask: Any, filling: _Filling | None) -> None:
        """Record the most tokens of KV cache held at once: the batch's (padding included) and the filling rows'."""
        held = (mask.numel() if mask is not None else 0) + (len(filling.rows) * filling.done if filling else 0)
        self.stats["max_tokens_in_flight"] = max(self.stats["max_tokens_in_flight"], held)

    def _decode_static(self, prompts: Sequence[Sequence[int]], queue: deque[tuple[int, int, int]],
                       params: SamplingParams, max_rows: int, budget: int) -> Iterator[tuple[int, Completion]]:
        """`_decode` for caches it cannot edit: rows are taken a batch at a time, prefilled together (left-padded)
        into the cache transformers builds for the model, and decoded until the last one ends; no cache is
        merged or trimmed. A row that has ended rides along unread. Rows sample as in `_decode` (own seeded
        generator, one draw per token), so an answer still depends on its seed alone. On an exception the
        unfinished rows go back to the front of the queue.
        """
        import torch
        from transformers import DynamicCache

        eos = set(self.eos_ids)
        vocab = len(self.tokenizer)
        unfinished: list[_Row] = []
        try:
            while queue:
                room = budget // (len(prompts[queue[0][0]]) + params.max_new_tokens)  # longest first
                rows = [self._row(*queue.popleft()) for _ in range(max(1, min(max_rows, room, len(queue))))]
                unfinished = list(rows)
                cache, mask, last = self._prefill_group(prompts, rows, params, vocab,
                                                        DynamicCache(config=self.model.config))
                self.stats["prefills"] += 1
                feed, pos = last.clone(), mask.sum(dim=1)  # each row's next input and its position
                active = list(range(len(rows)))
                while True:
                    still = []
                    for j, t in zip(active, last.tolist(), strict=True):
                        done = self._take(prompts, rows[j], t, eos, params)
                        if done is None:
                            still.append(j)
                            continue
                        unfinished.remove(rows[j])
                        yield rows[j].index, done
                    active = still
                    if not active:
                        break
                    mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                    logits = self._forward(feed.unsqueeze(1), mask, pos.unsqueeze(1), cache)
                    self.stats["decode_steps"] += 1
                    self.stats["row_steps"] += len(rows)
                    pos = pos + 1
                    idx = torch.tensor(active, dtype=torch.long, device=self.device)
                    last = draw(logits[idx], [rows[j].generator for j in active], params, vocab, self.banned)
                    feed[idx] = last
        except BaseException:
            queue.extendleft((r.index, r.sample, r.seed) for r in reversed(unfinished))
            raise

    def _row(self, index: int, sample: int, seed: int) -> _Row:
        """A queued request as a row with its own generator, seeded from its seed alone."""
        import torch

        return _Row(index, sample, seed, torch.Generator(device=self.device).manual_seed(seed))

    def _take(self, prompts: Sequence[Sequence[int]], row: _Row, token: int, eos: set[int],
              params: SamplingParams) -> Completion | None:
        """Append `token` to `row`; the row's completion if that ended it (end of sequence or token limit)."""
        row.tokens.append(token)
        if token in eos or len(row.tokens) >= params.max_new_tokens:
            return self._completion(prompts[row.index], row, eos)
        return None

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        """Logits of the last position (a method of its own so tests can make it fail)."""
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _left_padded(self, prompts: Sequence[Sequence[int]], rows: list[_Row]) -> tuple[Any, Any]:
        """(ids, attention mask) of the rows' prompts, left-padded to the longest, on the model's device."""
        import torch

        width = max(len(prompts[r.index]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            p = prompts[r.index]
            ids[j, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[j, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _prefill_group(self, prompts: Sequence[Sequence[int]], new: list[_Row], params: SamplingParams,
                       vocab: int, cache: Any) -> tuple[Any, Any, Any]:
        """(`cache` filled, attention mask, first sampled tokens) of rows left-padded to their longest prompt."""
        ids, mask = self._left_padded(prompts, new)
        positions = (mask.cumsum(dim=1) - 1).clamp_(min=0)
        logits = self._forward(ids, mask, positions, cache)
        return cache, mask, draw(logits, [r.generator for r in new], params, vocab, self.banned)

    def _completion(self, prompt: Sequence[int], row: _Row, eos: set[int]) -> Completion:
        tokens = row.tokens
        ended = tokens[-1] in eos
        text = self.tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True)
        return Completion(text, "stop" if ended else "length", len(prompt), len(tokens), row.sample, tuple(tokens))


def _merge(cache: Any, mask: Any, new_cache: Any, new_mask: Any) -> tuple[Any, Any]:
    """One cache and mask holding the rows of both, the shorter left-padded (masked) to the longer."""
    import torch
    import torch.nn.functional as F

    if cache is None or mask.shape[0] == 0:
        return new_cache, new_mask
    width = max(mask.shape[1], new_mask.shape[1])
    for a, b in zip(cache.layers, new_cache.layers, strict=True):
        for name in ("keys", "values"):
            x, y = getattr(a, name), getattr(b, name)
            x = F.pad(x, (0, 0, width - x.shape[-2], 0))
            y = F.pad(y, (0, 0, width - y.shape[-2], 0))
            setattr(a, name, torch.cat([x, y]))
    mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)), F.pad(new_mask, (width - new_mask.shape[1], 0))])
    return cache, mask


def _select(cache: Any, mask: Any, idx: Any) -> tuple[Any, Any]:
    """Keep rows `idx`, then drop leading columns that no remaining row attends to."""
    mask = mask[idx]
    used = (mask.sum(dim=0) > 0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in cache.layers:
        layer.keys = layer.keys[idx, :, start:]
        layer.values = layer.values[idx, :, start:]
    return cache, mask[:, start:]


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
