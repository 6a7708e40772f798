"""Where the memory plan gets a model's shape: its config.json, fetched or from the local cache;
for the presets' large models, as their hubs publish it when it cannot be fetched, so a preset
is planned without a download and the plans are checked without a network."""

from __future__ import annotations

import logging
from typing import Any

from transformers import AutoConfig, GlmConfig, PretrainedConfig, Qwen2Config

from silotune.modeling.load import not_loadable

log = logging.getLogger(__name__)

# Qwen/Qwen2.5-7B-Instruct: configs/fedpit-7b-qlora.toml, configs/split-7b.toml.
QWEN25_7B = Qwen2Config(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    tie_word_embeddings=False,
)
# THUDM/glm-4-9b-chat-hf (GLM-4-9B-Chat in its transformers-native form): split-glm4-9b.toml.
GLM4_9B = GlmConfig(
    hidden_size=4096,
    intermediate_size=13696,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    vocab_size=151552,
    attention_bias=True,
    tie_word_embeddings=False,
)
PUBLISHED: dict[str, PretrainedConfig] = {
    "Qwen/Qwen2.5-7B-Instruct": QWEN25_7B,
    "THUDM/glm-4-9b-chat-hf": GLM4_9B,
}


def model_config(location: str) -> PretrainedConfig:
    """The model's config.json (a hub id is fetched, or read from the local HF cache); a
    preset's model that cannot be fetched is planned from its published shape."""
    try:
        cfg: Any = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as exc:
        if location in PUBLISHED:
            log.info("%s cannot be fetched: planned from its published config.json", location)
            return PUBLISHED[location]
        raise not_loadable(location, exc) from None
    return cfg  # type: ignore[no-any-return]
