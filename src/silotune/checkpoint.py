"""Checkpoints that let an interrupted run continue where it stopped (`silotune run --resume`).

Layout inside the unfinished run folder (`OUT.incomplete/checkpoints/`):

    base.json                    the base model's held-out metrics (evaluated once)
    <algorithm>/result/          a finished algorithm: its AlgorithmResult (JSON + safetensors)
    <algorithm>/round/           a federated algorithm's last finished round: global adapter,
                                 strategy state (e.g. FedAdam's moments), round logs, RNG state

Each client keeps its own state on its own disk (`clients/client-N/state/round-R.safetensors`),
never in the server's checkpoint. Every checkpoint is written whole or not at all
(silotune.run_folder), so a crash while saving leaves the previous checkpoint readable.
Tensors are stored as safetensors and everything else as JSON: a checkpoint never holds pickles.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save, save_file

from silotune.data.synthetic import SyntheticStats
from silotune.evaluation.judge import JudgeResult
from silotune.jobs import AlgorithmResult, RoundLog
from silotune.modeling.adapters import StateDict
from silotune.run_folder import (
    client_state_dir,
    read_folder,
    write_atomic,
    write_folder_atomic,
    write_json,
)
from silotune.tensor_groups import contiguous, flatten, unflatten

_KEEP_CLIENT_ROUNDS = 2


@dataclass
class RoundCheckpoint:
    """What a federated server needs to run round `round + 1` as if it never stopped."""

    round: int
    arrays: StateDict
    rounds: list[RoundLog]
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    client_evals: list[dict[str, Any]] = field(default_factory=list)
    client_predictions: list[list[str]] = field(default_factory=list)
    client_per_record: list[dict[str, list[float]]] = field(default_factory=list)
    random_state: Any = None
    per_record: dict[str, list[float]] = field(default_factory=dict)  # the global adapter's


def save_round(folder: Path, ckpt: RoundCheckpoint) -> None:
    """Replace the round checkpoint in `folder` with `ckpt`."""

    def write(tmp: Path) -> None:
        save_file(contiguous(ckpt.arrays), str(tmp / "global.safetensors"))
        save_numpy(flatten(ckpt.strategy_state), str(tmp / "strategy.safetensors"))
        state = {
            "round": ckpt.round,
            "rounds": [log.to_json() for log in ckpt.rounds],
            "samples": ckpt.samples,
            "predictions": ckpt.predictions,
            "client_evals": ckpt.client_evals,
            "client_predictions": ckpt.client_predictions,
            "client_per_record": ckpt.client_per_record,
            "random_state": ckpt.random_state,
            "per_record": ckpt.per_record,
        }
        write_json(tmp / "state.json", state, indent=None)

    write_folder_atomic(folder, write)


def load_round(folder: Path) -> RoundCheckpoint | None:
    """The round checkpoint in `folder`, or None when there is none yet."""
    found = read_folder(folder)
    if found is None:
        return None
    state = json.loads((found / "state.json").read_text(encoding="utf-8"))
    return RoundCheckpoint(
        round=int(state["round"]),
        arrays=load_file(str(found / "global.safetensors")),
        rounds=[RoundLog.from_json(r) for r in state["rounds"]],
        strategy_state=unflatten(load_numpy(str(found / "strategy.safetensors"))),
        samples=state["samples"],
        predictions=state["predictions"],
        client_evals=state["client_evals"],
        client_predictions=state["client_predictions"],
        client_per_record=state.get("client_per_record", []),  # absent from older checkpoints
        random_state=state["random_state"],
        per_record=state.get("per_record", {}),  # absent from checkpoints kept before it existed
    )


def python_random_state() -> Any:
    """The `random` module's state as JSON (Flower samples clients with it)."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def restore_python_random(state: Any) -> None:
    """Inverse of python_random_state."""
    if state is not None:
        version, internal, gauss = state
        random.setstate((version, tuple(internal), gauss))


def save_result(folder: Path, result: AlgorithmResult) -> None:
    """Keep a finished algorithm's result, so a resumed experiment does not run it again."""

    def write(tmp: Path) -> None:
        adapters = {name: contiguous(state) for name, state in result.adapters.items()}
        save_file(flatten(adapters), str(tmp / "adapters.safetensors"))
        data = {
            "rounds": [log.to_json() for log in result.rounds],
            "per_client_final": result.per_client_final,
            "samples": result.samples,
            "notes": result.notes,
            "synthetic": _synthetic_to_json(result.synthetic),
            "final_predictions": result.final_predictions,
            "judge": dataclasses.asdict(result.judge) if result.judge else None,
            "adapter_config": result.adapter_config,
            "final_per_record": result.final_per_record,
            "per_client_eval": result.per_client_eval,
        }
        write_json(tmp / "result.json", data, indent=None)

    write_folder_atomic(folder, write)


def load_result(folder: Path) -> AlgorithmResult | None:
    """A finished algorithm's result kept by save_result, or None."""
    found = read_folder(folder)
    if found is None:
        return None
    data = json.loads((found / "result.json").read_text(encoding="utf-8"))
    synthetic = data["synthetic"]
    return AlgorithmResult(
        rounds=[RoundLog.from_json(r) for r in data["rounds"]],
        adapters=unflatten(load_file(str(found / "adapters.safetensors"))),
        per_client_final=data["per_client_final"],
        samples=data["samples"],
        notes=data["notes"],
        synthetic=_synthetic_from_json(synthetic) if synthetic else None,
        final_predictions=data["final_predictions"],
        judge=JudgeResult(**data["judge"]) if data["judge"] else None,
        adapter_config=data.get("adapter_config"),  # absent from results kept before it existed
        final_per_record=data.get("final_per_record", {}),  # likewise
        per_client_eval=data.get("per_client_eval", {}),  # likewise
    )


def save_client_state(client_dir: Path, round_: int, store: dict[str, StateDict]) -> None:
    """A client's own state after `round_`, on its own disk (the last two rounds are kept)."""
    if not store:
        return
    folder = client_state_dir(client_dir)
    folder.mkdir(parents=True, exist_ok=True)
    data = save(flatten({k: contiguous(v) for k, v in store.items()}))
    write_atomic(folder / f"round-{round_}.safetensors", data)
    for old in sorted(_client_rounds(folder))[:-_KEEP_CLIENT_ROUNDS]:
        (folder / f"round-{old}.safetensors").unlink()


def load_client_state(client_dir: Path, upto: int) -> dict[str, StateDict]:
    """The client's state saved after the latest round <= `upto`; empty if none."""
    folder = client_state_dir(client_dir)
    rounds = [r for r in _client_rounds(folder) if r <= upto] if folder.is_dir() else []
    if not rounds:
        return {}
    return unflatten(load_file(str(folder / f"round-{max(rounds)}.safetensors")))


def _synthetic_to_json(stats: SyntheticStats | None) -> dict[str, Any] | None:
    return None if stats is None else stats.to_json()


def _synthetic_from_json(data: dict[str, Any]) -> SyntheticStats:
    stats = SyntheticStats(int(data["generated"]), int(data["kept"]))
    stats.dropped_by_filter.update(data["dropped_by_filter"])
    return stats


def _client_rounds(folder: Path) -> list[int]:
    return [
        int(p.name.removeprefix("round-").removesuffix(".safetensors"))
        for p in folder.glob("round-*.safetensors")
    ]
