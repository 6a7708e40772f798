"""Differentially private few-shot generation of FedPIT's synthetic instructions, after Tang et
al., "Privacy-Preserving In-Context Learning with Differentially Private Few-Shot Generation"
(ICLR 2024).

One instruction: Poisson-sample the client's records (each with probability q), deal every
sampled record to one of `dp_groups` groups at random (at most `icl_examples` per group), and
write one in-context prompt per group plus a public prompt with no record. Token by token all
the prompts continue with the same tokens, batched through transformers' `generate` (`DPVote`):
the candidates are the public prompt's `dp_top_k` most likely next tokens (public: free), each
group's next-token distribution over them (renormalised) is one vote, the votes are summed,
Gaussian noise is added and the largest wins (report-noisy-max, post-processing).

Privacy: adding or removing one record changes at most one group's prompt (records are dealt
independently), which moves the sum by at most √2 in L2 (two points of a simplex); the noise is
sigma √2 per candidate. The T tokens of one instruction share one sample: T Gaussian mechanisms of
noise multiplier sigma on one subsample are one of sigma/√T, subsampled once (`mechanisms.joint`). A
round's `per_round` instructions draw independent samples: GaussianUse(sigma/√T, q, per_round) per
round, composed over rounds by the ledger. T is the most tokens an instruction may take;
stopping earlier depends only on the released tokens. The response to a released instruction,
written by the generator without records, and the filters that look only at synthetic data are
post-processing: everything trained on the kept examples carries the generation's ε.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import LogitsProcessor

from silotune.config_privacy import Accountant
from silotune.config_synthetic import SyntheticConfig
from silotune.errors import ConfigError
from silotune.privacy.ledger import compose, noise_for_target
from silotune.privacy.mechanisms import GaussianUse

# How far one record moves the sum of the groups' distributions, in L2.
SENSITIVITY = math.sqrt(2.0)


def sample_rate(syn: SyntheticConfig, records: int) -> float:
    """Poisson rate q that fills the groups with `icl_examples` records each on average."""
    return min(1.0, syn.dp_groups * syn.icl_examples / records)


def generation_use(
    syn: SyntheticConfig, rounds: int, records: int, delta: float, accountant: Accountant
) -> GaussianUse:
    """What one round of a client's private generation releases, as the ledger accounts it."""
    rate = sample_rate(syn, records)
    if syn.dp_noise_multiplier > 0:
        per_instruction = syn.dp_noise_multiplier / math.sqrt(syn.instruction_max_new_tokens)
    else:
        per_instruction = noise_for_target(
            syn.dp_epsilon, delta, rate, rounds * syn.per_round, accountant
        )
    return GaussianUse(per_instruction, rate, syn.per_round)


def check_budget(
    syn: SyntheticConfig, rounds: int, records: int, delta: float, accountant: Accountant
) -> GaussianUse:
    """The planned use of a client with `records` records, or ConfigError when its planned
    generation over `rounds` rounds cannot stay within synthetic.dp_epsilon."""
    what = (
        f"{rounds} rounds x {syn.per_round} private instructions of up to "
        f"{syn.instruction_max_new_tokens} tokens for a client with {records} records"
    )
    try:
        use = generation_use(syn, rounds, records, delta, accountant)
    except ValueError as exc:
        raise ConfigError(
            f"synthetic.dp_epsilon = {syn.dp_epsilon:g} cannot cover {what} ({exc}): raise it, "
            "or lower train.rounds, synthetic.per_round or synthetic.instruction_max_new_tokens"
        ) from None
    spent = compose([use] * rounds, delta, accountant)
    if syn.dp_epsilon > 0 and spent > syn.dp_epsilon * (1 + 1e-9):
        raise ConfigError(
            f"{what} spend ε = {spent:.3g} at synthetic.dp_noise_multiplier = "
            f"{syn.dp_noise_multiplier:g}, past synthetic.dp_epsilon = {syn.dp_epsilon:g}: "
            "raise the noise multiplier (or set it 0 to calibrate the noise to the budget), or "
            "lower train.rounds, synthetic.per_round or synthetic.instruction_max_new_tokens"
        )
    return use


def token_noise(syn: SyntheticConfig, use: GaussianUse) -> float:
    """The noise multiplier of each token's vote (the instruction's, x √T)."""
    return use.noise_multiplier * math.sqrt(syn.instruction_max_new_tokens)


def deal(records: int, rate: float, groups: int, cap: int, seed: int) -> list[list[int]]:
    """Record indices per group: each record in with probability `rate`, in a uniformly random
    group, in random order, at most `cap` per group. Each record's draws are its own (one
    stream per kind of draw, read in record order), so a record added at the end changes only
    the group it lands in."""
    included = np.random.default_rng([seed, 1]).random(records) < rate
    group = np.random.default_rng([seed, 2]).integers(groups, size=records)
    order = np.random.default_rng([seed, 3]).random(records)
    dealt: list[list[int]] = [[] for _ in range(groups)]
    for i in sorted(np.flatnonzero(included).tolist(), key=lambda i: order[i]):
        if len(dealt[group[i]]) < cap:
            dealt[group[i]].append(i)
    return dealt


class DPVote(LogitsProcessor):
    """Rows come in blocks of 1 + groups (the public prompt first, then one per group); every
    row of a block gets the block's noisy-vote winner as its only possible next token."""

    def __init__(self, groups: int, top_k: int, noise_std: float, seed: int) -> None:
        self.block = groups + 1
        self.top_k = top_k
        self.noise_std = noise_std
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, vocab = scores.shape
        if rows % self.block:
            raise ValueError(f"{rows} rows do not split into blocks of {self.block}")
        probs = scores.float().softmax(dim=-1).view(-1, self.block, vocab)  # (blocks, 1+G, V)
        k = min(self.top_k, vocab)
        candidates = probs[:, 0].topk(k, dim=-1).indices  # (blocks, k): the public prompt's
        votes = probs[:, 1:].gather(2, candidates[:, None, :].expand(-1, self.block - 1, -1))
        votes = votes / votes.sum(dim=-1, keepdim=True).clamp(min=1e-30)  # each group: sums to 1
        noise = torch.randn(votes.shape[0], k, generator=self.generator) * self.noise_std
        tally = votes.sum(dim=1) + noise.to(votes.device)  # (blocks, k)
        winner = candidates.gather(1, tally.argmax(dim=-1, keepdim=True))  # (blocks, 1)
        forced = torch.full_like(scores, -math.inf)
        chosen = winner.repeat_interleave(self.block, dim=0)  # (rows, 1)
        forced.scatter_(1, chosen, 0.0)
        return forced  # type: ignore[return-value]
