"""The bilateral judge (FedPIT's protocol): is the tuned model's answer better than the reference?

Each item is judged twice, once with the model's answer first and once with it second, so a judge
that favours a position cancels out. Per order: win = 1, tie = 0.5, loss = 0; the item's score is
the mean of both orders, and the win rate the mean over items.

Judges: any OpenAI-compatible chat endpoint (`openai`), or a causal LM on this machine (`local`;
the packaged default is small and a weak judge, labelled as such in reports).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal, Protocol

import torch

from silotune.config import Config
from silotune.config_reporting import JudgeConfig
from silotune.config_sections import ModelConfig
from silotune.errors import ConfigError
from silotune.modeling.placement import Placement, device_of, resolve_placement
from silotune.registry import Registry

Verdict = Literal["first", "second", "tie"]
_SCORE_FIRST: dict[Verdict, float] = {"first": 1.0, "tie": 0.5, "second": 0.0}
_SYSTEM = "You are a careful judge of answers to questions. You reply with one token only."
_PROMPT = (
    "Question:\n{question}\n\nAnswer 1:\n{first}\n\nAnswer 2:\n{second}\n\n"
    "Which answer is more correct, complete and helpful? Reply with exactly one of: 1, 2, tie."
)


class Judge(Protocol):
    """Compares two answers to one question."""

    label: str

    def compare(self, question: str, first: str, second: str) -> Verdict | None:
        """The better answer (first, second, tie); None when the judge's reply was unreadable."""
        ...

    def rate(self, question: str, answer: str) -> float | None:
        """How good one answer is, from 0 to 1; None when the judge's reply was unreadable."""
        ...


@dataclass(frozen=True)
class JudgeResult:
    """Bilateral win rate of candidates over references, and how often the judge was unreadable."""

    win_rate: float
    items: int
    unparsed: int
    judge: str


_RATE_PROMPT = (
    "Question:\n{question}\n\nAnswer:\n{answer}\n\n"
    "Rate how correct, complete and helpful the answer is, from 1 (useless) to 10 (excellent). "
    "Reply with the number only."
)
_YES_NO_PROMPT = (
    "Question:\n{question}\n\nAnswer:\n{answer}\n\n"
    "Is this a correct and helpful answer to the question? Reply with yes or no."
)


def parse_rating(reply: str) -> float | None:
    """The first whole number 1..10 in a reply, scaled to 0..1."""
    found = re.search(r"\b(10|[1-9])\b", reply)
    return None if found is None else (int(found.group(1)) - 1) / 9


def judge_prompt(question: str, first: str, second: str) -> str:
    """The user message both judges receive."""
    return _PROMPT.format(question=question, first=first, second=second)


def parse_verdict(reply: str) -> Verdict | None:
    """The first `1`, `2` or `tie` in a reply (e.g. "Answer 2." -> second), or None."""
    found = re.search(r"\b(1|2|tie)\b", reply.lower())
    if found is None:
        return None
    return {"1": "first", "2": "second", "tie": "tie"}[found.group(1)]  # type: ignore[return-value]


def bilateral_win_rate(
    judge: Judge,
    questions: Sequence[str],
    candidates: Sequence[str],
    references: Sequence[str],
) -> JudgeResult:
    """Win rate of `candidates` over `references`, judged in both orders."""
    if not (len(questions) == len(candidates) == len(references)) or not questions:
        raise ValueError("need the same, non-zero number of questions, candidates and references")
    unparsed = 0
    total = 0.0
    for question, candidate, reference in zip(questions, candidates, references, strict=True):
        scores = []
        for first, second, candidate_first in (
            (candidate, reference, True),
            (reference, candidate, False),
        ):
            verdict = judge.compare(question, first, second)
            if verdict is None:  # an unreadable reply counts as a tie, and is reported
                unparsed += 1
                verdict = "tie"
            score = _SCORE_FIRST[verdict]
            scores.append(score if candidate_first else 1.0 - score)
        total += sum(scores) / 2
    return JudgeResult(total / len(questions), len(questions), unparsed, judge.label)


