"""Supervised fine-tuning examples: prompt tokens masked with -100; response + EOS learned."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from silotune.config_sections import PromptStyle
from silotune.data.prompts import build_prompt

IGNORE_INDEX = -100
# Tokens of the response kept at least, when a long prompt has to be cut.
_MIN_RESPONSE_TOKENS = 8


@dataclass(frozen=True)
class Batch:
    """A right-padded training batch."""

    input_ids: torch.Tensor  # (b, t)
    attention_mask: torch.Tensor  # (b, t)
    labels: torch.Tensor  # (b, t), IGNORE_INDEX on prompt and padding

    def to(self, device: torch.device) -> Batch:
        """The same batch on `device` (itself when it is already there)."""
        if self.input_ids.device == device:
            return self
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    instruction: str,
    input_text: str,
    output: str,
    max_length: int,
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record; the prompt keeps its end if it must be cut."""
    prompt_ids = encode_prompt(tokenizer, style, instruction, input_text)
    response_ids = tokenizer(output, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    room_for_prompt = max_length - min(len(response_ids), _MIN_RESPONSE_TOKENS)
    if len(prompt_ids) > room_for_prompt:
        prompt_ids = prompt_ids[len(prompt_ids) - room_for_prompt :]
    response_ids = response_ids[: max_length - len(prompt_ids)]
    ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return ids, labels


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, style: PromptStyle, instruction: str, input_text: str
) -> list[int]:
    """Token ids of the prompt alone (what generation starts from)."""
    prompt = build_prompt(style, tokenizer, instruction, input_text)
    # Chat templates already spell out their special tokens; Alpaca text gets the usual BOS.
    ids: list[int] = tokenizer(prompt, add_special_tokens=style == "alpaca")["input_ids"]
    return ids


def tokenize_dataset(
    dataset: Iterable[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    max_length: int,
) -> list[tuple[list[int], list[int]]]:
    """Encode every record (instruction/input/output) of a dataset or a list of records."""
    return [
        encode_example(tokenizer, style, r["instruction"], r["input"], r["output"], max_length)
        for r in dataset
    ]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-pad a list of (ids, labels) into a Batch."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return Batch(input_ids, mask, labels)


def batch_stream(
    examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int
) -> Iterator[Batch]:
    """Endless shuffled batches (a new permutation per epoch), deterministic by seed."""
    if not examples:
        raise ValueError("no examples to train on")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield collate([examples[i] for i in chunk], pad_id)
