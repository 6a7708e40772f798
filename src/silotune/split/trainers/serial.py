"""Serial mode: one client's step at a time on the shared middle."""

from __future__ import annotations

import time

import torch

from silotune.config import Config
from silotune.split.segments import Middle
from silotune.split.trainers.base import TRAINERS, MiddleTrainer, Pending, StepDropped


@TRAINERS.register("serial")
class SerialTrainer(MiddleTrainer):
    """One client's step at a time on the shared middle adapter, in arrival order."""

    def __init__(self, middle: Middle, config: Config) -> None:
        super().__init__(middle, config)
        self.opt = self.optimizer(middle)
        self.holder: str | None = None
        self.deadline = 0.0
        self.pending: Pending | None = None

    def forward(self, client: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self.cond:
            self.dropped.pop(client, None)
            while self.holder is not None and self.holder != client:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    self.drop(self.holder, f"no gradient within {self.timeout_s:g} s")
                    break
                self.cond.wait(remaining)
            self.holder, self.deadline = client, time.monotonic() + self.timeout_s
            try:
                self.pending = self.checked_forward(self.middle, hidden, mask)
            except BaseException:
                self.release(client, "failed")
                raise
            return self.pending.outputs.detach()

    def backward(self, client: str, grad: torch.Tensor) -> torch.Tensor:
        with self.cond:
            self.check_not_dropped(client)
            if self.holder != client or self.pending is None:
                raise StepDropped("gradient for a step the server holds no forward for")
            try:
                grad_in = self.timed_backward(self.pending, grad)
                self.step(self.middle, self.opt)
                self.stepped(client)
            finally:
                self.release(client, "done")
            return grad_in

    def release(self, client: str, reason: str) -> None:
        with self.cond:
            if self.holder == client:
                self.holder, self.pending = None, None
                self.opt.zero_grad(set_to_none=True)
                self.cond.notify_all()
