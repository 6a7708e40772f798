"""One local training loop for every algorithm (FedIT clients, LocIT, CenIT): a fair comparison.

It trains whatever parameters require gradients (the active LoRA adapter) for a fixed number of
optimizer steps with AdamW, gradient clipping and an optional FedProx proximal term; with
`privacy.mode = "dp-sgd"` the same steps run as DP-SGD (training/dp.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from silotune.config_privacy import PrivacyConfig
from silotune.config_sections import TrainConfig
from silotune.data.sft import Batch, batch_stream
from silotune.modeling.placement import device_of
from silotune.privacy.mechanisms import GaussianUse
from silotune.progress import tick
from silotune.training.dp import train_dp
from silotune.training.guards import check_gradients
from silotune.training.optim import clip_and_step, make_optimizer

Examples = list[tuple[list[int], list[int]]]


@dataclass(frozen=True)
class TrainResult:
    """What one call of `train_steps` did."""

    loss: float  # mean training loss over the steps
    steps: int
    examples: int  # distinct examples available to this trainer (FedAvg weights by it)
    seconds: float
    # The DP-SGD mechanism these steps ran, for the privacy ledger (None: not private).
    privacy: GaussianUse | None = None


def train_steps(
    model: nn.Module,
    examples: Examples,
    cfg: TrainConfig,
    steps: int,
    pad_id: int,
    seed: int,
    proximal_mu: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
    privacy: PrivacyConfig | None = None,
) -> TrainResult:
    """Run `steps` optimizer steps on `examples`; the model is left in eval mode.

    With `privacy.mode = "dp-sgd"` they are DP-SGD steps on Poisson-sampled batches (the loss is
    the mean over steps that drew examples) and the result carries the GaussianUse they ran.
    """
    on_step = _ticking(steps, on_step)
    # Only the adapter being trained requires grad (FedPIT freezes the other active one).
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("the model has no trainable parameters (no active adapter?)")
    params = list(named.values())
    # With FedProx, pull towards the parameters received at the start of the round.
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = make_optimizer(params, cfg)
    if privacy is not None and privacy.mode == "dp-sgd":
        start = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            run = train_dp(
                model,
                named,
                anchors,
                optimizer,
                examples,
                cfg,
                privacy,
                steps,
                pad_id,
                seed,
                proximal_mu,
                on_step,
            )
        return TrainResult(
            loss=run.loss,
            steps=steps,
            examples=len(examples),
            seconds=time.perf_counter() - start,
            privacy=run.use,
        )
    batches = batch_stream(examples, cfg.batch_size, pad_id, seed)
    start = time.perf_counter()
    # Dropout draws from the global RNG: seed it too, so a (state, data, seed) triple is replayable.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        total = _run(model, named, anchors, optimizer, batches, cfg, steps, proximal_mu, on_step)
    return TrainResult(
        loss=total / steps,
        steps=steps,
        examples=len(examples),
        seconds=time.perf_counter() - start,
    )


def _ticking(
    steps: int, on_step: Callable[[int, float], None] | None
) -> Callable[[int, float], None]:
    """`on_step` that also tells the run's progress display."""

    def step_done(step: int, loss: float) -> None:
        tick("training", step + 1, steps)
        if on_step is not None:
            on_step(step, loss)

    return step_done


def _run(
    model: nn.Module,
    named: dict[str, nn.Parameter],
    anchors: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    cfg: TrainConfig,
    steps: int,
    proximal_mu: float,
    on_step: Callable[[int, float], None] | None,
) -> float:
    """The steps themselves; returns the summed training loss."""
    total = 0.0
    params = list(named.values())
    device = device_of(model)
    model.train()
    try:
        for step in range(steps):
            batch = next(batches).to(device)
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                labels=batch.labels,
            )
            optimizer.zero_grad(set_to_none=True)
            # A loss that reaches no trainable parameter has nothing to backward: the check
            # below names them instead of autograd's "does not require grad".
            if out.loss.requires_grad:
                out.loss.backward()
            check_gradients(named)
            if anchors:
                # FedProx's mu/2 * |p - a|^2, added as its gradient mu * (p - a) after the check:
                # in the loss it would give every parameter a gradient, hiding a cut-off one.
                with torch.no_grad():
                    for p, a in zip(params, anchors, strict=True):
                        assert p.grad is not None  # checked above
                        p.grad.add_(p - a, alpha=proximal_mu)
            clip_and_step(params, optimizer, cfg)
            value = float(out.loss.detach())
            # Free this step's logits before the next forward allocates its own.
            del out
            total += value
            if on_step is not None:
                on_step(step, value)
    finally:
        model.eval()
    return total
