"""Run attacks on finished run folders and record what they found.

`audit(path, kinds, attack_config)` attacks every run folder under `path` with every applicable
attack, writes each run's `privacy.json` (merged with earlier attacks) and its report section,
and, for an experiment of several algorithms, the side-by-side privacy section at its top.
The base model's scores are computed once per experiment and shown as the reference row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from silotune.attacks.extraction import PROMPTS, extraction_attack, versus_base
from silotune.attacks.inversion import PAPER, Front, Tokens, inversion_setting, record_tokens
from silotune.attacks.membership import membership_attack
from silotune.attacks.target import (
    RunUnderAttack,
    load_shared_model,
    open_run,
    run_folders,
    sample,
    sample_members,
)
from silotune.config import Config
from silotune.config_federation import ATTACK_TARGETS, SHARED_ADAPTER_ALGORITHMS, AttackConfig
from silotune.data.sft import tokenize_dataset
from silotune.errors import ConfigError, UserError
from silotune.modeling.generation import pad_id
from silotune.modeling.load import load_model, load_tokenizer, resolve_model
from silotune.registry import Registry
from silotune.report.privacy import write_privacy
from silotune.run_folder import RunFolder, client_name
from silotune.split.adapters import build_split_model
from silotune.split.loading import load_segments
from silotune.split.segments import split_model
from silotune.split.trainers import load_state

# Inversion: at most this many records of each colluding client are the shadow data.
_SHADOW_PER_CLIENT = 512

Attack = Callable[[RunUnderAttack, AttackConfig, dict[str, Any]], dict[str, Any]]
ATTACKS: Registry[Attack] = Registry("attack")


def applicable(kind: str, algorithm: str) -> bool:
    """Extraction and membership need a shared adapter; inversion needs a split run."""
    return algorithm in ATTACK_TARGETS[kind]


def audit(
    path: Path,
    kinds: Sequence[str],
    cfg: AttackConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Attack every run folder in `path`; returns run name -> privacy results."""
    for kind in kinds:
        ATTACKS.get(kind)  # unknown names fail before any work
    folders = run_folders(path)
    found: dict[str, dict[str, Any]] = {}
    cache: dict[str, Any] = {}  # the base model's scores, shared by the algorithms
    for folder in folders:
        run = open_run(folder)
        settings = cfg or run.config.attack
        wanted = [k for k in kinds if applicable(k, run.algorithm)]
        if not wanted:
            log(f"  {run.algorithm}: no attack in {kinds} applies to it; skipped")
            continue
        results: dict[str, Any] = {}
        for kind in wanted:
            log(f"  {run.algorithm}: {kind} attack ...")
            results[kind] = ATTACKS.get(kind)(run, settings, cache)
        found[run.algorithm] = write_privacy(folder, results)
    if not found:
        raise UserError(
            f"none of the attacks {kinds} applies to the runs in {path}: extraction and "
            f"membership attack {', '.join(SHARED_ADAPTER_ALGORITHMS)} runs, inversion split runs"
        )
    if len(folders) > 1:
        write_privacy(path, found, several=True)
    return found


def _shared(run: RunUnderAttack, cache: dict[str, Any]) -> Any:
    """The run's shared model, loaded once for all its attacks (one run's at a time)."""
    if cache.get("shared_for") != run.run_dir:
        cache["shared"], cache["shared_for"] = load_shared_model(run), run.run_dir
    return cache["shared"]


@ATTACKS.register("extraction")
def _extraction(run: RunUnderAttack, cfg: AttackConfig, cache: dict[str, Any]) -> dict[str, Any]:
    bench = _shared(run, cache)
    members = sample_members(run, cfg.max_records, cfg.seed)
    others = sample(run.non_members(), len(members), cfg.seed)
    _check_sizes(members, others)
    args = (bench.tokenizer, members, others, run.config.data, cfg, run.config.eval.batch_size)
    out: dict[str, Any] = {"members": len(members), "non_members": len(others)}
    out["tuned"] = extraction_attack(bench.model, *args)
    if "extraction" not in cache:
        with bench.model.disable_adapter():
            cache["extraction"] = extraction_attack(bench.model, *args)
    out["base"] = cache["extraction"]
    for kind in PROMPTS:
        out["tuned"][kind]["versus_base"] = versus_base(out["tuned"][kind], out["base"][kind])
    return out


