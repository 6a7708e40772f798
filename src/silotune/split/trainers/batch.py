"""Batch-parallel mode: the clients' activations stacked into one step."""

from __future__ import annotations

import time

import torch
from torch import nn

from silotune.config import Config
from silotune.errors import FrameRejected
from silotune.split.segments import Middle
from silotune.split.trainers.base import (
    TRAINERS,
    WHOLE,
    Micro,
    MiddleTrainer,
    Pending,
    StepDropped,
    check_shape,
)


@TRAINERS.register("batch")
class BatchTrainer(MiddleTrainer):
    """Stack the clients' activations into one batch: one forward, one backward, one step."""

    def __init__(self, middle: Middle, config: Config) -> None:
        super().__init__(middle, config)
        self.opt = self.optimizer(middle)
        self.window_s = config.split.batch_window_s
        self.batch_id = 0
        self.arrivals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.first_arrival = 0.0
        self.rows: dict[str, tuple[int, int, int]] = {}  # client -> (row start, row end, length)
        self.pending: Pending | None = None
        self.grads: dict[str, torch.Tensor] = {}
        self.grad_inputs: dict[str, torch.Tensor] = {}
        self.deadline = 0.0

    def forward(
        self, client: str, hidden: torch.Tensor, mask: torch.Tensor, micro: Micro = WHOLE
    ) -> torch.Tensor:
        if micro != WHOLE:  # the config refuses micro-batches in this mode; so does the screen
            raise StepDropped("batch mode takes whole batches, not micro-batches")
        with self.cond:
            self.dropped.pop(client, None)
            while self.pending is not None:  # the previous batch is still in its backward
                self._wait_or_drop_missing()
            if mask.shape[1] != hidden.shape[1]:
                raise StepDropped(f"mask covers {mask.shape[1]} positions for {hidden.shape[1]}")
            if not self.arrivals:
                self.first_arrival = time.monotonic()
            self.arrivals[client] = (hidden, mask)
            self.cond.notify_all()
            batch = self.batch_id
            while self.batch_id == batch:
                waited = time.monotonic() - self.first_arrival
                if self.active() <= set(self.arrivals) or waited >= self.window_s:
                    self._run_forward()
                    break
                self.cond.wait(self.window_s - waited)
            if client not in self.rows:
                self.check_not_dropped(client)
                raise StepDropped("the server dropped this client's step")
            start, end, length = self.rows[client]
            assert self.pending is not None
            return self.pending.outputs[start:end, :length].detach()

    def _run_forward(self) -> None:
        """Right-pad every arrival to the longest sequence, stack and run the middle once.

        A client whose rows come out non-finite is dropped and the rest run again without it:
        its rows would otherwise turn the stacked step's gradients into NaN for everyone."""
        while self.arrivals:
            self.pending = self._stacked_forward()
            bad = [c for c in self.rows if not self._rows_finite(c)]
            if not bad:
                break
            for client in bad:
                self.arrivals.pop(client)
                self.dropped[client] = "the middle's output for its activations is not finite"
            self.pending, self.rows = None, {}
        self.arrivals, self.grads, self.grad_inputs = {}, {}, {}
        self.deadline = time.monotonic() + self.timeout_s
        self.batch_id += 1
        self.cond.notify_all()

    def _stacked_forward(self) -> Pending:
        width = max(h.shape[1] for h, _ in self.arrivals.values())
        hs, ms, row = [], [], 0
        self.rows = {}
        for client, (h, m) in self.arrivals.items():
            pad = width - h.shape[1]
            hs.append(nn.functional.pad(h, (0, 0, 0, pad)))  # (b_i, width, d)
            ms.append(nn.functional.pad(m, (0, pad)))  # (b_i, width), padding masked out
            self.rows[client] = (row, row + h.shape[0], h.shape[1])
            row += h.shape[0]
        return self.timed_forward(self.middle, torch.cat(hs), torch.cat(ms))

    def _rows_finite(self, client: str) -> bool:
        assert self.pending is not None
        start, end, length = self.rows[client]
        return bool(torch.isfinite(self.pending.outputs[start:end, :length]).all())

    def backward(self, client: str, grad: torch.Tensor, micro: Micro = WHOLE) -> torch.Tensor:
        if micro != WHOLE:
            raise StepDropped("batch mode takes whole batches, not micro-batches")
        with self.cond:
            self.check_not_dropped(client)
            if self.pending is None or client not in self.rows:
                raise StepDropped("gradient for a step the server holds no forward for")
            start, end, length = self.rows[client]
            check_shape(grad, torch.Size([end - start, length, self.pending.outputs.shape[2]]))
            self.grads[client] = grad
            if set(self.grads) >= set(self.rows):
                self._run_backward()
            while client not in self.grad_inputs:
                self.check_not_dropped(client)
                self._wait_or_drop_missing()
            return self.grad_inputs.pop(client)

    def _wait_or_drop_missing(self) -> None:
        """Wait for the batch's gradients; past the deadline, drop the silent clients and go on."""
        remaining = self.deadline - time.monotonic()
        if remaining > 0:
            self.cond.wait(remaining)
            return
        for client in set(self.rows) - set(self.grads):
            self.drop(client, f"no gradient within {self.timeout_s:g} s")
        self._run_backward()

    def _run_backward(self) -> None:
        """Backward the stacked batch (missing rows get zero gradient); step; hand out slices."""
        if self.pending is None:
            return
        out = self.pending.outputs
        full = torch.zeros_like(out)
        for client, g in self.grads.items():
            start, end, length = self.rows[client]
            full[start:end, :length] = g.to(out.device, out.dtype)
        if self.grads:
            grad_in = self.timed_backward(self.pending, full)
            try:
                # The mean of the clients' gradients, so lr means the same as for one client.
                self.step(self.middle, self.opt, scale=1.0 / len(self.grads))
            except FrameRejected as exc:  # finite inputs that still overflowed: nobody's step
                for client in self.grads:
                    self.dropped[client] = str(exc)
            else:
                for client in self.grads:
                    self.stepped(client)
                    start, end, length = self.rows[client]
                    self.grad_inputs[client] = grad_in[start:end, :length]
        self.pending, self.rows = None, {}
        self.cond.notify_all()

    def release(self, client: str, reason: str) -> None:
        with self.cond:
            self.arrivals.pop(client, None)
            if self.pending is not None and client in self.rows and client not in self.grads:
                # Out of the batch: its rows get no gradient, and nobody waits for it.
                del self.rows[client]
                self.dropped[client] = reason
                if set(self.rows) <= set(self.grads):
                    self._run_backward()  # it was the last one the batch waited for
                self.cond.notify_all()
