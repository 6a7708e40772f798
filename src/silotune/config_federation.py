"""The sections of an experiment config for the silos working together: the federated server's
strategy and what its clients upload, privacy defences and attacks, with their value types and
numeric lower bounds (split learning's section: silotune.config_split). `silotune.config`
assembles, reads and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from silotune.config_sections import Algorithm
from silotune.errors import ConfigError
from silotune.typed_values import setting

if TYPE_CHECKING:
    from silotune.config import Config

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
Aggregation = Literal["fedavg", "hetlora", "flora", "fedsa", "fedex"]
Compression = Literal["none", "int8", "nf4"]
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

    strategy: Strategy = setting(
        "fedavg",
        "How the server combines the clients' updates, with Flower's own strategy: averages "
        "(fedavg, fedprox), server optimisers (fedadam, fedavgm, fedyogi, fedadagrad), or "
        "robust rules that select or trim updates (fedmedian, fedtrimmedavg, krum, multikrum, "
        "bulyan).",
    )
    fraction_train: float = setting(
        1.0,
        "Share of the clients sampled to train each round, at most 1: clients × "
        "fraction_train, rounded down, and at least one client.",
    )
    proximal_mu: float = setting(
        0.01,
        "fedprox: weight mu of the proximal term (mu / 2) ‖w - w_global‖² each client adds to "
        "its loss, which keeps its update near the global adapter.",
    )
    server_lr: float = setting(
        0.01, "fedadam, fedyogi, fedadagrad: learning rate (eta) of the server optimiser."
    )
    server_beta_1: float = setting(
        0.9, "fedadam, fedyogi: decay of the server optimiser's first moment, below 1."
    )
    server_beta_2: float = setting(
        0.99, "fedadam, fedyogi: decay of the server optimiser's second moment, below 1."
    )
    server_tau: float = setting(
        1e-3,
        "fedadam, fedyogi, fedadagrad: adaptivity, added to sqrt(v) in the denominator of the "
        "server's step.",
    )
    server_momentum: float = setting(0.9, "fedavgm: momentum of the server's SGD.")
    momentum_lr: float = setting(1.0, "fedavgm: learning rate of the server's SGD.")
    trim_fraction: float = setting(
        0.2,
        "fedtrimmedavg: share of the updates cut from each tail of every coordinate, below "
        "0.5; it must trim at least one update of those sampled a round.",
    )
    malicious_clients: int = setting(
        1,
        "krum, multikrum, bulyan: hostile clients tolerated per round (f); krum and multikrum "
        "need 2f + 3 clients a round, bulyan 4f + 3.",
    )
    multikrum_select: int = setting(
        0,
        "multikrum: updates averaged each round (0: the clients sampled a round minus "
        "`malicious_clients`).",
    )
    round_timeout_s: float = setting(
        3600.0,
        "Seconds the server waits for a round's replies; clients silent this long are recorded "
        "as dropped, and the round aggregates the replies it has if they reach `quorum`.",
    )
    quorum: int = setting(
        1,
        "Fewest valid client updates a round needs; below it the run stops. After the first "
        "round the server waits only for this many clients; krum, multikrum and bulyan raise "
        "it to their minimum.",
    )
    aggregation: Aggregation = setting(
        "fedavg",
        'How LoRA updates combine: "fedavg" (the strategy averages A and B separately), '
        '"hetlora" (the same, each client training the first `lora.client_ranks` components of '
        'the server\'s rank-`lora.r` adapter and its upload zero-padded back) or "flora" (the '
        "weighted mean of the clients' products B·A, exact by stacking, projected to the best "
        'rank-`lora.r` pair; needs strategy fedavg) or "fedsa" (FedSA-LoRA: only the A '
        "matrices are uploaded and averaged; each client keeps its B, and infers and is scored "
        'with the shared A and its own B) or "fedex" (FedEx-LoRA: the strategy\'s mean of the '
        "factors plus a frozen correction, sent to every client, that makes the model the exact "
        "mean of the clients' products; needs strategy fedavg).",
    )
    compression: Compression = setting(
        "none",
        'Uploads coded blockwise by bitsandbytes: "int8" (dynamic 8-bit, blocks of 256: about '
        '0.25 of float32) or "nf4" (4-bit NormalFloat, blocks of 64: about 0.14); the server '
        "decodes before screening and aggregating.",
    )
    max_weight_ratio: float = setting(
        10.0,
        "A client update whose weight (num-examples, or dp-weight with DP) is above this "
        "multiple of the round's median is rejected, so that no one client can outweigh the "
        "others. Where the server knows each client's records (FedIT in simulation) it checks "
        "the weight against them instead; split learning caps such a weight.",
    )

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
class DefenceConfig:
    """Privacy defences: Flower's DP wrappers and SecAgg+ (federated), noise on the split wire."""

    dp: DpKind = setting(
        "none",
        "Federated: Flower's differential-privacy wrapper around the strategy. Each client's "
        'update is clipped to `dp_clipping_norm` (by the client: "client-fixed"; by the '
        'server: "server-fixed") and the average gets Gaussian noise of '
        "`dp_noise_multiplier` × that norm / the number of clients sampled.",
    )
    dp_noise_multiplier: float = setting(
        0.0,
        "`dp`: the noise's standard deviation as a multiple of `dp_clipping_norm` (then "
        "divided by the clients sampled a round).",
    )
    dp_clipping_norm: float = setting(1.0, "`dp`: the L2 norm each client's update is clipped to.")
    secagg: bool = setting(
        False,
        "Federated: aggregate with Flower's SecAgg+ (SecAggPlusWorkflow + secaggplus_mod), so "
        "the server only learns the weighted sum of the uploads, not any one of them. Needs "
        "strategy fedavg, fedprox or fedadam, two or more clients a round, and no `dp`.",
    )
    activation_noise: float = setting(
        0.0,
        "Split: Gaussian noise on the front activations a client sends, as a multiple of each "
        "token's RMS activation (scale-free, but no DP guarantee), or of `activation_clip` "
        "when that is set (a Gaussian mechanism). 0 = off.",
    )
    activation_clip: float = setting(
        0.0,
        "Split: > 0 clips each example's whole activation tensor to this L2 norm before the "
        "noise, which makes `activation_noise` a Gaussian mechanism the privacy ledger "
        "accounts under privacy.mode = dp-sgd. 0 = off.",
    )
    gradient_clip: float = setting(
        0.0,
        "Split: each example's gradient a client returns to the server is clipped to this L2 "
        "norm (0 = off).",
    )
    gradient_noise: float = setting(
        0.0,
        "Split: Gaussian noise on the returned gradients of `gradient_noise` × "
        "`gradient_clip`, which must be set. 0 = off.",
    )


