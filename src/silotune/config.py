"""One typed, frozen experiment config: read from TOML, overridden with `--set key=value`.

Every section is a frozen dataclass; unknown keys, wrong types and values out of range raise a
ConfigError that names the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from silotune.config_federation import (
    ATTACK_TARGETS,
    FEDERATION_MINIMUMS,
    AttackConfig,
    DefenceConfig,
    FederatedConfig,
    check_strategy,
)
from silotune.config_fewfedweight import FEWFEDWEIGHT_MINIMUMS, FewFedWeightConfig
from silotune.config_privacy import PRIVACY_MINIMUMS, PrivacyConfig
from silotune.config_reporting import (
    REPORTING_MINIMUMS,
    EvalConfig,
    JudgeConfig,
    SweepConfig,
    TrackingConfig,
)
from silotune.config_sections import (
    MINIMUMS,
    DataConfig,
    ExperimentConfig,
    LoraConfig,
    ModelConfig,
    PartitionConfig,
    TrainConfig,
)
from silotune.config_split import SPLIT_MINIMUMS, SplitConfig, check_split
from silotune.config_synthetic import SYNTHETIC_MINIMUMS, SyntheticConfig
from silotune.config_uploads import check_uploads
from silotune.errors import ConfigError
from silotune.typed_values import build_section, reject_unknown

# Numeric lower bounds of every section: (section, key) -> (minimum, inclusive?)
MINIMUMS_ALL = {
    **MINIMUMS,
    **SYNTHETIC_MINIMUMS,
    **REPORTING_MINIMUMS,
    **FEDERATION_MINIMUMS,
    **SPLIT_MINIMUMS,
    **PRIVACY_MINIMUMS,
    **FEWFEDWEIGHT_MINIMUMS,
}


@dataclass(frozen=True)
class Config:
    """A whole experiment."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    fewfedweight: FewFedWeightConfig = field(default_factory=FewFedWeightConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as written to a run's `config.json`."""
        plain: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(self)))
        return plain

    def fingerprint(self) -> str:
        """Short stable hash of the whole config."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    algorithm_checks: bool = True,
) -> Config:
    """Read a TOML file (or a run's `config.json`), then apply `section.key=value` overrides.

    Without `algorithm_checks` the chosen algorithms' own checks are skipped (and their modules,
    Flower among them, not loaded): for a split process, which runs none of them.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{p} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
        try:
            raw = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{p} is not valid {p.suffix.lstrip('.').upper()}: {exc}") from None
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw, algorithm_checks=algorithm_checks)


def config_from_dict(raw: dict[str, Any], *, algorithm_checks: bool = True) -> Config:
    """Build and validate a Config from nested dicts (as parsed from TOML)."""
    types = section_types()
    reject_unknown(raw, types, where="config")
    sweep = raw.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("values"), list):
        # Sweep values may be written as TOML numbers or booleans; keep them as --set text.
        sweep["values"] = [v if isinstance(v, str) else json.dumps(v) for v in sweep["values"]]
    built: dict[str, Any] = {}
    for name in types:
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{name}] must be a table of keys, got {section!r}")
        built[name] = build_section(name, types[name], section, MINIMUMS_ALL)
    config = Config(**built)
    _check_combinations(config)
    if algorithm_checks:
        _check_algorithms(config)
    return config


def sweep_variants(config: Config) -> list[tuple[str, Config]]:
    """One (label, config) per swept value; a config without a sweep is its own only variant."""
    key = config.sweep.key
    if not key:
        return [("", config)]
    variants = []
    for value in config.sweep.values:
        raw = config.to_dict()
        raw["sweep"] = {}
        _apply_override(raw, f"{key}={value}")
        try:
            variants.append((f"{key.split('.')[-1]}={value}", config_from_dict(raw)))
        except ConfigError as exc:
            raise ConfigError(f"sweep value {value!r} for {key}: {exc}") from None
    return variants


def seed_variants(config: Config) -> list[tuple[str, Config]]:
    """One (label, config) per seed of experiment.seeds, each with that one seed."""
    variants = []
    for seed in config.experiment.seeds:
        raw = config.to_dict()
        raw["experiment"].update(seed=seed, seeds=[])
        variants.append((f"seed={seed}", config_from_dict(raw)))
    return variants


def section_types() -> dict[str, type[Any]]:
    """Every section's TOML table name -> its dataclass, in the Config's order."""
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as TOML, else taken as text."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value (e.g. train.rounds=3), got {item!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    section, key = parts
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table of keys")
    table[key] = value


