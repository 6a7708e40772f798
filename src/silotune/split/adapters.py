"""Each segment's own adapter (PEFT LoRA, or p-tuning v2 prefixes) and the split model built
from adapted segments."""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import inject_adapter_in_model

from silotune.config import Config
from silotune.modeling.adapters import peft_lora_config
from silotune.registry import Registry
from silotune.split.model import MiddleFn, SplitCausalLM
from silotune.split.segments import Segment, Segments
from silotune.training.workbench import derive_seed


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
