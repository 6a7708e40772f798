"""The sections of an experiment config that say what is trained: the experiment, the model,
its adapters, the data and its split across clients, and the training loop; one frozen
dataclass per TOML table, their value types and their numeric lower bounds. Their siblings:
`config_synthetic` (self-generation), `config_reporting` (evaluation, judge, trackers, sweeps),
`config_federation`, `config_privacy`, `config_fewfedweight`; `silotune.config` assembles,
reads and checks them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from silotune.errors import ConfigError
from silotune.typed_values import setting

Algorithm = Literal[
    "fedit", "fedpit", "fewfedweight", "locit", "locit-sa", "cenit", "split", "split-central"
]
Partitioner = Literal["iid", "dirichlet"]
PromptStyle = Literal["alpaca", "chat"]
DataFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "hub"]
BadRows = Literal["skip", "fail"]
ModelDtype = Literal["auto", "float32", "bfloat16"]
Quantization = Literal["none", "4bit", "8bit"]


@dataclass(frozen=True)
class ExperimentConfig:
    """What to run and how to name it."""

    name: str = setting("experiment", "Names the run: the report's title and the trackers' runs.")
    algorithms: tuple[Algorithm, ...] = setting(
        ("fedit",),
        "The algorithms to train and compare, each on the same split, budget and held-out "
        "records; each gets its own folder in the run.",
    )
    seed: int = setting(
        0, "Seeds the data split, the adapters' initialisation and every sampling step."
    )
    seeds: tuple[int, ...] = setting(
        (),
        "Non-empty (e.g. [0, 1, 2]): the whole experiment (data split, initialisation, "
        "sampling) runs once per seed, in OUT/seed=S/, and the report gives the mean and spread "
        "over seeds; `seed` is then unused.",
    )


@dataclass(frozen=True)
class ModelConfig:
    """Base model: `smollm2-135m-instruct` (packaged), `tiny-llama`, a hub id or a path."""

    name: str = setting(
        "smollm2-135m-instruct",
        "The frozen base model: `smollm2-135m-instruct` (SmolLM2-135M-Instruct, packaged), "
        "`tiny-llama` (a small random Llama built in code, for tests), a Hugging Face hub id, "
        "or a local model folder holding config.json.",
    )
    tiny_layers: int = setting(
        2, "Number of blocks of the `tiny-llama` random model; ignored for other models."
    )
    tiny_hidden: int = setting(
        64,
        "Hidden size of the `tiny-llama` random model (its MLP is twice as wide); ignored for "
        "other models.",
    )
    device: str = setting(
        "auto",
        'Where the model runs: "auto" (the first CUDA GPU when there is one, else the CPU), '
        '"cpu", "cuda" or "cuda:N". A GPU this machine does not have stops the run.',
    )
    dtype: ModelDtype = setting(
        "auto",
        'Precision of the frozen base: "auto" is bfloat16 on a GPU that supports it natively '
        "and float32 otherwise (always float32 on a CPU). Adapters always train in float32.",
    )
    quantization: Quantization = setting(
        "none",
        'A frozen base quantized by bitsandbytes (QLoRA style): "4bit" is NF4 with double '
        'quantization, computing in `dtype`; "8bit" is LLM.int8. Adapters stay in float32. '
        "Every process that trains uses it, except split clients, which keep their few blocks "
        "unquantized.",
    )


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter hyper-parameters, passed to PEFT's own LoraConfig."""

    r: int = setting(8, "LoRA rank: the inner dimension of each adapter's A and B matrices.")
    alpha: int = setting(16, "LoRA scaling: each adapter's update is scaled by alpha / r.")
    dropout: float = setting(0.05, "Dropout on each adapter's input while training.")
    target_modules: tuple[str, ...] = setting(
        ("q_proj", "v_proj"),
        "Names of the linear layers that get an adapter (PEFT's target_modules), e.g. "
        '["q_proj", "k_proj", "v_proj", "o_proj"] on Llama-style models.',
    )
    freeze_a: bool = setting(
        False,
        "FFA-LoRA: A stays at its random initialisation and only B trains (half the "
        "parameters under DP noise, and no noise product A·B). Applies to the federated and "
        "local algorithms' adapters; split and split-central refuse it.",
    )
    client_ranks: tuple[int, ...] = setting(
        (),
        "Each federated client's LoRA rank, one per client (e.g. [4, 8, 16]), each at most `r`, "
        "the server's; a client trains the first components of the server's adapter, scaled by "
        'alpha / r as the server\'s. Needs federated.aggregation = "hetlora", "flora" or '
        '"fedsa"; empty: every client trains rank `r`.',
    )


