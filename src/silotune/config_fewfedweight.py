"""The `[fewfedweight]` section: FewFedWeight's pseudo-sample and client weighting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SampleWeighting = Literal["energy", "none"]
ClientWeighting = Literal["adaptive", "equal"]


@dataclass(frozen=True)
class FewFedWeightConfig:
    """FewFedWeight (Dong et al., 2022): how pseudo samples and clients are weighted."""

    # "energy": each pseudo sample weighs n x softmax(-E / sample_temperature) over the round's n
    # samples, E its mean free energy -T logsumexp(logits / T) over its response tokens under the
    # global model (lower energy: more weight); "none": every pseudo sample weighs 1.
    sample_weighting: SampleWeighting = "energy"
    energy_temperature: float = 1.0  # T above
    sample_temperature: float = 1.0
    # Training draws from `copies` slots per example, shared out by weight (a real record has
    # weight 1): the weights' resolution, as the training loop has no per-example loss weights.
    copies: int = 4
    # "adaptive": a client's upload weighs exp(p / client_temperature), p = exp(-its trained
    # adapter's mean token loss on its own records), so FedAvg's normalisation is a softmax over
    # the clients' p; "equal": every upload weighs the same.
    client_weighting: ClientWeighting = "adaptive"
    client_temperature: float = 0.5


FEWFEDWEIGHT_MINIMUMS: dict[tuple[str, str], tuple[float, bool]] = {
    ("fewfedweight", "energy_temperature"): (0.0, False),
    ("fewfedweight", "sample_temperature"): (0.0, False),
    ("fewfedweight", "copies"): (1, True),
    ("fewfedweight", "client_temperature"): (0.0, False),
}
