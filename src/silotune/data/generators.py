"""Who writes the synthetic data (`synthetic.generator`).

- `global` (FedPIT's choice, the default): the current global model, base + the global adapter;
- `base`: the frozen base model, adapters off;
- `model`: a separate causal LM on the client's machine (`synthetic.generator_model`, a folder or
  hub id), loaded once per process and kept;
- `endpoint`: an OpenAI-compatible server (`synthetic.generator_url`, e.g. an on-premises vLLM or
  TGI). Its prompts hold real records, so it is refused unless `allow_remote_generator = true`,
  and it is non-private only: DP generation needs next-token distributions.

Every generator writes instructions (from in-context prompts of local records; with DP, by
`dp_synthetic`'s noisy vote) and responses to the kept instructions (no records in the prompt).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn
from transformers import LogitsProcessorList, PreTrainedTokenizerBase

from silotune.config_sections import DataConfig, ModelConfig
from silotune.config_synthetic import SyntheticConfig
from silotune.data import dp_synthetic
from silotune.data.sft import encode_prompt
from silotune.data.synthetic import (
    TASK_HEADER,
    Record,
    instruction_prompts,
    self_instruct_prompt,
)
from silotune.errors import ConfigError, UserError
from silotune.modeling.generation import DecodeConfig, Generation, generate
from silotune.modeling.placement import Placement
from silotune.privacy.mechanisms import GaussianUse
from silotune.seeds import derive_seed

if TYPE_CHECKING:
    from silotune.training.workbench import Workbench


class Generator(Protocol):
    """Writes instructions from local records and responses to instructions."""

    label: str

    def instructions(
        self, local: Sequence[Record], cfg: SyntheticConfig, seed: int, private: GaussianUse | None
    ) -> list[Generation]:
        """`cfg.per_round` new instructions (the task block after a self-instruct prompt)."""
        ...

    def responses(
        self, tasks: Sequence[tuple[str, str]], cfg: SyntheticConfig, data: DataConfig
    ) -> list[Generation]:
        """One response per (instruction, input), in the run's prompt style."""
        ...


@dataclass
class LocalGenerator:
    """A causal LM in this process (`base_only`: with its adapters switched off)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    label: str
    base_only: bool = False

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        if self.base_only:
            with self.model.disable_adapter():  # type: ignore[operator]
                yield
        else:
            yield

    def instructions(
        self, local: Sequence[Record], cfg: SyntheticConfig, seed: int, private: GaussianUse | None
    ) -> list[Generation]:
        """Plain or DP in-context generation (see `data.synthetic`)."""
        with self._active():
            if private is not None:
                return private_instructions(self.model, self.tokenizer, local, cfg, seed, private)
            return plain_instructions(self.model, self.tokenizer, local, cfg, seed)

    def responses(
        self, tasks: Sequence[tuple[str, str]], cfg: SyntheticConfig, data: DataConfig
    ) -> list[Generation]:
        """Greedy responses with the repetition penalty."""
        prompts = [encode_prompt(self.tokenizer, data.prompt_style, i, x) for i, x in tasks]
        decoding = DecodeConfig(
            max_new_tokens=cfg.response_max_new_tokens,
            batch_size=cfg.batch_size,
            repetition_penalty=cfg.repetition_penalty,
        )
        with self._active():
            return generate(
                self.model, self.tokenizer, prompts, decoding, label="synthetic answers"
            )


class EndpointGenerator:
    """An OpenAI-compatible server: text completions for instructions, chat for responses."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        from openai import OpenAI

        self.model = cfg.generator_model
        key = os.environ.get(cfg.generator_api_key_env, "") or "unused"  # local servers want none
        self._client = OpenAI(base_url=cfg.generator_url, api_key=key, timeout=cfg.timeout_s)
        self.label = f"{cfg.generator_model} at {cfg.generator_url} (OpenAI-compatible endpoint)"

    def instructions(
        self, local: Sequence[Record], cfg: SyntheticConfig, seed: int, private: GaussianUse | None
    ) -> list[Generation]:
        """One completion per prompt, stopped at the next task header."""
        if private is not None:
            raise ConfigError("synthetic.dp cannot run on an endpoint generator")
        out = []
        for prompt in instruction_prompts(local, cfg, seed):
            reply = self._call(
                lambda p=prompt: self._client.completions.create(
                    model=self.model,
                    prompt=p,
                    max_tokens=cfg.instruction_max_new_tokens,
                    temperature=cfg.instruction_temperature,
                    stop=[TASK_HEADER],
                    seed=seed,
                )
            )
            choice = reply.choices[0]
            out.append(Generation(choice.text or "", choice.finish_reason == "stop"))
        return out

    def responses(
        self, tasks: Sequence[tuple[str, str]], cfg: SyntheticConfig, data: DataConfig
    ) -> list[Generation]:
        """One chat completion per instruction (the server applies its own chat template)."""
        out = []
        for instruction, task_input in tasks:
            content = f"{instruction}\n\n{task_input}" if task_input else instruction
            reply = self._call(
                lambda c=content: self._client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": c}],
                    max_tokens=cfg.response_max_new_tokens,
                    temperature=0.0,
                )
            )
            choice = reply.choices[0]
            text = choice.message.content or ""
            out.append(Generation(text, choice.finish_reason == "stop"))
        return out

    def _call(self, request: Any) -> Any:
        from openai import OpenAIError

        try:
            return request()
        except OpenAIError as exc:
            raise UserError(
                f"the synthetic data generator at {self.label} failed: {exc}; check "
                "synthetic.generator_url and synthetic.generator_model"
            ) from None


