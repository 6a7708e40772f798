"""The sections of an experiment config that say what is trained and how it is measured: one
frozen dataclass per TOML table, their value types and their numeric lower bounds.
`silotune.config_federation` holds those of the federated server, split learning, defences and
attacks; `silotune.config` assembles, reads and checks them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from silotune.errors import ConfigError

Algorithm = Literal[
    "fedit", "fedpit", "fewfedweight", "locit", "locit-sa", "cenit", "split", "split-central"
]
Partitioner = Literal["iid", "dirichlet"]
PromptStyle = Literal["alpaca", "chat"]
DataFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "hub"]
BadRows = Literal["skip", "fail"]
PrivateData = Literal["local+synthetic", "local"]
TruncatedPolicy = Literal["drop", "keep"]
GeneratorKind = Literal["global", "base", "model", "endpoint"]
JudgeKind = Literal["none", "openai", "local"]
ModelDtype = Literal["auto", "float32", "bfloat16"]
Quantization = Literal["none", "4bit", "8bit"]


@dataclass(frozen=True)
class ExperimentConfig:
    """What to run and how to name it."""

    name: str = "experiment"
    algorithms: tuple[Algorithm, ...] = ("fedit",)
    seed: int = 0
    # Non-empty: the whole experiment (data split, initialisation, sampling) runs once per seed,
    # in OUT/seed=S/, and a report gives the mean and spread over seeds (`seed` is then unused).
    seeds: tuple[int, ...] = ()


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
    # FFA-LoRA: A stays at its random initialisation and only B trains (half the parameters
    # under DP noise, and no noise product A·B).
    freeze_a: bool = False


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
    # > 0: each client also holds out up to this many of its own records (never trained on),
    # on which every final model is scored: how each does on each client's distribution.
    client_eval_size: int = 0


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
    # Differentially private instructions (data/dp_synthetic.py): each token is a noisy vote of
    # dp_groups disjoint groups of sampled records over the top dp_top_k tokens of a prompt with
    # no record. dp_epsilon budgets one client's generation over the run (the noise is
    # calibrated to end there); dp_noise_multiplier > 0 sets the noise instead (per token).
    dp: bool = False
    dp_epsilon: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_groups: int = 4
    dp_top_k: int = 20
    # Who writes the data (data/generators.py): "global" (base + the current global adapter),
    # "base", "model" (generator_model: a local folder or hub id) or "endpoint" (an
    # OpenAI-compatible server at generator_url serving generator_model; its prompts hold real
    # records, so it needs allow_remote_generator = true).
    generator: GeneratorKind = "global"
    generator_model: str = ""
    generator_url: str = ""
    generator_api_key_env: str = "OPENAI_API_KEY"
    allow_remote_generator: bool = False
    timeout_s: float = 120.0  # per endpoint request

    def __post_init__(self) -> None:
        if self.dp and self.dp_epsilon <= 0 and self.dp_noise_multiplier <= 0:
            raise ConfigError(
                "synthetic.dp = true needs synthetic.dp_epsilon > 0 (the generation's budget) "
                "or synthetic.dp_noise_multiplier > 0"
            )
        if self.generator in ("model", "endpoint") and not self.generator_model:
            raise ConfigError(
                f"synthetic.generator = {self.generator!r} needs synthetic.generator_model"
            )
        if self.generator == "endpoint":
            if not self.generator_url:
                raise ConfigError("synthetic.generator = 'endpoint' needs synthetic.generator_url")
            if not self.allow_remote_generator:
                raise ConfigError(
                    f"synthetic.generator = 'endpoint' sends real records (the in-context "
                    f"examples) to {self.generator_url}: set synthetic.allow_remote_generator = "
                    "true if that server may see them"
                )
            if self.dp:
                raise ConfigError(
                    "synthetic.dp needs the generator's next-token distributions, which an "
                    "endpoint does not give: use generator 'global', 'base' or 'model'"
                )


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: loss/perplexity, ROUGE-L of greedy generations, choice accuracy."""

    generate: bool = True
    max_new_tokens: int = 48
    batch_size: int = 8
    # Held-out loss covers every eval record every round; generation (ROUGE-L, the judge) is
    # the slow part, so it runs on the first generate_n records (0: all) at the last round, and
    # also every generate_every rounds when that is > 0.
    generate_n: int = 0
    generate_every: int = 0
    # Non-empty (e.g. ["yes", "no"]): also pick, per held-out item, the choice the model finds
    # most likely after the prompt and report accuracy against the reference output.
    choices: tuple[str, ...] = ()
    # Every comparison shows each algorithm's difference to these, with a paired bootstrap
    # interval over the held-out records: "base" (the untuned model) or algorithm names; names
    # that did not run are skipped.
    references: tuple[str, ...] = ("base", "locit")
    # lm-eval tasks to score the run's models on once it has finished (as `silotune eval` does):
    # group names (e.g. "flowertune-medical"), lm-eval task names or task YAML paths.
    lm_eval_tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(not t.strip() for t in self.lm_eval_tasks):
            raise ConfigError(
                f"eval.lm_eval_tasks holds an empty name: {list(self.lm_eval_tasks)}; give lm-eval "
                "task or group names, or paths of task YAML files"
            )
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


TrackingBackend = Literal["tensorboard", "mlflow", "wandb"]


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers the run also reports to (pip install 'silotune[tracking]')."""

    backends: tuple[TrackingBackend, ...] = ()
    # MLflow's store: empty = $MLFLOW_TRACKING_URI, else MLflow's default (./mlflow.db).
    mlflow_uri: str = ""
    # W&B: offline (files in the run folder's wandb/, `wandb sync` uploads them) or online.
    wandb_mode: Literal["offline", "online"] = "offline"
    wandb_project: str = ""  # empty: the experiment's name


@dataclass(frozen=True)
class SweepConfig:
    """Run the whole experiment once per value of one key (e.g. partition.alpha)."""

    key: str = ""  # section.key
    values: tuple[str, ...] = ()  # written as with --set: numbers, true/false, text


# Numeric lower bounds of these sections: (section, key) -> (minimum, inclusive?)
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
    ("partition", "client_eval_size"): (0, True),
    ("train", "rounds"): (1, True),
    ("train", "local_steps"): (1, True),
    ("train", "batch_size"): (1, True),
    ("train", "lr"): (0.0, False),
    ("train", "weight_decay"): (0.0, True),
    ("train", "max_grad_norm"): (0.0, True),
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
    ("synthetic", "dp_epsilon"): (0.0, True),
    ("synthetic", "dp_noise_multiplier"): (0.0, True),
    ("synthetic", "dp_groups"): (1, True),
    ("synthetic", "dp_top_k"): (2, True),
    ("synthetic", "timeout_s"): (0.0, False),
    ("synthetic", "beta"): (0.0, True),
    ("synthetic", "judge_min_score"): (0.0, True),
    ("judge", "timeout_s"): (0.0, False),
    ("judge", "max_items"): (0, True),
    ("eval", "max_new_tokens"): (1, True),
    ("eval", "batch_size"): (1, True),
    ("eval", "generate_n"): (0, True),
    ("eval", "generate_every"): (0, True),
    ("model", "tiny_layers"): (1, True),
    ("model", "tiny_hidden"): (8, True),
}
