"""The `[fewfedweight]` section: FewFedWeight's pseudo-sample and client weighting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from silotune.typed_values import setting

SampleWeighting = Literal["energy", "none"]
ClientWeighting = Literal["adaptive", "equal"]


@dataclass(frozen=True)
class FewFedWeightConfig:
    """FewFedWeight (Dong et al., 2022): how pseudo samples and clients are weighted."""

    sample_weighting: SampleWeighting = setting(
        "energy",
        '"energy": each pseudo sample weighs n × softmax(-E / `sample_temperature`) over the '
        "round's n samples, E its mean free energy -T logsumexp(logits / T) over its response "
        'tokens under the global model (lower energy: more weight); "none": every pseudo '
        "sample weighs 1.",
    )
    energy_temperature: float = setting(
        1.0,
        "T in a pseudo sample's free energy -T logsumexp(logits / T) (see `sample_weighting`).",
    )
    sample_temperature: float = setting(
        1.0,
        "Temperature of the softmax over the pseudo samples' energies: lower puts more of the "
        "weight on the lowest-energy samples.",
    )
    copies: int = setting(
        4,
        "Training draws from `copies` slots per example, shared out by weight (a real record "
        "weighs 1): the weights' resolution, as the training loop has no per-example loss "
        'weights. Used with sample_weighting = "energy".',
    )
    client_weighting: ClientWeighting = setting(
        "adaptive",
        '"adaptive": a client\'s upload weighs exp(p / `client_temperature`), p = exp(-its '
        "trained adapter's mean token loss on its own records), so FedAvg's normalisation is a "
        'softmax over the clients\' p; "equal": every upload weighs the same.',
    )
    client_temperature: float = setting(
        0.5,
        "The temperature of the adaptive client weights: lower spreads them further, up to "
        "exp(1 / client_temperature) apart, which `federated.max_weight_ratio` must allow.",
    )


FEWFEDWEIGHT_MINIMUMS: dict[tuple[str, str], tuple[float, bool]] = {
    ("fewfedweight", "energy_temperature"): (0.0, False),
    ("fewfedweight", "sample_temperature"): (0.0, False),
    ("fewfedweight", "copies"): (1, True),
    ("fewfedweight", "client_temperature"): (0.0, False),
}
