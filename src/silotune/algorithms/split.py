"""`split` in a config's algorithms: FL-GLM split learning with real processes on this machine.

The run starts one split server and one split client per client (`split.process`, each a
separate process, talking gRPC over loopback with mutual TLS and sealed frames, certificates
made for the run), follows their progress, and gathers their results into the report.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

from safetensors.torch import load_file

from silotune.config import Config
from silotune.defences.split import calibrated
from silotune.errors import ConfigError, UserError
from silotune.evaluation.intervals import mean_over_models
from silotune.jobs import (
    AlgorithmResult,
    Job,
    RoundLog,
    mean_metrics,
    register,
)
from silotune.modeling.memory import Process
from silotune.privacy.accounting import dp_sgd_release
from silotune.privacy.mechanisms import Releases
from silotune.procs import Supervisor
from silotune.run_folder import RunFolder, client_name
from silotune.security.tls import create_dev_pki
from silotune.split.adapters import whole_model_adapter
from silotune.split.process import ClientArgs, ServerArgs, command, environment
from silotune.split.records import (
    ClientReport,
    ServerSummary,
    checkpointed_round,
    read_rounds,
)
from silotune.split.trainers.state import saved_round

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 600.0


class SplitRunError(UserError):
    """A split process failed; the message carries the end of its log."""


def split_processes(config: Config) -> tuple[Process, ...]:
    """The split server (the middle blocks) and the clients (the ends), all resident at once."""
    split, clients = config.split, config.partition.clients
    ends = split.front_blocks + split.back_blocks
    # The server's mode decides what it multiplies by the clients: a middle adapter for each
    # (per-client), or their batches stacked into one step (batch).
    server = Process(
        "split server",
        "resident",
        blocks_elsewhere=ends,
        ends=False,
        adapters=clients if split.mode == "per-client" else 1,
        batches=clients if split.mode == "batch" else 1,
    )
    # Split clients never quantize their blocks.
    client = Process("split client", "client", ends, quantized=False, concurrent=True)
    return server, client


def split_releases(config: Config) -> Releases:
    """What a split client sends: activations and gradients every step, adapters to average.

    Under privacy.mode = dp-sgd all three come from the same Poisson-sampled batches: the wire's
    clipped and noised activations and gradients are Gaussian mechanisms the ledger accounts with
    the front/back adapters' DP-SGD, without amplification by sampling (the rows show which
    records each step sampled)."""
    defence, dp = config.defence, config.privacy.mode == "dp-sgd"
    wire = calibrated(defence)
    shuffled = "clipped and noised, but on shuffled batches (privacy.mode = off): not accounted"
    releases: Releases = {
        "activations": None
        if dp and "activations" in wire
        else shuffled
        if "activations" in wire
        else "noised by activation_noise x RMS, not clipped (defence.activation_clip = 0)"
        if defence.activation_noise > 0
        else "sent without noise",
        "gradients": None
        if dp and "gradients" in wire
        else shuffled
        if "gradients" in wire
        else "sent without calibrated noise",
    }
    # Under DP-SGD the adapters' noised updates are part of the accounted transcript even when
    # they are not averaged: they shape every later activation and gradient the client sends.
    if config.split.average_clients or dp:
        releases["adapter"] = dp_sgd_release(config, "front and back adapters")
    return releases


def check_split_adapters(config: Config) -> None:
    """Refuse what the split segments' adapters do not implement (split and split-central)."""
    if config.lora.freeze_a:
        raise ConfigError(
            "lora.freeze_a (FFA-LoRA) is not implemented for split learning's segment adapters, "
            "which train A and B: set lora.freeze_a = false, or run split and split-central in "
            "their own experiment"
        )


