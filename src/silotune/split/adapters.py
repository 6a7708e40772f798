"""Each segment's own adapter (PEFT LoRA, or p-tuning v2 prefixes), the split model built from
adapted segments, and the one PEFT adapter of the whole base model that its segments' make."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import torch
from peft import inject_adapter_in_model

from silotune.config import Config
from silotune.modeling.adapters import StateDict, peft_lora_config
from silotune.registry import Registry
from silotune.seeds import derive_seed
from silotune.split.model import MiddleFn, SplitCausalLM
from silotune.split.prefix import prefix_tuning_config
from silotune.split.segments import Segment, Segments, SplitPoints


def add_segment_adapter(segment: Segment, config: Config, role: str) -> None:
    """Freeze the segment and give its blocks (if any) the configured PEFT adapter."""
    for p in segment.parameters():
        p.requires_grad = False
    if not len(segment.layers):
        return
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(config.experiment.seed, "split", role))
        SEGMENT_ADAPTERS.get(config.split.adapter)(segment, config)


SEGMENT_ADAPTERS: Registry[Callable[[Segment, Config], None]] = Registry("split adapter")


@SEGMENT_ADAPTERS.register("lora")
def _lora(segment: Segment, config: Config) -> None:
    inject_adapter_in_model(peft_lora_config(config.lora), segment)


@SEGMENT_ADAPTERS.register("prefix")
def _prefix(segment: Segment, config: Config) -> None:
    segment.add_prefix(config.split.prefix_tokens)


def build_split_model(config: Config, segments: Segments, middle: MiddleFn) -> SplitCausalLM:
    """`segments`' front and back, each given its adapter, around `middle` (the server's, a
    stand-in, or the segments' own middle)."""
    add_segment_adapter(segments.front, config, "front")
    add_segment_adapter(segments.back, config, "back")
    return SplitCausalLM(segments.front, segments.back, middle)


# Segment names in a split model's state: `front.`, `middle.`, `back.`, then the segment's own.
SEGMENT_ORDER = ("front", "middle", "back")
_LORA_KEY = re.compile(r"^(front|middle|back)\.layers\.(\d+)\.(.+)$")


def whole_model_adapter(
    config: Config, model_config: Any, state: StateDict
) -> tuple[StateDict, dict[str, Any]]:
    """A split model's trained segments (`front.`/`middle.`/`back.` names) as one PEFT adapter
    of the whole base model: its tensors, named as PEFT saves them, and its adapter_config.json.

    PeftModel.from_pretrained(base model, folder) then loads the split model as one model.
    """
    layers = int(model_config.num_hidden_layers)
    points = SplitPoints(config.split.front_blocks, config.split.back_blocks, layers)
    first = {"front": 0, "middle": points.front_blocks, "back": layers - points.back_blocks}
    if config.split.adapter == "prefix":
        # Each segment's prefix table holds its blocks' key/value columns in block order, the
        # layout of PEFT's own table for all blocks: side by side they make the whole model's.
        tables = [
            state[f"{s}.prefix.encoder.embedding.weight"]
            for s in SEGMENT_ORDER
            if f"{s}.prefix.encoder.embedding.weight" in state
        ]
        peft_config: Any = prefix_tuning_config(model_config, layers, config.split.prefix_tokens)
        tensors = {"prompt_embeddings": torch.cat(tables, dim=1)}
    else:
        peft_config = peft_lora_config(config.lora)
        tensors = {}
        for name, tensor in state.items():
            match = _LORA_KEY.match(name)
            if match is None:
                raise ValueError(f"{name!r} is not a LoRA tensor of a split segment's blocks")
            segment, index, rest = match.groups()
            # PEFT saves without the adapter's name (inject_adapter_in_model named it default).
            rest = rest.replace(".default.", ".")
            block = first[segment] + int(index)
            tensors[f"base_model.model.model.layers.{block}.{rest}"] = tensor
    peft_config.base_model_name_or_path = config.model.name
    return tensors, json.loads(json.dumps(peft_config.to_dict(), default=sorted))
