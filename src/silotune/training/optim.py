"""The one optimizer and step for every trained adapter: local training and the split server."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from silotune.config_sections import TrainConfig


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over `params` with the configured learning rate and weight decay."""
    return torch.optim.AdamW(list(params), lr=cfg.lr, weight_decay=cfg.weight_decay)


def clip_and_step(
    params: list[nn.Parameter], optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> None:
    """Clip the gradients' total norm to `max_grad_norm` (0: no clipping), then step."""
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
