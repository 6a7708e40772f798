"""Evaluate a (PEFT) causal LM on the fixed held-out set: loss, perplexity, ROUGE-L, accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from silotune.config_reporting import EvalConfig
from silotune.config_sections import DataConfig
from silotune.data.sft import IGNORE_INDEX, collate, encode_example, encode_prompt
from silotune.errors import DataError
from silotune.evaluation.intervals import ACCURACY, LOSS, ROUGE_L, TOKENS
from silotune.evaluation.metrics import rouge_scores
from silotune.modeling.generation import DecodeConfig, generate, pad_id
from silotune.modeling.placement import device_of
from silotune.progress import tick


@dataclass(frozen=True)
class EvalSet:
    """The held-out records, tokenised once for loss and for generation."""

    examples: list[tuple[list[int], list[int]]]
    prompts: list[list[int]]
    instructions: list[str]
    references: list[str]
    max_length: int = (
        0  # the run's data.max_length, which choice scoring cuts prompts to (0: no cut)
    )


@dataclass(frozen=True)
class EvalResult:
    """Held-out metrics of one model; rouge_l / accuracy are None without generation / choices."""

    eval_loss: float
    perplexity: float
    rouge_l: float | None
    samples: list[dict[str, str]] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)  # one per held-out record
    accuracy: float | None = None
    # Each held-out record's scores, in eval-set order (see silotune.evaluation.intervals).
    per_record: dict[str, list[float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The numeric metrics only."""
        out = {"eval_loss": self.eval_loss, "perplexity": self.perplexity}
        if self.rouge_l is not None:
            out["rouge_l"] = self.rouge_l
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
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
        max_length=data.max_length,
    )


def generates(cfg: EvalConfig, round_: int | None, rounds: int) -> bool:
    """Whether an evaluation at `round_` of `rounds` generates (None: a one-off evaluation, as
    of the base model, which always does when eval.generate is on)."""
    if not cfg.generate:
        return False
    if round_ is None or round_ >= rounds:
        return True
    return cfg.generate_every > 0 and round_ % cfg.generate_every == 0


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    eval_set: EvalSet,
    cfg: EvalConfig,
    n_samples: int = 3,
    generate_now: bool = True,
) -> EvalResult:
    """Held-out loss (token-weighted), perplexity, choice accuracy and ROUGE-L of generations
    (only when `generate_now`, on the first eval.generate_n records: see `generates`)."""
    model.eval()
    pad = pad_id(tokenizer)
    device = device_of(model)
    loss_sum, tokens = 0.0, 0
    record_loss: list[float] = []
    record_tokens: list[float] = []
    for start in range(0, len(eval_set.examples), cfg.batch_size):
        batch = collate(eval_set.examples[start : start + cfg.batch_size], pad).to(device)
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = out.logits[:, :-1].float()  # (b, t-1, v)
        targets = batch.labels[:, 1:]  # (b, t-1)
        nll = nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (b, t-1), 0 on prompt and padding
        # The headline sums the flat batch as before, so eval_loss keeps its exact value.
        loss_sum += float(
            nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        tokens += int((targets != IGNORE_INDEX).sum())
        record_loss += nll.sum(dim=1, dtype=torch.float64).tolist()
        record_tokens += (targets != IGNORE_INDEX).sum(dim=1).float().tolist()
        tick("held-out loss", len(record_loss), len(eval_set.examples))
    eval_loss = loss_sum / max(tokens, 1)
    per_record = {LOSS: record_loss, TOKENS: record_tokens}
    perplexity = math.exp(min(eval_loss, 50.0))
    acc = None
    if cfg.choices:
        correct = choice_correct(model, tokenizer, eval_set, cfg.choices, cfg.batch_size)
        acc = sum(correct) / len(correct) if correct else 0.0
        per_record[ACCURACY] = [float(c) for c in correct]
    if not (cfg.generate and generate_now):
        return EvalResult(eval_loss, perplexity, None, accuracy=acc, per_record=per_record)
    decode = DecodeConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    n = cfg.generate_n or len(eval_set.prompts)
    predictions = [
        g.text.strip()
        for g in generate(model, tokenizer, eval_set.prompts[:n], decode, label="held-out answers")
    ]
    instructions, references = eval_set.instructions[:n], eval_set.references[:n]
    samples = [
        {"instruction": i, "reference": r, "prediction": p}
        for i, r, p in list(zip(instructions, references, predictions, strict=True))[:n_samples]
    ]
    scores = rouge_scores(predictions, references)
    per_record[ROUGE_L] = scores
    score = float(sum(scores) / len(scores)) if scores else 0.0  # as metrics.rouge_l averages
    return EvalResult(eval_loss, perplexity, score, samples, predictions, acc, per_record)


@torch.no_grad()
def choice_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    eval_set: EvalSet,
    choices: Sequence[str],
    batch_size: int,
) -> float:
    """Fraction of items whose most likely choice (summed log-likelihood) is the reference."""
    correct = choice_correct(model, tokenizer, eval_set, choices, batch_size)
    return sum(correct) / len(correct) if correct else 0.0


