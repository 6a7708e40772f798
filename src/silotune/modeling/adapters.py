"""Named PEFT LoRA adapters on a frozen base: create, read, write and save them."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from silotune.config_sections import LoraConfig
from silotune.run_folder import write_folder_atomic

GLOBAL = "global"
PRIVATE = "private"
StateDict = dict[str, torch.Tensor]
# The model attribute naming its adapters created with lora.freeze_a (FFA-LoRA): their A stays
# frozen whatever `use_adapters` later makes trainable.
_FROZEN_A = "silotune_frozen_a"


def peft_lora_config(cfg: LoraConfig, rank: int | None = None) -> PeftLoraConfig:
    """PEFT's own LoraConfig from ours (causal-LM task, no bias training); of another `rank`,
    with the scaling alpha / r of ours, so that its components mean what ours do."""
    rank = rank or cfg.r
    alpha = cfg.alpha if rank == cfg.r else cfg.alpha * rank / cfg.r
    return PeftLoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT scales by lora_alpha / r, any number
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(
    model: PreTrainedModel, cfg: LoraConfig, name: str = GLOBAL, seed: int = 0
) -> PeftModel:
    """Wrap `model` with a LoRA adapter called `name`, initialised deterministically by `seed`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_lora_config(cfg), adapter_name=name)
    assert isinstance(peft_model, PeftModel)
    if cfg.freeze_a:
        _freeze_a(peft_model, name)
    return peft_model


def add_named_lora(
    model: PeftModel, cfg: LoraConfig, name: str, seed: int = 0, rank: int | None = None
) -> None:
    """Add another LoRA adapter `name` to a PEFT model: the first's shape, or `rank`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.add_adapter(name, peft_lora_config(cfg, rank))
    if cfg.freeze_a:
        _freeze_a(model, name)


def _freeze_a(model: PeftModel, name: str) -> None:
    """FFA-LoRA: adapter `name`'s A matrices keep their initial values; only B trains."""
    setattr(model, _FROZEN_A, frozen_a(model) | {name})
    for param_name, param in model.named_parameters():
        if _is_frozen_a(param_name, {name}):
            param.requires_grad = False


def frozen_a(model: PeftModel) -> frozenset[str]:
    """The adapters of `model` whose LoRA A is frozen (created with lora.freeze_a)."""
    names: frozenset[str] = getattr(model, _FROZEN_A, frozenset())
    return names


def use_adapters(model: PeftModel, active: list[str], trainable: list[str]) -> None:
    """Make `active` adapters take part in the forward pass; only `trainable` ones get gradients."""
    if not set(trainable) <= set(active):
        raise ValueError(f"trainable adapters {trainable} must be active ({active})")
    # PeftModel.set_adapter takes one name; the tuner underneath takes several.
    model.base_model.set_adapter(active)  # type: ignore[operator]
    frozen = frozen_a(model)
    for name, param in model.named_parameters():
        owner = _adapter_of(name)
        if owner is not None:
            param.requires_grad = owner in trainable and not _is_frozen_a(name, frozen)


def _adapter_of(param_name: str) -> str | None:
    # LoRA parameters are named `...lora_A.<adapter>.weight` / `...lora_B.<adapter>.weight`.
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def _is_frozen_a(param_name: str, frozen: frozenset[str] | set[str]) -> bool:
    """Whether `param_name` is a LoRA A matrix of one of the `frozen` adapters."""
    owner = _adapter_of(param_name)
    return owner in frozen and f".lora_A.{owner}." in param_name


def mix_adapters(a: StateDict, b: StateDict, beta: float) -> StateDict:
    """`beta * a + (1 - beta) * b`, key by key (FedPIT v2's upload); beta = 1 returns `a` itself."""
    if beta == 1.0:
        return a
    if a.keys() != b.keys():
        raise ValueError("adapters to mix have different keys")
    return {k: beta * a[k] + (1.0 - beta) * b[k] for k in a}


def weighted_mean(states: list[StateDict], weights: list[float]) -> StateDict:
    """`sum(w_i * s_i) / sum(w_i)` key by key, computed in float64 and cast back to each dtype."""
    if not states:
        raise ValueError("nothing to average")
    total = sum(weights)
    mean: StateDict = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for state, weight in zip(states, weights, strict=True):
            acc.add_(state[key].to(torch.float64), alpha=weight / total)
        mean[key] = acc.to(first.dtype)
    return mean


def get_adapter(model: PeftModel, name: str = GLOBAL) -> StateDict:
    """A detached CPU copy of the adapter's tensors, keyed as PEFT saves them."""
    state = get_peft_model_state_dict(model, adapter_name=name)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def set_adapter(model: PeftModel, state: StateDict, name: str = GLOBAL) -> None:
    """Load tensors into adapter `name`; every key must match exactly."""
    expected = set(get_peft_model_state_dict(model, adapter_name=name))
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise ValueError(f"adapter {name!r} keys differ: missing {missing}, unexpected {extra}")
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise ValueError(f"adapter {name!r} did not take keys {unexpected[:3]}")


def adapter_nbytes(state: StateDict) -> int:
    """Raw size of the adapter's tensors in bytes."""
    return sum(t.numel() * t.element_size() for t in state.values())


def save_adapter(model: PeftModel, state: StateDict, target: Path, name: str = GLOBAL) -> None:
    """Save `state` as a stock PEFT adapter folder (loadable by PeftModel.from_pretrained)."""
    set_adapter(model, state, name)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model.save_pretrained(tmp, selected_adapters=[name])
        # PEFT writes non-default adapters into a sub-folder named after them.
        saved = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(saved), target)


def load_adapter_state(folder: Path) -> StateDict:
    """The tensors of a PEFT adapter folder written by save_adapter, keyed as PEFT saves them."""
    return dict(load_file(str(folder / "adapter_model.safetensors")))


def write_peft_folder(target: Path, state: StateDict, adapter_config: dict[str, Any]) -> None:
    """A PEFT adapter folder from tensors already named as PEFT saves them and their config."""

    def write(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "adapter_model.safetensors"))

    write_folder_atomic(target, write)
