"""FewFedWeight (Dong et al., "FewFedWeight: Few-shot Federated Learning Framework across
Multiple NLP Tasks", arXiv 2212.08354), the baseline the FedPIT paper measures itself against.

One round on one client, with one LoRA adapter (no parameter isolation):

    base + global ──self-generate, prompted with local records──▶ pseudo samples x_1..x_n
    base + global ──free energy of each pseudo response──▶ E_i,  w_i = n softmax(-E / t)_i
    train `global` on local records (weight 1) + pseudo samples (weights w_i) ──▶ global'
    upload global', weighing exp(p / t_c),  p = exp(-mean token loss of global' on local records)

The server averages the uploads with a stock Flower strategy: FedAvg's weight / sum of weights
makes the clients' weights a softmax over their p. The server evaluates the global adapter.

The paper (we could read its abstract) says: the server broadcasts the global model, which
produces pseudo data for each client; an energy-based algorithm weighs the pseudo samples to damp
the noise in them; client models get adaptive weights tuned by their performance, with which the
server aggregates them. Our choices where that leaves room, each in `[fewfedweight]`:
- pseudo data: FedPIT's self-generation (`data.synthetic`, `[synthetic]` settings and filters),
  by the current global model unless `synthetic.generator` says otherwise;
- a sample's energy: the mean over its response tokens of -T logsumexp(logits / T) under the
  generating global model (Liu et al.'s energy score: lower is more in-distribution, so weighs
  more); weights n softmax(-E / sample_temperature) keep the mean weight 1 (= a real record's);
- weighted training: the one training loop has no per-example loss weights, so each example gets
  `copies` slots shared out by weight (largest remainder), and training samples those slots;
- a client's performance: the likelihood exp(-loss) of its own records under its trained adapter
  (no per-client dev set exists in the few-shot setting), bounded in (0, 1] so that no upload can
  outweigh another by more than exp(1 / client_temperature);
- the uploads are averaged by the configured Flower strategy with those weights (not a new FedAvg).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from silotune.config import Config
from silotune.data.generators import generator_for, generator_note
from silotune.data.sft import IGNORE_INDEX, collate, tokenize_dataset
from silotune.data.synthetic import self_generate
from silotune.errors import ConfigError
from silotune.evaluation.judge import filter_judge
from silotune.federated.local import LOCAL_ROLES, LocalReply, LocalRequest, LocalRole
from silotune.federated.simulation import run_federated
from silotune.jobs import AlgorithmResult, Job, register
from silotune.modeling.adapters import GLOBAL
from silotune.modeling.memory import Process
from silotune.modeling.placement import device_of
from silotune.privacy.accounting import central_releases, dp_sgd_release
from silotune.privacy.mechanisms import Releases
from silotune.seeds import derive_seed
from silotune.training.loop import Examples

# Upload weights are integers: exp(p / t_c) in [1, exp(1 / t_c)] is sent x this, rounded.
WEIGHT_SCALE = 1000


@dataclass(frozen=True)
class Score:
    """One example's response under a model: mean free energy, summed loss, token count."""

    energy: float
    loss_sum: float
    tokens: int


@torch.no_grad()
def response_scores(
    model: nn.Module, examples: Examples, pad_id: int, temperature: float, batch_size: int
) -> list[Score]:
    """Each example's response tokens scored by `model` as it is now (in eval mode)."""
    model.eval()
    device = device_of(model)
    scores: list[Score] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        # Position j predicts token j + 1: score the positions whose next token is a response's.
        logits = logits[:, :-1].float()  # (b, t-1, vocab)
        targets = batch.labels[:, 1:]  # (b, t-1)
        mask = targets != IGNORE_INDEX
        energy = -temperature * torch.logsumexp(logits / temperature, dim=-1)  # (b, t-1)
        nll = F.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (b, t-1)
        tokens = mask.sum(dim=1)
        energy_sum = (energy * mask).sum(dim=1)
        rows = zip(energy_sum.tolist(), nll.sum(dim=1).tolist(), tokens.tolist(), strict=True)
        scores += [Score(e / max(n, 1), loss, int(n)) for e, loss, n in rows]
        del logits
    return scores


def energy_weights(energies: list[float], temperature: float) -> list[float]:
    """n x softmax(-E / temperature): lower energy weighs more; the mean weight is 1."""
    if not energies:
        return []
    logits = -torch.tensor(energies, dtype=torch.float64) / temperature
    return (torch.softmax(logits, dim=0) * len(energies)).tolist()


def weighted_multiset(examples: Examples, weights: list[float], copies: int) -> Examples:
    """`copies` x len(examples) slots shared out by weight (largest remainder): sampling the
    result uniformly draws example i with probability (close to) w_i / sum(w)."""
    total = copies * len(examples)
    quotas = [w / sum(weights) * total for w in weights]
    counts = [math.floor(q) for q in quotas]
    # Ties go to the earlier example, so the same weights always give the same set.
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return [example for example, n in zip(examples, counts, strict=True) for _ in range(n)]


def client_weight(records_loss: float, temperature: float) -> int:
    """The upload's weight from its performance p = exp(-loss) on the client's own records."""
    return round(WEIGHT_SCALE * math.exp(math.exp(-records_loss) / temperature))


