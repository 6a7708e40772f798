"""DP-SGD for the one local training loop, with Opacus: Poisson-sampled batches, per-example
gradients of the trainable adapter only, per-example clipping and Gaussian noise (DPOptimizer).

The accountant (Opacus's RDP or PRV, in the ledger) assumes Poisson sampling, and Poisson sampling
is what runs: each example joins a step's batch independently with probability
q = batch_size / records, so a batch's size varies and may be 0 (a noise-only step).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import (
    UniformWithReplacementSampler,
)
from scipy.stats import poisson
from torch import nn

from silotune.config_privacy import PrivacyConfig
from silotune.config_sections import TrainConfig
from silotune.data.sft import IGNORE_INDEX, Batch, collate
from silotune.errors import ConfigError
from silotune.modeling.placement import device_of
from silotune.privacy.ledger import noise_for_target, record_delta
from silotune.privacy.mechanisms import GaussianUse
from silotune.privacy.noise import mechanism_seed
from silotune.training.guards import check_gradients

# Every LoRA input is a frozen activation, so each backward hook fires "with respect to module
# outputs" and PyTorch warns each time; Opacus needs exactly that.
_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module"


@dataclass(frozen=True)
class DPRun:
    """What `train_dp` did: the mean loss of its non-empty steps and the mechanism it ran."""

    loss: float
    use: GaussianUse


def sample_rate(batch_size: int, records: int) -> float:
    """Poisson sampling rate q: the expected batch is `batch_size` (all records if fewer)."""
    return min(1.0, batch_size / records)


def largest_batch(batch_size: int) -> int:
    """A Poisson-sampled batch of expected size `batch_size` is larger than this with
    probability below 1e-12 (a Binomial batch's tail is below its Poisson's)."""
    return int(poisson.isf(1e-12, batch_size)) + 1


def noise_multiplier_for(
    privacy: PrivacyConfig, cfg: TrainConfig, records: int, shared: Sequence[float] = ()
) -> float:
    """`privacy.noise_multiplier`, or when 0 the one that makes the planned rounds x local steps
    reach `target_epsilon` at δ with the configured Opacus accountant.

    `shared`: the noise multipliers of a split client's wire mechanisms on the same batches; the
    adapter's noise is then what is left of the target once they are joined with it
    (`mechanisms.joint`), without amplification by sampling (the wire shows the sample), so the
    client's total reaches the target.
    """
    if privacy.noise_multiplier > 0:
        return privacy.noise_multiplier
    target = noise_for_target(
        privacy.target_epsilon,
        record_delta(privacy.delta, records),
        1.0 if shared else sample_rate(cfg.batch_size, records),
        cfg.rounds * cfg.local_steps,
        privacy.accountant,
    )
    left = target**-2 - sum(s**-2 for s in shared)
    if left <= 0:
        raise ConfigError(
            f"privacy.target_epsilon = {privacy.target_epsilon:g} needs a joint noise multiplier "
            f"of {target:.3g} for a client with {records} records, and the split wire's noise "
            f"({', '.join(f'{s:g}' for s in shared)}: defence.activation_noise, "
            "defence.gradient_noise) alone is less: raise them or privacy.target_epsilon"
        )
    return float(left**-0.5)


def planned_use(
    privacy: PrivacyConfig, cfg: TrainConfig, records: int, shared: Sequence[float] = ()
) -> GaussianUse:
    """The DP-SGD mechanism one client's round of `cfg.local_steps` steps will run (`shared`:
    see `noise_multiplier_for`)."""
    return GaussianUse(
        noise_multiplier_for(privacy, cfg, records, shared),
        sample_rate(cfg.batch_size, records),
        cfg.local_steps,
    )


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's own mean next-token loss over its labelled tokens, shape (b,).

    The model's built-in loss averages over every token of the batch, which mixes examples:
    per-example clipping needs each example's loss on its own.
    """
    # Shift the labels, not the logits (as transformers' own loss does): logits[:, :-1] is not
    # contiguous, and flattening it would copy the (b, t, v) logits and their gradient.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (b, t)
    tokens = F.cross_entropy(
        logits.float().flatten(0, 1),  # (b*t, v)
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return tokens.sum(dim=1) / counts


def train_dp(
    model: nn.Module,
    named: dict[str, nn.Parameter],
    anchors: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    examples: list[tuple[list[int], list[int]]],
    cfg: TrainConfig,
    privacy: PrivacyConfig,
    steps: int,
    pad_id: int,
    seed: int,
    proximal_mu: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
) -> DPRun:
    """Run `steps` DP-SGD steps of `optimizer` over the `named` trainable parameters.

    Per-example gradients come from Opacus's hooks on the modules that hold trainable parameters
    (frozen base layers get none); DPOptimizer clips each example's gradient over all of them
    together to `clip_norm`, adds N(0, (noise_multiplier x clip_norm)²) to the sum and divides
    by the expected batch size. `cfg.max_grad_norm` is not applied: per-example clipping
    replaces it. An empty batch calls `on_step` with NaN.
    """
    if not examples:
        raise ValueError("no examples to train on")
    if cfg.gradient_checkpointing:
        # Recomputed forwards would record each layer's activations twice in Opacus's hooks.
        raise ConfigError(
            "privacy.mode = dp-sgd cannot run with train.gradient_checkpointing = true: "
            "set one of them off"
        )
    records = len(examples)
    rate = sample_rate(cfg.batch_size, records)
    sigma = noise_multiplier_for(privacy, cfg, records)
    device = device_of(model)
    noise = torch.Generator(device=device).manual_seed(mechanism_seed(privacy, seed, "dp-noise"))
    sampler = UniformWithReplacementSampler(
        num_samples=records,
        sample_rate=rate,
        generator=torch.Generator().manual_seed(mechanism_seed(privacy, seed, "dp-sampling")),
        steps=steps,
    )
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=sigma,
        max_grad_norm=privacy.clip_norm,
        expected_batch_size=min(cfg.batch_size, records),
        loss_reduction="mean",
        generator=noise,
    )
    params = list(named.values())
    total, counted = 0.0, 0
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    model.train()
    try:
        for step, indices in enumerate(sampler):
            dp_optimizer.zero_grad(set_to_none=True)
            value = float("nan")
            if indices:
                batch = collate([examples[i] for i in indices], pad_id).to(device)
                value = _backward(module, named, batch)
                total, counted = total + value, counted + 1
            else:
                # No example this step: Opacus clips nothing, the update is noise alone.
                for p in params:
                    empty = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    p.grad_sample = empty  # type: ignore[attr-defined]
            if dp_optimizer.pre_step():
                if anchors:
                    # FedProx's pull does not read the data: added after the noise it costs no ε.
                    with torch.no_grad():
                        for p, a in zip(params, anchors, strict=True):
                            assert p.grad is not None  # DPOptimizer set it
                            p.grad.add_(p - a, alpha=proximal_mu)
                optimizer.step()
            if on_step is not None:
                on_step(step, value)
    finally:
        dp_optimizer.zero_grad(set_to_none=True)
        module.to_standard_module()  # hooks and per-sample fields off: the model is shared
        model.eval()
    return DPRun(
        loss=total / counted if counted else float("nan"),
        use=GaussianUse(noise_multiplier=sigma, sample_rate=rate, steps=steps),
    )


def _backward(module: GradSampleModule, named: dict[str, nn.Parameter], batch: Batch) -> float:
    """Forward and backward one batch (per-example grads land in `.grad_sample`); its loss."""
    out = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    # Mean over examples of each one's own loss: what loss_reduction="mean" assumes.
    loss = per_example_loss(out.logits, batch.labels).mean()
    del out
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_HOOK_WARNING)
        if loss.requires_grad:
            torch.autograd.backward(loss)
    check_gradients(named)
    return float(loss.detach())
