"""The two roles of a split run as plain functions: the server process and a client process.

Each loads only its own segments of the base model (`split.loading`) and gives them its own
adapter (PEFT LoRA, or p-tuning v2 prefixes from PEFT's PrefixEncoder). `silotune split-server`,
`silotune split-client` and `silotune run` call these.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from silotune.config import Config
from silotune.config_privacy import PrivacyConfig
from silotune.data.load import load_client_records
from silotune.data.sft import tokenize_dataset
from silotune.errors import UserError
from silotune.evaluation.evaluator import build_eval_set, evaluate, generates
from silotune.modeling.generation import pad_id
from silotune.modeling.load import load_tokenizer, resolve_model
from silotune.privacy.accounting import planned_uses
from silotune.privacy.mechanisms import ONE_LOOP, GaussianUse, Mechanism
from silotune.run_folder import SplitOutputs, write_atomic, write_json
from silotune.seeds import derive_seed
from silotune.split.adapters import add_segment_adapter, build_split_model
from silotune.split.link import MiddleLink, RemoteMiddle, SplitError
from silotune.split.loading import load_segments
from silotune.split.model import SplitCausalLM
from silotune.split.records import (
    ClientReport,
    ClientRound,
    ServerSummary,
    append_round,
    checkpointed_round,
    read_rounds,
)
from silotune.split.server import serve
from silotune.split.trainers import adapter_state, build_trainer, load_state
from silotune.split.trainers.state import load_training_state, save_training_state
from silotune.training.loop import TrainResult, train_steps

log = logging.getLogger(__name__)


def run_server(
    config: Config,
    listen: str,
    certs: Path | None,
    expected: int,
    out: Path | None,
    resume: bool = False,
    allowed: set[str] | None = None,
) -> ServerSummary:
    """Serve the middle until `expected` clients have ended their sessions (0: until killed).

    Only the `allowed` client ids get a session; by default those with a certificate in
    CERTS/clients, else (no such folder) any client the CA signed.

    With `out`, the server checkpoints its training state at every round's end (the clients'
    adapter average is the barrier) into OUT/checkpoint.safetensors; `resume` starts from it.
    """
    segments = load_segments(config, "server")
    middle = segments.middle
    del segments  # front and back are not the server's: let them be freed
    add_segment_adapter(middle, config, "middle")
    trainer = build_trainer(middle, config)
    # The middle's LoRA dropout draws from this process's RNG: seed it, so a run can be replayed.
    torch.manual_seed(derive_seed(config.experiment.seed, "split-server"))
    outputs = SplitOutputs(out) if out is not None else None
    if resume:
        if outputs is None or not outputs.checkpoint.is_file():
            raise UserError(
                f"nothing to resume: no checkpoint.safetensors in {out} (give the same --out)"
            )
        trainer.restore(load_training_state(outputs.checkpoint))
        log.info("resumed after round %d (%d steps)", trainer.rounds, trainer.steps)
    if outputs is not None:
        outputs.root.mkdir(parents=True, exist_ok=True)
        checkpoint = outputs.checkpoint

        def save(_round: int) -> None:
            if checkpoint.is_file():  # kept until every client has saved this round too
                checkpoint.replace(outputs.previous_checkpoint)
            save_training_state(trainer.training_state(), checkpoint)

        trainer.on_round_end = save
    if allowed is None and certs is not None and (certs / "clients").is_dir():
        allowed = {pem.stem for pem in (certs / "clients").glob("*.pem")} or None
    server, port, service = serve(trainer, config, listen, certs, expected, allowed)
    log.info("split server (%s) listening on port %d", config.split.mode, port)
    if outputs is not None:
        outputs.port.write_text(str(port))  # how a launcher on this machine finds us
    start = time.perf_counter()
    stopped: KeyboardInterrupt | None = None
    try:
        while not service.state.done.wait(0.5):
            pass
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (the CLI raises those as it)
        log.info("stopping; saving the middle adapter")
        stopped = exc
    finally:
        server.stop(grace=2.0)
    summary = ServerSummary(
        mode=config.split.mode,
        steps=trainer.steps,
        compute_s=trainer.compute_s,
        wall_s=time.perf_counter() - start,
        clients=dict(service.state.stats),
    )
    if outputs is not None:
        _save(adapter_state(trainer.middle), outputs.middle_adapter)
        for client, module in trainer.client_middles().items():
            _save(adapter_state(module), outputs.client_middle_adapter(client))
        summary.write(outputs)
    if stopped is not None:  # saved; the command still ends as interrupted
        raise stopped
    return summary


class _NoMiddle:
    """Stands in for the middle until the link to the server is up."""

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise SplitError("no split server connected")


def _resume_client(model: SplitCausalLM, outputs: SplitOutputs) -> list[ClientRound]:
    """Load the adapters of the last finished round; the rounds up to it."""
    done = checkpointed_round(outputs)
    if done is None:
        raise UserError(f"nothing to resume: no checkpoint in {outputs.root} (give the same --out)")
    load_state(model, load_file(str(outputs.checkpoint)))
    rounds = read_rounds(outputs)[:done]
    outputs.rounds.write_text("")
    for row in rounds:
        append_round(outputs, row)
    return rounds


def _save(state: dict[str, torch.Tensor], target: Path) -> None:
    """safetensors, written whole or not at all."""
    write_atomic(target, save(state))


def dp_plan(config: Config, records: int) -> tuple[PrivacyConfig, dict[Mechanism, GaussianUse]]:
    """Under DP-SGD: the [privacy] the front/back adapters train with (their noise is what the
    target leaves once the wire's mechanisms have theirs) and the wire's uses per round."""
    uses = planned_uses(config, dict.fromkeys(ONE_LOOP), records)
    adapter = uses.pop("adapter", None)
    if adapter is None:
        return config.privacy, {}
    return dataclasses.replace(config.privacy, noise_multiplier=adapter.noise_multiplier), uses


def dp_metrics(trained: TrainResult, wire: dict[Mechanism, GaussianUse]) -> dict[str, float]:
    """A round's DP uses as the client reports them to the ledger (nothing without DP)."""
    out = trained.privacy.metrics("adapter") if trained.privacy is not None else {}
    for mechanism, use in wire.items():
        out.update(use.metrics(mechanism))
    return out


def run_client(
    config: Config,
    client_id: str,
    target: str,
    certs: Path | None,
    data_file: Path,
    eval_file: Path,
    out: Path,
    resume: bool = False,
) -> ClientReport:
    """Train front/back with the server's middle for `train.rounds` rounds; evaluate each round.

    After every round the client keeps its adapters in OUT/checkpoint.safetensors; `resume`
    goes on from there against a server resumed from the same round.
    """
    # The client's own files, checked before the model loads: the same field mapping and
    # bad-row policy as `silotune run`.
    loaded = load_client_records(data_file, config.data)
    if loaded.dropped:
        log.warning("%s: %s", data_file, loaded.describe_dropped())
    held_out = load_client_records(eval_file, config.data).dataset
    tokenizer = load_tokenizer(resolve_model(config.model))
    model = build_split_model(config, load_segments(config, "client"), _NoMiddle())
    examples = tokenize_dataset(
        loaded.dataset, tokenizer, config.data.prompt_style, config.data.max_length
    )
    eval_set = build_eval_set(held_out, tokenizer, config.data)
    outputs = SplitOutputs(out)
    out.mkdir(parents=True, exist_ok=True)
    privacy, wire = dp_plan(config, len(examples))
    rounds: list[ClientRound] = []
    if resume:
        rounds = _resume_client(model, outputs)
    else:
        outputs.rounds.write_text("")
    link = MiddleLink(config, client_id, target, certs)
    model.middle = RemoteMiddle(link)
    # A fresh client may join a fresh server late (the others' rounds went on without it);
    # a resumed client or server must meet its counterpart at the same round.
    restarted = resume or link.server_resumed
    if restarted and link.server_round != len(rounds):
        link.close()
        raise SplitError(
            f"the split server has finished {link.server_round} round(s), this client "
            f"{len(rounds)}: start both from the same round (server --resume with its --out, "
            "client --resume with its --out)"
        )
    if len(rounds) >= config.train.rounds:
        link.close()
        raise UserError(f"{out} holds all {config.train.rounds} rounds: nothing left to resume")
    try:
        sent = (0, 0)  # traffic up to the previous round
        for rnd in range(len(rounds) + 1, config.train.rounds + 1):
            start = time.perf_counter()
            seed = derive_seed(config.experiment.seed, "split-client", client_id, rnd)
            trained = train_steps(
                model,
                examples,
                config.train,
                config.train.local_steps,
                pad_id(tokenizer),
                seed,
                privacy=privacy,
            )
            if config.split.average_clients:
                averaged = link.average(adapter_state(model), float(len(examples)))
                load_state(model, averaged)
            now = generates(config.eval, rnd, config.train.rounds)
            result = evaluate(model, tokenizer, eval_set, config.eval, generate_now=now)
            row = ClientRound(
                round=rnd,
                metrics={**result.metrics(), **dp_metrics(trained, wire)},
                train_loss=trained.loss,
                train_s=trained.seconds,
                wall_s=time.perf_counter() - start,
                bytes_up=link.stats.bytes_up - sent[0],
                bytes_down=link.stats.bytes_down - sent[1],
            )
            sent = (link.stats.bytes_up, link.stats.bytes_down)
            rounds.append(row)
            append_round(outputs, row)  # progress for whoever launched us
            _save(adapter_state(model), outputs.checkpoint)
            write_json(outputs.checkpoint_round, {"round": rnd})
    except SplitError as exc:
        raise SplitError(
            f"{exc}; rounds 1-{len(rounds)} are saved in {out}: once the server runs again "
            "(with --resume), restart this client with --resume"
        ) from None
    finally:
        link.close()
    report = ClientReport(
        client=client_id,
        examples=len(examples),
        source_rows=loaded.source_rows,
        dropped=dict(loaded.dropped),
        rounds=rounds,
        predictions=result.predictions,
        samples=result.samples,
        link=dataclasses.replace(link.stats, crypto_s=link.sealer.seconds),
        per_record=result.per_record,
    )
    _save(adapter_state(model), outputs.adapter)
    report.write(outputs)
    return report
