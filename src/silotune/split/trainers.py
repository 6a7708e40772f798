"""How the split server trains its middle for many clients: serial, batch-parallel, per-client.

All three take the same calls from the per-client sessions (threads):
`forward(client, hidden, mask, train)` → middle output, then `backward(client, grad)` → gradient
for the client's front. Between the two the client runs its back and its loss. A client that
goes silent mid-step is dropped after `step_timeout_s`: its graph is freed, the rest go on.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from silotune.config import Config, SplitMode
from silotune.modeling.adapters import StateDict
from silotune.records import average_adapters
from silotune.registry import Registry
from silotune.split.rendezvous import Rendezvous
from silotune.split.segments import Middle


class StepDropped(Exception):
    """This client's step was abandoned (it went silent, or the server dropped it)."""


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train (the middle's adapter)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def adapter_state(module: nn.Module) -> StateDict:
    """A detached copy of the trainable tensors."""
    return {n: p.detach().clone() for n, p in trainable(module).items()}


def load_state(module: nn.Module, state: StateDict) -> None:
    """Copy `state` into the trainable tensors in place."""
    params = trainable(module)
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


@dataclass
class _Replica:
    """A middle with its own adapter and optimizer; the frozen base is shared."""

    module: Middle
    optimizer: torch.optim.Optimizer
    steps: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)


@dataclass
class Pending:
    """A training forward waiting for its gradient."""

    inputs: torch.Tensor  # (b, t, d) leaf
    outputs: torch.Tensor  # (b, t, d)


