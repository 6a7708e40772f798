"""Every path of a run folder, its `OUT.incomplete` -> `OUT` rename, and the atomic writes.

An experiment's folder (written as OUT.incomplete, renamed to OUT once everything is in it):

    config.json                  the full config (written first: a resume reads it)
    partitions/                  client-N.jsonl, client-N-eval.jsonl (its own held-out records),
                                 eval.jsonl, canaries.json (0600 in a 0700 folder), stats.json
    checkpoints/                 resumable state (see silotune.checkpoint); deleted at the end
    clients/client-N/            each simulated client's own disk (its state/ deleted at the end;
                                 synthetic/<algorithm>/round-K.jsonl: what its generator kept, 0600)
    split/                       a split run: server/ and client-N/ (see SplitOutputs), one log each
    deploy-logs/                 the processes of `silotune deploy local`
    summary.json, metrics.jsonl, adapters/<name>/, report.md, plots/    an algorithm's result
    privacy.json                 what `silotune attack` found
    silotune.log                 what the libraries logged (see silotune.logs)

With several algorithms each result is a sub-folder named after the algorithm, beside a
side-by-side report.md and comparison.json. A sweep or experiment.seeds holds one such folder per
value or seed, beside its report (see silotune.repeats). Whatever a reader must never see
half-written (checkpoints, results, keys, caches) goes through write_atomic or
write_folder_atomic.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from silotune.errors import UserError

INCOMPLETE = ".incomplete"
_CLIENT = "client-"


def work_folder(out: Path) -> Path:
    """Where a run writes until it has finished."""
    return out.with_name(out.name + INCOMPLETE)


def finished_folder(folder: Path) -> Path:
    """OUT, given a run's OUT or its OUT.incomplete twin."""
    return folder.with_name(folder.name.removesuffix(INCOMPLETE))


def refuse_leftover(out: Path) -> None:
    """Never start over an interrupted run: its checkpoints may hold hours of rounds."""
    work = work_folder(out)
    if work.exists():
        raise UserError(
            f"{work} holds an interrupted run: continue it with `silotune run --resume {work}`, "
            f"or discard it with `rm -r {work}` and run this command again"
        )


def client_name(index: int) -> str:
    """A client's name in file and folder names."""
    return f"{_CLIENT}{index}"


def partition_file(partitions_dir: str | Path, index: int) -> Path:
    """Where client `index` finds its own records."""
    return Path(partitions_dir) / f"{client_name(index)}.jsonl"


def client_eval_file(partitions_dir: str | Path, index: int) -> Path:
    """Client `index`'s own held-out records (partition.client_eval_size)."""
    return Path(partitions_dir) / f"{client_name(index)}-eval.jsonl"


def eval_file(partitions_dir: str | Path) -> Path:
    """The held-out records, beside the clients' partitions."""
    return Path(partitions_dir) / "eval.jsonl"


def canaries_file(partitions_dir: str | Path) -> Path:
    """The canary audit's secret records and which went in, beside the partitions."""
    return Path(partitions_dir) / "canaries.json"


def client_state_dir(client_dir: Path) -> Path:
    """A client's resumable state on its own disk."""
    return client_dir / "state"


def client_adapter_dir(client_dir: Path, name: str) -> Path:
    """The PEFT folder of a client's own adapter `name`, on its own disk."""
    return client_dir / "adapters" / name


def client_synthetic_file(client_dir: Path, algorithm: str, round_: int) -> Path:
    """The synthetic examples a client's generator kept in one round of `algorithm`, on its disk."""
    return client_dir / "synthetic" / algorithm / f"round-{round_}.jsonl"


