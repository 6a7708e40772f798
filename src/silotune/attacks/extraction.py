"""Training-data extraction: can whoever holds the shared adapter make it recite private records?

For each sampled record the adversary prompts the model two ways and decodes greedily:
- `instruction`: the record's own prompt (what a curious participant would type);
- `prefix`: the prompt plus the first `prefix_fraction` of the true response tokens (the
  classic extraction setting, where the adversary knows how a record starts).
Each continuation is scored against the true (rest of the) response: ROUGE-L F, the share of
its tokens reproduced verbatim from the start, and whether ROUGE-L reaches `rouge_threshold`.
The same is done for non-members; leakage is the members' score minus the non-members', with
a 95 % interval, so text the model can write about any record of the domain is not counted.
`versus_base` goes one step further and compares with the base model record by record.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from silotune.config_federation import AttackConfig
from silotune.config_sections import DataConfig
from silotune.data.sft import IGNORE_INDEX, encode_example
from silotune.data.synthetic import Record
from silotune.evaluation.metrics import rouge_scores
from silotune.modeling.generation import DecodeConfig, generate

PROMPTS = ("instruction", "prefix")
SCORES = ("rouge_l", "prefix_match", "extracted")


@dataclass(frozen=True)
class Probe:
    """One prompt to decode from and the text a leaky model would continue with."""

    prompt: list[int]
    reference: str


def probes(
    records: list[Record],
    tokenizer: PreTrainedTokenizerBase,
    data: DataConfig,
    kind: str,
    fraction: float,
    max_new_tokens: int,
) -> list[Probe]:
    """The prompts of one kind for `records`, tokenised exactly as the run trained on them; the
    reference is the next `max_new_tokens` tokens of the response that was trained on."""
    out = []
    for r in records:
        ids, labels = encode_example(
            tokenizer, data.prompt_style, r["instruction"], r["input"], r["output"], data.max_length
        )
        start = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids))
        response = [t for t in ids[start:] if t != tokenizer.eos_token_id]
        given = 0
        if kind == "prefix" and len(response) > 1:
            given = min(max(1, math.ceil(fraction * len(response))), len(response) - 1)
        rest = response[given : given + max_new_tokens]
        out.append(
            Probe(ids[: start + given], str(tokenizer.decode(rest, skip_special_tokens=True)))
        )
    return out


def score(
    continuations: list[str],
    references: list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    threshold: float,
) -> dict[str, list[float]]:
    """Per-record scores of continuations against the true text."""
    rouge = rouge_scores(continuations, references)
    prefix = []
    for text, ref in zip(continuations, references, strict=True):
        got = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        want = tokenizer(ref.strip(), add_special_tokens=False)["input_ids"][:max_new_tokens]
        same = 0
        for a, b in zip(got, want, strict=False):
            if a != b:
                break
            same += 1
        prefix.append(same / len(want) if want else 0.0)
    return {
        "rouge_l": rouge,
        "prefix_match": prefix,
        "extracted": [float(r >= threshold) for r in rouge],
    }


def compare(members: dict[str, list[float]], others: dict[str, list[float]]) -> dict[str, Any]:
    """Mean member and non-member scores, and the excess with its 95 % interval half-width."""
    out: dict[str, Any] = {}
    for name in SCORES:
        m, n = members[name], others[name]
        excess = statistics.fmean(m) - statistics.fmean(n)
        spread = math.sqrt(_var(m) / len(m) + _var(n) / len(n))
        out[name] = {
            "members": round(statistics.fmean(m), 4),
            "non_members": round(statistics.fmean(n), 4),
            "excess": round(excess, 4),
            "ci95": round(1.96 * spread, 4),
        }
    return out


def extraction_attack(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    members: list[Record],
    non_members: list[Record],
    data: DataConfig,
    cfg: AttackConfig,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Both prompt kinds on members and non-members: scores, excess, the best-leaking records."""
    decode = DecodeConfig(max_new_tokens=cfg.max_new_tokens, batch_size=batch_size)
    result: dict[str, Any] = {}
    for kind in PROMPTS:
        scored = []
        for records in (members, non_members):
            ps = probes(records, tokenizer, data, kind, cfg.prefix_fraction, cfg.max_new_tokens)
            prompts = [p.prompt for p in ps]
            texts = [
                g.text for g in generate(model, tokenizer, prompts, decode, label="extraction")
            ]
            refs = [p.reference for p in ps]
            scored.append(
                (
                    score(texts, refs, tokenizer, cfg.max_new_tokens, cfg.rouge_threshold),
                    texts,
                    refs,
                )
            )
        (mem, texts, refs), (non, _, _) = scored
        top = sorted(range(len(members)), key=lambda i: -mem["rouge_l"][i])[:3]
        result[kind] = {
            **compare(mem, non),
            "scores": {"members": mem, "non_members": non},  # per record, for paired comparisons
            "examples": [
                {
                    "instruction": members[i]["instruction"],
                    "true": refs[i][:300],
                    "generated": texts[i][:300],
                    "rouge_l": round(mem["rouge_l"][i], 4),
                }
                for i in top
            ],
        }
    return result


def versus_base(tuned: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The tuned model's excess over the base model's, record by record (same records, same
    prompts): what tuning added to members beyond what it added to non-members. This also
    cancels any difference between the member and non-member records themselves."""
    out: dict[str, Any] = {}
    for name in SCORES:
        diffs = [
            [
                t - b
                for t, b in zip(
                    tuned["scores"][side][name], base["scores"][side][name], strict=True
                )
            ]
            for side in ("members", "non_members")
        ]
        m, n = diffs
        out[name] = {
            "excess": round(statistics.fmean(m) - statistics.fmean(n), 4),
            "ci95": round(1.96 * math.sqrt(_var(m) / len(m) + _var(n) / len(n)), 4),
        }
    return out


def _var(xs: list[float]) -> float:
    return statistics.variance(xs) if len(xs) > 1 else 0.0