@dataclass(frozen=True)
class DataConfig:
    """Where the records come from and how their fields map to instruction/input/output."""

    path: str = setting(
        "bundled:medquad_demo.jsonl",
        "The records: a .jsonl, .json, .csv or .parquet file, bundled:NAME for a file "
        'packaged with silotune, or a Hugging Face hub dataset id with `format` = "hub".',
    )
    format: DataFormat = setting(
        "auto",
        'How `path` is read: "auto" tells the file format from its suffix; "hub" loads `path` '
        "from the Hugging Face hub with the datasets library.",
    )
    hub_split: str = setting("train", 'The split of a hub dataset to load (`format` = "hub").')
    instruction_field: str = setting(
        "question",
        "The source column that becomes each record's instruction; unused when "
        "`instruction_template` is set.",
    )
    input_field: str = setting(
        "",
        "The source column that becomes each record's input (context shown with the "
        "instruction); empty: the records have no input.",
    )
    output_field: str = setting(
        "answer", "The source column that becomes each record's response, the text learned."
    )
    label_field: str = setting(
        "qtype",
        'The source column that labels each record: partition.method = "dirichlet" skews the '
        "clients' label mix on it, and each client's mix is reported. Empty: no label "
        '(partition.method must then be "iid").',
    )
    instruction_template: str = setting(
        "",
        "When set, the instruction is this template filled from the source row's columns "
        "(str.format_map), e.g. '\"{premise}\" Question: {hypothesis}? yes/no'; "
        "`instruction_field` is then unused.",
    )
    output_map: tuple[str, ...] = setting(
        (),
        '"source=target" pairs mapping output values, e.g. ["entailment=yes", '
        '"not_entailment=no"]; when set, every non-empty output must be listed.',
    )
    prompt_style: PromptStyle = setting(
        "alpaca",
        'How a record becomes the prompt the model continues: "alpaca" (the Stanford Alpaca '
        'template) or "chat" (the tokenizer\'s chat template, one user turn).',
    )
    max_length: int = setting(
        128,
        "Most tokens of one record, prompt and response together, in training and scoring; a "
        "prompt too long keeps its end, then the response is cut.",
    )
    eval_size: int = setting(
        16,
        "Records held out before the split: the shared held-out set on which the base model "
        "and every algorithm are scored. No client trains on them.",
    )
    bad_rows: BadRows = setting(
        "skip",
        "A malformed row (not UTF-8, not a JSON object, empty instruction or output): "
        '"skip" it and count it, or "fail" naming its row. Clients\' own files get the same '
        "policy.",
    )

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

    clients: int = setting(3, "Number of clients (silos) the records are split across.")
    method: Partitioner = setting(
        "dirichlet",
        '"iid": equal random shares; "dirichlet": each label\'s records (`data.label_field`) '
        "are shared out in proportions drawn from a Dirichlet of concentration `alpha`, so "
        "clients differ in their label mix.",
    )
    alpha: float = setting(
        1.0,
        'Dirichlet concentration (method "dirichlet"): small (0.1) gives each client a few '
        "labels, large (10) nearly the same mix everywhere.",
    )
    max_examples_per_client: int = setting(
        0,
        "Few-shot cap: at most this many training records per client, drawn at random from "
        "its share (0 = no cap).",
    )
    min_partition_size: int = setting(
        2,
        'Method "dirichlet": the fewest records a client may get; the split is redrawn until '
        "every client has that many, and the run stops when a few draws cannot manage it.",
    )
    client_eval_size: int = setting(
        0,
        "> 0: each client also holds out up to this many of its own records (at most half), "
        "never trained on, on which every final model is scored: how each does on each "
        "client's distribution.",
    )


@dataclass(frozen=True)
class TrainConfig:
    """The one local training loop every algorithm uses, so comparisons are fair."""

    rounds: int = setting(
        2,
        "Training rounds: federated rounds (train, upload, aggregate); the local, centralized "
        "and split algorithms train as many rounds. Every algorithm is evaluated each round.",
    )
    local_steps: int = setting(
        5,
        "Optimiser steps each client takes per round; CenIT takes this many times the number "
        "of clients per round on the pooled records.",
    )
    batch_size: int = setting(
        4,
        "Records per training step; under DP-SGD, the expected size of its Poisson-sampled "
        "batches.",
    )
    lr: float = setting(2e-4, "AdamW's learning rate for every trained adapter.")
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay.")
    max_grad_norm: float = setting(
        1.0,
        "The gradients' total L2 norm is clipped to this before each step (0 = no clipping). "
        "DP-SGD clips each example instead (`privacy.clip_norm`) and ignores it.",
    )
    gradient_checkpointing: bool = setting(
        False,
        "Recompute each block's activations in the backward pass instead of keeping them: "
        "activation memory falls from every block's to about one block's, for ~30 % more "
        "compute. Cannot run with privacy.mode = dp-sgd.",
    )


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
    ("model", "tiny_layers"): (1, True),
    ("model", "tiny_hidden"): (8, True),
}
