"""Shared fixtures: a tiny randomly initialised chat model built from a config (no download, ~1 s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "delia-format"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to Icelandic: good morning. Góðan daginn.",
    "{'thought': 'the response is accurate', 'hallucination': 'no'}",
    "Write a short poem about the sea and the sky, in three lines.",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \"",
]


def build_tiny_model(folder: Path, *, tie: bool = True, seed: int = 0, padding_rows: int = 8) -> Path:
    """A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer and a ChatML template, saved to `folder`.

    `padding_rows` embedding rows lie past the tokenizer, as real checkpoints have (a new token reuses one)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok) + padding_rows,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Path of a tiny random chat model folder (tied embeddings, like SmolLM2)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model_untied(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-untied"), tie=False)


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, rows) -> path: rows are dicts (dumped) or raw strings/bytes (written as lines)."""

    def _write(name: str, rows: list) -> Path:
        p = tmp_path / name
        with open(p, "wb") as fh:
            for r in rows:
                if isinstance(r, bytes):
                    fh.write(r + b"\n")
                elif isinstance(r, str):
                    fh.write(r.encode() + b"\n")
                else:
                    fh.write(json.dumps(r).encode() + b"\n")
        return p

    return _write


@pytest.fixture(scope="session")
def delia_format_data() -> Path:
    """The authors' formatted-output task (../shared/data/delia-format); skipped where it is absent."""
    if not (SHARED_DATA / "train.jsonl").exists():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
