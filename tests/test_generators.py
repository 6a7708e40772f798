"""The choice of synthetic-data generator: the global model, the frozen base, a separate local
model, and an OpenAI-compatible endpoint (a fake one on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

from silotune.config import load_config
from silotune.config_synthetic import SyntheticConfig
from silotune.data.generators import (
    EndpointGenerator,
    LocalGenerator,
    generator_for,
    generator_note,
)
from silotune.data.synthetic import self_generate
from silotune.errors import ConfigError
from silotune.modeling.adapters import GLOBAL
from silotune.training.workbench import Workbench

from .conftest import CONFIGS
from .fake_openai import fake_openai

LOCAL = [
    {"instruction": f"What treats a disease of the {organ}?", "input": "", "output": "Rest."}
    for organ in ("liver", "heart", "lung", "skin")
]
SYN = SyntheticConfig(per_round=3, icl_examples=2, instruction_max_new_tokens=8)


def test_settings_that_cannot_work_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"needs synthetic\.generator_model"):
        SyntheticConfig(generator="model")
    url = "http://10.0.0.5:8000/v1"
    with pytest.raises(ConfigError, match=r"sends real records .* to http://10\.0\.0\.5"):
        SyntheticConfig(generator="endpoint", generator_model="m", generator_url=url)
    with pytest.raises(ConfigError, match="next-token distributions"):
        SyntheticConfig(
            generator="endpoint",
            generator_model="m",
            generator_url=url,
            allow_remote_generator=True,
            dp=True,
            dp_epsilon=4,
        )
    config = load_config(CONFIGS / "tiny.toml", ["synthetic.generator='base'"])
    assert config.synthetic.generator == "base"


def _random_global(bench: Workbench) -> None:
    gen = torch.Generator().manual_seed(0)
    bench.put(GLOBAL, {k: torch.randn(v.shape, generator=gen) for k, v in bench.initial.items()})


def test_base_and_global_generators_see_the_adapters_they_should(tiny_bench: Workbench) -> None:
    _random_global(tiny_bench)
    try:
        glob = generator_for(SYN, tiny_bench, [GLOBAL])
        with_adapter = [g.text for g in glob.instructions(LOCAL, SYN, 0, None)]
        base = generator_for(replace(SYN, generator="base"), tiny_bench, [GLOBAL])
        without = [g.text for g in base.instructions(LOCAL, SYN, 0, None)]
        with tiny_bench.model.disable_adapter():
            plain = LocalGenerator(tiny_bench.model, tiny_bench.tokenizer, "plain")
            reference = [g.text for g in plain.instructions(LOCAL, SYN, 0, None)]
        after = [g.text for g in glob.instructions(LOCAL, SYN, 0, None)]
    finally:
        tiny_bench.put(GLOBAL, tiny_bench.initial)
    assert without == reference  # adapters off
    assert with_adapter != without
    assert after == with_adapter  # the base generator left the adapters as they were


def test_a_separate_generator_is_loaded_once(tiny_bench: Workbench) -> None:
    syn = replace(SYN, generator="model", generator_model="tiny-llama")
    first = generator_for(syn, tiny_bench, [GLOBAL])
    second = generator_for(syn, tiny_bench, [GLOBAL])
    assert isinstance(first, LocalGenerator) and isinstance(second, LocalGenerator)
    assert first.model is second.model and first.model is not tiny_bench.model
    _, stats = self_generate(first, LOCAL, syn, tiny_bench.config.data, 0)
    assert stats.generated == syn.per_round
    assert "separate model" in generator_note(syn)


QUESTIONS = [
    "What are the early signs of kidney stones in adults?",
    "How is asthma in young children usually diagnosed?",
    "Which vaccines protect travellers against hepatitis?",
]


def _writer(path: str, body: dict[str, Any], n: int) -> str:
    """Completions: a well-formed task block; chat: a numbered answer."""
    if path.endswith("/chat/completions"):
        return f"Answer {n}: see a doctor about it soon."
    return f" {QUESTIONS[(n - 1) % len(QUESTIONS)]}\nInput: <none>\n\n"


@pytest.fixture
def fake_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    with fake_openai(_writer) as server:
        yield server


def test_an_endpoint_generator_writes_through_the_server(
    fake_server: tuple[str, list[dict[str, Any]]], tiny_bench: Workbench
) -> None:
    url, seen = fake_server
    syn = replace(
        SYN,
        generator="endpoint",
        generator_model="med-7b",
        generator_url=url,
        allow_remote_generator=True,
        min_response_words=2,
    )
    generator = generator_for(syn, tiny_bench, [GLOBAL])
    assert isinstance(generator, EndpointGenerator)
    kept, stats = self_generate(generator, LOCAL, syn, tiny_bench.config.data, 0)
    assert stats.generated == 3 and len(kept) == 3
    assert [k["instruction"] for k in kept] == QUESTIONS
    assert kept[0]["output"].startswith("Answer 4:")
    paths = [r["path"] for r in seen]
    assert paths.count("/v1/completions") == 3 and paths.count("/v1/chat/completions") == 3
    prompt = seen[0]["prompt"]
    # What the note warns about: the in-context examples are real records, sent to the server.
    assert any(r["instruction"] in prompt for r in LOCAL)
    assert seen[0]["stop"] == ["### Task"]
    assert url in generator_note(syn) and "real records" in generator_note(syn)


def test_an_unreachable_endpoint_is_one_clear_error(tiny_bench: Workbench) -> None:
    syn = replace(
        SYN,
        generator="endpoint",
        generator_model="m",
        generator_url="http://127.0.0.1:9/v1",
        allow_remote_generator=True,
        timeout_s=2.0,
    )
    with pytest.raises(Exception, match=r"synthetic\.generator_url"):
        EndpointGenerator(syn).instructions(LOCAL, syn, 0, None)
