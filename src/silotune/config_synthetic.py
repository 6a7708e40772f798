"""The `[synthetic]` section: how FedPIT, LocIT+SA and FewFedWeight clients write their own
training data (in-context prompts, decoding, filters, a DP generator, who writes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from silotune.errors import ConfigError
from silotune.typed_values import setting

PrivateData = Literal["local+synthetic", "local"]
TruncatedPolicy = Literal["drop", "keep"]
GeneratorKind = Literal["global", "base", "model", "endpoint"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Self-generation of FedPIT, LocIT+SA and FewFedWeight: in-context prompts, decoding,
    filters, isolation."""

    per_round: int = setting(
        8,
        "Synthetic examples each client generates per round, before the filters drop some.",
    )
    icl_examples: int = setting(
        8,
        "Local records shown in each instruction prompt (fewer if the client has fewer); with "
        "`dp`, the most records in each group's prompt.",
    )
    instruction_max_new_tokens: int = setting(
        48,
        "Most tokens of one generated instruction (with its input); an unfinished one is "
        "dropped. With `dp`, every instruction is accounted as this many tokens.",
    )
    instruction_temperature: float = setting(
        0.7,
        "Sampling temperature of the instructions (0 = greedy); `dp` instructions are always "
        "greedy on the noisy vote.",
    )
    response_max_new_tokens: int = setting(
        96,
        "Most tokens of one synthetic response (greedy); one cut there is handled as "
        "`truncated` says.",
    )
    repetition_penalty: float = setting(
        1.2,
        "transformers' repetition penalty on the synthetic responses (1 = none); an "
        '"endpoint" generator is not sent it.',
    )
    batch_size: int = setting(
        8,
        "Prompts generated together; with `dp`, rounded down to whole blocks of `dp_groups` + 1 "
        "prompts (at least one block).",
    )
    min_instruction_words: int = setting(
        3, "A synthetic instruction with fewer words (split on whitespace) is dropped."
    )
    min_response_words: int = setting(
        5, "A synthetic response with fewer words (split on whitespace) is dropped."
    )
    dedup_rouge_l: float = setting(
        0.7,
        "A synthetic instruction is dropped when its ROUGE-L F against a local or already kept "
        "instruction exceeds this (1 keeps all); with `dp`, only kept synthetic ones count.",
    )
    judge_min_score: float = setting(
        0.0,
        "> 0: the [judge] rates each synthetic answer from 0 to 1 and those below this are "
        "dropped (needs `judge.kind`); 0 = off.",
    )
    truncated: TruncatedPolicy = setting(
        "drop",
        '"drop" or "keep" (cut) the responses that ran out of tokens '
        "(`response_max_new_tokens`); unfinished instructions are always dropped.",
    )
    private_data: PrivateData = setting(
        "local+synthetic",
        "What FedPIT's private adapter trains on: the client's records plus its kept synthetic "
        "examples, or its records alone.",
    )
    beta: float = setting(
        1.0,
        "FedPIT's upload: beta × the global adapter + (1 - beta) × the private one. 1 sends the "
        "global adapter alone; below 1 mixes in the private adapter, trained on real records.",
    )
    dp: bool = setting(
        False,
        "FedPIT's instructions by differentially private few-shot generation: each token is a "
        "noisy vote of `dp_groups` disjoint groups of sampled records over the top `dp_top_k` "
        "tokens of a prompt with no record. Needs `dp_epsilon` or `dp_noise_multiplier`; not "
        'with an "endpoint" generator.',
    )
    dp_epsilon: float = setting(
        0.0,
        "`dp`: one client's ε for its generation over the whole run, at `privacy.delta`. With "
        "`dp_noise_multiplier` 0 the noise is calibrated to end there; with both set, a run "
        "that would pass it is refused.",
    )
    dp_noise_multiplier: float = setting(
        0.0,
        "`dp`: > 0 sets the noise of each token's vote (a multiple of the vote's L2 "
        "sensitivity) instead of calibrating it to `dp_epsilon`.",
    )
    dp_groups: int = setting(
        4, "`dp`: disjoint groups of sampled records, one prompt each, that vote on every token."
    )
    dp_top_k: int = setting(
        20,
        "`dp`: the candidates of each token's vote, the most likely next tokens of the prompt "
        "that holds no record.",
    )
    generator: GeneratorKind = setting(
        "global",
        'Who writes the data: "global" (the current model: base + the global adapter, or a '
        'LocIT+SA client\'s own), "base", "model" (`generator_model` on the client\'s machine) '
        'or "endpoint" (an OpenAI-compatible server at `generator_url`, which sees real records).',
    )
    generator_model: str = setting(
        "",
        'generator "model": a local model folder or hub id, placed as the base model is '
        '(`model.device`, `dtype`, `quantization`); "endpoint": the model name the server '
        "serves.",
    )
    generator_url: str = setting(
        "",
        'generator "endpoint": the base URL of the OpenAI-compatible server (e.g. an '
        "on-premises vLLM or TGI).",
    )
    generator_api_key_env: str = setting(
        "OPENAI_API_KEY",
        'generator "endpoint": the environment variable holding its API key (may be unset for '
        "a server that needs none).",
    )
    allow_remote_generator: bool = setting(
        False,
        'Must be true for generator "endpoint": its prompts hold real records (the in-context '
        "examples), and this says that server may see them.",
    )
    timeout_s: float = setting(120.0, 'generator "endpoint": seconds one request may take.')

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


# Numeric lower bounds: (section, key) -> (minimum, inclusive?)
SYNTHETIC_MINIMUMS: dict[tuple[str, str], tuple[float, bool]] = {
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
}
