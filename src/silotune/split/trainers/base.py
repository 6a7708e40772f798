"""What the three ways of training the middle share (members, locks, steps, averaging).

All three take the same calls from the per-client sessions (threads):
`forward(client, hidden, mask, train)` → middle output, then `backward(client, grad)` → gradient
for the client's front. Between the two the client runs its back and its loss. A client that
goes silent mid-step is dropped after `step_timeout_s`: its graph is freed, the rest go on.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import Cache

from silotune.config import Config
from silotune.errors import FrameRejected
from silotune.modeling.adapters import StateDict, weighted_mean
from silotune.registry import Registry
from silotune.split.rendezvous import Rendezvous
from silotune.split.screen import check_finite
from silotune.split.segments import Middle
from silotune.training.guards import MissingGradientError, check_gradients
from silotune.training.optim import clip_and_step, make_optimizer

CacheUse = Literal["", "new", "next"]
log = logging.getLogger(__name__)


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
class Replica:
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


Micro = tuple[int, int]  # (index, count): a micro-batch of its client's step (split.micro_batches)
WHOLE: Micro = (0, 1)


@dataclass
class Pipeline:
    """One client's step as `count` micro-batches: forwards in order, then their gradients in
    the same order; the optimizer steps once, after the last (the gradients add up to the
    whole batch's)."""

    count: int
    pendings: list[Pending | None] = field(default_factory=list)
    backs: int = 0

    def add(self, micro: Micro, pending: Pending) -> None:
        """Keep the forward of micro-batch `micro`, the next one expected."""
        if micro != (len(self.pendings), self.count):
            raise StepDropped(f"micro-batch {list(micro)} out of order (at {len(self.pendings)})")
        self.pendings.append(pending)

    def take(self, micro: Micro) -> Pending:
        """The forward the gradient of micro-batch `micro` answers (the next one due)."""
        if micro != (self.backs, self.count) or self.backs >= len(self.pendings):
            raise StepDropped(f"gradient of micro-batch {list(micro)} out of order")
        pending, self.pendings[self.backs] = self.pendings[self.backs], None  # free its graph
        self.backs += 1
        assert pending is not None
        return pending

    @property
    def done(self) -> bool:
        """Every micro-batch has had its backward: time to step."""
        return self.backs == self.count


class MiddleTrainer:
    """Shared bookkeeping: members, compute lock, optimizer step, eval forward, stats."""

    def __init__(self, middle: Middle, config: Config) -> None:
        self.middle = middle
        self.config = config
        self.timeout_s = config.split.step_timeout_s
        self.cond = threading.Condition(threading.RLock())
        self.members: set[str] = set()
        self.caches: dict[str, Cache] = {}  # per client, while it generates
        self.dropped: dict[str, str] = {}
        # Clients whose last step was refused: the averaging meetings do not wait for them until
        # they complete a step again (a hostile client must not hold every average up).
        self.stalled: set[str] = set()
        self.steps = 0
        self.rounds = 0  # client averages done: the round barrier, where checkpoints are taken
        self.compute_s = 0.0
        # Called inside the round barrier (every client waits): nothing trains meanwhile.
        self.on_round_end: Callable[[int], None] = lambda _: None
        self.client_average: Rendezvous[tuple[StateDict, float], StateDict] = Rendezvous(
            self._round_end, self.timeout_s
        )
        self.restored: dict[str, dict[str, Any]] = {}  # saved per-client states not joined yet
        self.resumed = False  # started from a checkpoint (its rounds are a client's too)
        middle.train()

    def _round_end(self, deposits: dict[str, tuple[StateDict, float]]) -> StateDict:
        averaged = _weighted_average(deposits, self.config.federated.max_weight_ratio)
        self.rounds += 1
        self.on_round_end(self.rounds)
        return averaged

    def trained(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer | None]]:
        """Every module whose adapter the server trains, with its optimizer."""
        return {"middle": (self.middle, getattr(self, "opt", None))}

    def client_middles(self) -> dict[str, nn.Module]:
        """Each client's own middle, where it has one (per-client mode); else none."""
        return {}

    def training_state(self) -> dict[str, Any]:
        """What a restarted server needs to go on exactly: adapters, optimizers, counters, RNG."""
        return {
            "round": self.rounds,
            "steps": self.steps,
            "rng": torch.get_rng_state(),
            "modules": {
                name: {
                    "adapter": adapter_state(module),
                    "optimizer": optimizer.state_dict() if optimizer else {},
                }
                for name, (module, optimizer) in self.trained().items()
            },
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Inverse of training_state; states of modules made later (replicas) wait for them."""
        self.rounds, self.steps = int(state["round"]), int(state["steps"])
        self.resumed = True
        torch.set_rng_state(state["rng"])
        modules = dict(state["modules"])
        for name, (module, optimizer) in self.trained().items():
            saved = modules.pop(name)
            load_state(module, saved["adapter"])
            if optimizer is not None:
                optimizer.load_state_dict(saved["optimizer"])
        self.restored = modules

    def optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """The training loop's optimizer over `module`'s adapter."""
        return make_optimizer(trainable(module).values(), self.config.train)

    def step(self, module: nn.Module, optimizer: torch.optim.Optimizer, scale: float = 1.0) -> None:
        """Clip and apply the accumulated gradients, then clear them; a non-finite gradient is
        refused (FrameRejected) and leaves the adapter and its optimizer as they were."""
        named = trainable(module)
        params = list(named.values())
        try:
            check_gradients(named)  # every adapter tensor got a gradient (None is a fault)
            if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
                raise FrameRejected(
                    "the middle adapter's gradient is not finite; the step is refused"
                )
        except (FrameRejected, MissingGradientError):
            optimizer.zero_grad(set_to_none=True)
            raise
        if scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        clip_and_step(params, optimizer, self.config.train)
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
            self.caches.pop(client, None)
            self.release(client, "left")
            self.cond.notify_all()
        self.recheck_meetings()

    def active(self) -> set[str]:
        """Clients with an open session."""
        with self.cond:
            return set(self.members)

    def participants(self) -> set[str]:
        """Clients an averaging meeting waits for: open sessions whose steps are not refused."""
        with self.cond:
            return self.members - self.stalled

    def refused(self, client: str, reason: str) -> None:
        """`client`'s step was refused: drop it, and stop waiting for it in averaging meetings
        until it completes a step. Called outside the trainer's locks."""
        with self.cond:
            self.stalled.add(client)
            self.drop(client, reason)
        self.recheck_meetings()

    def stepped(self, client: str) -> None:
        """`client` completed a step: it takes part in averaging again."""
        with self.cond:
            self.stalled.discard(client)

    def recheck_meetings(self) -> None:
        """Close averaging meetings that no longer wait for anyone."""
        self.client_average.recheck(self.participants())

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

    def module_for(self, client: str) -> tuple[Middle, threading.RLock | threading.Condition]:
        """The middle `client` runs through and the lock that guards it."""
        return self.middle, self.cond

    def infer(
        self, client: str, hidden: torch.Tensor, mask: torch.Tensor, cache: CacheUse = ""
    ) -> torch.Tensor:
        """A forward without a graph (evaluation, generation), optionally with a KV cache:
        "new" starts one for this client (prompt), "next" continues it (new tokens only)."""
        module, lock = self.module_for(client)
        with lock, torch.no_grad():
            kv = None
            if cache == "new":
                kv = self.caches[client] = module.new_cache()
            elif cache == "next":
                kv = self.caches.get(client)
                if kv is None:
                    raise StepDropped("no generation in progress to continue")
            else:
                self.caches.pop(client, None)
            cached = module.cached_tokens(kv) if cache == "next" and kv is not None else 0
            if mask.shape[1] != cached + hidden.shape[1]:
                raise StepDropped(
                    f"mask covers {mask.shape[1]} positions; expected {cached} cached + "
                    f"{hidden.shape[1]} new"
                )
            set_training(module, False)
            out: torch.Tensor = module(hidden, mask, kv)
        check_finite(out, "the middle's output for these activations")
        return out

    def timed_forward(self, module: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> Pending:
        """Forward with a graph from a fresh leaf, so the input's gradient can be sent back."""
        if mask.shape[1] != hidden.shape[1]:
            raise StepDropped(
                f"a training step's mask covers {mask.shape[1]} positions for "
                f"{hidden.shape[1]} tokens"
            )
        start = time.perf_counter()
        set_training(module, True)
        leaf = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            out = module(leaf, mask)
        self.compute_s += time.perf_counter() - start
        return Pending(leaf, out)

    def checked_forward(
        self, module: nn.Module, hidden: torch.Tensor, mask: torch.Tensor
    ) -> Pending:
        """`timed_forward` whose output must be finite (one client's whole batch)."""
        pending = self.timed_forward(module, hidden, mask)
        check_finite(pending.outputs, "the middle's output for these activations")
        return pending

    def timed_backward(self, pending: Pending, grad: torch.Tensor) -> torch.Tensor:
        """Backward from the client's gradient; returns dL/d(input)."""
        out = pending.outputs
        check_shape(grad, out.shape)
        start = time.perf_counter()
        torch.autograd.backward(out, grad.to(out.device, out.dtype))
        self.compute_s += time.perf_counter() - start
        assert pending.inputs.grad is not None
        return pending.inputs.grad

    def forward(
        self, client: str, hidden: torch.Tensor, mask: torch.Tensor, micro: Micro = WHOLE
    ) -> torch.Tensor:
        """The middle's output for `client`'s front output (b, t, d), keeping the graph."""
        raise NotImplementedError

    def backward(self, client: str, grad: torch.Tensor, micro: Micro = WHOLE) -> torch.Tensor:
        """Finish `client`'s step (or one micro-batch of it) from dL/d(output); returns
        dL/d(input)."""
        raise NotImplementedError

    def average_clients(self, client: str, state: StateDict, weight: float) -> StateDict:
        """SplitFed: average the clients' front/back adapters (weighted by their examples)."""
        return self.client_average.meet(client, (state, weight), self.participants)


def set_training(module: nn.Module, training: bool) -> None:
    """Switch train/eval only when it changes: a switch walks every submodule (about 900 in a
    28-block middle, milliseconds), so flipping it for every decoding step would cost more than
    the step's own wire time."""
    if module.training != training:
        module.train(training)


def check_shape(grad: torch.Tensor, expected: torch.Size) -> None:
    """Refuse a client's gradient that does not match the output it answers."""
    if grad.shape != expected:
        raise StepDropped(
            f"gradient has shape {list(grad.shape)}, the step's output {list(expected)}"
        )


def _weighted_average(deposits: dict[str, tuple[StateDict, float]], max_ratio: float) -> StateDict:
    """The clients' adapters averaged by weight; weights above `max_ratio` x the median are
    capped there, so no single client can outvote the rest by claiming a huge weight."""
    weights = [w for _, w in deposits.values()]
    cap = max_ratio * statistics.median_low(weights)  # an actual client's weight
    for client, (_, w) in deposits.items():
        if w > cap:
            log.warning(
                "client %s claims weight %g; capped at %g (median x %g)", client, w, cap, max_ratio
            )
    return weighted_mean([s for s, _ in deposits.values()], [min(w, cap) for w in weights])


TRAINERS: Registry[type[MiddleTrainer]] = Registry("split mode")
