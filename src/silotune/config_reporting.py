"""The sections that say how a run is measured and reported: held-out evaluation, the judge,
experiment trackers and sweeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from silotune.errors import ConfigError
from silotune.typed_values import setting

JudgeKind = Literal["none", "openai", "local"]


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: loss/perplexity, ROUGE-L of greedy generations, choice accuracy."""

    generate: bool = setting(
        True,
        "Generate greedy answers to the held-out records and score them: ROUGE-L against the "
        "reference, and the [judge] when one is set. False: loss, perplexity and choice "
        "accuracy only.",
    )
    max_new_tokens: int = setting(48, "Most tokens of each generated held-out answer.")
    batch_size: int = setting(
        8,
        "Held-out records scored or generated together (also the batch of FewFedWeight's "
        "energy scoring and of the extraction attack).",
    )
    generate_n: int = setting(
        0,
        "Generation (ROUGE-L, the judge) is the slow part: it runs on the first this many "
        "held-out records (0 = all). Held-out loss always covers every record.",
    )
    generate_every: int = setting(
        0,
        "> 0: also generate every this many rounds; generation always runs at the last round "
        "(0 = only then).",
    )
    choices: tuple[str, ...] = setting(
        (),
        'Non-empty (e.g. ["yes", "no"]): also pick, per held-out item, the choice the model '
        "finds most likely after the prompt and report accuracy against the reference output, "
        "which must be one of them (see `data.output_map`).",
    )
    references: tuple[str, ...] = setting(
        ("base", "locit"),
        "Every comparison shows each algorithm's difference to these, with a paired bootstrap "
        'interval over the held-out records: "base" (the untuned model) or algorithm names; '
        "names that did not run are skipped.",
    )
    lm_eval_tasks: tuple[str, ...] = setting(
        (),
        "lm-eval tasks to score the run's models on once it has finished (as `silotune eval` "
        'does): group names (e.g. "flowertune-medical"), lm-eval task names or task YAML paths.',
    )

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

    kind: JudgeKind = setting(
        "none",
        "The judge that compares each algorithm's held-out answers with the references (and "
        'rates synthetic answers for `synthetic.judge_min_score`): "none", "openai" (any '
        'OpenAI-compatible endpoint) or "local" (a causal LM on this machine).',
    )
    base_url: str = setting(
        "",
        'kind "openai": the endpoint\'s base URL; empty: $OPENAI_BASE_URL, else the OpenAI API.',
    )
    model: str = setting("", 'kind "openai": the model name to ask; required there.')
    api_key_env: str = setting(
        "OPENAI_API_KEY",
        'kind "openai": the environment variable the API key is read from; it must be set.',
    )
    timeout_s: float = setting(60.0, 'kind "openai": seconds one request may take (retried twice).')
    local_model: str = setting(
        "smollm2-135m-instruct",
        'kind "local": the judge model, named as `model.name` is and placed as the base model '
        "is (`model.device`, `dtype`, `quantization`); the packaged default is a weak judge, "
        "and reports say so.",
    )
    max_items: int = setting(
        0, "Judge at most this many held-out items of each model (0 = all it generated)."
    )


TrackingBackend = Literal["tensorboard", "mlflow", "wandb"]


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers the run also reports to (pip install 'silotune[tracking]')."""

    backends: tuple[TrackingBackend, ...] = setting(
        (),
        "Trackers the run also reports to, each through its own library: one tracker run per "
        "algorithm with the config, each round's metrics and the report as artefacts.",
    )
    mlflow_uri: str = setting(
        "", "MLflow's store; empty: $MLFLOW_TRACKING_URI, else MLflow's default (./mlflow.db)."
    )
    wandb_mode: Literal["offline", "online"] = setting(
        "offline",
        'W&B: "offline" writes files in the run folder\'s wandb/ (`wandb sync` uploads them); '
        '"online" sends as it goes.',
    )
    wandb_project: str = setting("", "The W&B project; empty: the experiment's name.")


@dataclass(frozen=True)
class SweepConfig:
    """Run the whole experiment once per value of one key (e.g. partition.alpha)."""

    key: str = setting(
        "",
        "The setting to sweep, as section.key (e.g. partition.alpha; not in [experiment] or "
        "[sweep]); empty: no sweep.",
    )
    values: tuple[str, ...] = setting(
        (),
        "The values `key` takes, written as with --set (numbers, true/false, text): the whole "
        "experiment runs once per value, into OUT/<last part of key>=<value>/ (e.g. "
        "alpha=0.1/), and a report compares them.",
    )


# Numeric lower bounds: (section, key) -> (minimum, inclusive?)
REPORTING_MINIMUMS: dict[tuple[str, str], tuple[float, bool]] = {
    ("judge", "timeout_s"): (0.0, False),
    ("judge", "max_items"): (0, True),
    ("eval", "max_new_tokens"): (1, True),
    ("eval", "batch_size"): (1, True),
    ("eval", "generate_n"): (0, True),
    ("eval", "generate_every"): (0, True),
}