def fewfedweight_round(req: LocalRequest) -> LocalReply:
    """Generate pseudo data with the global model, weigh it by energy, train, weigh the upload."""
    cfg, ffw, bench = req.config, req.config.fewfedweight, req.bench
    seed = derive_seed(cfg.experiment.seed, "fewfedweight", req.client, req.round)
    bench.put(GLOBAL, req.global_state)
    # Non-private generation whatever synthetic.dp says: the upload trains on real records anyway.
    pseudo, stats = self_generate(
        generator_for(cfg.synthetic, bench, [GLOBAL]),
        req.records,
        cfg.synthetic,
        cfg.data,
        seed,
        filter_judge(cfg),
    )
    pseudo_examples = tokenize_dataset(
        pseudo, bench.tokenizer, cfg.data.prompt_style, cfg.data.max_length
    )
    bench.use([GLOBAL])  # the energies are the global model's, whoever wrote the samples
    weights = [1.0] * len(pseudo_examples)
    energies: list[float] = []
    train_set = req.examples + pseudo_examples
    if ffw.sample_weighting == "energy" and pseudo_examples:
        scored = response_scores(
            bench.model, pseudo_examples, bench.pad_id, ffw.energy_temperature, cfg.eval.batch_size
        )
        energies = [s.energy for s in scored]
        weights = energy_weights(energies, ffw.sample_temperature)
        train_set = weighted_multiset(train_set, [1.0] * len(req.examples) + weights, ffw.copies)
    trained = bench.fit(
        GLOBAL, train_set, cfg.train.local_steps, seed + 1, [GLOBAL], proximal_mu=req.proximal_mu
    )
    own = response_scores(
        bench.model, req.examples, bench.pad_id, ffw.energy_temperature, cfg.eval.batch_size
    )
    records_loss = sum(s.loss_sum for s in own) / max(sum(s.tokens for s in own), 1)
    adaptive = ffw.client_weighting == "adaptive"
    weight = client_weight(records_loss, ffw.client_temperature) if adaptive else 1
    return LocalReply(
        upload=bench.take(GLOBAL),
        weight=weight,
        # Every client reports the same metric keys (Flower aggregates only consistent replies).
        metrics={
            **stats.to_metrics(),
            "train_loss": trained.loss,
            "train_s": trained.seconds,
            "records_loss": records_loss,
            "client_weight": weight,
            "pseudo_energy_mean": sum(energies) / len(energies) if energies else 0.0,
            "pseudo_weight_max": max(weights, default=0.0),
        },
    )


LOCAL_ROLES.register("fewfedweight")(LocalRole(train=fewfedweight_round))


def max_client_weight(config: Config) -> float:
    """The largest weight one upload can carry."""
    ffw = config.fewfedweight
    adaptive = ffw.client_weighting == "adaptive"
    return float(client_weight(0.0, ffw.client_temperature)) if adaptive else 1.0


def check_fewfedweight(config: Config) -> None:
    """Refuse the settings FewFedWeight cannot run with."""
    ffw = config.fewfedweight
    if config.privacy.mode == "dp-sgd":
        raise ConfigError(
            "privacy.mode = 'dp-sgd' cannot run FewFedWeight: its upload also trains on pseudo "
            "data written from real records without DP, and the energy weights repeat examples, "
            "which record-level DP-SGD cannot account; drop fewfedweight from the algorithms"
        )
    if ffw.client_weighting != "adaptive":
        return
    if config.defence.dp != "none":
        raise ConfigError(
            "Flower's DP weighs every client's update the same, so FewFedWeight's adaptive "
            "client weights cannot apply: set fewfedweight.client_weighting = 'equal' or "
            "defence.dp = 'none'"
        )
    ratio = math.exp(1 / ffw.client_temperature)
    if ratio > config.federated.max_weight_ratio:
        raise ConfigError(
            f"FewFedWeight's client weights span up to exp(1 / fewfedweight.client_temperature) "
            f"= {ratio:.3g} x, but federated.max_weight_ratio = "
            f"{config.federated.max_weight_ratio:g} rejects a weight above that multiple of the "
            f"median: raise max_weight_ratio to at least {ratio:.3g} or raise client_temperature"
        )


def fewfedweight_releases(config: Config) -> Releases:
    """The upload trains on real records and on pseudo data prompted with them; its weight is
    its loss on the records."""
    return {
        "adapter": dp_sgd_release(config, "the uploaded adapter (weighted by its records' loss)"),
        "synthetic": "the uploaded adapter trains on pseudo data the global model wrote, "
        "prompted with real records (no DP)",
        **central_releases(config),
    }


@register(
    "fewfedweight",
    "federated",
    "one shared LoRA adapter trained on local + energy-weighted pseudo data from the global "
    "model, averaged with adaptive client weights (Flower)",
    processes=lambda _: (Process("fewfedweight client", "client", generates=True),),
    releases=fewfedweight_releases,
    shared_adapter=True,
    deployable=True,
    weight_bound=lambda config, _: max_client_weight(config),
    check=check_fewfedweight,
)
def run_fewfedweight(job: Job) -> AlgorithmResult:
    """Run FewFedWeight on Flower's Simulation Engine, evaluating the global adapter each round."""
    cfg, ffw = job.config, job.config.fewfedweight
    result = run_federated(job, "fewfedweight")
    result.notes += [
        f"Per round each client generates {cfg.synthetic.per_round} pseudo candidates, "
        f"weighs the kept ones by {ffw.sample_weighting} "
        f"(T = {ffw.energy_temperature:g}, t = {ffw.sample_temperature:g}) and trains the global "
        f"adapter on them and its records ({cfg.train.local_steps} steps); uploads weigh "
        + (
            f"exp(exp(-records loss) / {ffw.client_temperature:g})."
            if ffw.client_weighting == "adaptive"
            else "the same."
        ),
        generator_note(cfg.synthetic),
    ]
    if cfg.synthetic.dp:
        result.notes.append(
            "FewFedWeight generated without DP (synthetic.dp applies to FedPIT only): its upload "
            "trains on real records without DP anyway."
        )
    return result