@dataclass(frozen=True)
class RunFolder:
    """The paths inside one run folder (an experiment's, or one algorithm's result in it)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def partitions(self) -> Path:
        return self.root / "partitions"

    def partition(self, index: int) -> Path:
        return partition_file(self.partitions, index)

    @property
    def eval_file(self) -> Path:
        return eval_file(self.partitions)

    @property
    def partition_stats(self) -> Path:
        return self.partitions / "stats.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def base_metrics(self) -> Path:
        """The base model's held-out metrics, evaluated once per run."""
        return self.checkpoints / "base.json"

    def round_checkpoint(self, algorithm: str) -> Path:
        """A federated algorithm's last finished round (see silotune.checkpoint.save_round)."""
        return self.checkpoints / algorithm / "round"

    def result_checkpoint(self, algorithm: str) -> Path:
        """A finished algorithm's kept result (see silotune.checkpoint.save_result)."""
        return self.checkpoints / algorithm / "result"

    @property
    def clients(self) -> Path:
        return self.root / "clients"

    def client_states(self) -> Iterator[Path]:
        """The simulated clients' resumable state folders."""
        return (client_state_dir(c) for c in self.clients.glob(f"{_CLIENT}*"))

    def synthetic_files(self, algorithm: str) -> list[Path]:
        """Every simulated client's kept synthetic examples of `algorithm`, one file a round."""
        return sorted(self.clients.glob(f"{_CLIENT}*/synthetic/{algorithm}/round-*.jsonl"))

    @property
    def experiment(self) -> RunFolder:
        """The experiment folder of this result: itself, or its parent when one of several."""
        return self if self.config.is_file() else RunFolder(self.root.parent)

    @property
    def split(self) -> Path:
        return self.root / "split"

    @property
    def split_server(self) -> Path:
        return self.split / "server"

    def split_process(self, name: str) -> Path:
        """The output folder of split process `name` (`server` or a client's name)."""
        return self.split / name

    def split_outputs(self, name: str) -> SplitOutputs:
        """The files split process `name` writes in its output folder."""
        return SplitOutputs(self.split_process(name))

    def split_log(self, name: str) -> Path:
        return self.split / f"{name}.log"

    @property
    def deploy_logs(self) -> Path:
        return self.root / "deploy-logs"

    def result(self, algorithm: str, several: bool) -> RunFolder:
        """Where an algorithm's result goes: this folder, or a sub-folder among `several`."""
        return RunFolder(self.root / algorithm) if several else self

    @property
    def summary(self) -> Path:
        """Written last: it marks a finished result."""
        return self.root / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def comparison(self) -> Path:
        return self.root / "comparison.json"

    @property
    def privacy(self) -> Path:
        """The privacy attacks' results (`silotune attack`)."""
        return self.root / "privacy.json"

    def finish(self) -> Path:
        """Rename OUT.incomplete to OUT: the run is a result now."""
        out = finished_folder(self.root)
        self.root.rename(out)
        return out


@dataclass(frozen=True)
class SplitOutputs:
    """What a split process writes in its `--out` folder (a server's or a client's)."""

    root: Path

    @property
    def port(self) -> Path:
        """The server's listening port, for a launcher on the same machine."""
        return self.root / "port"

    @property
    def rounds(self) -> Path:
        """A client's finished rounds, one JSON line each (see split.records.ClientRound)."""
        return self.root / "rounds.jsonl"

    @property
    def report(self) -> Path:
        """A client's final report (split.records.ClientReport)."""
        return self.root / "result.json"

    @property
    def summary(self) -> Path:
        """The server's summary (split.records.ServerSummary)."""
        return self.root / "server.json"

    @property
    def checkpoint(self) -> Path:
        """Resumable training state, rewritten every round."""
        return self.root / "checkpoint.safetensors"

    @property
    def previous_checkpoint(self) -> Path:
        """The server's checkpoint of the round before (its clients may not have saved the
        last one yet when a run stops)."""
        return self.root / "checkpoint-previous.safetensors"

    @property
    def checkpoint_round(self) -> Path:
        """The round a client's checkpoint holds."""
        return self.root / "checkpoint.json"

    def checkpoints(self) -> list[Path]:
        """The resumable state files present (a finished run needs none)."""
        files = (self.checkpoint, self.previous_checkpoint, self.checkpoint_round)
        return [p for p in files if p.exists()]

    @property
    def adapter(self) -> Path:
        """A client's trained front + back adapters (segment names)."""
        return self.root / "adapter.safetensors"

    @property
    def middle_adapter(self) -> Path:
        """The server's middle adapter (the clients' shared one)."""
        return self.root / "middle-adapter.safetensors"

    def client_middle_adapter(self, client: str) -> Path:
        """The middle adapter `client` ended with, when the server kept one per client."""
        return self.root / f"middle-adapter-{client}.safetensors"


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` whole or not at all; `mode` sets its permissions exactly.

    Without `mode` the file gets the permissions a plain open would give it (umask applied).
    """
    tmp = _sibling(path, ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode is not None else 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)  # the umask narrowed what os.open was given
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    """`data` as UTF-8 JSON with a trailing newline, written atomically."""
    text = json.dumps(data, indent=indent, ensure_ascii=False) + "\n"
    write_atomic(path, text.encode("utf-8"))


def write_folder_atomic(folder: Path, write: Callable[[Path], None], replace: bool = True) -> None:
    """Fill a fresh sibling with `write(tmp)`, then rename it to `folder`.

    With `replace`, an existing `folder` is swapped out through `folder.old` (read_folder finds
    it if a crash comes between the two renames); without, a `folder` that appeared meanwhile
    (another process building the same thing) is kept and ours dropped.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(folder, ".tmp")
    tmp.mkdir()
    try:
        write(tmp)
        if not replace:
            try:
                tmp.rename(folder)
            except OSError:
                if not folder.is_dir():
                    raise
            return
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_folder(folder: Path) -> Path | None:
    """`folder`, or its `.old` twin when write_folder_atomic was cut between its renames."""
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if candidate.is_dir():
            return candidate
    return None


def _sibling(path: Path, suffix: str) -> Path:
    # Hidden and unique: two processes may write the same target at once.
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
