"""One typed, frozen experiment config: read from TOML, overridden with `--set key=value`.

Every section is a frozen dataclass; unknown keys, wrong types and values out of range raise a
ConfigError that names the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

from silotune.errors import ConfigError
from silotune.typed_values import build_section, reject_unknown

Algorithm = Literal["fedit", "fedpit", "locit", "locit-sa", "cenit", "split", "split-central"]
Strategy = Literal["fedavg", "fedprox", "fedadam"]
Partitioner = Literal["iid", "dirichlet"]
PromptStyle = Literal["alpaca", "chat"]
DataFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "hub"]
PrivateData = Literal["local+synthetic", "local"]
TruncatedPolicy = Literal["drop", "keep"]
JudgeKind = Literal["none", "openai", "local"]
SplitMode = Literal["serial", "batch", "per-client"]
KeyExchange = Literal["x25519", "rsa"]
WireDtype = Literal["float32", "bfloat16"]
SplitAdapter = Literal["lora", "prefix"]


@dataclass(frozen=True)
class ExperimentConfig:
    """What to run and how to name it."""

    name: str = "experiment"
    algorithms: tuple[Algorithm, ...] = ("fedit",)
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Base model: `smollm2-135m-instruct` (packaged), `tiny-llama`, a hub id or a path."""

    name: str = "smollm2-135m-instruct"
    # Shape of the `tiny-llama` random model (ignored for real models).
    tiny_layers: int = 2
    tiny_hidden: int = 64


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter hyper-parameters, passed to PEFT's own LoraConfig."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class DataConfig:
    """Where the records come from and how their fields map to instruction/input/output."""

    path: str = "bundled:medquad_demo.jsonl"
    format: DataFormat = "auto"
    hub_split: str = "train"
    instruction_field: str = "question"
    input_field: str = ""
    output_field: str = "answer"
    label_field: str = "qtype"
    # When set, the instruction is this template filled from the source row's columns
    # (str.format_map), e.g. '"{premise}" Question: {hypothesis}? yes/no'; instruction_field
    # is then unused.
    instruction_template: str = ""
    # "source=target" pairs mapping output values, e.g. ["entailment=yes", "not_entailment=no"];
    # when set, every non-empty output must be listed.
    output_map: tuple[str, ...] = ()
    prompt_style: PromptStyle = "alpaca"
    max_length: int = 128
    eval_size: int = 16

    def __post_init__(self) -> None:
        self.output_mapping()  # a malformed data.output_map fails when the config is read

    def output_mapping(self) -> dict[str, str]:
        """`output_map` as a dict from source value to target value."""
        mapping: dict[str, str] = {}
        for entry in self.output_map:
            source, sep, target = entry.partition("=")
            source, target = source.strip(), target.strip()
            if not sep or not source or not target:
                raise ConfigError(
                    f"data.output_map entries are 'source=target' (e.g. 'entailment=yes'), "
                    f"got {entry!r}"
                )
            if source in mapping:
                raise ConfigError(f"data.output_map maps {source!r} twice")
            mapping[source] = target
        return mapping


@dataclass(frozen=True)
class PartitionConfig:
    """How the non-eval records are split across clients (flwr-datasets partitioners)."""

    clients: int = 3
    method: Partitioner = "dirichlet"
    alpha: float = 1.0
    # Few-shot cap: at most this many records per client (0 = no cap).
    max_examples_per_client: int = 0
    min_partition_size: int = 2


@dataclass(frozen=True)
class TrainConfig:
    """The one local training loop every algorithm uses, so comparisons are fair."""

    rounds: int = 2
    local_steps: int = 5
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class FederatedConfig:
    """Server strategy (Flower's own) and sampling for federated algorithms."""

    strategy: Strategy = "fedavg"
    fraction_train: float = 1.0
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    round_timeout_s: float = 3600.0


