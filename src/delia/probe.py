"""`delia probe`: does a new token mean what its description says? (the paper's alignment claim)

For each added token with a description, the same prompts are run twice: once using the token, once with
the description spelled out in its place. Per layer (0 = the embedding output, i = after block i; the
last one includes the model's final norm) it reports, averaged over prompts:

- `cosine_last`: cosine between the hidden state at the token's position and the hidden state at the
  last token of the spelled-out description. In a causal model that is the one position that has read
  the whole description, so it is where the description's meaning is gathered, like the token's own.
- `cosine_mean`: the same against the mean hidden state over the description's tokens.
- `baseline`: the mean cosine between the token's hidden state and the spelled prompt's states before
  the description. Hidden states of LLMs share a large common direction, so raw cosines are high
  everywhere; alignment shows as `cosine_last` above this baseline.

Also the token embedding's nearest vocabulary neighbours (cosine) and its cosine with the mean embedding
of the description's tokens. A model without the token (the base model) gets it added exactly as
`delia train` would (`delia.tokens.add_tokens`, same init and seed), so the base row is the starting point
that plain SFT and DELIA move away from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field

from delia.artifacts import TrainRecord
from delia.config import Flags
from delia.data import Format
from delia.errors import DeliaError
from delia.files import sha256_file
from delia.models import ModelChoice
from delia.progress import Progress, ProgressCallback, report
from delia.stage import Stage
from delia.tokens import TokenInit

PROBE = "probe.json"
# Prompts used when no data row puts the token in a prompt.
TEMPLATES = (
    "{token}",
    "Please answer using {token}.",
    "Check the response below and reply in the {token} format.\n\nResponse: Paris is the capital of France.",
    "Follow {token} strictly when you write your answer.",
)
_EMBED_CHUNK = 8192


class ProbeConfig(ModelChoice):
    """Options of `delia probe`: the model, the tokens and their descriptions, the prompts."""

    token: Annotated[list[str] | None, Flags("--token")] = None  # -t is pool's --task
    """TOKEN=DESCRIPTION, repeatable: the instruction the token stands for."""
    tokens_file: Path | None = None
    """YAML mapping of token to description."""
    data: Path | None = None
    """Rows whose prompts use the tokens (e.g. the task's eval set); without it, or when no row has a token,
    templates."""
    format: Annotated[Format, Flags("--format", "-f")] = "auto"
    """Format of `data` (auto, messages, ...)."""
    max_prompts: int = Field(16, ge=1)
    """Prompts per token."""
    neighbours: int = Field(10, ge=1)
    """Nearest vocabulary neighbours to list."""
    init: TokenInit = "random"
    """Init for a token the model lacks (as `delia train --token-init`): random, mean, mean-noise or
    description."""
    seed: int = 0
    """Seed of that init."""
    device: str | None = None
    """cpu, cuda ... (default: cuda if present)."""
    overwrite: bool = False
    """Replace an earlier probe.json in OUT."""


def _recorded_descriptions(folder: Path | None) -> dict[str, str]:
    """Token descriptions that `delia train --add-token TOKEN=DESCRIPTION` recorded (empty when none)."""
    record = TrainRecord.find(folder) if folder is not None and Path(folder).is_dir() else None
    return record.token_descriptions() if record else {}


def _descriptions(token: list[str] | None, tokens_file: Path | None, adapter: Path | None,
                  model: str | None) -> dict[str, str]:
    """Token -> description: `token` options win over the YAML file, which wins over the training record."""
    from delia.tokens import parse_token_specs

    found = _recorded_descriptions(adapter) or _recorded_descriptions(Path(model) if model else None)
    if tokens_file is not None:
        from delia.files import read_yaml

        mapping = read_yaml(tokens_file, "token descriptions")
        if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
            raise DeliaError(f"{tokens_file}: expected a mapping of token to description")
        found.update({k: str(v) for k, v in mapping.items() if v})
    found.update({t: d for t, d in parse_token_specs(token, option="token") if d})
    if not found:
        raise DeliaError("no token with a description: set `token` '<sep>=what it stands for', `tokens_file`, "
                         "or an `adapter` whose delia_train.json records descriptions")
    return found


def _prompts(token: str, data: Path | None, fmt: Format, max_prompts: int) -> tuple[list[list[dict[str, str]]], str]:
    """Conversations that use `token` in a user turn (eval rows: all but the last assistant turn), or templates."""
    if data is not None:
        from delia.data import read_chat

        found = []
        for rec in read_chat(data, fmt, require_assistant=False).records:
            msgs = rec["messages"]
            msgs = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
            if any(token in m["content"] for m in msgs if m["role"] == "user"):
                found.append(msgs)
            if len(found) == max_prompts:
                break
        if found:
            return found, str(data)
    return [[{"role": "user", "content": t.format(token=token)}] for t in TEMPLATES[:max_prompts]], "templates"


def _pair(tokenizer: Any, messages: list[dict[str, str]], token: str, description: str,
          token_id: int) -> tuple[list[int], int, list[int], tuple[int, int]] | None:
    """(ids with the token, its position, ids with the description, description token span [start, end)).

    Both texts are the same chat-template rendering with every occurrence of the token spelled out; the
    probe looks at the first one. Ids are cut right after the positions used (a causal model's states
    there do not depend on what follows).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    at = text.find(token)
    if at < 0:  # the chat template dropped the turn holding it
        return None
    spelled = text.replace(token, description)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pos = next((i for i, (s, e) in enumerate(enc["offset_mapping"]) if s == at), None)
    if pos is None or enc["input_ids"][pos] != token_id:
        raise DeliaError(f"{token!r} is not a single token in this tokenizer's rendering of the prompt")
    enc_d = tokenizer(spelled, add_special_tokens=False, return_offsets_mapping=True)
    end_char = at + len(description)
    span = [i for i, (s, e) in enumerate(enc_d["offset_mapping"]) if s < end_char and e > at]
    return enc["input_ids"][: pos + 1], pos, enc_d["input_ids"][: span[-1] + 1], (span[0], span[-1] + 1)


def _hidden(model: Any, ids: list[int]) -> Any:
    """Hidden states as one float32 tensor [layers + 1, positions, hidden]."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True)
    return torch.stack([h[0] for h in out.hidden_states]).float()


def _embedding_report(model: Any, tokenizer: Any, token_id: int, description: str, k: int) -> dict[str, Any]:
    """Nearest vocabulary neighbours of the token's input embedding, and its cosine with the description's
    mean embedding. Rows come from calling the embedding module, so PEFT's trained-token deltas count."""
    import torch
    import torch.nn.functional as F

    emb = model.get_input_embeddings()
    device = next(model.parameters()).device

    def rows(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return emb(torch.tensor(ids, device=device)).float()

    vec = rows([token_id])[0]
    n = len(tokenizer)  # padding rows past the tokenizer are not words
    sims = torch.cat([F.cosine_similarity(rows(list(range(a, min(n, a + _EMBED_CHUNK)))), vec[None], dim=-1)
                      for a in range(0, n, _EMBED_CHUNK)])
    sims[token_id] = -2.0
    top = torch.topk(sims, min(k, n - 1))
    desc_ids = tokenizer(description, add_special_tokens=False)["input_ids"]
    return {
        "embedding_norm": float(vec.norm()),
        "embedding_description_cosine": float(F.cosine_similarity(rows(desc_ids).mean(0), vec, dim=0)),
        "neighbours": [{"token": tokenizer.decode([i]), "id": i, "cosine": round(float(c), 6)}
                       for c, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)],
    }


def probe_token(model: Any, tokenizer: Any, token: str, description: str,
                prompts: list[list[dict[str, str]]], neighbours: int = 10) -> dict[str, Any]:
    """The probe for one token already in the tokenizer: per-layer cosines averaged over prompts, plus
    the embedding neighbours (see the module docstring for the measures)."""
    import torch
    import torch.nn.functional as F

    token_id = tokenizer.convert_tokens_to_ids(token)
    last, mean, base = [], [], []
    for msgs in prompts:
        pair = _pair(tokenizer, msgs, token, description, token_id)
        if pair is None:
            continue
        ids_t, pos, ids_d, (start, end) = pair
        h_t, h_d = _hidden(model, ids_t)[:, pos], _hidden(model, ids_d)
        last.append(F.cosine_similarity(h_t, h_d[:, end - 1], dim=-1))
        mean.append(F.cosine_similarity(h_t, h_d[:, start:end].mean(1), dim=-1))
        context = h_d[:, 1:start] if start > 1 else h_d[:, :start]  # position 0 is an attention sink
        base.append(F.cosine_similarity(h_t[:, None], context, dim=-1).mean(1))  # NaN when there is none
    if not last:
        raise DeliaError(f"no prompt for {token!r} survived the chat template")
    avg = lambda xs: [round(float(v), 6) for v in torch.stack(xs).nanmean(0)]  # noqa: E731
    return {"description": description, "id": token_id, "prompts": len(last),
            "cosine_last": avg(last), "cosine_mean": avg(mean), "baseline": avg(base),
            **_embedding_report(model, tokenizer, token_id, description, neighbours)}


@dataclass
class ProbeStage(Stage[dict[str, Any]]):
    """The probe as a stage of `delia run`: its identity is what is probed (`subject`: the base model's identity,
    or the training stage's that made the adapter), the tokens with their descriptions, the probe data's hash,
    and how the base model's new rows are initialised."""

    name: ClassVar[str] = "probe"
    result: ClassVar[Any] = dict[str, Any]

    config: ProbeConfig  # what to probe and on which data (an adapter reads its tokens from its record)
    subject: dict[str, Any]
    tokens: list[str]  # TOKEN=DESCRIPTION of the experiment's described tokens
    label: str = ""

    def identity(self) -> dict[str, Any]:
        assert self.config.data is not None
        return {**self.subject, "token": self.tokens, "data": sha256_file(self.config.data),
                "init": self.config.init, "seed": self.config.seed}

    def run(self, folder: Path, progress: ProgressCallback | None = None) -> dict[str, Any]:
        return probe(folder, self.config, progress=progress, overwrite=True)


def probe(
    out: Annotated[Path, "Output folder: probe.json."],
    config: ProbeConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Compare hidden states of prompts using a new token with the same prompts spelling out its description.

    `options` set any ProbeConfig field over `config`; `progress` hears of every probed token.

    Examples:\n
      delia probe --out runs/probe-base --token '<sep>=the format of a Python dict with the keys thought and
      hallucination' --data ../shared/data/delia-format/eval.jsonl\n
      delia probe --out runs/probe-delia --adapter runs/delia-adapter --data ../shared/data/delia-format/eval.jsonl
    """
    from delia.files import check_output, write_json
    from delia.models import load_for_eval
    from delia.tokens import add_tokens

    cfg = ProbeConfig.build(config, **options)
    check_output(Path(out) / PROBE, inputs=[p for p in (cfg.data, cfg.tokens_file) if p is not None],
                 overwrite=cfg.overwrite)
    descriptions = _descriptions(cfg.token, cfg.tokens_file, cfg.adapter, cfg.model)
    lm, tokenizer, loaded = load_for_eval(cfg.model, cfg.adapter, cfg.device, cfg.adapter_scale)
    missing = [(t, d) for t, d in descriptions.items() if t not in tokenizer.get_vocab()]
    added = add_tokens(lm, tokenizer, missing, method=cfg.init, seed=cfg.seed) if missing else None
    result: dict[str, Any] = {
        "model": loaded,
        "measure": "per layer (0 = embeddings), cosine between the hidden state at the token and at the last "
                   "token of the spelled-out description (cosine_last), or their mean (cosine_mean); baseline = "
                   "mean cosine with the spelled prompt's earlier positions",
        "added_for_probe": added,
        "tokens": {},
    }
    for t, d in descriptions.items():
        prompts, source = _prompts(t, cfg.data, cfg.format, cfg.max_prompts)
        entry = probe_token(lm, tokenizer, t, d, prompts, cfg.neighbours)
        entry["prompt_source"] = source
        entry["in_model"] = t not in dict(missing)
        result["tokens"][t] = entry
        report(progress, Progress("probe", len(result["tokens"]), len(descriptions), unit="tokens"))
    result["layers"] = len(next(iter(result["tokens"].values()))["cosine_last"])
    write_json(Path(out) / PROBE, result)
    return result
