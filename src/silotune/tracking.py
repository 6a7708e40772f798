"""Experiment trackers a run also reports to (`[tracking] backends`): TensorBoard, MLflow and
Weights & Biases, each through its own library. One tracker run per algorithm: its config as
parameters, per-round held-out metrics, training loss, time and traffic, each client's training
loss and time, then the final figures (the ledger's ε where finite, the attacks') and the report
and plots as artefacts. The ids live in the run folder's tracking.json, so a resumed run goes on
in the same tracker runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

from silotune.config import Config
from silotune.errors import ConfigError
from silotune.jobs import RoundLog
from silotune.logs import adopt
from silotune.run_folder import write_json

IDS_FILE = "tracking.json"
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class _Backend(Protocol):
    def start(self, algorithm: str, resume_id: str | None) -> str:
        """Open (or reopen) the algorithm's tracker run; its id."""

    def scalars(self, algorithm: str, values: dict[str, float], step: int) -> None: ...

    def files(self, algorithm: str, paths: list[Path]) -> None: ...

    def close(self, failed: bool) -> None:
        """End every tracker run (`failed`: the run stopped or broke)."""


def check_installed(cfg: Config) -> None:
    """Refuse, before any training, a backend whose library is not installed."""
    for backend in cfg.tracking.backends:
        if importlib.util.find_spec(_MODULES[backend]) is None:
            raise ConfigError(
                f"tracking.backends has '{backend}' but {backend} is not installed: "
                "pip install 'silotune[tracking]', or remove it from tracking.backends"
            )


def run_name(out: Path) -> str:
    """A run's name in the trackers: its folder, with the sweep values and seed it is one of
    (runs/study/alpha=0.1/seed=0 -> study/alpha=0.1/seed=0)."""
    parts = [p.removesuffix(".incomplete") for p in out.parts]
    kept = [parts[-1]]
    for part in reversed(parts[:-1]):
        if "=" not in kept[0]:
            break
        kept.insert(0, part)
    return "/".join(kept)


class Trackers:
    """Every configured backend, for one experiment folder (nothing when none is configured):
    `root` is where the folder is now, `out` where it will be when finished."""

    def __init__(self, cfg: Config, root: Path, out: Path) -> None:
        check_installed(cfg)
        self.cfg, self.root = cfg, root
        name = run_name(out)
        ids_file = root / IDS_FILE
        # backend -> algorithm -> tracker run id; and "logged": algorithm -> the rounds logged
        self.ids: dict[str, dict[str, Any]] = (
            json.loads(ids_file.read_text(encoding="utf-8")) if ids_file.is_file() else {}
        )
        self.logged: dict[str, list[int]] = self.ids.setdefault("logged", {})
        self.backends: dict[str, _Backend] = {
            b: _open(b, cfg, root, name, out) for b in cfg.tracking.backends
        }
        self.started: set[str] = set()

    def _start(self, algorithm: str) -> None:
        if algorithm in self.started:
            return
        for key, backend in self.backends.items():
            known = self.ids.setdefault(key, {})
            known[algorithm] = backend.start(algorithm, known.get(algorithm))
        write_json(self.root / IDS_FILE, self.ids)
        self.started.add(algorithm)

    def round(self, algorithm: str, log: RoundLog) -> None:
        """One round's figures, at step = the round (once: a resumed run skips those logged)."""
        if not self.backends or log.round in self.logged.get(algorithm, []):
            return
        self._start(algorithm)
        values = {**log.metrics, "train_loss": log.train_loss, "wall_s": log.wall_s}
        values |= {"bytes_up": float(log.bytes_up), "bytes_down": float(log.bytes_down)}
        for row in log.clients:
            client = row.get("client")
            for key in ("train_loss", "train_s"):
                if isinstance(client, int) and isinstance(row.get(key), int | float):
                    values[f"client_{client}/{key}"] = float(row[key])
        self._scalars(algorithm, values, log.round)
        self.logged[algorithm] = sorted({*self.logged.get(algorithm, []), log.round})
        write_json(self.root / IDS_FILE, self.ids)

    def finished(self, algorithm: str, summary: dict[str, Any], folder: Path, rounds: int) -> None:
        """The ledger's finite ε per client, and the algorithm's report and plots."""
        if not self.backends:
            return
        self._start(algorithm)
        clients = summary.get("privacy", {}).get("clients", {})
        epsilons = {
            f"epsilon/client_{c}": float(found["epsilon"])
            for c, found in clients.items()
            if isinstance(found.get("epsilon"), int | float)
        }
        self._scalars(algorithm, epsilons, rounds)
        report = [folder / "report.md", *sorted((folder / "plots").glob("*.png"))]
        for backend in self.backends.values():
            backend.files(algorithm, [p for p in report if p.is_file()])

    def attacks(self, algorithm: str, found: dict[str, Any], rounds: int) -> None:
        """What the attacks measured on the algorithm's release (numbers only)."""
        if not self.backends:
            return
        self._start(algorithm)
        self._scalars(algorithm, {f"attack/{k}": v for k, v in _numbers(found).items()}, rounds)

    def _scalars(self, algorithm: str, values: dict[str, float], step: int) -> None:
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        for backend in self.backends.values():
            backend.scalars(algorithm, finite, step)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        for backend in self.backends.values():
            backend.close(failed=kind is not None)