@torch.no_grad()
def choice_correct(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    eval_set: EvalSet,
    choices: Sequence[str],
    batch_size: int,
) -> list[bool]:
    """Per item: whether its most likely choice (summed log-likelihood) is the reference.

    Only `model(input_ids=..., attention_mask=...).logits` is used, never `generate`, so a
    split-learning wrapper with just a forward pass can be scored too.
    """
    wanted = [c.strip() for c in choices]
    unknown = sorted({r.strip() for r in eval_set.references} - set(wanted))
    if unknown:
        raise DataError(
            f"held-out outputs {', '.join(map(repr, unknown[:5]))} are not among eval.choices "
            f"({', '.join(wanted)}); map outputs onto the choices with data.output_map"
        )
    model.eval()
    pad = pad_id(tokenizer)
    # A choice is encoded as encode_example encodes a training response: its own tokens (no
    # special tokens) + EOS, after the prompt tokens, so "no" cannot win as a prefix of "not".
    # The prompt keeps its end to fit max_length as in training, but no choice token is ever cut
    # (encode_example would keep only 8 of a long response; choices must be scored whole).
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in wanted]
    if tokenizer.eos_token_id is not None:
        choice_ids = [[*ids, tokenizer.eos_token_id] for ids in choice_ids]
    rows = []  # (ids, labels) per (item, choice), item-major
    for prompt in eval_set.prompts:
        for response in choice_ids:
            room = max(eval_set.max_length - len(response), 1)
            kept = prompt[-room:] if eval_set.max_length else prompt
            rows.append(([*kept, *response], [IGNORE_INDEX] * len(kept) + response))
    scores = torch.tensor([-total for total, _ in response_nll(model, rows, pad, batch_size)])
    by_item = scores.view(len(eval_set.prompts), len(choices))  # (n, c)
    predicted = [wanted[i] for i in by_item.argmax(dim=1).tolist()]
    return [p == r.strip() for p, r in zip(predicted, eval_set.references, strict=True)]


@torch.no_grad()
def response_nll(
    model: nn.Module, rows: list[tuple[list[int], list[int]]], pad: int, batch_size: int
) -> list[tuple[float, int]]:
    """Per (ids, labels) row: the summed next-token loss over its labelled tokens, and their
    count. Only `model(input_ids=..., attention_mask=...).logits` is used."""
    out: list[tuple[float, int]] = []
    device = device_of(model)
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        targets = batch.labels[:, 1:]  # (b, t-1)
        nll = nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2),  # (b, v, t-1)
            targets,
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )  # (b, t-1), 0 on prompt and padding
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        out.extend(zip(nll.sum(dim=1).tolist(), counts.tolist(), strict=True))
    return out
