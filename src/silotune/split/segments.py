"""Cut a decoder-only causal LM into front / middle / back segments that reuse its own modules.

```
 client                         server                        client
 ┌──────────────────────┐      ┌────────────────────────┐     ┌─────────────────────────────┐
 │ embed_tokens         │      │ blocks f .. n-b-1      │     │ blocks n-b .. n-1           │
 │ blocks 0 .. f-1      │ ───▶ │ (the middle)           │ ──▶ │ final norm + lm_head → loss │
 └──────────────────────┘ h_f  └────────────────────────┘ h_m └─────────────────────────────┘
   tokens stay here                sees hidden states only       labels stay here
```

Each segment receives the hidden states and the 2-D padding mask and builds what its blocks
need itself (causal mask per attention type, position ids, rotary embeddings), exactly as the
model's own `forward` does, so `back(middle(front(x)))` is the full model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Cache, DynamicCache, PreTrainedModel
from transformers.masking_utils import (
    create_causal_mask,
    create_chunked_causal_mask,
    create_sliding_window_causal_mask,
)

from silotune.errors import ConfigError
from silotune.split.families import check_splittable, embedding_scale, logits_transform
from silotune.split.prefix import PrefixKV, SegmentPrefix, with_prefix_columns

_MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
    "chunked_attention": create_chunked_causal_mask,
}


@dataclass(frozen=True)
class SplitPoints:
    """Which blocks each segment holds."""

    front_blocks: int
    back_blocks: int
    layers: int

    @property
    def middle(self) -> range:
        """Indices of the server's blocks."""
        return range(self.front_blocks, self.layers - self.back_blocks)

    def check(self) -> None:
        """Refuse splits that leave a segment without blocks it needs."""
        if self.front_blocks < 0 or self.back_blocks < 1:
            raise ConfigError("split.front_blocks must be >= 0 and split.back_blocks >= 1")
        if len(self.middle) < 1:
            raise ConfigError(
                f"the model has {self.layers} blocks: split.front_blocks ({self.front_blocks}) + "
                f"split.back_blocks ({self.back_blocks}) must leave at least one for the server"
            )


def decoder_parts(model: PreTrainedModel) -> dict[str, nn.Module]:
    """The modules a split needs (`model.model.*` and `model.lm_head`); a family the split is
    not proven on is refused first (`families.check_splittable`)."""
    check_splittable(model.config)
    inner = getattr(model, "model", None)
    parts = {
        "embed_tokens": getattr(inner, "embed_tokens", None),
        "layers": getattr(inner, "layers", None),
        "norm": getattr(inner, "norm", None),
        "rotary_emb": getattr(inner, "rotary_emb", None),
        "lm_head": getattr(model, "lm_head", None),
    }
    if not all(isinstance(m, nn.Module) for m in parts.values()):
        raise ConfigError(
            f"{type(model).__name__} lacks the decoder layout a split cuts (model.embed_tokens, "
            "model.layers, model.norm, model.rotary_emb, lm_head)"
        )
    return {k: m for k, m in parts.items() if isinstance(m, nn.Module)}


class Segment(nn.Module):
    """Consecutive decoder blocks plus the per-call context they need."""

    def __init__(self, config: Any, rotary: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.rotary_emb = rotary
        self.rotary_per_kind = "layer_type" in inspect.signature(rotary.forward).parameters
        self.layers = nn.ModuleList(blocks)
        # Looked up once, not per block and token (a decoding step is a few milliseconds).
        self.kinds = [_attention_kind(block, config) for block in blocks]
        self.indices = [_layer_index(block) for block in blocks]
        # Blocks over several devices when cut: hidden states follow them block by block.
        self.spread = len({_block_device(block) for block in blocks}) > 1
        self.prefix: SegmentPrefix | None = None  # set for p-tuning v2 (see add_prefix)
        # What hidden states are cast to on entry (the base's dtype); None: left as they come.
        self.compute_dtype: torch.dtype | None = None

    def new_cache(self) -> Cache:
        """An empty KV cache for incremental decoding (each segment fills its own layers)."""
        return DynamicCache(config=self.config)

    def cached_tokens(self, cache: Cache) -> int:
        """Positions `cache` holds for this segment's blocks (0 for a segment without blocks)."""
        return cache.get_seq_length(self.indices[0]) if self.indices else 0

    def add_prefix(self, tokens: int) -> None:
        """Give every block of this segment `tokens` learned key/value prefixes (p-tuning v2)."""
        if len(self.layers):
            device = _block_device(self.layers[0])
            self.prefix = SegmentPrefix(self.config, len(self.layers), tokens).to(device)

    def run_blocks(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, cache: Cache | None = None
    ) -> torch.Tensor:
        """Pass `hidden` (b, q, d) through the blocks, as the model's forward would.

        `attention_mask` (b, t) covers every token so far; without a cache q = t, with one
        (incremental decoding) the q newest tokens run and the cache holds the earlier ones.
        """
        if not len(self.layers):
            return hidden
        first = _block_device(self.layers[0])
        hidden = hidden.to(first, self.compute_dtype or hidden.dtype)
        # Blocks spread over GPUs after the cut (loading.spread_blocks) end on another device.
        spread = self.spread or _block_device(self.layers[-1]) != first
        attention_mask = attention_mask.to(hidden.device)
        q = hidden.shape[1]
        # Positions count real tokens, so left-padded prompts (generation) get the positions
        # transformers' generate gives them; with right padding this is arange(t), as in training.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]  # (b, q)
        masks: dict[str, Any] = {}
        rotary: dict[str, Any] = {}  # per layer kind: (cos, sin), or one complex table (Llama 4)
        prefixes = self.prefix(hidden.shape[0]) if self.prefix is not None else None
        if prefixes is not None and cache is not None:
            raise ValueError("prefix segments decode without a cache")
        for i, (block, kind, index) in enumerate(
            zip(self.layers, self.kinds, self.indices, strict=True)
        ):
            if spread and (device := _block_device(block)) != hidden.device:
                hidden, attention_mask = hidden.to(device), attention_mask.to(device)
                rotary = {k: _moved(r, device) for k, r in rotary.items()}
                masks = {k: _moved(m, device) for k, m in masks.items()}
            if kind not in rotary:
                rotary[kind] = self._rotary(hidden, position_ids, kind)
            if kind not in masks:
                masks[kind] = _MASK_BUILDERS[kind](
                    config=self.config,
                    inputs_embeds=hidden,
                    attention_mask=attention_mask,
                    past_key_values=cache,
                    position_ids=position_ids,
                    allow_is_causal_skip=prefixes is None,
                    # The cache spans the whole model: size the mask by the first of this
                    # segment's blocks of this kind (a sliding layer's cache keeps the window).
                    layer_idx=index if cache is not None else None,
                )
                if prefixes is not None:
                    masks[kind] = with_prefix_columns(masks[kind], prefixes[0][0].shape[2])
            extra: dict[str, Any] = {}
            if prefixes is not None:
                extra["past_key_values"] = PrefixKV({index: prefixes[i]})
            elif cache is not None:
                extra["past_key_values"] = cache
            hidden = block(
                hidden,
                attention_mask=masks[kind],
                position_ids=position_ids,
                position_embeddings=rotary[kind],
                **extra,
            )
        return hidden

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, kind: str) -> Any:
        """The rotary table for blocks of `kind`: one per layer type where the model keeps
        several (Gemma 3, OLMo 3: local and global rope), else the one table."""
        if self.rotary_per_kind:
            return self.rotary_emb(hidden, position_ids, kind)
        return self.rotary_emb(hidden, position_ids=position_ids)


