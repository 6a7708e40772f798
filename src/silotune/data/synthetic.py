"""FedPIT self-generation: new instruction/response pairs from a client's own few examples.

Two steps per synthetic example, both by the generator (`data.generators`; by default the
current model):

    k random local examples ──▶ Self-Instruct-style prompt ──▶ new instruction (+ input)
    new instruction ──▶ the run's prompt style ──▶ response (greedy, repetition penalty)

then filters, each counted: unparseable, empty, truncated, too short, near-duplicate (ROUGE-L F of
the instruction against every local and already-kept instruction).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rouge_score import rouge_scorer

from silotune.config_sections import DataConfig
from silotune.config_synthetic import SyntheticConfig
from silotune.modeling.generation import Generation
from silotune.privacy.mechanisms import GaussianUse

if TYPE_CHECKING:
    from silotune.data.generators import Generator
    from silotune.evaluation.judge import Judge

Record = dict[str, str]
FILTERS = ("unparseable", "empty", "truncated", "too_short", "duplicate", "judge")
TASK_HEADER = "### Task"
_NO_INPUT = "<none>"
_HEADER = (
    "Here are example tasks from one domain. Each has an instruction and, if it needs one, an "
    "input. Write one new task for the same domain: a different question, in the same format.\n\n"
)


@dataclass(frozen=True)
class Candidate:
    """One generated example before filtering."""

    instruction: str
    input: str
    output: str
    instruction_finished: bool
    response_finished: bool


@dataclass
class SyntheticStats:
    """How many examples were generated, kept, and dropped by each filter."""

    generated: int = 0
    kept: int = 0
    dropped_by_filter: Counter[str] = field(default_factory=Counter)

    def add(self, other: SyntheticStats) -> None:
        """Accumulate another round's or client's counts."""
        self.generated += other.generated
        self.kept += other.kept
        self.dropped_by_filter.update(other.dropped_by_filter)

    def to_json(self) -> dict[str, object]:
        """As written to summary.json (every filter listed, zeros included)."""
        return {
            "generated": self.generated,
            "kept": self.kept,
            "dropped_by_filter": {name: self.dropped_by_filter[name] for name in FILTERS},
        }

    def to_metrics(self) -> dict[str, int]:
        """Flat counts for a Flower MetricRecord."""
        flat = {"synthetic_generated": self.generated, "synthetic_kept": self.kept}
        flat.update({f"dropped_{name}": self.dropped_by_filter[name] for name in FILTERS})
        return flat

    @classmethod
    def from_metrics(cls, metrics: dict[str, object]) -> SyntheticStats:
        """Inverse of to_metrics (missing counts, and any that is not a count, are 0: a hostile
        reply's `inf` must not crash the server)."""

        def count(key: str) -> int:
            value = metrics.get(key, 0)
            if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
                return int(value)
            return 0

        stats = cls(count("synthetic_generated"), count("synthetic_kept"))
        stats.dropped_by_filter.update({n: count(f"dropped_{n}") for n in FILTERS})
        return stats


def self_instruct_prompt(demos: Sequence[Record]) -> str:
    """The in-context prompt: numbered example tasks, then the header of a new one."""
    parts = [_HEADER]
    for i, rec in enumerate(demos, start=1):
        task_input = rec.get("input", "").strip() or _NO_INPUT
        parts.append(
            f"{TASK_HEADER} {i}\nInstruction: {rec['instruction'].strip()}\nInput: {task_input}\n\n"
        )
    parts.append(f"{TASK_HEADER} {len(demos) + 1}\nInstruction:")
    return "".join(parts)


def parse_task(text: str) -> tuple[str, str] | None:
    """(instruction, input) from the model's continuation of the prompt, or None if unparseable.

    The continuation should read ` <instruction>\nInput: <input or <none>>\n\n### Task ...`;
    the task block ends at the first blank line or the next task header.
    """
    block = text.split(TASK_HEADER, 1)[0].strip("\n").split("\n\n", 1)[0]
    lines = block.split("\n")
    instruction = lines[0].strip()
    if instruction.lower().startswith("input:"):
        return None
    task_input = ""
    if len(lines) > 1:
        if not lines[1].startswith("Input:"):
            return None
        task_input = "\n".join([lines[1].removeprefix("Input:"), *lines[2:]]).strip()
        if task_input == _NO_INPUT:
            task_input = ""
    return instruction, task_input


def task_complete(generation: Generation) -> bool:
    """The task block was finished: the model stopped, or closed the block with a blank line."""
    return generation.finished or "\n\n" in generation.text.strip("\n")


class NearDuplicates:
    """ROUGE-L F of a new instruction against every instruction seen so far."""

    def __init__(self, threshold: float, seen: Sequence[str]) -> None:
        self.threshold = threshold
        self.seen = list(seen)
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def is_duplicate(self, instruction: str) -> bool:
        """True when too close to something already seen; otherwise remember it."""
        for other in self.seen:
            if self._scorer.score(other, instruction)["rougeL"].fmeasure > self.threshold:
                return True
        self.seen.append(instruction)
        return False


def filter_candidates(
    candidates: Sequence[Candidate],
    local_instructions: Sequence[str],
    cfg: SyntheticConfig,
    judge: Judge | None = None,
) -> tuple[list[Record], SyntheticStats]:
    """Apply the filters in order; every dropped candidate is counted under its first failure.

    The judge filter (last, as it is the costly one) runs when `cfg.judge_min_score` > 0.
    """
    stats = SyntheticStats(generated=len(candidates))
    dedup = NearDuplicates(cfg.dedup_rouge_l, local_instructions)
    kept: list[Record] = []
    for c in candidates:
        reason = _rejection(c, cfg, dedup)
        if reason is None and judge is not None and cfg.judge_min_score > 0:
            score = judge.rate(c.instruction, c.output)
            if score is None or score < cfg.judge_min_score:
                reason = "judge"
        if reason is None:
            kept.append({"instruction": c.instruction, "input": c.input, "output": c.output})
        else:
            stats.dropped_by_filter[reason] += 1
    stats.kept = len(kept)
    return kept, stats


def _rejection(c: Candidate, cfg: SyntheticConfig, dedup: NearDuplicates) -> str | None:
    if not c.instruction.strip() or not c.output.strip():
        return "empty"
    # An unfinished task block is unreliable; a long response is only cut (policy decides).
    if not c.instruction_finished or (cfg.truncated == "drop" and not c.response_finished):
        return "truncated"
    if (
        len(c.instruction.split()) < cfg.min_instruction_words
        or len(c.output.split()) < cfg.min_response_words
    ):
        return "too_short"
    if dedup.is_duplicate(c.instruction):
        return "duplicate"
    return None


def self_generate(
    generator: Generator,
    local: Sequence[Record],
    cfg: SyntheticConfig,
    data: DataConfig,
    seed: int,
    judge: Judge | None = None,
    private: GaussianUse | None = None,
) -> tuple[list[Record], SyntheticStats]:
    """Generate `cfg.per_round` candidates from `local` with `generator`; filter them.

    With `private` (the round's planned use, see `dp_synthetic.generation_use`) the
    instructions are differentially private and no filter looks at `local`."""
    tasks = generator.instructions(local, cfg, seed, private)
    parsed = [(parse_task(t.text), task_complete(t)) for t in tasks]
    unparseable = sum(1 for p, _ in parsed if p is None)
    usable = [(p, done) for p, done in parsed if p is not None]
    answers = generator.responses([p for p, _ in usable], cfg, data)
    candidates = [
        Candidate(ins, inp, ans.text.strip(), done, ans.finished)
        for ((ins, inp), done), ans in zip(usable, answers, strict=True)
    ]
    # Under DP the near-duplicate filter sees only synthetic instructions: comparing them with
    # the records would make what is kept depend on the records.
    seen = [] if private is not None else [r["instruction"] for r in local]
    kept, stats = filter_candidates(candidates, seen, cfg, judge)
    stats.generated += unparseable
    stats.dropped_by_filter["unparseable"] += unparseable
    return kept, stats


def instruction_prompts(local: Sequence[Record], cfg: SyntheticConfig, seed: int) -> list[str]:
    """`cfg.per_round` in-context prompts, each of `icl_examples` random local records."""
    rng = random.Random(seed)
    k = min(cfg.icl_examples, len(local))
    return [self_instruct_prompt(rng.sample(list(local), k)) for _ in range(cfg.per_round)]
