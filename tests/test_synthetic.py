"""FedPIT self-generation: prompt format, parsing, and every filter on crafted generations."""

from __future__ import annotations

from silotune.config_synthetic import SyntheticConfig
from silotune.data.synthetic import (
    FILTERS,
    Candidate,
    SyntheticStats,
    filter_candidates,
    parse_task,
    self_instruct_prompt,
    task_complete,
)
from silotune.modeling.generation import Generation

LOCAL = ["What are the symptoms of asthma ?", "How is gout diagnosed ?"]
CFG = SyntheticConfig(min_instruction_words=3, min_response_words=5, dedup_rouge_l=0.7)


def _c(
    instruction: str,
    output: str = "Rest, fluids and a visit to a doctor help most people.",
    *,
    done: bool = True,
) -> Candidate:
    return Candidate(instruction, "", output, instruction_finished=True, response_finished=done)


def test_prompt_numbers_examples_and_opens_a_new_task() -> None:
    prompt = self_instruct_prompt(
        [{"instruction": "Q one?", "input": ""}, {"instruction": "Q two?", "input": "ctx"}]
    )
    assert "### Task 1\nInstruction: Q one?\nInput: <none>\n\n" in prompt
    assert "### Task 2\nInstruction: Q two?\nInput: ctx\n\n" in prompt
    assert prompt.endswith("### Task 3\nInstruction:")


def test_parse_task() -> None:
    assert parse_task(" What causes anemia ?\nInput: <none>\n\n### Task 4") == (
        "What causes anemia ?",
        "",
    )
    assert parse_task(" Summarise this.\nInput: The patient has a cough.\n\n") == (
        "Summarise this.",
        "The patient has a cough.",
    )
    assert parse_task(" What is lupus ?") == ("What is lupus ?", "")
    assert parse_task(" What is lupus ?\nSome rambling that is not an input") is None
    assert parse_task("Input: only an input") is None
    assert parse_task("\n\n") == ("", "")


def test_task_complete() -> None:
    assert task_complete(Generation(" Q?\nInput: <none>\n\nmore", finished=False))
    assert task_complete(Generation(" Q?", finished=True))
    assert not task_complete(Generation(" Q? and it goes on and on", finished=False))


def test_each_filter_drops_and_counts() -> None:
    candidates = [
        _c("What are the treatments for migraine ?"),  # kept
        _c("", "An answer long enough to pass."),  # empty instruction
        _c("What is the outlook for kidney stones ?", ""),  # empty response
        _c("What is the outlook for a stroke ?", "It depends on many", done=False),  # truncated
        _c("Define it", "Short answer that passes the length check."),  # too short instruction
        _c("What causes high blood pressure ?", "Salt."),  # too short response
        _c("What are the symptoms of asthma ?"),  # duplicate of a local instruction
        _c("What are the treatments for a migraine ?"),  # near-duplicate of the kept one
    ]
    kept, stats = filter_candidates(candidates, LOCAL, CFG)
    assert [k["instruction"] for k in kept] == ["What are the treatments for migraine ?"]
    assert stats.generated == 8 and stats.kept == 1
    assert dict(stats.dropped_by_filter) == {
        "empty": 2,
        "truncated": 1,
        "too_short": 2,
        "duplicate": 2,
    }


def test_truncated_responses_can_be_kept_and_dedup_can_be_disabled() -> None:
    cfg = SyntheticConfig(truncated="keep", dedup_rouge_l=1.0, min_response_words=1)
    candidates = [_c("What is the outlook for a stroke ?", "It depends", done=False)] * 2
    unfinished_task = Candidate("What is the outlook", "", "An answer.", False, True)
    kept, stats = filter_candidates([*candidates, unfinished_task], LOCAL, cfg)
    assert len(kept) == 2 and stats.kept == 2
    assert stats.dropped_by_filter["truncated"] == 1, "an unfinished instruction is always dropped"


def test_stats_round_trip_through_metrics_and_add_up() -> None:
    _, stats = filter_candidates([_c(""), _c("What are the treatments for gout ?")], LOCAL, CFG)
    again = SyntheticStats.from_metrics(dict(stats.to_metrics()))
    assert again.to_json() == stats.to_json()
    total = SyntheticStats()
    total.add(stats)
    total.add(again)
    assert total.generated == 4 and total.kept == 2
    assert set(total.to_json()["dropped_by_filter"]) == set(FILTERS)  # type: ignore[arg-type]


class _ScoringJudge:
    """Rates an answer 1.0 when it mentions a doctor, 0.2 otherwise; None for `???`."""

    label = "test judge"

    def compare(self, question: str, first: str, second: str) -> None:
        return None

    def rate(self, question: str, answer: str) -> float | None:
        if "???" in answer:
            return None
        return 1.0 if "doctor" in answer else 0.2


def test_judge_filter_drops_low_and_unreadable_ratings() -> None:
    candidates = [
        _c("What are the treatments for migraine ?", "See a doctor about triptans and rest."),
        _c("What causes kidney stones in adults ?", "Minerals crystallise in concentrated urine."),
        _c("How is anemia diagnosed in children ?", "??? a blood test can show it clearly"),
    ]
    cfg = SyntheticConfig(judge_min_score=0.5)
    kept, stats = filter_candidates(candidates, LOCAL, cfg, judge=_ScoringJudge())
    assert [k["instruction"] for k in kept] == ["What are the treatments for migraine ?"]
    assert stats.dropped_by_filter["judge"] == 2
    # Off by default: the same candidates all pass without a judge score threshold.
    kept, _ = filter_candidates(candidates, LOCAL, SyntheticConfig(), judge=_ScoringJudge())
    assert len(kept) == 3
