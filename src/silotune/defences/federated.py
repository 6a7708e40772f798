"""Differential privacy for federated runs, with Flower's own fixed-clipping wrappers.

`client-fixed`: each client clips its update (Flower's `fixedclipping_mod` on the train
handler) and the server adds Gaussian noise of `noise_multiplier x clipping_norm / clients` to
the average. `server-fixed`: the server clips each update, then adds the same noise. Either way
the clients' updates are averaged with equal weights, as the noise calibration assumes.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from silotune.config_federation import DefenceConfig

# The metric every client sends when DP is on, so that FedAvg weighs the updates equally.
EQUAL_WEIGHT = "dp-weight"


def with_dp(strategy: Strategy, defence: DefenceConfig, sampled: int) -> Strategy:
    """`strategy` wrapped in the configured DP wrapper (or itself when DP is off)."""
    if defence.dp == "none":
        return strategy
    wrapper = {
        "client-fixed": DifferentialPrivacyClientSideFixedClipping,
        "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    }[defence.dp]
    return wrapper(
        strategy,
        noise_multiplier=defence.dp_noise_multiplier,
        clipping_norm=defence.dp_clipping_norm,
        num_sampled_clients=sampled,
    )


def train_mods(defence: DefenceConfig) -> list[Any]:
    """Flower mods for the clients' train handler (only: the mod assumes a train message)."""
    return [clip_update_mod] if defence.dp == "client-fixed" else []


def clip_update_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's `fixedclipping_mod`, except that a client whose update is exactly zero (e.g. a
    FedPIT client that kept no synthetic example this round) is sent back as it is: Flower's
    mod divides by the update's norm, and a zero update is within any clipping norm anyway."""
    replies: list[Message] = []

    def handler(message: Message, ctx: Context) -> Message:
        reply: Message = call_next(message, ctx)
        replies.append(reply)
        return reply

    try:
        clipped: Message = fixedclipping_mod(msg, context, handler)
    except ZeroDivisionError:
        if not replies:
            raise
        return replies[0]
    return clipped


def describe(defence: DefenceConfig) -> str:
    """One line for the report."""
    if defence.dp == "none":
        return "no differential privacy"
    side = "each client" if defence.dp == "client-fixed" else "the server"
    return (
        f"Flower's {defence.dp} DP: {side} clips every update to L2 norm "
        f"{defence.dp_clipping_norm:g}; the average gets Gaussian noise of "
        f"{defence.dp_noise_multiplier:g} x the clipping norm / clients"
    )
