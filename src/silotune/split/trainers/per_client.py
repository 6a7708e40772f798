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
    WHOLE,
    Micro,
    MiddleTrainer,
    Pipeline,
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
        self.pipelines: dict[str, Pipeline] = {}  # each client's step in progress
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

    def forward(
        self, client: str, hidden: torch.Tensor, mask: torch.Tensor, micro: Micro = WHOLE
    ) -> torch.Tensor:
        replica = self.replicas[client]
        with replica.lock:
            if micro[0] == 0:
                self.dropped.pop(client, None)
                self.release(client, "a new step began")  # no gradients left from an abandoned one
                self.pipelines[client] = Pipeline(micro[1])
            pipeline = self.pipelines.get(client)
            if pipeline is None:
                raise StepDropped("micro-batch of a step the server holds no forward for")
            try:
                pending = self.checked_forward(replica.module, hidden, mask)
                pipeline.add(micro, pending)
            except BaseException:
                self.release(client, "failed")
                raise
            return pending.outputs.detach()

    def backward(self, client: str, grad: torch.Tensor, micro: Micro = WHOLE) -> torch.Tensor:
        replica = self.replicas[client]
        with replica.lock:
            pipeline = self.pipelines.get(client)
            if pipeline is None:
                raise StepDropped("gradient for a step the server holds no forward for")
            try:
                grad_in = self.timed_backward(pipeline.take(micro), grad)
                if pipeline.done:
                    del self.pipelines[client]
                    self.step(replica.module, replica.optimizer)  # zeroes the gradients if it fails
            except BaseException:
                self.release(client, "failed")
                raise
            if not pipeline.done:
                return grad_in
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
        if self.pipelines.pop(client, None) is not None and client in self.replicas:
            self.replicas[client].optimizer.zero_grad(set_to_none=True)
