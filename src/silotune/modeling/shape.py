"""What the memory plan needs to know about a model's architecture: its parameters by part and
its widths, counted on a meta skeleton built from its config (no weights, no memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig


@dataclass(frozen=True)
class Shape:
    """What the planner needs to know about the architecture (counted on a meta skeleton)."""

    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key/value heads x head dim
    vocab: int
    block_linear: int  # parameters in one block's linear layers (quantizable)
    block_other: int  # parameters in one block besides those (norms, biases)
    embed: int
    head: int  # 0 when tied to the embeddings
    lora_per_block: int  # LoRA parameters one adapter adds to one block
    lora_inputs: int  # summed input features of one block's LoRA targets
    lora_outputs: int  # summed output features of one block's LoRA targets
    lora_b_per_block: int  # of lora_per_block, the B matrices' (all that trains with freeze_a)

    @property
    def params(self) -> int:
        return self.layers * (self.block_linear + self.block_other) + self.embed + self.head


def architecture(hf_config: PretrainedConfig, targets: tuple[str, ...], r: int) -> Shape:
    """Count a model's parameters by part on a meta skeleton (no memory, any architecture)."""
    with torch.device("meta"):
        model: nn.Module = AutoModelForCausalLM.from_config(hf_config)  # type: ignore[no-untyped-call]
    inner = model.get_submodule("model")
    layers = list(inner.get_submodule("layers").children())
    # Blocks may differ (Gemma 4's global-attention blocks are larger): plan every block as the
    # largest, so the plan errs high.
    counts = [_block_counts(block, targets, r) for block in layers]
    linear, other, lora, lora_inputs, lora_outputs = (max(c) for c in zip(*counts, strict=True))
    embed: torch.Tensor = inner.get_submodule("embed_tokens").weight  # type: ignore[assignment]
    head: torch.Tensor = model.get_submodule("lm_head").weight  # type: ignore[assignment]
    heads = int(_largest(hf_config, "num_attention_heads"))
    head_dim = int(_largest(hf_config, "head_dim") or hf_config.hidden_size // heads)
    kv_heads = int(_largest(hf_config, "num_key_value_heads") or heads)
    return Shape(
        layers=len(layers),
        hidden=int(hf_config.hidden_size),
        intermediate=int(getattr(hf_config, "intermediate_size", 4 * hf_config.hidden_size)),
        kv_dim=kv_heads * head_dim,
        vocab=int(hf_config.vocab_size),
        block_linear=linear,
        block_other=other,
        embed=embed.numel(),
        head=0 if head is embed else head.numel(),
        lora_per_block=lora,
        lora_inputs=lora_inputs,
        lora_outputs=lora_outputs,
        lora_b_per_block=r * lora_outputs,
    )


def _block_counts(block: nn.Module, targets: tuple[str, ...], r: int) -> tuple[int, ...]:
    """One block's linear weights, other parameters, LoRA parameters and LoRA targets' summed
    input and output features."""
    linear = other = lora = lora_inputs = lora_outputs = 0
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            linear += module.weight.numel()
            other += module.bias.numel() if module.bias is not None else 0
            if name.split(".")[-1] in targets:
                lora += r * (module.in_features + module.out_features)
                lora_inputs += module.in_features
                lora_outputs += module.out_features
    other += sum(p.numel() for p in block.parameters()) - linear - other
    return linear, other, lora, lora_inputs, lora_outputs


def _largest(hf_config: PretrainedConfig, name: str) -> Any:
    """A config attribute, or its largest value over the layers where it varies (Gemma 4's
    global blocks have larger heads); None where the config lacks it."""
    layers = getattr(hf_config, "per_layer_config", None)
    if layers:
        values = [v for v in (getattr(c, name, None) for c in layers) if v is not None]
        return max(values) if values else None
    return getattr(hf_config, name, None)