@dataclass(frozen=True)
class SyntheticConfig:
    """FedPIT / LocIT+SA self-generation: in-context prompts, decoding, filters, isolation."""

    per_round: int = 8  # synthetic examples each client generates per round
    icl_examples: int = 8  # local examples shown in each generation prompt (fewer if fewer)
    instruction_max_new_tokens: int = 48
    instruction_temperature: float = 0.7  # 0 = greedy
    response_max_new_tokens: int = 96
    repetition_penalty: float = 1.2  # for responses
    batch_size: int = 8
    min_instruction_words: int = 3
    min_response_words: int = 5
    dedup_rouge_l: float = 0.7  # drop if ROUGE-L F against a local or kept instruction exceeds it
    judge_min_score: float = 0.0  # > 0: ask the [judge] to rate each answer (0..1), drop below
    # Responses that ran out of tokens (unfinished instructions are always dropped).
    truncated: TruncatedPolicy = "drop"
    private_data: PrivateData = "local+synthetic"  # what FedPIT's private adapter trains on
    beta: float = 1.0  # FedPIT v2: upload beta * global + (1 - beta) * private


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: loss/perplexity, ROUGE-L of greedy generations, choice accuracy."""

    generate: bool = True
    max_new_tokens: int = 48
    batch_size: int = 8
    # Non-empty (e.g. ["yes", "no"]): also pick, per held-out item, the choice the model finds
    # most likely after the prompt and report accuracy against the reference output.
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        stripped = {c.strip() for c in self.choices} - {""}
        if self.choices and (len(stripped) != len(self.choices) or len(stripped) < 2):
            raise ConfigError(
                f"eval.choices needs two or more distinct, non-empty strings, got "
                f"{list(self.choices)}"
            )


@dataclass(frozen=True)
class JudgeConfig:
    """The bilateral judge: which of two answers is better, asked in both orders."""

    kind: JudgeKind = "none"
    # kind = "openai": any OpenAI-compatible endpoint; the key is read from the named variable.
    base_url: str = ""  # empty: $OPENAI_BASE_URL, else the OpenAI API
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    # kind = "local": a causal LM on this machine (the packaged default is a weak judge).
    local_model: str = "smollm2-135m-instruct"
    max_items: int = 0  # judge at most this many held-out items (0 = all)


@dataclass(frozen=True)
class SplitConfig:
    """FL-GLM split learning: where the model is cut, how the server trains, the wire."""

    mode: SplitMode = "serial"
    front_blocks: int = 1  # embeddings + this many blocks stay on the client
    back_blocks: int = 1  # this many blocks + final norm + LM head stay on the client
    adapter: SplitAdapter = "lora"  # each segment's PEFT method: LoRA ([lora]) or p-tuning v2
    prefix_tokens: int = 16  # adapter = "prefix": virtual tokens per block
    tls: bool = True  # mutual TLS; turn off only for tests on one machine
    encrypt: bool = True  # AES-256-GCM on every frame, on top of TLS
    key_exchange: KeyExchange = "x25519"
    wire_dtype: WireDtype = "float32"  # activations and gradients on the wire (never fp16)
    batch_window_s: float = 2.0  # batch mode: wait this long for the other clients' activations
    average_every: int = 1  # per-client mode: average the middle adapters every K steps
    average_clients: bool = True  # average the clients' front/back adapters each round (SplitFed)
    step_timeout_s: float = 120.0  # a client silent this long mid-step is dropped
    connect_timeout_s: float = 120.0  # a client waits this long for the server to come up
    host: str = "127.0.0.1"  # where `silotune run` starts its split server
    port: int = 0  # 0: any free port


@dataclass(frozen=True)
class SweepConfig:
    """Run the whole experiment once per value of one key (e.g. partition.alpha)."""

    key: str = ""  # section.key
    values: tuple[str, ...] = ()  # written as with --set: numbers, true/false, text


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
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as written to a run's `config.json`."""
        plain: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(self)))
        return plain

    def fingerprint(self) -> str:
        """Short stable hash of the whole config."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# Numeric lower bounds: (section, key) -> (minimum, inclusive?)
_MINIMUMS: dict[tuple[str, str], tuple[float, bool]] = {
    ("lora", "r"): (1, True),
    ("lora", "alpha"): (1, True),
    ("lora", "dropout"): (0.0, True),
    ("data", "max_length"): (8, True),
    ("data", "eval_size"): (1, True),
    ("partition", "clients"): (1, True),
    ("partition", "alpha"): (0.0, False),
    ("partition", "max_examples_per_client"): (0, True),
    ("partition", "min_partition_size"): (0, True),
    ("train", "rounds"): (1, True),
    ("train", "local_steps"): (1, True),
    ("train", "batch_size"): (1, True),
    ("train", "lr"): (0.0, False),
    ("train", "weight_decay"): (0.0, True),
    ("train", "max_grad_norm"): (0.0, True),
    ("federated", "fraction_train"): (0.0, False),
    ("federated", "proximal_mu"): (0.0, True),
    ("federated", "server_lr"): (0.0, False),
    ("federated", "round_timeout_s"): (0.0, False),
    ("synthetic", "per_round"): (1, True),
    ("synthetic", "icl_examples"): (1, True),
    ("synthetic", "instruction_max_new_tokens"): (4, True),
    ("synthetic", "instruction_temperature"): (0.0, True),
    ("synthetic", "response_max_new_tokens"): (4, True),
    ("synthetic", "repetition_penalty"): (0.0, False),
    ("synthetic", "batch_size"): (1, True),
    ("synthetic", "min_instruction_words"): (0, True),
    ("synthetic", "min_response_words"): (0, True),
    ("synthetic", "dedup_rouge_l"): (0.0, True),
    ("synthetic", "beta"): (0.0, True),
    ("synthetic", "judge_min_score"): (0.0, True),
    ("judge", "timeout_s"): (0.0, False),
    ("judge", "max_items"): (0, True),
    ("eval", "max_new_tokens"): (1, True),
    ("eval", "batch_size"): (1, True),
    ("model", "tiny_layers"): (1, True),
    ("model", "tiny_hidden"): (8, True),
    ("split", "front_blocks"): (0, True),
    ("split", "back_blocks"): (1, True),
    ("split", "prefix_tokens"): (1, True),
    ("split", "batch_window_s"): (0.0, True),
    ("split", "average_every"): (1, True),
    ("split", "step_timeout_s"): (0.0, False),
    ("split", "connect_timeout_s"): (0.0, False),
    ("split", "port"): (0, True),
}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML file (or a run's `config.json`), then apply `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        text = p.read_text(encoding="utf-8")
        try:
            raw = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{p} is not valid {p.suffix.lstrip('.').upper()}: {exc}") from None
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts (as parsed from TOML)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    reject_unknown(raw, sections, where="config")
    sweep = raw.get("sweep")
    if isinstance(sweep, dict) and isinstance(sweep.get("values"), list):
        # Sweep values may be written as TOML numbers or booleans; keep them as --set text.
        sweep["values"] = [v if isinstance(v, str) else json.dumps(v) for v in sweep["values"]]
    built: dict[str, Any] = {}
    for name in sections:
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{name}] must be a table of keys, got {section!r}")
        built[name] = build_section(name, _section_type(name), section, _MINIMUMS)
    config = Config(**built)
    _check_combinations(config)
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


def _section_type(name: str) -> type[Any]:
    hints = get_type_hints(Config)
    cls = hints[name]
    assert isinstance(cls, type)
    return cls


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
    if not config.experiment.algorithms:
        raise ConfigError("experiment.algorithms is empty; list at least one, e.g. ['fedit']")
    if len(set(config.experiment.algorithms)) != len(config.experiment.algorithms):
        raise ConfigError(f"experiment.algorithms repeats a name: {config.experiment.algorithms}")
    if config.federated.fraction_train > 1.0:
        raise ConfigError(
            f"federated.fraction_train must be in (0, 1], got {config.federated.fraction_train}"
        )
    if bool(config.sweep.key) != bool(config.sweep.values):
        raise ConfigError("a sweep needs both sweep.key (section.key) and sweep.values")
    if config.sweep.key:
        if config.sweep.key.split(".")[0] in ("sweep", "experiment"):
            raise ConfigError(f"sweep.key cannot be {config.sweep.key!r}; sweep a setting")
        sweep_variants(config)  # every value must make a valid config
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