@functools.cache
def _separate_model(name: str, placement: Placement) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A separate generator model, placed as the base model is (device, dtype, quantization),
    loaded once per process and kept."""
    from silotune.modeling.load import load_model, load_tokenizer, resolve_model

    source = resolve_model(ModelConfig(name=name))
    return load_model(source, placement), load_tokenizer(source)


def generator_for(cfg: SyntheticConfig, bench: Workbench, current: list[str]) -> Generator:
    """The configured generator; `current`: the adapters that make the client's current model
    (FedPIT: the global one)."""
    if cfg.generator == "endpoint":
        return EndpointGenerator(cfg)
    if cfg.generator == "model":
        model, tokenizer = _separate_model(cfg.generator_model, bench.placement)
        return LocalGenerator(model, tokenizer, f"{cfg.generator_model} (separate generator)")
    bench.use(current)
    if cfg.generator == "base":
        return LocalGenerator(bench.model, bench.tokenizer, "the frozen base model", True)
    return LocalGenerator(bench.model, bench.tokenizer, "the current global model")


def generator_note(cfg: SyntheticConfig) -> str:
    """What wrote the synthetic data, and where the records its prompts held went."""
    private = (
        f"instructions by DP few-shot generation ({cfg.dp_groups} groups, top {cfg.dp_top_k})"
        if cfg.dp
        else "instructions prompted with real records"
    )
    if cfg.generator == "endpoint":
        return (
            f"Synthetic data: {private}, written by {cfg.generator_model} at {cfg.generator_url}: "
            "every client sent its in-context examples (real records) to that server."
        )
    where = {
        "global": "the current global model (base + global adapter)",
        "base": "the frozen base model",
        "model": f"{cfg.generator_model}, a separate model on each client's machine",
    }[cfg.generator]
    return f"Synthetic data: {private}, written by {where}; no record left the client for it."


def _instruction_decoding(cfg: SyntheticConfig, batch_size: int = 0) -> DecodeConfig:
    return DecodeConfig(
        max_new_tokens=cfg.instruction_max_new_tokens,
        batch_size=batch_size or cfg.batch_size,
        temperature=cfg.instruction_temperature,
        stop=(TASK_HEADER,),
    )


def plain_instructions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    local: Sequence[Record],
    cfg: SyntheticConfig,
    seed: int,
) -> list[Generation]:
    """`cfg.per_round` instructions, each prompted with `icl_examples` random local records."""
    prompts = [tokenizer(p)["input_ids"] for p in instruction_prompts(local, cfg, seed)]
    return generate(
        model, tokenizer, prompts, _instruction_decoding(cfg), seed=seed, label="synthetic tasks"
    )


def private_instructions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    local: Sequence[Record],
    cfg: SyntheticConfig,
    seed: int,
    use: GaussianUse,
) -> list[Generation]:
    """`cfg.per_round` instructions by DP few-shot generation (see `silotune.data.dp_synthetic`):
    each from its own sample of `local`, its groups' prompts and the public one in one block."""
    rate = dp_synthetic.sample_rate(cfg, len(local))
    blocks: list[list[int]] = []
    for j in range(cfg.per_round):
        dealt = dp_synthetic.deal(
            len(local), rate, cfg.dp_groups, cfg.icl_examples, derive_seed(seed, "dp-deal", j)
        )
        groups = [[local[i] for i in g] for g in dealt]
        for demos in ([], *groups):  # the public prompt first
            blocks.append(tokenizer(self_instruct_prompt(demos))["input_ids"])
    block = cfg.dp_groups + 1
    vote = dp_synthetic.DPVote(
        cfg.dp_groups,
        cfg.dp_top_k,
        dp_synthetic.token_noise(cfg, use) * dp_synthetic.SENSITIVITY,
        derive_seed(seed, "dp-vote"),
    )
    # Whole blocks per batch, greedy: every row of a block takes the vote's token.
    decoding = replace(
        _instruction_decoding(cfg, block * max(1, cfg.batch_size // block)), temperature=0.0
    )
    out = generate(
        model,
        tokenizer,
        blocks,
        decoding,
        processors=LogitsProcessorList([vote]),
        label="private synthetic tasks",
    )
    return out[::block]
