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
from typing import Literal, Protocol

import torch

from silotune.config import JudgeConfig, ModelConfig
from silotune.errors import ConfigError
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


@dataclass(frozen=True)
class JudgeResult:
    """Bilateral win rate of candidates over references, and how often the judge was unreadable."""

    win_rate: float
    items: int
    unparsed: int
    judge: str


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

    def __init__(self, cfg: JudgeConfig) -> None:
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
        response = self._client.chat.completions.create(
            model=self._model,
            messages=[
                {"role": "system", "content": _SYSTEM},
                {"role": "user", "content": judge_prompt(question, first, second)},
            ],
            temperature=0,
            max_tokens=4,
        )
        return parse_verdict(response.choices[0].message.content or "")


class LocalJudge:
    """A causal LM on this machine: compares the next-token scores of `1` and `2`."""

    def __init__(self, cfg: JudgeConfig) -> None:
        from silotune.modeling.load import load_model, load_tokenizer, resolve_model

        source = resolve_model(ModelConfig(name=cfg.local_model))
        self._model = load_model(source)
        self._tokenizer = load_tokenizer(source)
        self._options = [self._token_id("1"), self._token_id("2")]
        weak = " — a small model, a weak judge" if "135m" in cfg.local_model.lower() else ""
        self.label = f"{cfg.local_model} (local{weak})"

    def _token_id(self, text: str) -> int:
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return int(ids[-1])

    @torch.no_grad()
    def compare(self, question: str, first: str, second: str) -> Verdict | None:
        """Pick the answer number the model finds more likely next."""
        messages = [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": judge_prompt(question, first, second)},
        ]
        if self._tokenizer.chat_template:
            text = self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        else:
            text = judge_prompt(question, first, second)
        ids = self._tokenizer(str(text), add_special_tokens=False, return_tensors="pt")
        logits = self._model(input_ids=ids["input_ids"]).logits[0, -1]  # (v,)
        one, two = (float(logits[i]) for i in self._options)
        if one == two:
            return "tie"
        return "first" if one > two else "second"


JUDGES: Registry[Callable[[JudgeConfig], Judge]] = Registry("judge")
JUDGES.register("openai")(OpenAIJudge)
JUDGES.register("local")(LocalJudge)


def build_judge(cfg: JudgeConfig) -> Judge:
    """The configured judge (`kind` must not be "none")."""
    return JUDGES.get(cfg.kind)(cfg)
