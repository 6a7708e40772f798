"""Prompt styles: how an instruction (+ optional input) becomes the text the model continues."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from silotune.config_sections import PromptStyle
from silotune.registry import Registry

PromptFn = Callable[[PreTrainedTokenizerBase, str, str], str]
PROMPT_STYLES: Registry[PromptFn] = Registry("prompt style")

# The Stanford Alpaca instruction format (a data format, reproduced so tuned models match it).
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@PROMPT_STYLES.register("alpaca")
def alpaca_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, input_text: str) -> str:
    """Alpaca template; the input section appears only when there is an input."""
    template = _ALPACA_WITH_INPUT if input_text.strip() else _ALPACA_NO_INPUT
    return template.format(instruction=instruction, input=input_text)


@PROMPT_STYLES.register("chat")
def chat_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, input_text: str) -> str:
    """The tokenizer's own chat template with one user turn and the assistant turn opened."""
    content = f"{instruction}\n\n{input_text}" if input_text.strip() else instruction
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)
    return text


def build_prompt(
    style: PromptStyle, tokenizer: PreTrainedTokenizerBase, instruction: str, input_text: str
) -> str:
    """Format one prompt in the configured style."""
    return PROMPT_STYLES.get(style)(tokenizer, instruction, input_text)