def _check_combinations(config: Config) -> None:
    if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+", config.model.device):
        raise ConfigError(
            f"model.device must be auto, cpu, cuda or cuda:N, got {config.model.device!r}"
        )
    if not config.experiment.algorithms:
        raise ConfigError("experiment.algorithms is empty; list at least one, e.g. ['fedit']")
    if len(set(config.experiment.algorithms)) != len(config.experiment.algorithms):
        raise ConfigError(f"experiment.algorithms repeats a name: {config.experiment.algorithms}")
    if config.federated.fraction_train > 1.0:
        raise ConfigError(
            f"federated.fraction_train must be in (0, 1], got {config.federated.fraction_train}"
        )
    seeds = config.experiment.seeds
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ConfigError(
            f"experiment.seeds must be distinct seeds >= 0 (e.g. [0, 1, 2]), got {list(seeds)}"
        )
    if bool(config.sweep.key) != bool(config.sweep.values):
        raise ConfigError("a sweep needs both sweep.key (section.key) and sweep.values")
    if config.sweep.key:
        if config.sweep.key.split(".")[0] in ("sweep", "experiment"):
            raise ConfigError(f"sweep.key cannot be {config.sweep.key!r}; sweep a setting")
        sweep_variants(config)  # every value must make a valid config
    if config.defence.gradient_noise > 0 and config.defence.gradient_clip == 0:
        raise ConfigError(
            "defence.gradient_noise is a multiple of defence.gradient_clip: set gradient_clip > 0"
        )
    for kind in config.attack.kinds:
        if not set(ATTACK_TARGETS[kind]) & set(config.experiment.algorithms):
            raise ConfigError(
                f"attack.kinds has {kind!r}, which attacks {', '.join(ATTACK_TARGETS[kind])} "
                f"runs; experiment.algorithms has none of them"
            )
    if "inversion" in config.attack.kinds and config.attack.victim >= config.partition.clients:
        raise ConfigError(
            f"attack.victim is {config.attack.victim}; the clients are 0.."
            f"{config.partition.clients - 1}"
        )
    if config.privacy.audit and config.privacy.audit_client >= config.partition.clients:
        raise ConfigError(
            f"privacy.audit_client is {config.privacy.audit_client}; the clients are 0.."
            f"{config.partition.clients - 1}"
        )
    if "inversion" in config.attack.kinds and config.partition.clients < 2:
        raise ConfigError(
            "the inversion attack needs a colluding client: set partition.clients >= 2"
        )
    if config.attack.prefix_fraction >= 1.0:
        raise ConfigError("attack.prefix_fraction must be below 1 (some response must be left)")
    if config.attack.rouge_threshold > 1.0:
        raise ConfigError("attack.rouge_threshold is a ROUGE-L F score in (0, 1]")
    if any(b < 0 for b in config.attack.inversion_blocks) or not config.attack.inversion_blocks:
        raise ConfigError("attack.inversion_blocks lists front depths >= 0, e.g. [0, 1, 2]")
    if any(n < 0 for n in config.attack.inversion_noise) or not config.attack.inversion_noise:
        raise ConfigError("attack.inversion_noise lists noise levels >= 0, e.g. [0.0, 1.0]")
    if config.synthetic.beta > 1.0:
        raise ConfigError(f"synthetic.beta must be in [0, 1], got {config.synthetic.beta}")
    if config.synthetic.dedup_rouge_l > 1.0:
        raise ConfigError(
            f"synthetic.dedup_rouge_l must be in [0, 1] (1 keeps all), got "
            f"{config.synthetic.dedup_rouge_l}"
        )
    if config.synthetic.judge_min_score > 0 and config.judge.kind == "none":
        raise ConfigError(
            "synthetic.judge_min_score needs a judge: set judge.kind to 'openai' or 'local'"
        )
    if config.synthetic.judge_min_score > 1.0:
        raise ConfigError("synthetic.judge_min_score is a 0..1 score; 0 turns the filter off")
    if config.judge.kind == "openai" and not config.judge.model:
        raise ConfigError("judge.kind = 'openai' needs judge.model (the model name to ask)")
    if (
        config.judge.kind != "none"
        and not config.eval.generate
        and not (config.synthetic.judge_min_score > 0)
    ):
        raise ConfigError("the judge compares generations: set eval.generate = true")
    if config.partition.method == "dirichlet" and not config.data.label_field:
        raise ConfigError(
            "partition.method = 'dirichlet' needs data.label_field (the column to skew on); "
            "set it, or use partition.method = 'iid'"
        )
    if not config.data.instruction_field or not config.data.output_field:
        raise ConfigError("data.instruction_field and data.output_field must name columns")
    if config.defence.secagg and config.defence.dp != "none":
        raise ConfigError(
            "defence.secagg cannot be combined with defence.dp: Flower's DP wrappers need each "
            "client's update, which SecAgg+ hides from the server; set defence.dp = 'none'"
        )
    sampled = max(1, int(config.partition.clients * config.federated.fraction_train))
    if config.federated.quorum > sampled:
        raise ConfigError(
            f"federated.quorum = {config.federated.quorum} but only {sampled} client(s) train "
            f"each round (partition.clients x federated.fraction_train); lower the quorum"
        )
    check_strategy(config, sampled)
    check_uploads(config)
    check_split(config)
    if config.defence.secagg and sampled < 2:
        raise ConfigError(
            f"defence.secagg needs at least 2 clients training each round (SecAgg+ reveals a "
            f"lone client's upload); partition.clients = {config.partition.clients} with "
            f"federated.fraction_train = {config.federated.fraction_train} gives {sampled}"
        )


def _check_algorithms(config: Config) -> None:
    """Each chosen algorithm's own checks, from its registration."""
    # The algorithms import this module, so their registry is read when a config is checked.
    from silotune.algorithms import ALGORITHMS

    for name in config.experiment.algorithms:
        check = ALGORITHMS.get(name).check
        if check is not None:
            check(config)