@dataclass(frozen=True)
class AttackConfig:
    """Privacy attacks run on each finished algorithm of `silotune run` (also `silotune attack`)."""

    kinds: tuple[AttackKind, ...] = setting(
        (),
        "Attacks run on each finished algorithm they apply to: extraction and membership on "
        "those whose adapter every participant holds (fedit, fedpit, fewfedweight, cenit), "
        "inversion on split.",
    )
    max_records: int = setting(
        48,
        "Extraction: at most this many member records (the clients' training records, spread "
        "over clients) and as many non-members (never trained on). Membership uses every "
        "member; inversion at most this many of the victim's records.",
    )
    max_new_tokens: int = setting(
        32,
        "Extraction: greedy tokens generated per record, scored against as many true tokens.",
    )
    prefix_fraction: float = setting(
        0.5,
        "Extraction: share of the true response given in the prefix prompt; below 1.",
    )
    rouge_threshold: float = setting(
        0.5,
        "Extraction: a record counts as extracted when the ROUGE-L F of its continuation "
        "reaches this.",
    )
    inversion_blocks: tuple[int, ...] = setting(
        (0, 1, 2),
        "Inversion: front depths (blocks after the embeddings) to measure on the public base "
        "front; the run's own `split.front_blocks`, with its trained fronts, is measured "
        "always.",
    )
    inversion_noise: tuple[float, ...] = setting(
        (0.0,),
        "Inversion: activation noise levels (× each token's RMS, as "
        "`defence.activation_noise` without a clip) to measure at each depth; the run's own "
        "setting is measured always.",
    )
    inversion_model: InversionModel = setting(
        "linear",
        'The inversion model: "linear" (one linear map from an activation to the token at its '
        'position) or "transformer" (two bidirectional encoder layers first, so that a '
        "position can use its neighbours).",
    )
    inversion_steps: int = setting(200, "Inversion: training steps of the inversion model.")
    inversion_lr: float = setting(3e-3, "Inversion: AdamW learning rate of the inversion model.")
    victim: int = setting(
        0,
        "Inversion: the client whose activations are inverted; the other clients' records "
        "are the shadow data the inversion model trains on.",
    )
    seed: int = setting(0, "Seeds the attacks' record samples and the inversion model's training.")


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


def check_strategy(config: Config, sampled: int) -> None:
    """The federated strategy's own needs, and what it cannot be combined with."""
    fed = config.federated
    if config.defence.secagg and fed.strategy not in SECAGG_STRATEGIES:
        raise ConfigError(
            f"defence.secagg runs Flower's SecAgg+ workflow, which has the strategies "
            f"{', '.join(SECAGG_STRATEGIES)} (a robust strategy needs each client's update, "
            f"which SecAgg+ hides); federated.strategy is {fed.strategy!r}"
        )
    if config.defence.dp != "none" and fed.strategy in ROBUST_STRATEGIES:
        raise ConfigError(
            f"defence.dp calibrates its noise to an average of clipped updates, which "
            f"federated.strategy = {fed.strategy!r} does not compute; use fedavg, fedprox, "
            f"fedadam, fedavgm, fedyogi or fedadagrad with DP, or set defence.dp = 'none'"
        )
    if sampled < fed.min_updates():
        raise ConfigError(
            f"federated.strategy = {fed.strategy!r} with federated.malicious_clients = "
            f"{fed.malicious_clients} needs {fed.min_updates()} clients training each round; "
            f"{sampled} do (partition.clients x federated.fraction_train): lower "
            f"malicious_clients or add clients"
        )
    if fed.strategy == "multikrum" and fed.multikrum_select > sampled:
        raise ConfigError(
            f"federated.multikrum_select = {fed.multikrum_select} but only {sampled} clients "
            f"train each round; lower it (0 picks clients - malicious_clients)"
        )
    if fed.strategy == "fedtrimmedavg" and int(fed.trim_fraction * sampled) < 1:
        raise ConfigError(
            f"federated.trim_fraction = {fed.trim_fraction} of {sampled} clients a round trims "
            f"no update (a plain mean); with 3 or more clients a round, set it to at least "
            f"{1 / sampled:.3g}"
        )