class OpenAIJudge:
    """A judge behind any OpenAI-compatible chat-completions endpoint."""

    def __init__(self, cfg: JudgeConfig, placement: Placement | None = None) -> None:
        from openai import OpenAI

        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ConfigError(
                f"judge.kind = 'openai' reads its API key from ${cfg.api_key_env}, which is not "
                "set; export it or set judge.api_key_env to the variable that holds it"
            )
        self._client = OpenAI(
            api_key=key, base_url=cfg.base_url or None, timeout=cfg.timeout_s, max_retries=2
        )
        self._model = cfg.model
        self.label = f"{cfg.model} (OpenAI-compatible endpoint)"

    def compare(self, question: str, first: str, second: str) -> Verdict | None:
        """Ask the endpoint, deterministically (temperature 0)."""
        return parse_verdict(self._ask(judge_prompt(question, first, second)))

    def rate(self, question: str, answer: str) -> float | None:
        """Ask for a 1..10 rating."""
        return parse_rating(self._ask(_RATE_PROMPT.format(question=question, answer=answer)))

    def _ask(self, prompt: str) -> str:
        response = self._client.chat.completions.create(
            model=self._model,
            messages=[{"role": "system", "content": _SYSTEM}, {"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=4,
        )
        return response.choices[0].message.content or ""


class LocalJudge:
    """A causal LM on this machine: compares the next-token scores of `1` and `2`. It is placed
    as the run's base model is (`placement`: device, dtype, quantization), else fp32 on the CPU."""

    def __init__(self, cfg: JudgeConfig, placement: Placement | None = None) -> None:
        from silotune.modeling.load import load_model, load_tokenizer, resolve_model

        source = resolve_model(ModelConfig(name=cfg.local_model))
        self._model = load_model(source, placement)
        self._tokenizer = load_tokenizer(source)
        self._options = [self._token_id("1"), self._token_id("2")]
        self._yes_no = [self._token_id("yes"), self._token_id("no")]
        weak = " — a small model, a weak judge" if "135m" in cfg.local_model.lower() else ""
        self.label = f"{cfg.local_model} (local{weak})"

    def _token_id(self, text: str) -> int:
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return int(ids[-1])

    def compare(self, question: str, first: str, second: str) -> Verdict | None:
        """Pick the answer number the model finds more likely next."""
        one, two = self._next_token_logits(judge_prompt(question, first, second), self._options)
        if one == two:
            return "tie"
        return "first" if one > two else "second"

    def rate(self, question: str, answer: str) -> float | None:
        """The probability of `yes` against `no` for "is this a correct and helpful answer?"."""
        prompt = _YES_NO_PROMPT.format(question=question, answer=answer)
        yes, no = self._next_token_logits(prompt, self._yes_no)
        return float(torch.sigmoid(torch.tensor(yes - no)))

    @torch.no_grad()
    def _next_token_logits(self, prompt: str, token_ids: list[int]) -> list[float]:
        messages = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": prompt}]
        text = prompt
        if self._tokenizer.chat_template:
            text = str(
                self._tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            )
        ids = self._tokenizer(text, add_special_tokens=False, return_tensors="pt")
        input_ids = ids["input_ids"].to(device_of(self._model))
        logits = self._model(input_ids=input_ids).logits[0, -1]  # (v,)
        return [float(logits[i]) for i in token_ids]


JUDGES: Registry[Callable[[JudgeConfig, Placement | None], Judge]] = Registry("judge")
JUDGES.register("openai")(OpenAIJudge)
JUDGES.register("local")(LocalJudge)


def build_judge(cfg: JudgeConfig, placement: Placement | None = None) -> Judge:
    """The configured judge (`kind` must not be "none"); a local one placed as `placement`."""
    return JUDGES.get(cfg.kind)(cfg, placement)


@cache
def synthetic_judge(cfg: JudgeConfig, placement: Placement) -> Judge:
    """The judge that rates self-generated answers, built once per process."""
    return build_judge(cfg, placement)


def filter_judge(cfg: Config) -> Judge | None:
    """The judge for the synthetic-data filter, or None when that filter is off."""
    if cfg.synthetic.judge_min_score <= 0:
        return None
    return synthetic_judge(cfg.judge, resolve_placement(cfg))
