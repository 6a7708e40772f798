"""The sections of an experiment config for the silos working together: the federated server's
strategy, FL-GLM split learning, privacy defences and attacks, with their value types and numeric
lower bounds. `silotune.config` assembles, reads and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from silotune.config_sections import Algorithm
from silotune.errors import ConfigError

Strategy = Literal[
    "fedavg",
    "fedprox",
    "fedadam",
    "fedavgm",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
]
# Strategies that select or trim updates instead of averaging them: Flower's DP wrappers calibrate
# their noise to an average, and SecAgg+ reveals only the sum, so neither can run them.
ROBUST_STRATEGIES: tuple[Strategy, ...] = (
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)
# What Flower's legacy SecAgg+ workflow runs (silotune.federated.secagg).
SECAGG_STRATEGIES: tuple[Strategy, ...] = ("fedavg", "fedprox", "fedadam")
SplitMode = Literal["serial", "batch", "per-client"]
KeyExchange = Literal["x25519", "rsa"]
WireDtype = Literal["float32", "bfloat16"]
SplitAdapter = Literal["lora", "prefix"]
DeviceMap = Literal["single", "auto"]
DpKind = Literal["none", "client-fixed", "server-fixed"]
AttackKind = Literal["extraction", "membership", "inversion"]
InversionModel = Literal["linear", "transformer"]

# Which algorithms' results each attack applies to: extraction and membership need an adapter
# every participant holds; inversion needs a split run's activations. The algorithms import this
# module, so these are spelled out; tests/test_registry.py checks them against their traits.
SHARED_ADAPTER_ALGORITHMS: tuple[Algorithm, ...] = ("fedit", "fedpit", "fewfedweight", "cenit")
ATTACK_TARGETS: dict[str, tuple[Algorithm, ...]] = {
    "extraction": SHARED_ADAPTER_ALGORITHMS,
    "membership": SHARED_ADAPTER_ALGORITHMS,
    "inversion": ("split",),
}


@dataclass(frozen=True)
class FederatedConfig:
    """Server strategy (Flower's own) and sampling for federated algorithms."""

    strategy: Strategy = "fedavg"
    fraction_train: float = 1.0
    proximal_mu: float = 0.01
    server_lr: float = 0.01  # eta of the server optimiser (fedadam, fedyogi, fedadagrad)
    server_beta_1: float = 0.9  # fedadam, fedyogi: decay of the first moment
    server_beta_2: float = 0.99  # fedadam, fedyogi: decay of the second moment
    server_tau: float = 1e-3  # fedadam, fedyogi, fedadagrad: adaptivity (added to sqrt(v))
    server_momentum: float = 0.9  # fedavgm: momentum of the server's SGD
    momentum_lr: float = 1.0  # fedavgm: learning rate of the server's SGD
    trim_fraction: float = 0.2  # fedtrimmedavg: share of updates cut from each tail, in [0, 0.5)
    # krum, multikrum, bulyan: hostile clients tolerated per round (f); krum and multikrum
    # need 2f + 3 clients a round, bulyan 4f + 3.
    malicious_clients: int = 1
    multikrum_select: int = 0  # multikrum: updates averaged (0: clients a round - f)
    round_timeout_s: float = 3600.0  # clients silent this long are recorded as dropped
    quorum: int = 1  # fewest valid client updates a round needs; below it the run stops
    # A client weight (num-examples, or dp-weight with DP) above this multiple of the round's
    # median is rejected, so that no one client can outweigh the others.
    max_weight_ratio: float = 10.0

    def __post_init__(self) -> None:
        if not self.trim_fraction < 0.5:
            raise ConfigError(
                f"federated.trim_fraction is the share cut from each tail, in [0, 0.5); got "
                f"{self.trim_fraction}"
            )
        for name in ("server_beta_1", "server_beta_2"):
            if not getattr(self, name) < 1.0:
                raise ConfigError(f"federated.{name} must be in [0, 1), got {getattr(self, name)}")

    def min_updates(self) -> int:
        """Fewest valid updates a round of this strategy needs for its robustness guarantee."""
        f = self.malicious_clients
        return {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(
            self.strategy, 1
        )


@dataclass(frozen=True)
class SplitConfig:
    """FL-GLM split learning: where the model is cut, how the server trains, the wire."""

    mode: SplitMode = "serial"
    front_blocks: int = 1  # embeddings + this many blocks stay on the client
    back_blocks: int = 1  # this many blocks + final norm + LM head stay on the client
    adapter: SplitAdapter = "lora"  # each segment's PEFT method: LoRA ([lora]) or p-tuning v2
    prefix_tokens: int = 16  # adapter = "prefix": virtual tokens per block
    tls: bool = True  # mutual TLS; turn off only for tests on one machine
    encrypt: bool = True  # AES-256-GCM on every frame, on top of TLS
    key_exchange: KeyExchange = "x25519"
    wire_dtype: WireDtype = "float32"  # activations and gradients on the wire (never fp16)
    batch_window_s: float = 2.0  # batch mode: wait this long for the other clients' activations
    average_every: int = 1  # per-client mode: average the middle adapters every K steps
    average_clients: bool = True  # average the clients' front/back adapters each round (SplitFed)
    step_timeout_s: float = 120.0  # a client silent this long mid-step is dropped
    # A session that sends no frame for this long is closed (its client may reconnect); it must
    # outlast the longest local work between two frames (a client's evaluation, its checkpoint).
    idle_timeout_s: float = 900.0
    connect_timeout_s: float = 120.0  # a client waits this long for the server to come up
    host: str = "127.0.0.1"  # where `silotune run` starts its split server
    port: int = 0  # 0: any free port
    # "auto": spread the middle's blocks over every visible GPU (accelerate plans the map);
    # "single": all on model.device.
    server_device_map: DeviceMap = "single"


@dataclass(frozen=True)
class DefenceConfig:
    """Privacy defences: Flower's DP wrappers and SecAgg+ (federated), noise on the split wire."""

    # Federated: Flower's differential-privacy wrapper around the strategy: each client's update
    # is clipped to dp_clipping_norm (by the client: "client-fixed"; by the server:
    # "server-fixed") and the average gets Gaussian noise of dp_noise_multiplier x that norm /
    # the number of clients sampled.
    dp: DpKind = "none"
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    # Federated: aggregate with Flower's SecAgg+ (SecAggPlusWorkflow + secaggplus_mod), so the
    # server only learns the weighted sum of the clients' uploads, not any one of them.
    secagg: bool = False
    # Split: Gaussian noise on the front activations a client sends. Without activation_clip,
    # its standard deviation is activation_noise x each token's RMS activation (scale-free, but
    # no DP guarantee); with activation_clip > 0, each example's whole activation tensor is
    # clipped to that L2 norm and the noise is activation_noise x activation_clip (a Gaussian
    # mechanism the privacy ledger accounts under privacy.mode = dp-sgd). 0 = off.
    activation_noise: float = 0.0
    activation_clip: float = 0.0
    # Split: each example's gradient returned to the server is clipped to this L2 norm (0 = off)
    # and gets Gaussian noise of gradient_noise x gradient_clip.
    gradient_clip: float = 0.0
    gradient_noise: float = 0.0


@dataclass(frozen=True)
class AttackConfig:
    """Privacy attacks run on each finished algorithm of `silotune run` (also `silotune attack`)."""

    kinds: tuple[AttackKind, ...] = ()
    # Extraction: at most this many member records (the clients' training records, spread over
    # clients) and as many non-members of the same data (never trained on). Membership uses
    # every member and as many non-members; inversion at most this many of the victim's records.
    max_records: int = 48
    max_new_tokens: int = 32  # extraction: greedy tokens generated per record
    prefix_fraction: float = 0.5  # extraction: share of the response given in the prefix prompt
    rouge_threshold: float = 0.5  # extraction: a record counts as extracted at ROUGE-L >= this
    # Inversion: front depths (blocks after the embeddings) and activation noise levels
    # (x RMS, as defence.activation_noise) to measure; the run's own depth is measured always.
    inversion_blocks: tuple[int, ...] = (0, 1, 2)
    inversion_noise: tuple[float, ...] = (0.0,)
    inversion_model: InversionModel = "linear"
    inversion_steps: int = 200
    inversion_lr: float = 3e-3
    victim: int = 0  # the client whose activations are inverted; the others are the shadow data
    seed: int = 0


# Numeric lower bounds of these sections: (section, key) -> (minimum, inclusive?)
FEDERATION_MINIMUMS: dict[tuple[str, str], tuple[float, bool]] = {
    ("federated", "fraction_train"): (0.0, False),
    ("federated", "proximal_mu"): (0.0, True),
    ("federated", "server_lr"): (0.0, False),
    ("federated", "round_timeout_s"): (0.0, False),
    ("federated", "quorum"): (1, True),
    ("federated", "server_beta_1"): (0.0, True),
    ("federated", "server_beta_2"): (0.0, True),
    ("federated", "server_tau"): (0.0, False),
    ("federated", "server_momentum"): (0.0, True),
    ("federated", "momentum_lr"): (0.0, False),
    ("federated", "trim_fraction"): (0.0, True),
    ("federated", "malicious_clients"): (0, True),
    ("federated", "multikrum_select"): (0, True),
    ("federated", "max_weight_ratio"): (1.0, False),
    ("split", "front_blocks"): (0, True),
    ("split", "back_blocks"): (1, True),
    ("split", "prefix_tokens"): (1, True),
    ("split", "batch_window_s"): (0.0, True),
    ("split", "average_every"): (1, True),
    ("split", "step_timeout_s"): (0.0, False),
    ("split", "idle_timeout_s"): (0.0, False),
    ("split", "connect_timeout_s"): (0.0, False),
    ("split", "port"): (0, True),
    ("defence", "dp_noise_multiplier"): (0.0, True),
    ("defence", "dp_clipping_norm"): (0.0, False),
    ("defence", "activation_noise"): (0.0, True),
    ("defence", "activation_clip"): (0.0, True),
    ("defence", "gradient_clip"): (0.0, True),
    ("defence", "gradient_noise"): (0.0, True),
    ("attack", "max_records"): (1, True),
    ("attack", "max_new_tokens"): (1, True),
    ("attack", "prefix_fraction"): (0.0, False),
    ("attack", "rouge_threshold"): (0.0, False),
    ("attack", "inversion_steps"): (1, True),
    ("attack", "inversion_lr"): (0.0, False),
    ("attack", "victim"): (0, True),
}
