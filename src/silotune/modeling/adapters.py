"""Named PEFT LoRA adapters on a frozen base: create, read, write and save them."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from silotune.config import LoraConfig

GLOBAL = "global"
StateDict = dict[str, torch.Tensor]


def peft_lora_config(cfg: LoraConfig) -> PeftLoraConfig:
    """PEFT's own LoraConfig from ours (causal-LM task, no bias training)."""
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
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
    return peft_model


def get_adapter(model: PeftModel, name: str = GLOBAL) -> StateDict:
    """A detached copy of the adapter's tensors, keyed as PEFT saves them."""
    state = get_peft_model_state_dict(model, adapter_name=name)
    return {k: v.detach().clone() for k, v in state.items()}


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
