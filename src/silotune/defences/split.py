"""Noise on what a split client sends: its front activations and the gradients it returns.

Activations: with `activation_clip`, each example's activations (all its positions together) are
clipped to that L2 norm and get Gaussian noise of `activation_noise` x `activation_clip` on every
element, a Gaussian mechanism; without it, noise of `activation_noise` x each token's RMS
activation (one setting means the same for every model and depth, but bounds nothing).
Gradients: each example's gradient is clipped to L2 norm `gradient_clip`, then Gaussian noise of
`gradient_noise` x `gradient_clip` is added to every element.
"""

from __future__ import annotations

import torch

from silotune.config_federation import DefenceConfig
from silotune.privacy.mechanisms import Mechanism


def calibrated(defence: DefenceConfig) -> dict[Mechanism, float]:
    """The wire's Gaussian mechanisms (each example clipped, then noised): noise multiplier per
    mechanism; a mechanism missing here is not calibrated."""
    out: dict[Mechanism, float] = {}
    if defence.activation_clip > 0 and defence.activation_noise > 0:
        out["activations"] = defence.activation_noise
    if defence.gradient_clip > 0 and defence.gradient_noise > 0:
        out["gradients"] = defence.gradient_noise
    return out


def clip_examples(x: torch.Tensor, norm: float) -> torch.Tensor:
    """Scale each example (dim 0) of `x` down to L2 norm at most `norm` over all its elements."""
    norms = x.float().flatten(1).norm(dim=1).clamp(min=1e-12)  # (b,)
    scale = (norm / norms).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
    out: torch.Tensor = x * scale.to(x.dtype)
    return out


def noised_activations(
    hidden: torch.Tensor, noise: float, clip: float, generator: torch.Generator
) -> torch.Tensor:
    """(b, t, d) activations with `noise` as defence.activation_noise and `clip` as
    defence.activation_clip mean it (see the module's docstring)."""
    if clip > 0:
        hidden = clip_examples(hidden, clip)
        scale: torch.Tensor | float = clip
    else:
        scale = hidden.detach().float().pow(2).mean(dim=-1, keepdim=True).sqrt()  # (b, t, 1)
    if noise == 0:
        return hidden
    return hidden + (torch.randn(hidden.shape, generator=generator) * scale * noise).to(
        hidden.dtype
    )


class WireNoise:
    """The configured noise, drawn from this client's own seeded generator."""

    def __init__(self, defence: DefenceConfig, seed: int) -> None:
        self.defence = defence
        self.generator = torch.Generator().manual_seed(seed)

    def activations(self, hidden: torch.Tensor) -> torch.Tensor:
        """(b, t, d) hidden states as they should leave the client."""
        defence = self.defence
        return noised_activations(
            hidden, defence.activation_noise, defence.activation_clip, self.generator
        )

    def gradients(self, grad: torch.Tensor) -> torch.Tensor:
        """(b, t, d) gradients as they should leave the client."""
        clip = self.defence.gradient_clip
        if clip == 0:
            return grad
        out = clip_examples(grad, clip)
        if self.defence.gradient_noise > 0:
            noise = torch.randn(grad.shape, generator=self.generator)
            out = out + (noise * self.defence.gradient_noise * clip).to(grad.dtype)
        return out
