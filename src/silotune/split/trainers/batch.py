"""Batch-parallel mode: the clients' activations stacked into one step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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


@dataclass
class Stack:
    """One stacked forward: whose rows are where, its graph, the gradients that came back."""

    rows: dict[str, tuple[int, int, int]]  # client -> (row start, row end, length)
    pending: Pending | None
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    done: bool = False  # its backward ran (or it was given up)


@TRAINERS.register("batch")
class BatchTrainer(MiddleTrainer):
    """Stack the clients' activations into one batch: one forward, one backward, one step.

    With `split.micro_batches = k` every client's step is k micro-batches: micro-batch j of
    every client is stacked into the step's j-th forward, the k backwards accumulate, and the
    middle steps once after the last, as for whole batches."""

    def __init__(self, middle: Middle, config: Config) -> None:
        super().__init__(middle, config)
        self.opt = self.optimizer(middle)
        self.window_s = config.split.batch_window_s
        self.batch_id = 0
        self.arrivals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.first_arrival = 0.0
        # Each client's micro-batches in the current step (a client whose batch has fewer rows
        # than split.micro_batches sends fewer).
        self.counts: dict[str, int] = {}
        self.stacks: list[Stack] = []  # the current step's stacked forwards, in order
        self.contributed: set[str] = set()  # clients whose gradients are in the step
        self.deadline = 0.0

    @property
    def in_step(self) -> set[str]:
        """The clients the current step is made of (its first stack's)."""
        return set(self.stacks[0].rows) if self.stacks else set()

    def _expected(self, index: int) -> set[str]:
        """Whose micro-batch `index` the step's stack of that index waits for."""
        if index == 0:
            return self.active()
        return {c for c in self.in_step if self.counts.get(c, 1) > index}

    @property
    def _needed(self) -> int:
        """Stacks the current step is made of: its clients' most micro-batches."""
        return max((self.counts.get(c, 1) for c in self.in_step), default=0)

    def forward(
        self, client: str, hidden: torch.Tensor, mask: torch.Tensor, micro: Micro = WHOLE
    ) -> torch.Tensor:
        index, count = micro
        with self.cond:
            if index == 0:
                # A step it abandoned half-way must not leave gradients in the next one.
                self.release(client, "a new step began")
                self.dropped.pop(client, None)
                while self.stacks:  # the previous step is still in its backwards
                    self._wait_or_drop_missing()
            elif (
                client not in self.in_step
                or index != len(self.stacks)
                or count != self.counts.get(client)
            ):
                self.check_not_dropped(client)
                raise StepDropped(f"micro-batch {list(micro)} of a step the server is not in")
            if mask.shape[1] != hidden.shape[1]:
                raise StepDropped(f"mask covers {mask.shape[1]} positions for {hidden.shape[1]}")
            if not self.arrivals:
                self.first_arrival = time.monotonic()
            if index == 0:
                self.counts[client] = count
            self.arrivals[client] = (hidden, mask)
            self.cond.notify_all()
            batch = self.batch_id
            while self.batch_id == batch:
                if index > 0 and client not in self.in_step:  # the step was given up
                    self.arrivals.pop(client, None)
                    break
                waited = time.monotonic() - self.first_arrival
                if self._expected(index) <= set(self.arrivals) or waited >= self.window_s:
                    self._run_forward()
                    break
                self.cond.wait(self.window_s - waited)
            stack = self.stacks[index] if index < len(self.stacks) else None
            if stack is None or client not in stack.rows or stack.pending is None:
                self.check_not_dropped(client)
                raise StepDropped("the server dropped this client's step")
            start, end, length = stack.rows[client]
            return stack.pending.outputs[start:end, :length].detach()

    def _run_forward(self) -> None:
        """Right-pad every arrival to the longest sequence, stack and run the middle once.

        A client whose rows come out non-finite is dropped and the rest run again without it:
        its rows would otherwise turn the stacked step's gradients into NaN for everyone."""
        stack = Stack({}, None)
        while self.arrivals:
            stack = self._stacked_forward()
            bad = [c for c in stack.rows if not self._rows_finite(stack, c)]
            if not bad:
                break
            for client in bad:
                self.arrivals.pop(client)
                self.dropped[client] = "the middle's output for its activations is not finite"
            stack = Stack({}, None)
        if stack.pending is not None:
            self.stacks.append(stack)
        self.arrivals = {}
        self.deadline = time.monotonic() + self.timeout_s
        self.batch_id += 1
        self.cond.notify_all()

    def _stacked_forward(self) -> Stack:
        width = max(h.shape[1] for h, _ in self.arrivals.values())
        hs, ms, row = [], [], 0
        rows = {}
        for client, (h, m) in self.arrivals.items():
            pad = width - h.shape[1]
            hs.append(nn.functional.pad(h, (0, 0, 0, pad)))  # (b_i, width, d)
            ms.append(nn.functional.pad(m, (0, pad)))  # (b_i, width), padding masked out
            rows[client] = (row, row + h.shape[0], h.shape[1])
            row += h.shape[0]
        return Stack(rows, self.timed_forward(self.middle, torch.cat(hs), torch.cat(ms)))

    @staticmethod
    def _rows_finite(stack: Stack, client: str) -> bool:
        assert stack.pending is not None
        start, end, length = stack.rows[client]
        return bool(torch.isfinite(stack.pending.outputs[start:end, :length]).all())

    def _due(self) -> Stack | None:
        """The stack whose gradients come next (the first not backwarded yet)."""
        return next((s for s in self.stacks if not s.done), None)

    def backward(self, client: str, grad: torch.Tensor, micro: Micro = WHOLE) -> torch.Tensor:
        index, _ = micro
        with self.cond:
            self.check_not_dropped(client)
            stack = self._due()
            if stack is None or self.stacks.index(stack) != index:
                raise StepDropped(f"gradient of micro-batch {list(micro)} out of order")
            if client not in stack.rows or stack.pending is None:
                raise StepDropped("gradient for a step the server holds no forward for")
            start, end, length = stack.rows[client]
            check_shape(grad, torch.Size([end - start, length, stack.pending.outputs.shape[2]]))
            stack.grads[client] = grad
            if set(stack.grads) >= set(stack.rows):
                self._run_backward(stack)
            while client not in stack.grad_inputs:
                self.check_not_dropped(client)
                self._wait_or_drop_missing()
            return stack.grad_inputs.pop(client)

    def _wait_or_drop_missing(self) -> None:
        """Wait for the due stack's gradients; past the deadline, drop the silent clients and
        go on."""
        remaining = self.deadline - time.monotonic()
        if remaining > 0:
            self.cond.wait(remaining)
            return
        stack = self._due()
        if stack is None:
            if not self._step_if_complete():  # forwards still missing: the step is given up
                self._end_step()
            return
        for client in set(stack.rows) - set(stack.grads):
            self.drop(client, f"no gradient within {self.timeout_s:g} s")
        if stack in self.stacks:  # (a drop may have given the whole step up)
            self._run_backward(stack)

    def _run_backward(self, stack: Stack) -> None:
        """Backward one stack (missing rows get zero gradient) and hand out its slices; after
        the step's last, step the middle."""
        if stack.done or stack.pending is None:
            return
        out = stack.pending.outputs
        full = torch.zeros_like(out)
        for client, g in stack.grads.items():
            start, end, length = stack.rows[client]
            full[start:end, :length] = g.to(out.device, out.dtype)
        stack.done = True
        if stack.grads:
            grad_in = self.timed_backward(stack.pending, full)
            self.contributed |= set(stack.grads)
            for client in stack.grads:
                start, end, length = stack.rows[client]
                stack.grad_inputs[client] = grad_in[start:end, :length]
        stack.pending = None  # free its graph
        self.deadline = time.monotonic() + self.timeout_s
        self._step_if_complete()
        self.cond.notify_all()

    def _step_if_complete(self) -> bool:
        """Step once every stack of the step has had its backward."""
        if not self.stacks or len(self.stacks) < self._needed:
            return False
        if not all(s.done for s in self.stacks):
            return False
        self._step()
        return True

    def _step(self) -> None:
        """Step the middle on the step's accumulated gradients: the mean over the clients."""
        if self.contributed:
            try:
                self.step(self.middle, self.opt, scale=1.0 / len(self.contributed))
            except FrameRejected as exc:  # finite inputs that still overflowed: nobody's step
                for client in self.contributed:
                    self.dropped[client] = str(exc)
                for stack in self.stacks:
                    stack.grad_inputs.clear()
            else:
                for client in self.contributed:
                    self.stepped(client)
        self._end_step()

    def _end_step(self) -> None:
        """Forget the step (after its update, or giving it up) and wake whoever waits."""
        self.opt.zero_grad(set_to_none=True)
        self.stacks, self.contributed, self.counts, self.arrivals = [], set(), {}, {}
        self.batch_id += 1  # a micro-batch still waiting to be stacked is out of it
        self.cond.notify_all()

    def _finished(self, client: str) -> bool:
        """`client` has sent the gradients of every micro-batch it has in the current step."""
        sent = sum(1 for s in self.stacks if client in s.rows and client in s.grads)
        return client in self.counts and sent >= self.counts[client]

    def release(self, client: str, reason: str) -> None:
        with self.cond:
            self.arrivals.pop(client, None)
            if self._finished(client):
                # Its part is whole (a client with fewer micro-batches than the others is
                # done first): the step goes on; its next step waits for this one to end.
                return
            if client in self.contributed and client in self.in_step:
                # Its gradients are already in the step's sums and cannot be taken out: the
                # step is given up for everyone rather than applied half-done.
                for other in self.in_step - {client}:
                    self.dropped[other] = f"another client left the stacked step ({reason})"
                self.dropped[client] = reason
                self._end_step()
                return
            waited_for = [s for s in self.stacks if not s.done and client not in s.grads]
            if any(client in s.rows for s in waited_for):
                # Out of the step: its rows get no gradient, and nobody waits for it.
                for stack in waited_for:
                    stack.rows.pop(client, None)
                self.dropped[client] = reason
                due = self._due()
                if due is not None and set(due.rows) <= set(due.grads):
                    self._run_backward(due)  # it was the last one the stack waited for
                else:
                    self._step_if_complete()  # it was the one the step's last stack waited for
                self.cond.notify_all()
