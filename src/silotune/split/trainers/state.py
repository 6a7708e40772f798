"""The split server's checkpoint file: a trainer's `training_state()` without pickles.

One safetensors file holds the tensors (RNG state, each module's adapter, its optimizer's moment
and step tensors); its metadata holds the rest as JSON (round, steps, optimizer param groups,
replica steps). One file, so one rename swaps a whole checkpoint in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from silotune.run_folder import write_atomic

_SEP = "::"  # joins a module name, a part and a tensor name in one safetensors key
_META = "state"


def save_training_state(state: dict[str, Any], target: Path) -> None:
    """Write `state` (as MiddleTrainer.training_state returns it) to `target`, whole or not at
    all."""
    tensors = {"rng": state["rng"]}
    modules: dict[str, Any] = {}
    for name, saved in state["modules"].items():
        for key, tensor in saved["adapter"].items():
            tensors[_SEP.join((name, "adapter", key))] = tensor
        info: dict[str, Any] = {k: v for k, v in saved.items() if k not in ("adapter", "optimizer")}
        if optimizer := saved["optimizer"]:
            rest: dict[str, dict[str, Any]] = {}
            for index, values in optimizer["state"].items():
                rest[str(index)] = {}
                for key, value in values.items():
                    if isinstance(value, torch.Tensor):
                        tensors[_SEP.join((name, "optimizer", str(index), key))] = value
                    else:
                        rest[str(index)][key] = value
            info["optimizer"] = {"param_groups": optimizer["param_groups"], "state": rest}
        modules[name] = info
    meta = {"round": state["round"], "steps": state["steps"], "modules": modules}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(target, save(contiguous, metadata={_META: json.dumps(meta)}))


def load_training_state(source: Path) -> dict[str, Any]:
    """Inverse of save_training_state: the dict MiddleTrainer.restore takes."""
    with safe_open(str(source), framework="pt") as fh:
        meta = json.loads(fh.metadata()[_META])
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (not iterable)
    modules: dict[str, Any] = {}
    for name, info in meta["modules"].items():
        saved = {k: v for k, v in info.items() if k != "optimizer"}
        saved["adapter"] = _group(tensors, (name, "adapter"))
        saved["optimizer"] = {}
        if optimizer := info.get("optimizer"):
            saved["optimizer"] = {
                "state": {
                    int(index): {**values, **_group(tensors, (name, "optimizer", index))}
                    for index, values in optimizer["state"].items()
                },
                # JSON has no tuples; torch's param groups keep their pairs (betas) as tuples.
                "param_groups": [
                    {k: tuple(v) if k == "betas" else v for k, v in group.items()}
                    for group in optimizer["param_groups"]
                ],
            }
        modules[name] = saved
    return {
        "round": meta["round"],
        "steps": meta["steps"],
        "rng": tensors["rng"],
        "modules": modules,
    }


def _group(tensors: dict[str, torch.Tensor], prefix: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors whose key starts with `prefix`, keyed by the rest of their key."""
    head = _SEP.join(prefix) + _SEP
    return {k.removeprefix(head): v for k, v in tensors.items() if k.startswith(head)}
