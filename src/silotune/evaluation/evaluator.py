"""Evaluate a (PEFT) causal LM on the fixed held-out set: loss, perplexity, ROUGE-L."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from silotune.config import DataConfig, EvalConfig
from silotune.data.sft import IGNORE_INDEX, collate, encode_example, encode_prompt
from silotune.evaluation.metrics import rouge_l
from silotune.modeling.generation import DecodeConfig, generate, pad_id


@dataclass(frozen=True)
class EvalSet:
    """The held-out records, tokenised once for loss and for generation."""

    examples: list[tuple[list[int], list[int]]]
    prompts: list[list[int]]
    instructions: list[str]
    references: list[str]


@dataclass(frozen=True)
class EvalResult:
    """Held-out metrics of one model; rouge_l is None when generation is off."""

    eval_loss: float
    perplexity: float
    rouge_l: float | None
    samples: list[dict[str, str]] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)  # one per held-out record

    def metrics(self) -> dict[str, float]:
        """The numeric metrics only."""
        out = {"eval_loss": self.eval_loss, "perplexity": self.perplexity}
        if self.rouge_l is not None:
            out["rouge_l"] = self.rouge_l
        return out


def build_eval_set(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, data: DataConfig
) -> EvalSet:
    """Tokenise the held-out records with the run's prompt style and length limit."""
    examples, prompts = [], []
    for r in dataset:
        examples.append(
            encode_example(
                tokenizer,
                data.prompt_style,
                r["instruction"],
                r["input"],
                r["output"],
                data.max_length,
            )
        )
        prompts.append(encode_prompt(tokenizer, data.prompt_style, r["instruction"], r["input"]))
    return EvalSet(
        examples=examples,
        prompts=prompts,
        instructions=list(dataset["instruction"]),
        references=list(dataset["output"]),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    eval_set: EvalSet,
    cfg: EvalConfig,
    n_samples: int = 3,
) -> EvalResult:
    """Token-weighted held-out loss, its perplexity, and ROUGE-L of greedy generations."""
    model.eval()
    pad = pad_id(tokenizer)
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(eval_set.examples), cfg.batch_size):
        batch = collate(eval_set.examples[start : start + cfg.batch_size], pad)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = out.logits[:, :-1].float()  # (b, t-1, v)
        targets = batch.labels[:, 1:]  # (b, t-1)
        loss_sum += float(
            nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        tokens += int((targets != IGNORE_INDEX).sum())
    eval_loss = loss_sum / max(tokens, 1)
    perplexity = math.exp(min(eval_loss, 50.0))
    if not cfg.generate:
        return EvalResult(eval_loss, perplexity, None)
    decode = DecodeConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    predictions = [g.text.strip() for g in generate(model, tokenizer, eval_set.prompts, decode)]
    samples = [
        {"instruction": i, "reference": r, "prediction": p}
        for i, r, p in list(
            zip(eval_set.instructions, eval_set.references, predictions, strict=True)
        )[:n_samples]
    ]
    score = rouge_l(predictions, eval_set.references)
    return EvalResult(eval_loss, perplexity, score, samples, predictions)
