"""The split client's model: front + back on this machine around a middle, as a causal LM.

`SplitCausalLM` looks like a causal LM to the rest of silotune (forward with labels → loss,
logits; `generate`), so the same training loop and evaluator serve split learning. The middle is
a callable: the local `Middle` module (centralized reference, tests) or a `RemoteMiddle` on the
split server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutput

from silotune.split.link import RemoteMiddle
from silotune.split.pipeline import pipelined_loss
from silotune.split.segments import Back, Front, Middle

MiddleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SplitCausalLM(nn.Module):
    """front → middle → back, called like a transformers causal LM."""

    def __init__(self, front: Front, back: Back, middle: MiddleFn) -> None:
        super().__init__()
        self.front = front
        self.back = back
        self.middle = middle
        self.vocab_size = int(back.config.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits (b, t, vocab) and, with labels, the mean next-token loss (as transformers)."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        link = self.middle.link if isinstance(self.middle, RemoteMiddle) else None
        if labels is not None and link is not None and torch.is_grad_enabled():
            count = link.config.split.micro_batches
            if count > 1 and input_ids.shape[0] > 1:  # the loss only: logits stay per micro-batch
                return CausalLMOutput(
                    loss=pipelined_loss(self, link, input_ids, mask, labels, count)
                )
        hidden = self.front(input_ids, mask)  # (b, t, d)
        hidden = self.middle(hidden, mask)  # (b, t, d)
        logits = self.back(hidden, mask)  # (b, t, v)
        loss = None if labels is None else ForCausalLMLoss(logits, labels, self.vocab_size)
        return CausalLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        pad_token_id: int,
        eos_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop_strings: list[str] | None = None,
        tokenizer: Any = None,
        use_cache: bool = True,
        stopping_criteria: StoppingCriteriaList | None = None,
    ) -> torch.Tensor:
        """Decode as transformers' `generate` does (greedy, or sampling with temperature, top-k
        and top-p; repetition penalty; EOS and stop strings end a row), batched. With KV caches on
        every segment (the server keeps the middle's) each step runs only the newest token;
        prefix segments, or `use_cache=False`, run the whole sequence again. `stopping_criteria`
        end a row as transformers' do."""
        processors = LogitsProcessorList()
        if repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if do_sample:
            processors.append(TemperatureLogitsWarper(temperature))
            if top_k > 0:  # transformers' default of 50, so split and local sampling agree
                processors.append(TopKLogitsWarper(top_k))
            processors.append(TopPLogitsWarper(top_p))
        stop = StopStringCriteria(tokenizer, stop_strings) if stop_strings else None
        ids, mask = input_ids, attention_mask
        new = input_ids
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        incremental = self._incremental() if use_cache else None
        for step in range(max_new_tokens):
            if incremental is None:
                hidden = self.middle(self.front(ids, mask), mask)
                logits = self.back(hidden, mask, last_only=True)[:, -1]  # (b, v)
            else:
                logits = incremental(new, mask, step == 0)[:, -1]
            scores = processors(ids, logits.float())  # type: ignore[arg-type]
            if do_sample:
                token = torch.multinomial(scores.softmax(-1), num_samples=1)[:, 0]
            else:
                token = scores.argmax(-1)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            new = token[:, None]  # (b, 1)
            ids = torch.cat([ids, new], dim=1)
            mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
            if eos_token_id is not None:
                finished |= token == eos_token_id
            if stop is not None:
                finished |= stop(ids, scores).to(finished.device)
            if stopping_criteria is not None:
                finished |= stopping_criteria(ids, scores).to(finished.device)
            if bool(finished.all()):
                break
        return ids

    def _incremental(self) -> Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor] | None:
        """One cached decoding step (new ids, mask so far, first?) -> logits, or None if the
        segments carry prefixes (their stand-in cache does not keep keys)."""
        if self.back.prefix is not None or self.front.prefix is not None:
            return None
        middle = self.middle
        run_middle: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
        if isinstance(middle, RemoteMiddle):
            link = middle.link

            def run_middle(h: torch.Tensor, m: torch.Tensor, first: bool) -> torch.Tensor:
                return link.forward(h, m, train=False, cache="new" if first else "next")

        elif isinstance(middle, Middle) and middle.prefix is None:
            middle_cache = middle.new_cache()

            def run_middle(h: torch.Tensor, m: torch.Tensor, first: bool) -> torch.Tensor:
                out: torch.Tensor = middle(h, m, middle_cache)
                return out

        else:
            return None
        front_cache, back_cache = self.front.new_cache(), self.back.new_cache()

        def step(new: torch.Tensor, mask: torch.Tensor, first: bool) -> torch.Tensor:
            hidden = self.front(new, mask, front_cache)  # (b, q, d)
            out: torch.Tensor = self.back(
                run_middle(hidden, mask, first), mask, back_cache, last_only=True
            )
            return out

        return step
