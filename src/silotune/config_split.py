"""The [split] section of an experiment config: FL-GLM split learning, where the model is cut,
how the server trains its middle, and the wire, with its value types and numeric lower bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from silotune.errors import ConfigError
from silotune.typed_values import setting

if TYPE_CHECKING:
    from silotune.config import Config

SplitMode = Literal["serial", "batch", "per-client"]
KeyExchange = Literal["x25519", "rsa"]
WireDtype = Literal["float32", "bfloat16"]
WireCodec = Literal["none", "int8", "int4"]
SplitAdapter = Literal["lora", "prefix"]
DeviceMap = Literal["single", "auto"]


@dataclass(frozen=True)
class SplitConfig:
    """FL-GLM split learning: where the model is cut, how the server trains, the wire."""

    mode: SplitMode = setting(
        "serial",
        'How the server trains its middle for many clients: "serial" (one client\'s step at a '
        'time on one middle adapter), "batch" (the clients\' activations stacked into one step) '
        'or "per-client" (one middle adapter per client, averaged every `average_every` steps).',
    )
    front_blocks: int = setting(
        1,
        "Blocks after the embeddings that stay on the client (0: it sends the embeddings "
        "themselves).",
    )
    back_blocks: int = setting(
        1,
        "Last blocks that stay on the client, with the final norm and the LM head; the server "
        "holds the blocks between, at least one.",
    )
    adapter: SplitAdapter = setting(
        "lora",
        'Each segment\'s PEFT method: "lora" (the [lora] settings) or "prefix" (p-tuning v2, '
        "`prefix_tokens` virtual tokens per block).",
    )
    prefix_tokens: int = setting(16, 'adapter = "prefix": virtual tokens per block.')
    tls: bool = setting(
        True,
        "Mutual TLS between the split clients and server (`silotune run` makes throwaway "
        "certificates for the run); turn it off only for tests on one machine.",
    )
    encrypt: bool = setting(
        True,
        "AES-256-GCM on every frame, on top of TLS, with a key each session agrees by "
        "`key_exchange`.",
    )
    key_exchange: KeyExchange = setting(
        "x25519",
        'How `encrypt` agrees its key: "x25519" (ephemeral X25519 keys on both sides) or "rsa" '
        "(the FL-GLM paper's: the client wraps a random secret with the server's RSA key).",
    )
    wire_dtype: WireDtype = setting(
        "float32",
        "Precision of the activations and gradients on the wire (float16 is not offered: it "
        "underflows gradients).",
    )
    activation_codec: WireCodec = setting(
        "none",
        "Activations on the wire (the front's output going up, the middle's coming back): "
        '"none" (`wire_dtype` floats), "int8" or "int4" (quantized per token with an absmax '
        "scale: about a quarter or an eighth of float32's bytes). int8 cost no measurable "
        "held-out loss; int4 cost 0.85 on SmolLM2 (its hidden states have outlier channels).",
    )
    gradient_codec: WireCodec = setting(
        "none",
        "Gradients on the wire (dL/d(middle output) going up, dL/d(front output) coming back): "
        '"none", "int8" or "int4", as `activation_codec` (both cost no measurable held-out '
        "loss).",
    )
    micro_batches: int = setting(
        1,
        "Split each training batch into this many micro-batches and keep them all in flight: "
        "the client's front and back work on one while the wire and the server work on "
        "another; the gradients add up to the whole batch's, so the update is the same. "
        "Every mode (in batch mode micro-batch j of every client is stacked); not with DP-SGD.",
    )
    batch_window_s: float = setting(
        2.0,
        'mode = "batch": seconds the server waits for the other clients\' activations before '
        "it steps with those that came.",
    )
    average_every: int = setting(
        1, 'mode = "per-client": average the clients\' middle adapters every this many steps.'
    )
    average_clients: bool = setting(
        True,
        "Average the clients' front and back adapters at the end of each round, weighted by "
        "their records (SplitFed; a weight above `federated.max_weight_ratio` × the median is "
        "capped there); false: each client keeps its own.",
    )
    step_timeout_s: float = setting(
        120.0,
        "A client silent this long mid-step is dropped from the step and the others go on; "
        "the adapter averages wait at most this long too.",
    )
    idle_timeout_s: float = setting(
        900.0,
        "A session that sends no frame for this long is closed (its client may reconnect); it "
        "must outlast the longest local work between two frames (a client's evaluation, its "
        "checkpoint).",
    )
    connect_timeout_s: float = setting(
        120.0, "Seconds a split client waits for the server to come up."
    )
    host: str = setting(
        "127.0.0.1",
        "The address `silotune run` starts its split server on (0.0.0.0: every interface); "
        "`silotune split-server` takes --listen instead.",
    )
    port: int = setting(0, "The port `silotune run` starts its split server on; 0: any free port.")
    server_device_map: DeviceMap = setting(
        "single",
        '"auto": spread the middle\'s blocks over every visible GPU (accelerate plans the '
        'map); "single": all on `model.device`.',
    )


SPLIT_MINIMUMS: dict[tuple[str, str], tuple[float, bool]] = {
    ("split", "front_blocks"): (0, True),
    ("split", "back_blocks"): (1, True),
    ("split", "prefix_tokens"): (1, True),
    ("split", "batch_window_s"): (0.0, True),
    ("split", "average_every"): (1, True),
    ("split", "micro_batches"): (1, True),
    ("split", "step_timeout_s"): (0.0, False),
    ("split", "idle_timeout_s"): (0.0, False),
    ("split", "connect_timeout_s"): (0.0, False),
    ("split", "port"): (0, True),
}


def check_split(config: Config) -> None:
    """What pipelined micro-batches cannot be combined with, in one message each."""
    count = config.split.micro_batches
    if count == 1:
        return
    if config.privacy.mode == "dp-sgd":
        raise ConfigError(
            "split.micro_batches > 1 cannot be combined with privacy.mode = 'dp-sgd' (its "
            "per-example clipping sees the whole batch); set split.micro_batches = 1"
        )
    if count > config.train.batch_size:
        raise ConfigError(
            f"split.micro_batches = {count} is more than train.batch_size = "
            f"{config.train.batch_size}: each micro-batch needs a row"
        )