class MiddleTrainer:
    """Shared bookkeeping: members, compute lock, optimizer step, eval forward, stats."""

    def __init__(self, middle: Middle, config: Config) -> None:
        self.middle = middle
        self.config = config
        self.timeout_s = config.split.step_timeout_s
        self.cond = threading.Condition(threading.RLock())
        self.members: set[str] = set()
        self.dropped: dict[str, str] = {}
        self.steps = 0
        self.compute_s = 0.0
        self.client_average: Rendezvous[tuple[StateDict, float], StateDict] = Rendezvous(
            _weighted_average, self.timeout_s
        )
        middle.train()

    def optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """AdamW over `module`'s adapter, as the local training loop uses."""
        cfg = self.config.train
        params = list(trainable(module).values())
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(self, module: nn.Module, optimizer: torch.optim.Optimizer, scale: float = 1.0) -> None:
        """Clip and apply the accumulated gradients, then clear them."""
        params = list(trainable(module).values())
        if scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        if self.config.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def join(self, client: str) -> None:
        """A client opened a session."""
        with self.cond:
            self.members.add(client)
            self.dropped.pop(client, None)

    def leave(self, client: str) -> None:
        """A client ended its session (or vanished): forget whatever it left pending."""
        with self.cond:
            self.members.discard(client)
            self.release(client, "left")
            self.cond.notify_all()
        self.client_average.recheck(self.active())

    def active(self) -> set[str]:
        """Clients with an open session."""
        with self.cond:
            return set(self.members)

    def release(self, client: str, reason: str) -> None:
        """Drop `client`'s pending work (subclasses free their graphs)."""

    def drop(self, client: str, reason: str) -> None:
        """Give up on a client mid-step; its late gradient will be refused."""
        self.dropped[client] = reason
        self.release(client, reason)

    def check_not_dropped(self, client: str) -> None:
        """Raise StepDropped if the server gave up on `client`'s current step."""
        reason = self.dropped.pop(client, None)
        if reason is not None:
            raise StepDropped(f"the server dropped this client's step: {reason}")

    def evaluate(self, module: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A forward without a graph (evaluation, generation)."""
        with self.cond, torch.no_grad():
            module.eval()
            try:
                out: torch.Tensor = module(hidden, mask)
            finally:
                module.train()
        return out

    def timed_forward(self, module: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> Pending:
        """Forward with a graph from a fresh leaf, so the input's gradient can be sent back."""
        start = time.perf_counter()
        leaf = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            out = module(leaf, mask)
        self.compute_s += time.perf_counter() - start
        return Pending(leaf, out)

    def timed_backward(self, pending: Pending, grad: torch.Tensor) -> torch.Tensor:
        """Backward from the client's gradient; returns dL/d(input)."""
        start = time.perf_counter()
        torch.autograd.backward(pending.outputs, grad.to(pending.outputs.dtype))
        self.compute_s += time.perf_counter() - start
        assert pending.inputs.grad is not None
        return pending.inputs.grad

    def forward(
        self, client: str, hidden: torch.Tensor, mask: torch.Tensor, train: bool
    ) -> torch.Tensor:
        """The middle's output for `client`'s front output (b, t, d)."""
        raise NotImplementedError

    def backward(self, client: str, grad: torch.Tensor) -> torch.Tensor:
        """Finish `client`'s step from dL/d(output); returns dL/d(input)."""
        raise NotImplementedError

    def average_clients(self, client: str, state: StateDict, weight: float) -> StateDict:
        """SplitFed: average the clients' front/back adapters (weighted by their examples)."""
        return self.client_average.meet(client, (state, weight), self.active)

    def adapter(self) -> StateDict:
        """The middle adapter to save at the end."""
        return adapter_state(self.middle)


def _weighted_average(deposits: dict[str, tuple[StateDict, float]]) -> StateDict:
    states = [s for s, _ in deposits.values()]
    return average_adapters(states, [w for _, w in deposits.values()])


TRAINERS: Registry[type[MiddleTrainer]] = Registry("split mode")


@TRAINERS.register("serial")
class SerialTrainer(MiddleTrainer):
    """One client's step at a time on the shared middle adapter, in arrival order."""

    def __init__(self, middle: Middle, config: Config) -> None:
        super().__init__(middle, config)
        self.opt = self.optimizer(middle)
        self.holder: str | None = None
        self.deadline = 0.0
        self.pending: Pending | None = None

    def forward(
        self, client: str, hidden: torch.Tensor, mask: torch.Tensor, train: bool
    ) -> torch.Tensor:
        if not train:
            return self.evaluate(self.middle, hidden, mask)
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
                self.pending = self.timed_forward(self.middle, hidden, mask)
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
            finally:
                self.release(client, "done")
            return grad_in

    def release(self, client: str, reason: str) -> None:
        with self.cond:
            if self.holder == client:
                self.holder, self.pending = None, None
                self.opt.zero_grad(set_to_none=True)
                self.cond.notify_all()


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
        self, client: str, hidden: torch.Tensor, mask: torch.Tensor, train: bool
    ) -> torch.Tensor:
        if not train:
            return self.evaluate(self.middle, hidden, mask)
        with self.cond:
            self.dropped.pop(client, None)
            while self.pending is not None:  # the previous batch is still in its backward
                self._wait_or_drop_missing()
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
                raise StepDropped("the server dropped this client's step")
            start, end, length = self.rows[client]
            assert self.pending is not None
            return self.pending.outputs[start:end, :length].detach()

    def _run_forward(self) -> None:
        """Right-pad every arrival to the longest sequence, stack and run the middle once."""
        width = max(h.shape[1] for h, _ in self.arrivals.values())
        hs, ms, row = [], [], 0
        self.rows = {}
        for client, (h, m) in self.arrivals.items():
            pad = width - h.shape[1]
            hs.append(nn.functional.pad(h, (0, 0, 0, pad)))  # (b_i, width, d)
            ms.append(nn.functional.pad(m, (0, pad)))  # (b_i, width), padding masked out
            self.rows[client] = (row, row + h.shape[0], h.shape[1])
            row += h.shape[0]
        self.pending = self.timed_forward(self.middle, torch.cat(hs), torch.cat(ms))
        self.arrivals, self.grads, self.grad_inputs = {}, {}, {}
        self.deadline = time.monotonic() + self.timeout_s
        self.batch_id += 1
        self.cond.notify_all()

    def backward(self, client: str, grad: torch.Tensor) -> torch.Tensor:
        with self.cond:
            self.check_not_dropped(client)
            if self.pending is None or client not in self.rows:
                raise StepDropped("gradient for a step the server holds no forward for")
            self.grads[client] = grad
            if set(self.grads) >= set(self.rows):
                self._run_backward()
            while client not in self.grad_inputs:
                self._wait_or_drop_missing()
                self.check_not_dropped(client)
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
            full[start:end, :length] = g.to(out.dtype)
        if self.grads:
            grad_in = self.timed_backward(self.pending, full)
            # The mean of the clients' gradients, so lr means the same as for one client.
            self.step(self.middle, self.opt, scale=1.0 / len(self.grads))
            for client in self.grads:
                start, end, length = self.rows[client]
                self.grad_inputs[client] = grad_in[start:end, :length]
        self.pending, self.rows = None, {}
        self.cond.notify_all()

    def release(self, client: str, reason: str) -> None:
        with self.cond:
            self.arrivals.pop(client, None)
            if self.pending is not None and client in self.rows and client not in self.grads:
                self.dropped[client] = reason
                self.cond.notify_all()