def _numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON tree, keyed by their path (a/b/c)."""
    if isinstance(tree, bool):
        return {}
    if isinstance(tree, int | float):
        return {prefix: float(tree)}
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for key, value in tree.items():
            out |= _numbers(value, f"{prefix}/{key}" if prefix else str(key))
        return out
    return {}


def _flat_config(cfg: Config) -> dict[str, str]:
    """section.key -> value, as trackers take parameters."""
    return {
        f"{section}.{key}": json.dumps(value) if not isinstance(value, str) else value
        for section, keys in cfg.to_dict().items()
        for key, value in keys.items()
    }


def _open(backend: str, cfg: Config, root: Path, name: str, out: Path) -> _Backend:
    if backend == "tensorboard":
        return _TensorBoard(root / "tensorboard", cfg)
    if backend == "mlflow":
        return _MLflow(cfg, name, out)
    return _WandB(cfg, name, root)


class _TensorBoard:
    """One event folder per algorithm under the run's tensorboard/ (`tensorboard --logdir`)."""

    def __init__(self, folder: Path, cfg: Config) -> None:
        self.folder, self.cfg = folder, cfg
        self.writers: dict[str, Any] = {}

    def start(self, algorithm: str, resume_id: str | None) -> str:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.folder / algorithm))
        if resume_id is None:
            writer.add_text("config", "```\n" + json.dumps(self.cfg.to_dict(), indent=1) + "\n```")
        self.writers[algorithm] = writer
        return algorithm

    def scalars(self, algorithm: str, values: dict[str, float], step: int) -> None:
        writer = self.writers[algorithm]
        for key, value in values.items():
            writer.add_scalar(key, value, global_step=step)
        writer.flush()

    def files(self, algorithm: str, paths: list[Path]) -> None:
        reports = [p for p in paths if p.suffix == ".md"]
        for path in reports:
            self.writers[algorithm].add_text(path.stem, path.read_text(encoding="utf-8"))
        self.writers[algorithm].flush()

    def close(self, failed: bool) -> None:
        for writer in self.writers.values():
            writer.close()


class _MLflow:
    """An MLflow run per algorithm, in the experiment named after the run; the store is
    tracking.mlflow_uri, else $MLFLOW_TRACKING_URI, else MLflow's default (./mlflow.db)."""

    def __init__(self, cfg: Config, name: str, out: Path) -> None:
        from mlflow import MlflowClient

        adopt("mlflow")  # its INFO lines about creating tables go to the run's log

        self.client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri or None)
        found = self.client.get_experiment_by_name(cfg.experiment.name)
        self.experiment = (
            found.experiment_id if found else self.client.create_experiment(cfg.experiment.name)
        )
        self.cfg, self.name, self.out = cfg, name, out
        self.runs: dict[str, str] = {}

    def start(self, algorithm: str, resume_id: str | None) -> str:
        from mlflow.entities import Param

        if resume_id is not None:
            self.client.update_run(resume_id, status="RUNNING")
            self.runs[algorithm] = resume_id
            return resume_id
        run = self.client.create_run(
            self.experiment,
            run_name=f"{self.name}/{algorithm}",
            tags={"silotune.folder": str(self.out), "silotune.algorithm": algorithm},
        )
        run_id: str = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in _flat_config(self.cfg).items()]
        self.client.log_batch(run_id, params=params)
        self.runs[algorithm] = run_id
        return run_id

    def scalars(self, algorithm: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _millis()
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in values.items()]
        self.client.log_batch(self.runs[algorithm], metrics=metrics)

    def files(self, algorithm: str, paths: list[Path]) -> None:
        for path in paths:
            where = "plots" if path.suffix == ".png" else None
            self.client.log_artifact(self.runs[algorithm], str(path), artifact_path=where)

    def close(self, failed: bool) -> None:
        for run_id in self.runs.values():
            self.client.set_terminated(run_id, status="KILLED" if failed else "FINISHED")


def _mlflow_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def _millis() -> int:
    return int(time.time() * 1000)


class _WandB:
    """A W&B run per algorithm, offline in the run folder (wandb/) unless tracking.wandb_mode
    is "online" (`wandb sync DIR/wandb/offline-run-*` uploads an offline one later)."""

    def __init__(self, cfg: Config, name: str, root: Path) -> None:
        self.cfg, self.name, self.root = cfg, name, root
        self.runs: dict[str, Any] = {}

    def start(self, algorithm: str, resume_id: str | None) -> str:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            project=self.cfg.tracking.wandb_project or self.cfg.experiment.name,
            name=f"{self.name}/{algorithm}",
            dir=str(self.root),
            mode=self.cfg.tracking.wandb_mode,
            config=self.cfg.to_dict(),
            id=resume_id,
            resume="allow" if resume_id else None,
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )
        self.runs[algorithm] = run
        return str(run.id)

    def scalars(self, algorithm: str, values: dict[str, float], step: int) -> None:
        self.runs[algorithm].log(values, step=step)

    def files(self, algorithm: str, paths: list[Path]) -> None:
        run = self.runs[algorithm]
        for path in paths:
            # Copied into the run's own files/ (W&B would link to them, and the run folder is
            # renamed when it finishes): report.md as itself, plots/x.png with its folder.
            target = Path(run.dir) / ("plots" if path.suffix == ".png" else "") / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            run.save(str(target), base_path=run.dir, policy="now")

    def close(self, failed: bool) -> None:
        for run in self.runs.values():
            run.finish(exit_code=1 if failed else 0)
