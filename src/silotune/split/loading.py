"""Load only the segments a split role runs, so a client never holds the server's blocks.

```
 meta skeleton (no memory)       kept modules (CPU, fp32)          Segments
 ┌────────────────────────┐      ┌───────────────────────────┐     front / back: real
 │ AutoModel.from_config  │ ───▶ │ tensors read one by one   │ ──▶ middle: on meta, guarded
 │ under torch.device     │      │ from *.safetensors        │     (client role; vice versa
 │ ("meta")               │      │ + rotary rebuilt on CPU   │      for the server role)
 └────────────────────────┘      └───────────────────────────┘
```

Only local Hugging Face folders with safetensors weights (the packaged default and `tiny-llama`
are such folders) are loaded partially; anything else is loaded whole and the parts the role does
not keep are moved to `meta`, so both paths return the same thing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from silotune.config import Config
from silotune.errors import ConfigError
from silotune.modeling.load import ModelSource, load_model, resolve_model
from silotune.modeling.placement import Placement, prepare_for_training, resolve_placement
from silotune.split.families import check_splittable
from silotune.split.segments import Segment, Segments, SplitPoints, decoder_parts, split_model

log = logging.getLogger(__name__)

Role = Literal["client", "server", "all"]
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


class SegmentNotLoadedError(RuntimeError):
    """A segment this process did not load (its weights are on `meta`) was called."""


def load_segments(config: Config, role: Role = "all") -> Segments:
    """The base model cut at the configured blocks, with only `role`'s segments in memory.

    client: front + back; server: middle; all: everything. The other segments stay on `meta`
    and raise `SegmentNotLoadedError` if called.
    """
    source = resolve_model(config.model)
    split = config.split
    placement = role_placement(config, role)
    model = None
    if not placement.quantized:  # quantizing needs transformers' own loader
        weights = _weight_files(Path(source.location))
        model = _load_partially(source, weights, split.front_blocks, split.back_blocks, role)
    if model is None:
        model = _load_whole(source, split.front_blocks, split.back_blocks, role, placement)
    if not placement.on_cpu_fp32:
        points = SplitPoints(split.front_blocks, split.back_blocks, _count_blocks(model))
        _place(model, kept_prefixes(points, role), placement)
    prepare_for_training(model, placement)
    segments = split_model(model, split.front_blocks, split.back_blocks)
    for segment in (segments.front, segments.middle, segments.back):
        segment.eval()  # the wrappers are new modules, in training mode
        if not placement.on_cpu_fp32:
            segment.compute_dtype = placement.dtype
    if role != "client" and split.server_device_map == "auto":
        spread_blocks(segments.middle, placement)
    for name in _dropped_segments(role):
        _guard(getattr(segments, name), name, role)
    return segments


def role_placement(config: Config, role: Role) -> Placement:
    """The configured placement; split clients keep their few blocks unquantized (the
    embeddings and LM head they hold are never quantized, so it would save little)."""
    placement = resolve_placement(config)
    if role == "client" and placement.quantized:
        return replace(placement, quantization="none")
    return placement


def spread_blocks(middle: Segment, placement: Placement) -> dict[int, str]:
    """Spread the middle's blocks over every visible GPU, balanced by accelerate; returns
    block index -> device (nothing moves with fewer than two GPUs)."""
    gpus = torch.cuda.device_count() if placement.device.type == "cuda" else 0
    if gpus < 2:
        log.info("split.server_device_map = 'auto' with %d GPU(s): the middle stays on one", gpus)
        return {}
    from accelerate.utils import get_balanced_memory

    max_memory = get_balanced_memory(middle, no_split_module_classes=_block_classes(middle))
    devices = block_device_map(middle, max_memory)
    for index, device in devices.items():
        middle.layers[index].to(device)
    middle.spread = len(set(devices.values())) > 1
    log.info("middle blocks on %s", devices)
    return devices


def block_device_map(segment: Segment, max_memory: dict[int | str, int | str]) -> dict[int, str]:
    """accelerate's placement of whole blocks under `max_memory` (GPU index -> bytes), as
    block index -> device name; refuses a plan that would need the CPU."""
    from accelerate import infer_auto_device_map

    device_map = infer_auto_device_map(
        segment.layers, max_memory=max_memory, no_split_module_classes=_block_classes(segment)
    )
    devices: dict[int, str] = {}
    for name, device in device_map.items():
        if not isinstance(device, int):
            raise ConfigError(
                f"the middle's blocks do not fit on the GPUs (block {name} would go to "
                f"{device}); set model.quantization = '4bit', or add GPUs"
            )
        for index in range(len(segment.layers)):  # a name covers one block ("3") or all ("")
            if name in ("", str(index)):
                devices[index] = f"cuda:{device}"
    return devices


def _block_classes(segment: Segment) -> list[str]:
    return sorted({type(block).__name__ for block in segment.layers})


def _place(model: PreTrainedModel, prefixes: list[str], placement: Placement) -> None:
    """Cast the kept modules to the placement's dtype and move them to its device; the rotary
    embedding is rebuilt there in float32 (its frequencies must not be rounded)."""
    for name in prefixes:
        module = model.get_submodule(name) if name else model
        if not placement.quantized:  # quantized weights are already where they belong
            module.to(device=placement.device, dtype=placement.dtype)
    inner = model.get_submodule("model")
    rotary: Any = type(inner.get_submodule("rotary_emb"))
    inner.rotary_emb = rotary(config=model.config).to(placement.device)


def kept_prefixes(points: SplitPoints, role: Role) -> list[str]:
    """Module names (in the causal LM's namespace) whose weights `role` needs."""
    if role == "all":
        return [""]
    layers = [f"model.layers.{i}" for i in _role_blocks(points, role)]
    if role == "server":
        return layers
    return ["model.embed_tokens", *layers, "model.norm", "lm_head"]


def _role_blocks(points: SplitPoints, role: Role) -> Iterable[int]:
    if role == "server":
        return points.middle
    return [*range(points.front_blocks), *range(points.layers - points.back_blocks, points.layers)]


def _dropped_segments(role: Role) -> list[str]:
    return {"client": ["middle"], "server": ["front", "back"], "all": []}[role]


def _kept(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _weight_files(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> safetensors file, for a single-file or sharded (indexed) checkpoint."""
    if (folder / _INDEX_FILE).is_file():
        index = json.loads((folder / _INDEX_FILE).read_text(encoding="utf-8"))
        return {k: folder / f for k, f in index.get("weight_map", {}).items()}
    if (folder / _SINGLE_FILE).is_file():
        with safe_open(str(folder / _SINGLE_FILE), framework="pt", device="cpu") as fh:
            return dict.fromkeys(fh.keys(), folder / _SINGLE_FILE)
    return None


def _load_partially(
    source: ModelSource,
    weights: dict[str, Path] | None,
    front_blocks: int,
    back_blocks: int,
    role: Role,
) -> PreTrainedModel | None:
    """Materialise only `role`'s modules from the safetensors files; None if this cannot work."""
    if weights is None:
        return None
    try:
        hf_config = AutoConfig.from_pretrained(source.location)
    except (OSError, ValueError):
        return None  # the whole-model loader reports what is wrong with the folder
    if getattr(hf_config, "quantization_config", None) is not None:
        return None  # quantized weights need transformers' own loader
    with torch.device("meta"):  # a skeleton: modules and shapes, no memory
        model: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            hf_config, dtype=torch.float32
        )
    parts = decoder_parts(model)
    points = SplitPoints(front_blocks, back_blocks, _count_blocks(model))
    points.check()
    prefixes = kept_prefixes(points, role)
    # Decided by transformers when it built the model (post_init ties them when configured).
    tied = parts["lm_head"].weight is parts["embed_tokens"].weight
    wanted = [k for k in model.state_dict() if _kept(k, prefixes)]
    if tied:
        wanted = [k for k in wanted if k != "lm_head.weight"]  # often absent from the file
    if missing := [k for k in wanted if k not in weights]:
        # Checkpoint names differ from the model's (legacy layout): transformers can map them.
        log.info("%s lacks %s...; loading the whole model", source.location, missing[0])
        return None
    model.load_state_dict(_read(wanted, weights), strict=False, assign=True)
    if tied and _kept("lm_head", prefixes):
        parts["lm_head"].weight = parts["embed_tokens"].weight
    # Non-persistent buffers (rotary `inv_freq`) are not in the file: rebuild them on CPU.
    model.get_submodule("model").rotary_emb = type(parts["rotary_emb"])(config=model.config)
    if buffers := [
        n
        for n, b in model.named_buffers()
        if _kept(n, [*prefixes, "model.rotary_emb"]) and b.is_meta
    ]:
        # Other buffers the file lacks (Gemma's embedding scale): transformers' loader sets them.
        log.info(
            "%s keeps %s outside its file; loading the whole model", source.location, buffers[0]
        )
        return None
    _check_materialised(model, [*prefixes, "model.rotary_emb"])
    log.debug("loaded %d of %d tensors for role %s", len(wanted), len(weights), role)
    return model


def _read(names: list[str], weights: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The named tensors as fp32, opening each shard once."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(weights[name], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in keys:
                tensors[key] = fh.get_tensor(key).to(torch.float32)
    return tensors


def _check_materialised(model: nn.Module, prefixes: list[str]) -> None:
    """Refuse to hand out a kept module with a tensor still on `meta` (it would compute nothing)."""
    tensors = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    if left := [n for n, t in tensors if _kept(n, prefixes) and t.is_meta]:
        raise RuntimeError(f"partial loading left {left[:3]} on meta; this model is unsupported")


def _load_whole(
    source: ModelSource, front_blocks: int, back_blocks: int, role: Role, placement: Placement
) -> PreTrainedModel:
    """The whole model, with the modules `role` does not keep moved to `meta` (freed)."""
    try:
        hf_config = AutoConfig.from_pretrained(source.location)
    except (OSError, ValueError):
        hf_config = None  # the loader reports what is wrong with the folder
    if hf_config is not None:
        check_splittable(hf_config)  # before gigabytes of weights load for nothing
    model = load_model(source, placement)
    points = SplitPoints(front_blocks, back_blocks, _count_blocks(model))
    points.check()
    prefixes = kept_prefixes(points, role)
    for name, module in list(model.named_modules()):
        # Whole subtrees only: a dropped block's children go with it; kept ones are untouched.
        is_part = name in ("model.embed_tokens", "model.norm", "lm_head") or (
            name.startswith("model.layers.") and name.count(".") == 2
        )
        if is_part and not _kept(name, prefixes):
            module.to("meta")
    return model


def _count_blocks(model: PreTrainedModel) -> int:
    return len(list(decoder_parts(model)["layers"].children()))


def _guard(segment: Segment, name: str, role: Role) -> None:
    """Make a dropped segment fail loudly instead of returning meta tensors."""

    def refuse(*_: Any) -> None:
        raise SegmentNotLoadedError(
            f"the {name} segment was not loaded in this process (role {role}); "
            "load the segments with role 'all' to run it"
        )

    segment.register_forward_pre_hook(refuse)
