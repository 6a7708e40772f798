"""What an attack reads from a finished run folder: its config, its members and non-members, and
the parameters the adversary holds.

A run folder is one algorithm's result (it has `summary.json`); its experiment folder holds
`config.json` and `partitions/` (the same folder for a one-algorithm run, else its parent).
Members are the records the clients trained on (`partitions/client-*.jsonl`). Non-members are
records of the same data the run never trained on: the held-out set plus every source record no
client received. Attacks score members against non-members, so what the base model knows about
the domain anyway is not counted as leakage.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from silotune.config import Config, load_config
from silotune.config_federation import SHARED_ADAPTER_ALGORITHMS
from silotune.data.load import as_records, load_partition_file, load_records
from silotune.data.synthetic import Record
from silotune.errors import UserError
from silotune.modeling.adapters import GLOBAL
from silotune.modeling.load import resolve_model
from silotune.run_folder import RunFolder
from silotune.training.workbench import Workbench


@dataclass(frozen=True)
class RunUnderAttack:
    """One finished algorithm's run folder and the experiment around it."""

    run_dir: Path
    root: Path
    config: Config
    algorithm: str
    summary: dict[str, Any]

    @property
    def clients(self) -> int:
        """How many clients the run had."""
        return self.config.partition.clients

    def members(self, client: int) -> list[Record]:
        """Client `client`'s training records, as it read them."""
        path = RunFolder(self.root).partition(client)
        if not path.is_file():
            raise UserError(f"{path} is missing; the run folder {self.root} is incomplete")
        return as_records(load_partition_file(path))

    def all_members(self) -> list[Record]:
        """Every client's training records."""
        return [r for c in range(self.clients) for r in self.members(c)]

    def non_members(self) -> list[Record]:
        """Records of the same data that no client trained on (held-out set first), leaving out
        any whose instruction or response equals a member's (it would be a member in disguise)."""
        members = self.all_members()
        taken = {r["instruction"].strip() for r in members} | {r["output"].strip() for r in members}
        held_out = as_records(load_partition_file(RunFolder(self.root).eval_file))
        pool = held_out + as_records(load_records(self.config.data).dataset)
        out, kept = [], set()
        for r in pool:
            k = _key(r)
            if k in kept or r["instruction"].strip() in taken or r["output"].strip() in taken:
                continue
            kept.add(k)
            out.append(r)
        return out

    def shared_adapter(self) -> Path:
        """The PEFT folder of the adapter the adversary holds (FedPIT: `global` alone)."""
        if self.algorithm not in SHARED_ADAPTER_ALGORITHMS:
            raise UserError(
                f"{self.run_dir} is a {self.algorithm!r} run, which shares no whole-model adapter; "
                f"extraction and membership attack {', '.join(SHARED_ADAPTER_ALGORITHMS)} runs "
                "(split runs: use the inversion attack)"
            )
        folder = RunFolder(self.run_dir).adapters / GLOBAL
        if not (folder / "adapter_model.safetensors").is_file():
            raise UserError(f"{folder} holds no adapter_model.safetensors; is the run finished?")
        return folder


def open_run(run_dir: Path) -> RunUnderAttack:
    """Read a finished run folder (one with `summary.json`)."""
    summary_file = RunFolder(run_dir).summary
    if not summary_file.is_file():
        raise UserError(
            f"{run_dir} is not a finished run folder (no summary.json); pass the folder of one "
            "algorithm's result, or an experiment folder holding several"
        )
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    root = run_dir if RunFolder(run_dir).partitions.is_dir() else run_dir.parent
    if not RunFolder(root).config.is_file():
        raise UserError(f"{root} has no config.json; it is not a silotune run folder")
    return RunUnderAttack(
        run_dir=run_dir,
        root=root,
        config=load_config(RunFolder(root).config),
        algorithm=str(summary["algorithm"]),
        summary=summary,
    )


def run_folders(path: Path) -> list[Path]:
    """The finished run folders in `path`: itself, or the algorithms of an experiment folder."""
    if (path / "summary.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("*/summary.json"))
    if not found:
        raise UserError(
            f"{path} holds no finished run (no summary.json in it or its sub-folders); pass the "
            "output folder of `silotune run`"
        )
    return found


def load_shared_model(run: RunUnderAttack) -> Workbench:
    """Base model with the run's shared adapter in the `global` slot (the adversary's model)."""
    bench = Workbench(resolve_model(run.config.model), run.config)
    state = load_file(str(run.shared_adapter() / "adapter_model.safetensors"))
    bench.put(GLOBAL, {k: v.to(bench.initial[k].dtype) for k, v in state.items()})
    bench.use([GLOBAL])
    bench.model.eval()  # no LoRA dropout while the adversary decodes or scores
    return bench


def sample(records: list[Record], count: int, seed: int) -> list[Record]:
    """`count` records drawn without replacement (all of them if fewer), reproducibly."""
    if len(records) <= count:
        return list(records)
    return random.Random(seed).sample(records, count)


def sample_members(run: RunUnderAttack, count: int, seed: int) -> list[Record]:
    """Up to `count` member records, spread as evenly as possible over the clients."""
    per_client = []
    for c in range(run.clients):
        records = run.members(c)
        random.Random(seed + c).shuffle(records)
        per_client.append(records)
    out: list[Record] = []
    while len(out) < count and any(per_client):
        for records in per_client:
            if records and len(out) < count:
                out.append(records.pop())
    return out


def _key(r: Record) -> tuple[str, str, str]:
    return (r["instruction"].strip(), r["input"].strip(), r["output"].strip())
