"""Batched generation from tokenised prompts (left padding), shared by evaluation and synthesis."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from silotune.modeling.placement import device_of
from silotune.progress import tick


@dataclass(frozen=True)
class Generation:
    """One continuation and whether the model ended it (EOS or a stop string) or ran out of room."""

    text: str
    finished: bool


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode: greedy when temperature is 0."""

    max_new_tokens: int
    batch_size: int = 8
    temperature: float = 0.0
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding token id (EOS when the tokenizer has no pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    assert isinstance(pad, int)
    return pad


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    cfg: DecodeConfig,
    seed: int = 0,
    processors: LogitsProcessorList | None = None,
    label: str = "generating",
) -> list[Generation]:
    """Continue each tokenised prompt; sampling (temperature > 0) is seeded. `processors` see
    each step's scores of a whole batch of `cfg.batch_size` prompts (greedy decoding). `label`:
    what the run's progress display calls it."""
    out: list[Generation] = []
    eos = tokenizer.eos_token_id
    model.eval()  # no dropout: a fresh PEFT model is in training mode
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[start : start + cfg.batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                input_ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            sampling = cfg.temperature > 0
            extra: dict[str, object] = {}
            if sampling:
                extra.update(temperature=cfg.temperature, top_p=cfg.top_p)
            if cfg.stop:
                extra.update(stop_strings=list(cfg.stop), tokenizer=tokenizer)
            if processors is not None:
                extra.update(logits_processor=processors)
            ticker = _Ticker(label, start, len(chunk), len(prompts), cfg.max_new_tokens)
            device = device_of(model)
            tokens = model.generate(  # type: ignore[operator]
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=sampling,
                repetition_penalty=cfg.repetition_penalty,
                pad_token_id=pad_id(tokenizer),
                eos_token_id=eos,
                stopping_criteria=StoppingCriteriaList([ticker]),
                **extra,
            )
            for row in tokens[:, width:].cpu():  # (new,)
                ids = row.tolist()
                text = str(tokenizer.decode(ids, skip_special_tokens=True))
                ended = eos in ids or any(s in text for s in cfg.stop)
                out.append(Generation(text=text, finished=ended))
    return out


class _Ticker(StoppingCriteria):
    """Never stops a batch; tells the progress display how far it is, in prompts."""

    def __init__(self, label: str, start: int, size: int, total: int, new_tokens: int) -> None:
        self.label, self.start, self.size, self.total = label, start, size, total
        self.new_tokens = max(new_tokens, 1)
        self.made = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> Any:
        self.made += 1
        done = self.start + self.size * min(self.made, self.new_tokens) // self.new_tokens
        tick(self.label, done, self.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
