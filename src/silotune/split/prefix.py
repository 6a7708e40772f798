"""P-tuning v2 (deep prefix tuning) on a segment: learned key/value prefixes for each block.

PEFT's `PrefixEncoder` makes the prefixes. The attention of a transformers block asks its cache
to `update` with the new keys/values and attends over what comes back, so a stand-in cache that
prepends the block's prefix is all a segment needs; the causal mask gains the prefix columns
(every token may attend every virtual token). Prefix keys carry no rotary position, as in PEFT.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PrefixTuningConfig
from peft.tuners.prefix_tuning.model import PrefixEncoder
from torch import nn

from silotune.errors import ConfigError

KV = tuple[torch.Tensor, torch.Tensor]


class PrefixKV:
    """Quacks like a transformers Cache for one forward: prepends each block's prefix."""

    def __init__(self, per_layer: dict[int, KV]) -> None:
        self.per_layer = per_layer

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> KV:
        """(b, kv_heads, t, head_dim) keys/values -> with the prefix in front: (b, h, n + t, d)."""
        k, v = self.per_layer[layer_idx]
        k, v = k.to(key.device, key.dtype), v.to(value.device, value.dtype)
        return torch.cat([k, key], dim=2), torch.cat([v, value], dim=2)


def _kv_shape(config: Any) -> tuple[int, int]:
    """Key/value heads and the size of each, from a transformers model config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return kv_heads, int(getattr(config, "head_dim", None) or config.hidden_size // heads)


def prefix_tuning_config(config: Any, blocks: int, tokens: int) -> PrefixTuningConfig:
    """PEFT's p-tuning v2 config for `blocks` blocks of a model with transformers `config`:
    one key/value prefix of `tokens` positions per block, one per key/value head group."""
    kv_heads, head_dim = _kv_shape(config)
    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=tokens,
        token_dim=kv_heads * head_dim,
        num_layers=blocks,
        num_attention_heads=kv_heads,
        num_transformer_submodules=1,
    )


class SegmentPrefix(nn.Module):
    """Prefixes for `blocks` consecutive blocks, from one PEFT PrefixEncoder."""

    def __init__(self, config: Any, blocks: int, tokens: int) -> None:
        super().__init__()
        self.kv_heads, self.head_dim = _kv_shape(config)
        self.blocks, self.tokens = blocks, tokens
        peft_config = prefix_tuning_config(config, blocks, tokens)
        self.encoder = PrefixEncoder(peft_config)  # type: ignore[no-untyped-call]

    def forward(self, batch: int) -> list[KV]:
        """One (key, value) pair per block, each (batch, kv_heads, tokens, head_dim)."""
        ids = torch.arange(self.tokens, device=self.encoder.embedding.weight.device)
        kv = self.encoder(
            ids.unsqueeze(0).expand(batch, -1)
        )  # (b, n, blocks * 2 * kv_heads * head_dim)
        kv = kv.view(batch, self.tokens, self.blocks * 2, self.kv_heads, self.head_dim)
        kv = kv.permute(2, 0, 3, 1, 4)  # (blocks * 2, b, kv_heads, n, head_dim)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.blocks)]


def with_prefix_columns(mask: Any, tokens: int) -> torch.Tensor:
    """A (b, 1, q, kv) mask widened to (b, 1, q, tokens + kv): the prefix is always visible."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ConfigError(
            "prefix tuning on split segments needs the sdpa or eager attention implementation"
        )
    b, h, q, _ = mask.shape
    # Boolean masks say "may attend"; float masks are added to the scores (0 = attend).
    visible = torch.ones if mask.dtype == torch.bool else torch.zeros
    columns = visible((b, h, q, tokens), dtype=mask.dtype, device=mask.device)
    return torch.cat([columns, mask], dim=-1)
