"""Which model families split exactly, and what their forward does outside the blocks.

A split reuses the model's own modules (embeddings, blocks, final norm, head), so what the
model's `forward` does *between* them has to be done again by the segment that owns that step:
the scale on the embeddings (`embedding_multiplier`, Granite's µP), the transform of the logits
(`final_logit_softcapping`, `logit_scale`, `logits_scaling`), a causal mask and rotary table per
layer type. These are read from the config, so a family that sets them is handled without a
rule of its own; `SPLIT_FAMILIES` is what `tests/test_split_families.py` proves exact (logits,
LoRA gradients on every segment, cached greedy decoding), and `check_splittable` refuses every
other `model_type` before any weights load, naming why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from silotune.errors import ConfigError

# Proven exact by the test matrix with the pinned transformers (kept in step with it: the matrix
# fails when a family listed here stops splitting exactly, or one not listed starts to).
SPLIT_FAMILIES: tuple[str, ...] = (
    "apertus",
    "arcee",
    "aria_text",
    "bitnet",
    "cohere",
    "cohere2",
    "cohere2_moe",
    "cwm",
    "diffllama",
    "doge",
    "ernie4_5",
    "exaone4",
    "flex_olmo",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma4_unified_text",
    "glm",
    "glm4",
    "gpt_oss",
    "granite",
    "granitemoe",
    "granitemoeshared",
    "helium",
    "hunyuan_v1_dense",
    "hunyuan_v1_moe",
    "hyperclovax",
    "internlm3",
    "iquestcoder",
    "jais2",
    "llama",
    "llama4_text",
    "minimax_m3_vl_text",
    "ministral",
    "ministral3",
    "mistral",
    "mixtral",
    "nemotron",
    "olmo",
    "olmo2",
    "olmo3",
    "olmoe",
    "phi3",
    "phimoe",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "seed_oss",
    "smollm3",
    "stablelm",
    "starcoder2",
    "vaultgemma",
)

# Families whose forward does something outside its modules that no config field names.
_OUTSIDE_THE_BLOCKS = {
    "nanochat": "its forward normalises the embeddings before the first block",
    "granite_swa": "it keeps one rotary table per rope theta and picks one per block",
    "granitemoe_swa": "it keeps one rotary table per rope theta and picks one per block",
    "gemma4_text": "its forward gives every block an input of its own made from the token ids",
}
# Logits scaled by `logits_scaling`: divided (Granite) unless the family multiplies.
_MULTIPLIES_LOGITS = frozenset({"hyperclovax"})
# Layer kinds a segment can build the causal mask for (see segments._MASK_BUILDERS).
ATTENTION_KINDS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})


def check_splittable(hf_config: Any) -> None:
    """Refuse a model split learning cannot cut exactly, naming its architecture and why."""
    kind = str(getattr(hf_config, "model_type", "") or "unknown")
    names = ", ".join(getattr(hf_config, "architectures", None) or []) or kind
    if kind in SPLIT_FAMILIES:
        return
    reason = _why_not(hf_config, kind)
    raise ConfigError(
        f"split learning cannot cut {names} (model_type {kind!r}): {reason}. It splits the "
        f"decoder-only families its test matrix proves exact: {', '.join(SPLIT_FAMILIES)}"
    )


def _why_not(hf_config: Any, kind: str) -> str:
    """The reason a family is not in SPLIT_FAMILIES, as far as its config tells."""
    if kind in _OUTSIDE_THE_BLOCKS:
        return _OUTSIDE_THE_BLOCKS[kind]
    if getattr(hf_config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model, not decoder-only"
    if getattr(hf_config, "auto_map", None):
        return "it is defined by remote code, which the split cannot check"
    other = set(getattr(hf_config, "layer_types", None) or []) - ATTENTION_KINDS
    if other:
        return (
            f"its blocks are not all attention blocks ({', '.join(sorted(other))}): a "
            "state-space or recurrent layer keeps a state the segments do not carry"
        )
    return (
        "it is not in the test matrix (its layout, or what its forward does outside the "
        "blocks, is unproven)"
    )


def embedding_scale(hf_config: Any) -> float | None:
    """What the model's forward multiplies the token embeddings by (None: nothing).

    A scale applied inside the embedding module (Gemma's) comes with the module itself."""
    scale = getattr(hf_config, "embedding_multiplier", None)
    return None if scale in (None, 1, 1.0) else float(scale)


def logits_transform(hf_config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model's forward does to the head's output (None: nothing)."""
    scale = float(getattr(hf_config, "logit_scale", None) or 1.0)  # Cohere multiplies
    divisor = float(getattr(hf_config, "logits_scaling", None) or 1.0)  # Granite divides
    if hf_config.model_type in _MULTIPLIES_LOGITS:
        scale, divisor = scale * divisor, 1.0
    cap = getattr(hf_config, "final_logit_softcapping", None)
    if scale == 1.0 and divisor == 1.0 and not cap:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale != 1.0:
            logits = logits * scale
        if divisor != 1.0:
            logits = logits / divisor
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def families_markdown() -> str:
    """The families split learning cuts, for the README and the docs (scripts/gen_docs.py)."""
    names = ", ".join(f"`{kind}`" for kind in SPLIT_FAMILIES)
    refused = ", ".join(f"`{kind}`" for kind in sorted(_OUTSIDE_THE_BLOCKS))
    return (
        f"Split learning cuts {len(SPLIT_FAMILIES)} decoder-only families of the pinned "
        f"transformers, each proven exact by `tests/test_split_families.py` (logits, LoRA "
        f"gradients on every segment, cached greedy decoding), by `model_type`: {names}. "
        "Any other model is refused before its weights load, with the reason: encoder-decoder, "
        "state-space or hybrid-recurrent layers, remote code, or a forward that does something "
        f"outside its blocks the segments cannot repeat ({refused})."
    )