def _attention_kind(block: nn.Module, config: Any) -> str:
    """Which causal mask (and rotary table) a block needs, as the model's forward picks it: the
    config's `layer_types` entry for the block, else the block's own `attention_type`, else
    sliding when the config has a window (Mistral), else full (Llama)."""
    types = getattr(config, "layer_types", None)
    if types:
        return str(types[_layer_index(block)])
    kind = getattr(block, "attention_type", None)
    if kind is None:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return str(kind)


def _moved(value: Any, device: torch.device) -> Any:
    """A tensor, or a tuple of them, on `device` (anything else as it is)."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_moved(v, device) for v in value)
    return value


def _block_device(block: nn.Module) -> torch.device:
    """Where a block's weights are (its inputs must go there)."""
    return next(block.parameters()).device


def _layer_index(block: nn.Module) -> int:
    """The block's index in the whole model (what its attention files its cache under)."""
    return int(getattr(block, "self_attn").layer_idx)  # noqa: B009


class Front(Segment):
    """Token embeddings + the first blocks: token ids in, hidden states out."""

    def __init__(self, config: Any, rotary: nn.Module, embed: nn.Module, blocks: list[nn.Module]):
        super().__init__(config, rotary, blocks)
        self.embed_tokens = embed
        self.embedding_scale = embedding_scale(config)  # µP models scale in their forward

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Cache | None = None
    ) -> torch.Tensor:
        """(b, q) ids -> (b, q, d) hidden states."""
        hidden = self.embed_tokens(input_ids)
        if self.embedding_scale is not None:
            hidden = hidden * self.embedding_scale
        return self.run_blocks(hidden, attention_mask, cache)


class Middle(Segment):
    """The server's blocks: hidden states in, hidden states out."""

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, cache: Cache | None = None
    ) -> torch.Tensor:
        """(b, q, d) -> (b, q, d)."""
        return self.run_blocks(hidden, attention_mask, cache)


class Back(Segment):
    """The last blocks + final norm + LM head: hidden states in, logits out."""

    def __init__(
        self,
        config: Any,
        rotary: nn.Module,
        blocks: list[nn.Module],
        norm: nn.Module,
        lm_head: nn.Module,
    ) -> None:
        super().__init__(config, rotary, blocks)
        self.norm = norm
        self.lm_head = lm_head
        # Soft-capping or scaling of the logits that the model's forward does after its head.
        self.logits_transform = logits_transform(config)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """(b, q, d) -> (b, q, vocab) logits; with `last_only` (decoding) (b, 1, vocab), the
        newest position's alone, as transformers' generate keeps (`logits_to_keep`): the head
        over a whole prompt is most of a prefill's work on small models."""
        hidden = self.run_blocks(hidden, attention_mask, cache)
        if last_only:
            hidden = hidden[:, -1:]
        out: torch.Tensor = self.lm_head(self.norm(hidden))
        return out if self.logits_transform is None else self.logits_transform(out)


@dataclass
class Segments:
    """The three parts of one model (a client keeps front + back, the server the middle)."""

    front: Front
    middle: Middle
    back: Back
    points: SplitPoints


def split_model(model: PreTrainedModel, front_blocks: int, back_blocks: int) -> Segments:
    """Cut `model` (optionally with LoRA already injected) into segments sharing its modules."""
    parts = decoder_parts(model)
    layers = list(parts["layers"].children())
    points = SplitPoints(front_blocks, back_blocks, len(layers))
    points.check()
    config, rotary = model.config, parts["rotary_emb"]
    return Segments(
        front=Front(config, rotary, parts["embed_tokens"], layers[:front_blocks]),
        middle=Middle(config, rotary, [layers[i] for i in points.middle]),
        back=Back(
            config, rotary, layers[len(layers) - back_blocks :], parts["norm"], parts["lm_head"]
        ),
        points=points,
    )
