"""The bilateral judge against a fake OpenAI-compatible server on loopback (no client mocks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from silotune.config import load_config
from silotune.config_reporting import JudgeConfig
from silotune.errors import ConfigError
from silotune.evaluation.judge import (
    LocalJudge,
    OpenAIJudge,
    bilateral_win_rate,
    build_judge,
    parse_rating,
    parse_verdict,
)

from .fake_openai import fake_openai

Policy = Callable[[str], str]


def prefers_marked(prompt: str) -> str:
    """A fair judge: the answer that says GOOD wins; tie when both or neither do."""
    first = prompt.split("Answer 1:\n", 1)[1].split("\n\nAnswer 2:", 1)[0]
    second = prompt.split("Answer 2:\n", 1)[1].split("\n\nWhich answer", 1)[0]
    if ("GOOD" in first) == ("GOOD" in second):
        return "tie"
    return "1" if "GOOD" in first else "2"


@pytest.fixture
def judge_server() -> Iterator[tuple[str, list[dict[str, object]], list[Policy]]]:
    policy: list[Policy] = [prefers_marked]
    with fake_openai(lambda _, body, __: policy[0](body["messages"][-1]["content"])) as (url, seen):
        yield url, seen, policy


@pytest.fixture
def judge(
    judge_server: tuple[str, list[dict[str, object]], list[Policy]],
    monkeypatch: pytest.MonkeyPatch,
) -> OpenAIJudge:
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    cfg = JudgeConfig(
        kind="openai", base_url=judge_server[0], model="fake-judge", api_key_env="TEST_JUDGE_KEY"
    )
    built = build_judge(cfg)
    assert isinstance(built, OpenAIJudge)
    return built


QUESTIONS = ["What causes gout?", "What is asthma?"]
REFERENCES = ["Uric acid crystals.", "A lung disease."]


def test_both_orders_are_asked_with_the_key(
    judge: OpenAIJudge, judge_server: tuple[str, list[dict[str, object]], list[Policy]]
) -> None:
    result = bilateral_win_rate(judge, QUESTIONS[:1], ["GOOD answer"], REFERENCES[:1])
    _, seen, _ = judge_server
    assert len(seen) == 2
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sk-test" for r in seen)
    assert all(r["model"] == "fake-judge" and r["temperature"] == 0 for r in seen)
    prompts = [r["messages"][-1]["content"] for r in seen]  # type: ignore[index]
    assert "Answer 1:\nGOOD answer" in prompts[0] and "Answer 2:\nGOOD answer" in prompts[1]
    assert result.win_rate == 1.0 and result.items == 1 and result.unparsed == 0


def test_win_loss_and_tie_scores(judge: OpenAIJudge) -> None:
    assert bilateral_win_rate(judge, QUESTIONS, ["GOOD a", "GOOD b"], REFERENCES).win_rate == 1.0
    assert (
        bilateral_win_rate(judge, QUESTIONS, ["bad", "bad"], ["GOOD r", "GOOD s"]).win_rate == 0.0
    )
    assert (
        bilateral_win_rate(judge, QUESTIONS, ["same", "GOOD"], ["same", "plain"]).win_rate == 0.75
    )


def test_order_swap_cancels_a_position_bias(
    judge: OpenAIJudge, judge_server: tuple[str, list[dict[str, object]], list[Policy]]
) -> None:
    judge_server[2][0] = lambda prompt: "1"  # always prefers whatever comes first
    assert bilateral_win_rate(judge, QUESTIONS, ["GOOD a", "bad"], REFERENCES).win_rate == 0.5


def test_unreadable_replies_count_as_ties_and_are_reported(
    judge: OpenAIJudge, judge_server: tuple[str, list[dict[str, object]], list[Policy]]
) -> None:
    judge_server[2][0] = lambda prompt: "I cannot decide."
    result = bilateral_win_rate(judge, QUESTIONS, ["GOOD a", "GOOD b"], REFERENCES)
    assert result.win_rate == 0.5 and result.unparsed == 4


def test_rating_through_the_endpoint(
    judge: OpenAIJudge, judge_server: tuple[str, list[dict[str, object]], list[Policy]]
) -> None:
    judge_server[2][0] = lambda prompt: "7" if "from 1 (useless) to 10" in prompt else "?"
    assert judge.rate("What causes gout?", "Uric acid.") == pytest.approx(6 / 9)
    judge_server[2][0] = lambda prompt: "no idea"
    assert judge.rate("What causes gout?", "Uric acid.") is None


def test_parse_rating() -> None:
    assert parse_rating("10") == 1.0
    assert parse_rating("Score: 1/10") == 0.0
    assert parse_rating("none") is None


def test_parse_verdict() -> None:
    assert parse_verdict("1") == "first"
    assert parse_verdict(" Answer 2.") == "second"
    assert parse_verdict("Tie") == "tie"
    assert parse_verdict("neither") is None


def test_missing_key_and_model_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match=r"\$NO_SUCH_KEY_VAR"):
        OpenAIJudge(JudgeConfig(kind="openai", model="m", api_key_env="NO_SUCH_KEY_VAR"))
    with pytest.raises(ConfigError, match=r"needs judge\.model"):
        load_config(None, ["judge.kind='openai'"])
    with pytest.raises(ConfigError, match=r"set eval\.generate = true"):
        load_config(None, ["judge.kind='local'", "eval.generate=false"])
    with pytest.raises(ConfigError, match=r"judge_min_score needs a judge"):
        load_config(None, ["synthetic.judge_min_score=0.5"])


def test_local_judge_scores_both_orders() -> None:
    local = LocalJudge(JudgeConfig(kind="local", local_model="tiny-llama"))
    result = bilateral_win_rate(local, QUESTIONS, ["an answer", "another"], REFERENCES)
    assert 0.0 <= result.win_rate <= 1.0 and result.items == 2
    rating = local.rate(QUESTIONS[0], "an answer")
    assert rating is not None and 0.0 < rating < 1.0
    assert "tiny-llama (local" in local.label


def test_a_local_judge_and_a_separate_generator_are_placed_as_the_base_model() -> None:
    """Given the run's placement (here bfloat16; on a GPU machine also its device), the local
    judge and a separate generator model load there, not as fp32 on the CPU, and still work."""
    import torch

    from silotune.data.generators import _separate_model
    from silotune.modeling.placement import Placement

    placed = Placement(torch.device("cpu"), torch.bfloat16, "none")
    local = LocalJudge(JudgeConfig(kind="local", local_model="tiny-llama"), placed)
    assert next(local._model.parameters()).dtype == torch.bfloat16
    assert local.rate(QUESTIONS[0], "an answer") is not None
    generator, _ = _separate_model("tiny-llama", placed)
    assert next(generator.parameters()).dtype == torch.bfloat16