@TRAINERS.register("per-client")
class PerClientTrainer(MiddleTrainer):
    """Server-hierarchical: one middle adapter per client, trained in parallel, averaged every K."""

    def __init__(self, middle: Middle, config: Config) -> None:
        super().__init__(middle, config)
        self.every = config.split.average_every
        self.replicas: dict[str, _Replica] = {}
        self.pendings: dict[str, Pending] = {}
        self.middle_average: Rendezvous[StateDict, StateDict] = Rendezvous(
            lambda d: average_adapters(list(d.values()), [1.0] * len(d)), self.timeout_s
        )

    def join(self, client: str) -> None:
        super().join(client)
        with self.cond:
            if client not in self.replicas:
                # Share the frozen base between replicas: only the adapter is copied.
                memo: dict[int, object] = {id(self.middle.config): self.middle.config}
                for tensor in [*self.middle.parameters(), *self.middle.buffers()]:
                    if not tensor.requires_grad:
                        memo[id(tensor)] = tensor
                module = copy.deepcopy(self.middle, memo)
                module.train()
                self.replicas[client] = _Replica(module, self.optimizer(module))

    def forward(
        self, client: str, hidden: torch.Tensor, mask: torch.Tensor, train: bool
    ) -> torch.Tensor:
        replica = self.replicas[client]
        if not train:
            with replica.lock, torch.no_grad():
                replica.module.eval()
                try:
                    out: torch.Tensor = replica.module(hidden, mask)
                finally:
                    replica.module.train()
                return out
        with replica.lock:
            self.dropped.pop(client, None)
            self.pendings[client] = self.timed_forward(replica.module, hidden, mask)
            return self.pendings[client].outputs.detach()

    def backward(self, client: str, grad: torch.Tensor) -> torch.Tensor:
        replica = self.replicas[client]
        with replica.lock:
            pending = self.pendings.pop(client, None)
            if pending is None:
                raise StepDropped("gradient for a step the server holds no forward for")
            grad_in = self.timed_backward(pending, grad)
            self.step(replica.module, replica.optimizer)
            replica.steps += 1
        if replica.steps % self.every == 0:
            averaged = self.middle_average.meet(client, adapter_state(replica.module), self.active)
            with replica.lock:
                load_state(replica.module, averaged)
            with self.cond:
                load_state(self.middle, averaged)
        return grad_in

    def leave(self, client: str) -> None:
        super().leave(client)
        self.middle_average.recheck(self.active())

    def release(self, client: str, reason: str) -> None:
        self.pendings.pop(client, None)


def build_trainer(middle: Middle, config: Config) -> MiddleTrainer:
    """The trainer for `config.split.mode`."""
    mode: SplitMode = config.split.mode
    return TRAINERS.get(mode)(middle, config)
