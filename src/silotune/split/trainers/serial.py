"""Serial mode: one client's step at a time on the shared middle."""

from __future__ import annotations

import time

import torch

from silotune.config import Config
from silotune.split.segments import Middle
from silotune.split.trainers.base import (
    TRAINERS,
    WHOLE,
    Micro,
    MiddleTrainer,
    Pipeline,
    StepDropped,
)


@TRAINERS.register("serial")
class SerialTrainer(MiddleTrainer):
    """One client's step at a time on the shared middle adapter, in arrival order."""

    def __init__(self, middle: Middle, config: Config) -> None:
        super().__init__(middle, config)
        self.opt = self.optimizer(middle)
        self.holder: str | None = None
        self.deadline = 0.0
        self.pipeline: Pipeline | None = None  # the holder's step

    def forward(
        self, client: str, hidden: torch.Tensor, mask: torch.Tensor, micro: Micro = WHOLE
    ) -> torch.Tensor:
        with self.cond:
            if micro[0] == 0:  # a new step: wait for the middle
                self.dropped.pop(client, None)
                # A step it abandoned half-way must not leave gradients in the next one.
                self.release(client, "a new step began")
                while self.holder is not None and self.holder != client:
                    remaining = self.deadline - time.monotonic()
                    if remaining <= 0:
                        self.drop(self.holder, f"no gradient within {self.timeout_s:g} s")
                        break
                    self.cond.wait(remaining)
                self.holder, self.pipeline = client, Pipeline(micro[1])
            elif self.holder != client or self.pipeline is None:
                self.check_not_dropped(client)
                raise StepDropped("micro-batch of a step the server holds no forward for")
            self.deadline = time.monotonic() + self.timeout_s
            try:
                pending = self.checked_forward(self.middle, hidden, mask)
                self.pipeline.add(micro, pending)
            except BaseException:
                self.release(client, "failed")
                raise
            return pending.outputs.detach()

    def backward(self, client: str, grad: torch.Tensor, micro: Micro = WHOLE) -> torch.Tensor:
        with self.cond:
            self.check_not_dropped(client)
            if self.holder != client or self.pipeline is None:
                raise StepDropped("gradient for a step the server holds no forward for")
            try:
                grad_in = self.timed_backward(self.pipeline.take(micro), grad)
                done = self.pipeline.done
                if done:
                    self.step(self.middle, self.opt)
                    self.stepped(client)
            except BaseException:
                self.release(client, "failed")
                raise
            if done:
                self.release(client, "done")
            else:
                self.deadline = time.monotonic() + self.timeout_s
            return grad_in

    def release(self, client: str, reason: str) -> None:
        with self.cond:
            if self.holder == client:
                self.holder, self.pipeline = None, None
                self.opt.zero_grad(set_to_none=True)
                self.cond.notify_all()