def check_split(config: Config) -> None:
    """Refuse DP-SGD for split where a release would stay without a guarantee anyway, and what
    the segments' adapters do not implement."""
    check_split_adapters(config)
    if config.privacy.mode != "dp-sgd":
        return
    missing = {"activations", "gradients"} - set(calibrated(config.defence))
    if missing:
        raise ConfigError(
            "privacy.mode = dp-sgd on split learning: what a client sends every step needs a "
            "Gaussian mechanism too, else its ε is ∞. Set defence.activation_clip and "
            "defence.activation_noise (activations), defence.gradient_clip and "
            f"defence.gradient_noise (gradients) > 0; missing: {', '.join(sorted(missing))}"
        )
    if config.split.adapter != "lora":
        raise ConfigError(
            "privacy.mode = dp-sgd on split learning needs split.adapter = lora: Opacus has "
            "no per-example gradients for the prefixes of split.adapter = prefix"
        )
    if config.privacy.max_epsilon > 0:
        raise ConfigError(
            "privacy.max_epsilon cannot stop a split client: the split server's rounds wait "
            "for every client. Leave it 0 and set privacy.target_epsilon (the noise is then "
            "calibrated so the planned rounds end at it)"
        )


@register(
    "split",
    "split",
    "FL-GLM split learning: clients keep embeddings + first/last blocks, a server the middle",
    processes=split_processes,
    releases=split_releases,
    check=check_split,
)
def run_split(job: Job) -> AlgorithmResult:
    """Start the server and the clients as processes, follow them, collect their results."""
    cfg = job.config
    run = job.run
    run.split.mkdir(parents=True, exist_ok=True)
    clients = [client_name(i) for i in range(len(job.client_examples))]
    server_out = run.split_outputs("server")
    resume = resumable_round(run, clients)
    if resume is not None and resume >= cfg.train.rounds:
        resume = None  # stopped while writing its reports, which need the last evaluation
    server_out.port.unlink(missing_ok=True)  # the dead attempt's, if any
    if resume is None:  # from the start: the progress of a dead attempt is not this one's
        for name in ("server", *clients):
            for stale in (run.split_outputs(name).rounds, *run.split_outputs(name).checkpoints()):
                stale.unlink(missing_ok=True)
    else:
        log.info("split: resuming after round %d", resume)
    env = environment()
    with Supervisor() as procs:
        certs = None
        if cfg.split.tls:  # keys live outside the run folder and are deleted with the run
            certs = procs.temp_dir("silotune-split-pki-")
            hosts = sorted({"localhost", "127.0.0.1", cfg.split.host} - {"0.0.0.0"})
            create_dev_pki(certs, clients, hosts, overwrite=True)
        listen = f"{cfg.split.host}:{cfg.split.port}"
        server_args = ServerArgs(
            run.config, listen, len(clients), server_out.root, certs, resume is not None
        )
        server = procs.start("server", command(server_args), run.split_log("server"), env)
        port = _wait_for_port(server_out.port, server, run.split_log("server"))
        host = (
            "localhost"
            if cfg.split.host in ("127.0.0.1", "0.0.0.0", "localhost")
            else cfg.split.host
        )
        for i, client in enumerate(clients):
            client_args = ClientArgs(
                config=run.config,
                client=client,
                server=f"{host}:{port}",
                data=run.partition(i),
                eval_file=run.eval_file,
                out=run.split_process(client),
                certs=certs,
                resume=resume is not None,
            )
            procs.start(client, command(client_args), run.split_log(client), env)
        rounds = _follow(job, procs.processes, run, clients)
    for name in ("server", *clients):  # resumable state: a finished run needs none
        for leftover in run.split_outputs(name).checkpoints():
            leftover.unlink()
    return _result(job, run, clients, rounds)


def resumable_round(run: RunFolder, clients: list[str]) -> int | None:
    """The round an interrupted attempt's server and every client all checkpointed after, or
    None (nothing to resume, or rounds that differ otherwise). The server checkpoints at the
    round's barrier, each client after its evaluation: a stop between the two leaves the server
    one round ahead, and its previous checkpoint is put back."""
    server = run.split_outputs("server")
    if not server.checkpoint.is_file():
        return None
    saved_by = [checkpointed_round(run.split_outputs(client)) for client in clients]
    if None in saved_by:  # a client saved none
        return None
    rounds = {r for r in saved_by if r is not None}
    saved = saved_round(server.checkpoint)
    previous = server.previous_checkpoint
    if rounds == {saved - 1} and previous.is_file() and saved_round(previous) == saved - 1:
        previous.replace(server.checkpoint)  # the clients stopped before saving round `saved`
        return saved - 1
    if rounds != {saved}:
        log.warning(
            "split: the server and clients saved different rounds %s; restarting from round 1",
            sorted(rounds | {saved}),
        )
        return None
    return saved


