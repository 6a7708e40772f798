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
from silotune.tensor_groups import contiguous, group, key

_META = "state"


def save_training_state(state: dict[str, Any], target: Path) -> None:
    """Write `state` (as MiddleTrainer.training_state returns it) to `target`, whole or not at
    all."""
    tensors = {"rng": state["rng"]}
    modules: dict[str, Any] = {}
    for name, saved in state["modules"].items():
        for tensor_name, tensor in saved["adapter"].items():
            tensors[key(name, "adapter", tensor_name)] = tensor
        info: dict[str, Any] = {k: v for k, v in saved.items() if k not in ("adapter", "optimizer")}
        if optimizer := saved["optimizer"]:
            rest: dict[str, dict[str, Any]] = {}
            for index, values in optimizer["state"].items():
                rest[str(index)] = {}
                for field, value in values.items():
                    if isinstance(value, torch.Tensor):
                        tensors[key(name, "optimizer", str(index), field)] = value
                    else:
                        rest[str(index)][field] = value
            info["optimizer"] = {"param_groups": optimizer["param_groups"], "state": rest}
        modules[name] = info
    meta = {"round": state["round"], "steps": state["steps"], "modules": modules}
    write_atomic(target, save(contiguous(tensors), metadata={_META: json.dumps(meta)}))


def saved_round(source: Path) -> int:
    """The round a checkpoint was taken after, read from its metadata alone."""
    with safe_open(str(source), framework="pt") as fh:
        return int(json.loads(fh.metadata()[_META])["round"])


def load_training_state(source: Path) -> dict[str, Any]:
    """Inverse of save_training_state: the dict MiddleTrainer.restore takes."""
    with safe_open(str(source), framework="pt") as fh:
        meta = json.loads(fh.metadata()[_META])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not iterable)
    modules: dict[str, Any] = {}
    for name, info in meta["modules"].items():
        saved = {k: v for k, v in info.items() if k != "optimizer"}
        saved["adapter"] = group(tensors, name, "adapter")
        saved["optimizer"] = {}
        if optimizer := info.get("optimizer"):
            saved["optimizer"] = {
                "state": {
                    int(index): {**values, **group(tensors, name, "optimizer", index)}
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
