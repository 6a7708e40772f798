"""The sections of an experiment config: one frozen dataclass per TOML table, their value types
and their numeric lower bounds. `silotune.config` assembles, reads and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from silotune.errors import ConfigError

Algorithm = Literal["fedit", "fedpit", "locit", "locit-sa", "cenit", "split", "split-central"]
Strategy = Literal[
    "fedavg",
    "fedprox",
    "fedadam",
    "fedavgm",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
]
# Strategies that select or trim updates instead of averaging them: Flower's DP wrappers calibrate
# their noise to an average, and SecAgg+ reveals only the sum, so neither can run them.
ROBUST_STRATEGIES: tuple[Strategy, ...] = (
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)
# What Flower's legacy SecAgg+ workflow runs (silotune.federated.secagg).
SECAGG_STRATEGIES: tuple[Strategy, ...] = ("fedavg", "fedprox", "fedadam")
Partitioner = Literal["iid", "dirichlet"]
PromptStyle = Literal["alpaca", "chat"]
DataFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "hub"]
BadRows = Literal["skip", "fail"]
PrivateData = Literal["local+synthetic", "local"]
TruncatedPolicy = Literal["drop", "keep"]
JudgeKind = Literal["none", "openai", "local"]
SplitMode = Literal["serial", "batch", "per-client"]
KeyExchange = Literal["x25519", "rsa"]
WireDtype = Literal["float32", "bfloat16"]
SplitAdapter = Literal["lora", "prefix"]
DpKind = Literal["none", "client-fixed", "server-fixed"]
AttackKind = Literal["extraction", "membership", "inversion"]
InversionModel = Literal["linear", "transformer"]
ModelDtype = Literal["auto", "float32", "bfloat16"]
Quantization = Literal["none", "4bit", "8bit"]
DeviceMap = Literal["single", "auto"]

# Which algorithms' results each attack applies to: extraction and membership need an adapter
# every participant holds; inversion needs a split run's activations. The algorithms import this
# module, so these are spelled out; tests/test_registry.py checks them against their traits.
SHARED_ADAPTER_ALGORITHMS: tuple[Algorithm, ...] = ("fedit", "fedpit", "cenit")
ATTACK_TARGETS: dict[str, tuple[Algorithm, ...]] = {
    "extraction": SHARED_ADAPTER_ALGORITHMS,
    "membership": SHARED_ADAPTER_ALGORITHMS,
    "inversion": ("split",),
}


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
    # "auto": the first CUDA GPU when there is one, else the CPU; or "cpu", "cuda", "cuda:N".
    device: str = "auto"
    # "auto": bfloat16 on a GPU that supports it, float32 otherwise (always float32 on a CPU).
    dtype: ModelDtype = "auto"
    # A frozen base quantized by bitsandbytes (QLoRA style: NF4 with double quantization, or
    # LLM.int8); adapters stay in float32. Used by federated clients and the split server.
    quantization: Quantization = "none"


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
    # A malformed row (not UTF-8, not a JSON object, empty instruction or output): "skip" it
    # and count it, or "fail" naming its row.
    bad_rows: BadRows = "skip"

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
    # Recompute each block's activations in the backward pass instead of keeping them:
    # activation memory falls from every block's to about one block's, for ~30 % more compute.
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class FederatedConfig:
    """Server strategy (Flower's own) and sampling for federated algorithms."""

    strategy: Strategy = "fedavg"
    fraction_train: float = 1.0
    proximal_mu: float = 0.01
    server_lr: float = 0.01  # eta of the server optimiser (fedadam, fedyogi, fedadagrad)
    server_beta_1: float = 0.9  # fedadam, fedyogi: decay of the first moment
    server_beta_2: float = 0.99  # fedadam, fedyogi: decay of the second moment
    server_tau: float = 1e-3  # fedadam, fedyogi, fedadagrad: adaptivity (added to sqrt(v))
    server_momentum: float = 0.9  # fedavgm: momentum of the server's SGD
    momentum_lr: float = 1.0  # fedavgm: learning rate of the server's SGD
    trim_fraction: float = 0.2  # fedtrimmedavg: share of updates cut from each tail, in [0, 0.5)
    # krum, multikrum, bulyan: hostile clients tolerated per round (f); krum and multikrum
    # need 2f + 3 clients a round, bulyan 4f + 3.
    malicious_clients: int = 1
    multikrum_select: int = 0  # multikrum: updates averaged (0: clients a round - f)
    round_timeout_s: float = 3600.0  # clients silent this long are recorded as dropped
    quorum: int = 1  # fewest valid client updates a round needs; below it the run stops
    # A client weight (num-examples, or dp-weight with DP) above this multiple of the round's
    # median is rejected, so that no one client can outweigh the others.
    max_weight_ratio: float = 10.0

    def __post_init__(self) -> None:
        if not self.trim_fraction < 0.5:
            raise ConfigError(
                f"federated.trim_fraction is the share cut from each tail, in [0, 0.5); got "
                f"{self.trim_fraction}"
            )
        for name in ("server_beta_1", "server_beta_2"):
            if not getattr(self, name) < 1.0:
                raise ConfigError(f"federated.{name} must be in [0, 1), got {getattr(self, name)}")

    def min_updates(self) -> int:
        """Fewest valid updates a round of this strategy needs for its robustness guarantee."""
        f = self.malicious_clients
        return {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(
            self.strategy, 1
        )


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
    # A session that sends no frame for this long is closed (its client may reconnect); it must
    # outlast the longest local work between two frames (a client's evaluation, its checkpoint).
    idle_timeout_s: float = 900.0
    connect_timeout_s: float = 120.0  # a client waits this long for the server to come up
    host: str = "127.0.0.1"  # where `silotune run` starts its split server
    port: int = 0  # 0: any free port
    # "auto": spread the middle's blocks over every visible GPU (accelerate plans the map);
    # "single": all on model.device.
    server_device_map: DeviceMap = "single"


@dataclass(frozen=True)
class DefenceConfig:
    """Privacy defences: Flower's DP wrappers and SecAgg+ (federated), noise on the split wire."""

    # Federated: Flower's differential-privacy wrapper around the strategy: each client's update
    # is clipped to dp_clipping_norm (by the client: "client-fixed"; by the server:
    # "server-fixed") and the average gets Gaussian noise of dp_noise_multiplier x that norm /
    # the number of clients sampled.
    dp: DpKind = "none"
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    # Federated: aggregate with Flower's SecAgg+ (SecAggPlusWorkflow + secaggplus_mod), so the
    # server only learns the weighted sum of the clients' uploads, not any one of them.
    secagg: bool = False
    # Split: Gaussian noise on the front activations a client sends, with standard deviation
    # activation_noise x each token's RMS activation (scale-free; 0 = off).
    activation_noise: float = 0.0
    # Split: each example's gradient returned to the server is clipped to this L2 norm (0 = off)
    # and gets Gaussian noise of gradient_noise x gradient_clip.
    gradient_clip: float = 0.0
    gradient_noise: float = 0.0


@dataclass(frozen=True)
class AttackConfig:
    """Privacy attacks run on each finished algorithm of `silotune run` (also `silotune attack`)."""

    kinds: tuple[AttackKind, ...] = ()
    # Extraction: at most this many member records (the clients' training records, spread over
    # clients) and as many non-members of the same data (never trained on). Membership uses
    # every member and as many non-members; inversion at most this many of the victim's records.
    max_records: int = 48
    max_new_tokens: int = 32  # extraction: greedy tokens generated per record
    prefix_fraction: float = 0.5  # extraction: share of the response given in the prefix prompt
    rouge_threshold: float = 0.5  # extraction: a record counts as extracted at ROUGE-L >= this
    # Inversion: front depths (blocks after the embeddings) and activation noise levels
    # (x RMS, as defence.activation_noise) to measure; the run's own depth is measured always.
    inversion_blocks: tuple[int, ...] = (0, 1, 2)
    inversion_noise: tuple[float, ...] = (0.0,)
    inversion_model: InversionModel = "linear"
    inversion_steps: int = 200
    inversion_lr: float = 3e-3
    victim: int = 0  # the client whose activations are inverted; the others are the shadow data
    seed: int = 0


@dataclass(frozen=True)
class SweepConfig:
    """Run the whole experiment once per value of one key (e.g. partition.alpha)."""

    key: str = ""  # section.key
    values: tuple[str, ...] = ()  # written as with --set: numbers, true/false, text


# Numeric lower bounds: (section, key) -> (minimum, inclusive?)
MINIMUMS: dict[tuple[str, str], tuple[float, bool]] = {
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
    ("federated", "quorum"): (1, True),
    ("federated", "server_beta_1"): (0.0, True),
    ("federated", "server_beta_2"): (0.0, True),
    ("federated", "server_tau"): (0.0, False),
    ("federated", "server_momentum"): (0.0, True),
    ("federated", "momentum_lr"): (0.0, False),
    ("federated", "trim_fraction"): (0.0, True),
    ("federated", "malicious_clients"): (0, True),
    ("federated", "multikrum_select"): (0, True),
    ("federated", "max_weight_ratio"): (1.0, False),
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
    ("split", "idle_timeout_s"): (0.0, False),
    ("split", "connect_timeout_s"): (0.0, False),
    ("split", "port"): (0, True),
    ("defence", "dp_noise_multiplier"): (0.0, True),
    ("defence", "dp_clipping_norm"): (0.0, False),
    ("defence", "activation_noise"): (0.0, True),
    ("defence", "gradient_clip"): (0.0, True),
    ("defence", "gradient_noise"): (0.0, True),
    ("attack", "max_records"): (1, True),
    ("attack", "max_new_tokens"): (1, True),
    ("attack", "prefix_fraction"): (0.0, False),
    ("attack", "rouge_threshold"): (0.0, False),
    ("attack", "inversion_steps"): (1, True),
    ("attack", "inversion_lr"): (0.0, False),
    ("attack", "victim"): (0, True),
}
