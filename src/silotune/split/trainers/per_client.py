"""Server-hierarchical mode: one middle adapter per client, averaged every K steps."""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch

from silotune.config import Config
from silotune.modeling.adapters import StateDict, weighted_mean
from silotune.split.rendezvous import Rendezvous
from silotune.split.segments import Middle
from silotune.split.trainers.base import (
    TRAINERS,
    MiddleTrainer,
    Pending,
    Replica,
    StepDropped,
    adapter_state,
    load_state,
)


@TRAINERS.register("per-client")
class PerClientTrainer(MiddleTrainer):
    """Server-hierarchical: one middle adapter per client, trained in parallel, averaged every K."""

    def __init__(self, middle: Middle, config: Config) -> None:
        super().__init__(middle, config)
        self.every = config.split.average_every
        self.replicas: dict[str, Replica] = {}
        self.pendings: dict[str, Pending] = {}
        self.middle_average: Rendezvous[StateDict, StateDict] = Rendezvous(
            lambda d: weighted_mean(list(d.values()), [1.0] * len(d)), self.timeout_s
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
                replica = Replica(module, self.optimizer(module))
                if saved := self.restored.pop(f"replica/{client}", None):  # a resumed server
                    load_state(module, saved["adapter"])
                    replica.optimizer.load_state_dict(saved["optimizer"])
                    replica.steps = int(saved["steps"])
                self.replicas[client] = replica

    def trained(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer | None]]:
        replicas = {f"replica/{c}": (r.module, r.optimizer) for c, r in self.replicas.items()}
        return {"middle": (self.middle, None), **replicas}

    def client_middles(self) -> dict[str, torch.nn.Module]:
        return {c: r.module for c, r in self.replicas.items()}

    def training_state(self) -> dict[str, Any]:
        state = super().training_state()
        for client, replica in self.replicas.items():
            state["modules"][f"replica/{client}"]["steps"] = replica.steps
        return state

    def module_for(self, client: str) -> tuple[Middle, threading.RLock | threading.Condition]:
        replica = self.replicas[client]
        return replica.module, replica.lock

    def forward(self, client: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        replica = self.replicas[client]
        with replica.lock:
            self.dropped.pop(client, None)
            self.pendings[client] = self.checked_forward(replica.module, hidden, mask)
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
        self.stepped(client)
        if replica.steps % self.every == 0:
            averaged = self.middle_average.meet(
                client, adapter_state(replica.module), self.participants
            )
            with replica.lock:
                load_state(replica.module, averaged)
            with self.cond:
                load_state(self.middle, averaged)
        return grad_in

    def recheck_meetings(self) -> None:
        super().recheck_meetings()
        self.middle_average.recheck(self.participants())

    def release(self, client: str, reason: str) -> None:
        self.pendings.pop(client, None)