@ATTACKS.register("membership")
def _membership(run: RunUnderAttack, cfg: AttackConfig, cache: dict[str, Any]) -> dict[str, Any]:
    bench = _shared(run, cache)
    members = run.all_members()
    others = sample(run.non_members(), len(members), cfg.seed)
    _check_sizes(members, others)
    data = run.config.data

    def encode(records: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
        return tokenize_dataset(records, bench.tokenizer, data.prompt_style, data.max_length)

    return membership_attack(
        bench.model, bench.model.disable_adapter, encode(members), encode(others), bench.pad_id
    )


@ATTACKS.register("inversion")
def _inversion(run: RunUnderAttack, cfg: AttackConfig, cache: dict[str, Any]) -> dict[str, Any]:
    config = run.config
    if run.clients < 2:
        raise ConfigError("the inversion attack needs a colluding client: run with 2+ clients")
    if cfg.victim >= run.clients:
        raise ConfigError(
            f"attack.victim is {cfg.victim}; the run has clients 0..{run.clients - 1}"
        )
    colluder = 1 if cfg.victim == 0 else 0
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(source)
    pad = pad_id(tokenizer)
    data = config.data

    def records(client: int, count: int) -> list[Tokens]:
        chosen = sample(run.members(client), count, cfg.seed + client)
        return [record_tokens(r, tokenizer, data) for r in chosen]

    victim = records(cfg.victim, cfg.max_records)
    shadow = [
        t for c in range(run.clients) if c != cfg.victim for t in records(c, _SHADOW_PER_CLIENT)
    ]
    model = load_model(source)
    model.eval()  # type: ignore[no-untyped-call]
    embeddings = model.get_input_embeddings().weight.detach()  # type: ignore[operator]
    layers = int(model.config.num_hidden_layers)
    run_depth, run_noise = config.split.front_blocks, config.defence.activation_noise
    settings = [(d, n) for d in cfg.inversion_blocks for n in cfg.inversion_noise]
    settings = sorted({*settings, (run_depth, run_noise)})
    deepest = max(d for d, _ in settings)
    if deepest > layers - 2:
        raise ConfigError(
            f"attack.inversion_blocks has {deepest}; the model has {layers} blocks, so a front "
            f"can hold at most {layers - 2}"
        )
    rows = []
    for depth, noise in settings:
        if depth == run_depth:  # what the server saw: the clients' trained fronts
            front = _trained_front(run, config, cfg.victim)
            shadow_front = _trained_front(run, config, colluder)
        else:
            front = shadow_front = _base_front(model, depth)
        seen_by_server = (depth, noise) == (run_depth, run_noise)
        # The run's own setting is noised as its clients noised (clipped, if they clipped); the
        # sweep's settings are relative to each token's RMS.
        clip = config.defence.activation_clip if seen_by_server else 0.0
        row = inversion_setting(
            front, shadow_front, shadow, victim, tokenizer, embeddings, noise, cfg, pad, clip
        )
        rows.append({"front_blocks": depth, **row, "run_setting": seen_by_server})
    return {
        "victim": cfg.victim,
        "victim_records": len(victim),
        "shadow_records": len(shadow),
        "inversion_model": cfg.inversion_model,
        "steps": cfg.inversion_steps,
        "settings": rows,
        "paper": PAPER,
    }


def _base_front(model: nn.Module, depth: int) -> Front:
    segment = split_model(model, depth, 1).front  # type: ignore[arg-type]
    return lambda ids, mask: segment(ids, mask)


def _trained_front(run: RunUnderAttack, config: Config, client: int) -> Front:
    """Client `client`'s front with the adapter it finished the run with."""
    # The split algorithm keeps its processes' folders in <experiment>/split/, whether or not
    # the experiment ran other algorithms too.
    file = RunFolder(run.root).split_outputs(client_name(client)).adapter
    if not file.is_file():
        raise UserError(f"{file} is missing; the split run did not finish for client {client}")
    model = build_split_model(config, load_segments(config, "client"), lambda hidden, mask: hidden)
    load_state(model, load_file(str(file)))
    model.eval()
    front = model.front
    return lambda ids, mask: front(ids, mask)


def _check_sizes(members: list[Any], others: list[Any]) -> None:
    if len(members) < 2 or len(others) < 2:
        raise UserError(
            f"{len(members)} members and {len(others)} non-members: the attack needs at least "
            "two of each (non-members are source records no client trained on)"
        )