def _tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _wait_for_port(port_file: Path, proc: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise SplitRunError(f"the split server exited before listening:\n{_tail(log)}")
        time.sleep(0.2)
    raise SplitRunError(f"the split server did not start within {_START_TIMEOUT_S:g} s")


def _follow(
    job: Job, procs: dict[str, subprocess.Popen[bytes]], run: RunFolder, clients: list[str]
) -> list[RoundLog]:
    """Report each round once every client finished it; fail fast if a process fails."""
    rounds: list[RoundLog] = []
    last = time.perf_counter()
    while True:
        for name, proc in procs.items():
            code = proc.poll()
            if code not in (None, 0):
                raise SplitRunError(
                    f"split {name} failed (exit code {code}):\n{_tail(run.split_log(name))}"
                )
        per_client = [read_rounds(run.split_outputs(c)) for c in clients]
        done = min(len(r) for r in per_client)
        while len(rounds) < done:
            rows = [r[len(rounds)] for r in per_client]
            log = RoundLog(
                round=len(rounds) + 1,
                metrics=mean_metrics([row.metrics for row in rows]),
                train_loss=sum(row.train_loss for row in rows) / len(rows),
                bytes_up=sum(row.bytes_up for row in rows),
                bytes_down=sum(row.bytes_down for row in rows),
                wall_s=time.perf_counter() - last,
                clients=[{"client": i, **row.metrics} for i, row in enumerate(rows)],
            )
            rounds.append(log)
            last = time.perf_counter()
            job.on_round(log)
        if all(p.poll() == 0 for p in procs.values()):
            return rounds
        time.sleep(0.5)


def _result(
    job: Job, run: RunFolder, clients: list[str], rounds: list[RoundLog]
) -> AlgorithmResult:
    reports = [ClientReport.read(run.split_outputs(c)) for c in clients]
    server_out = run.split_outputs("server")
    server = ServerSummary.read(server_out)
    links = [r.link for r in reports]
    steps = max(server.steps, 1)
    breakdown = {
        "server_compute_s_per_step": server.compute_s / steps,
        "serialize_s_per_frame": sum(lk.serialize_s for lk in links)
        / max(sum(lk.frames for lk in links), 1),
        "crypto_s_total": sum(lk.crypto_s for lk in links),
        "transport_s_total": sum(lk.wait_s - lk.server_s for lk in links),
    }
    # Each client's trained model is its front and back around the middle it trained with.
    adapters, adapter_config = {}, None
    for client in clients:
        middle = server_out.client_middle_adapter(client)
        if not middle.is_file():  # one middle shared by every client
            middle = server_out.middle_adapter
        state = {
            **load_file(str(run.split_outputs(client).adapter)),
            **{f"middle.{k}": v for k, v in load_file(str(middle)).items()},
        }
        model_config = job.workbench.model.config
        adapters[client], adapter_config = whole_model_adapter(job.config, model_config, state)
    return AlgorithmResult(
        rounds=rounds,
        adapters=adapters,
        adapter_config=adapter_config,
        per_client_final=[r.rounds[-1].metrics for r in reports],
        samples=reports[0].samples,
        final_predictions=[r.predictions for r in reports],
        # The headline is the mean over the clients' models: so is each record's score.
        final_per_record=mean_over_models([r.per_record for r in reports]),
        notes=[
            f"Split learning, mode {server.mode}: {server.steps} server steps; "
            f"{len(clients)} client processes and one server process over gRPC (mutual TLS + "
            "AEAD frames unless turned off). Metrics are the mean over the clients' models.",
            "Cost breakdown: "
            + ", ".join(f"{k} {v:.4f}" for k, v in breakdown.items())
            + ". Adapters: adapters/client-N is client N's whole model (its front and back "
            "around the middle it trained with) as one PEFT adapter of the base model; the "
            "processes' own: split/<client>/adapter.safetensors (front + back) and "
            "split/server/middle-adapter*.safetensors; logs: split/*.log.",
        ],
    )
