"""Noise on what a split client sends: its front activations and the gradients it returns.

Activations: Gaussian noise with standard deviation `activation_noise` x each token's RMS
activation (so one setting means the same for every model and depth). Gradients: each example's
gradient (all its positions together) is clipped to L2 norm `gradient_clip`, then Gaussian noise
of standard deviation `gradient_noise` x `gradient_clip` is added to every element.
"""

from __future__ import annotations

import torch

from silotune.config_federation import DefenceConfig


class WireNoise:
    """The configured noise, drawn from this client's own seeded generator."""

    def __init__(self, defence: DefenceConfig, seed: int) -> None:
        self.defence = defence
        self.generator = torch.Generator().manual_seed(seed)

    def activations(self, hidden: torch.Tensor) -> torch.Tensor:
        """(b, t, d) hidden states as they should leave the client."""
        level = self.defence.activation_noise
        if level == 0:
            return hidden
        rms = hidden.detach().float().pow(2).mean(dim=-1, keepdim=True).sqrt()  # (b, t, 1)
        noise = torch.randn(hidden.shape, generator=self.generator) * rms * level
        return hidden + noise.to(hidden.dtype)

    def gradients(self, grad: torch.Tensor) -> torch.Tensor:
        """(b, t, d) gradients as they should leave the client."""
        clip = self.defence.gradient_clip
        if clip == 0:
            return grad
        norms = grad.float().flatten(1).norm(dim=1).clamp(min=1e-12)  # (b,)
        scale = (clip / norms).clamp(max=1.0).view(-1, *([1] * (grad.dim() - 1)))
        out: torch.Tensor = grad * scale.to(grad.dtype)
        if self.defence.gradient_noise > 0:
            noise = torch.randn(grad.shape, generator=self.generator)
            out = out + (noise * self.defence.gradient_noise * clip).to(grad.dtype)
        return out
