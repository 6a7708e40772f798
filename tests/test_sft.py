"""Prompt styles and SFT tokenisation: prompt tokens are masked, response + EOS are learned."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from silotune.data.prompts import build_prompt
from silotune.data.sft import IGNORE_INDEX, batch_stream, collate, encode_example, encode_prompt
from silotune.modeling.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return build_tiny_tokenizer()


def test_alpaca_prompt_sections(tok: PreTrainedTokenizerBase) -> None:
    with_input = build_prompt("alpaca", tok, "Summarize.", "Some text.")
    assert "### Instruction:\nSummarize." in with_input
    assert "### Input:\nSome text." in with_input
    assert with_input.endswith("### Response:\n")
    assert "### Input:" not in build_prompt("alpaca", tok, "Summarize.", "")


def test_chat_prompt_uses_the_tokenizer_template(tok: PreTrainedTokenizerBase) -> None:
    text = build_prompt("chat", tok, "What is asthma?", "")
    assert text == "<s>user\nWhat is asthma?</s>\n<s>assistant\n"


@pytest.mark.parametrize("style", ["alpaca", "chat"])
def test_prompt_tokens_are_masked(tok: PreTrainedTokenizerBase, style: str) -> None:
    ids, labels = encode_example(tok, style, "What causes gout?", "", "Uric acid crystals.", 256)  # type: ignore[arg-type]
    prompt = encode_prompt(tok, style, "What causes gout?", "")  # type: ignore[arg-type]
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    response = labels[len(prompt) :]
    assert IGNORE_INDEX not in response
    assert response == ids[len(prompt) :]
    assert response[-1] == tok.eos_token_id
    assert tok.decode(response[:-1]) == "Uric acid crystals."


def test_truncation_keeps_prompt_end_and_some_response(tok: PreTrainedTokenizerBase) -> None:
    long_question = "Tell me everything about the kidneys. " * 40
    ids, labels = encode_example(tok, "alpaca", long_question, "", "A long answer " * 30, 64)
    assert len(ids) == len(labels) == 64
    learned = [t for t in labels if t != IGNORE_INDEX]
    assert len(learned) == 8
    # The end of the prompt (the response header) survives the cut.
    assert tok.decode(ids[: 64 - 8]).endswith("### Response:\n")


def test_collate_pads_right_and_masks_padding(tok: PreTrainedTokenizerBase) -> None:
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=3)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_batch_stream_is_deterministic_and_covers_every_example() -> None:
    examples = [([i], [i]) for i in range(10)]
    first = [
        b.input_ids.flatten().tolist()
        for _, b in zip(range(3), batch_stream(examples, 4, 0, seed=7), strict=False)
    ]
    again = [
        b.input_ids.flatten().tolist()
        for _, b in zip(range(3), batch_stream(examples, 4, 0, seed=7), strict=False)
    ]
    assert first == again
    assert sorted(x for chunk in first for x in chunk) == list(range(10))
    other = next(batch_stream(examples, 10, 0, seed=8)).input_ids.flatten()
    assert not torch.equal(other, torch.tensor([x for chunk in first for x in chunk]))
