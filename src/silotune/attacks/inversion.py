"""Activation inversion: an honest-but-curious split server turns front activations into text.

The server sees every hidden state a client's front sends (embeddings + `front_blocks` blocks,
with whatever noise the client adds). With shadow data of the same domain, here the records of
colluding clients passed through the same front, it trains an inversion model from an
activation to the token at its position, then decodes the victim client's activations.

Two inversion models: `linear` (one linear map applied at every position on its own, its output
layer started from the public base model's token embeddings, which the server knows) and
`transformer` (two bidirectional encoder layers first, so a position can use its neighbours).
Scores, on the victim's own tokens only (its instruction, input and response; the prompt
template every record shares is left out): token accuracy, BLEU-4 and ROUGE-1 of the recovered
text. Tokens the shadow data never contains cannot be
recovered (the inversion model only outputs tokens it has seen); they count as misses.

The server's view is recreated from the run: the public base front for each depth measured, and
for the run's own depth of a split run the clients' trained front adapters. Noise is modelled
as the client adds it: Gaussian, standard deviation = level x each token's RMS activation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from silotune.config_federation import AttackConfig
from silotune.config_sections import DataConfig
from silotune.data.prompts import build_prompt
from silotune.data.sft import IGNORE_INDEX, encode_example
from silotune.data.synthetic import Record
from silotune.defences.split import noised_activations
from silotune.evaluation.metrics import bleu4, rouge_scores

# FL-GLM (Table 5): their inversion attack on embeddings-only vs one-block fronts.
PAPER = {
    "source": "FL-GLM paper, attack on the client's front output",
    "embeddings_only": {"bleu4": 0.2857, "rouge1": 0.3329},
    "one_block": "near 0",
}

Front = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> hidden states


@dataclass(frozen=True)
class Observed:
    """What the server holds for a set of sequences, and the truth (for scoring only)."""

    hidden: torch.Tensor  # (n, t, d)
    tokens: torch.Tensor  # (n, t)
    real: torch.Tensor  # (n, t) bool: not padding
    mask: torch.Tensor  # (n, t) bool: scored, a token of the record itself (not the template)


@dataclass(frozen=True)
class Tokens:
    """One training record as its client tokenised it, and which tokens are its own content."""

    ids: list[int]
    scored: list[bool]  # instruction, input and response tokens (not the template, not EOS)


def record_tokens(record: Record, tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> Tokens:
    """The record's training tokens; content tokens found through the prompt's char offsets."""
    ids, labels = encode_example(
        tokenizer,
        data.prompt_style,
        record["instruction"],
        record["input"],
        record["output"],
        data.max_length,
    )
    start = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids))
    text = build_prompt(data.prompt_style, tokenizer, record["instruction"], record["input"])
    enc = tokenizer(
        text, add_special_tokens=data.prompt_style == "alpaca", return_offsets_mapping=True
    )
    spans = []
    for part in (record["instruction"], record["input"]):
        at = text.find(part) if part else -1
        if at >= 0:
            spans.append((at, at + len(part)))
    in_prompt = [
        any(a < end and b > begin for begin, end in spans) for a, b in enc["offset_mapping"]
    ]
    kept = in_prompt[len(in_prompt) - start :] if start else []  # a long prompt loses its head
    response = [t != tokenizer.eos_token_id for t in ids[start:]]
    return Tokens(ids, kept + response)


@torch.no_grad()
def observe(
    front: Front,
    records: list[Tokens],
    pad: int,
    noise: float,
    generator: torch.Generator,
    batch_size: int = 8,
    clip: float = 0.0,
) -> Observed:
    """Run `front` on the right-padded records and add noise (`noise`, `clip`: as
    defence.activation_noise and activation_clip), as the client sends them."""
    sequences = [r.ids for r in records]
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
    chunks = []
    for start in range(0, len(sequences), batch_size):
        part = slice(start, start + batch_size)
        chunks.append(front(tokens[part], attention[part]).float())
    hidden = noised_activations(torch.cat(chunks), noise, clip, generator)  # (n, t, d)
    real = attention.bool()
    mask = torch.zeros_like(real)
    for i, r in enumerate(records):
        mask[i, : len(r.scored)] = torch.tensor(r.scored, dtype=torch.bool)
    return Observed(hidden, tokens, real, mask)


class Inverter(nn.Module):
    """Activations (b, t, d) -> scores over the candidate tokens (b, t, k)."""

    def __init__(self, kind: str, dim: int, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))
            self.proj.bias.zero_()
        self.encoder: nn.Module | None = None
        if kind == "transformer":
            heads = next(h for h in (8, 6, 4, 3, 2, 1) if dim % h == 0)
            layer = nn.TransformerEncoderLayer(
                dim, heads, dim_feedforward=2 * dim, batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        # Start from the base model's embeddings of the candidates: for an embeddings-only
        # front this is already a nearest-embedding decoder; training adapts it to the blocks.
        self.head = nn.Linear(dim, embeddings.shape[0])
        with torch.no_grad():
            unit = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp(min=1e-6)
            self.head.weight.copy_(unit * 10.0)
            self.head.bias.zero_()

    def forward(self, hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """`real` (b, t) marks the positions that are not padding."""
        x = hidden / hidden.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=1e-6)
        x = self.proj(x)
        if self.encoder is not None:
            x = self.encoder(x, src_key_padding_mask=~real)
        out: torch.Tensor = self.head(x)
        return out


def train_inverter(
    inverter: Inverter, shadow: Observed, target: torch.Tensor, steps: int, lr: float, seed: int
) -> float:
    """Fit on the shadow activations; `target` is the candidate index per token (-100: none)."""
    opt = torch.optim.AdamW(inverter.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    inverter.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        rows = torch.randint(0, shadow.hidden.shape[0], (8,), generator=gen)
        scores = inverter(shadow.hidden[rows], shadow.real[rows])  # (8, t, k)
        wanted = torch.where(shadow.real[rows], target[rows], -100)
        loss = nn.functional.cross_entropy(scores.transpose(1, 2), wanted, ignore_index=-100)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    inverter.eval()
    return float(loss.detach())


@torch.no_grad()
def recover(
    inverter: Inverter, victim: Observed, candidates: torch.Tensor, batch_size: int = 8
) -> torch.Tensor:
    """The token id the inverter picks at every position (b, t)."""
    picks = [
        inverter(victim.hidden[i : i + batch_size], victim.real[i : i + batch_size]).argmax(-1)
        for i in range(0, victim.hidden.shape[0], batch_size)
    ]
    return candidates[torch.cat(picks)]


def score_recovery(
    recovered: torch.Tensor, victim: Observed, tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    """Token accuracy, BLEU-4 and ROUGE-1 of the recovered text against the victim's text."""
    hits = (recovered == victim.tokens) & victim.mask
    texts, truths = [], []
    for row in range(victim.tokens.shape[0]):
        keep = victim.mask[row]
        texts.append(str(tokenizer.decode(recovered[row][keep].tolist(), skip_special_tokens=True)))
        truths.append(
            str(tokenizer.decode(victim.tokens[row][keep].tolist(), skip_special_tokens=True))
        )
    rouge1 = rouge_scores(texts, truths, "rouge1")
    return {
        "token_accuracy": round(float(hits.sum()) / max(int(victim.mask.sum()), 1), 4),
        "bleu4": round(bleu4(texts, truths), 4),
        "rouge1": round(sum(rouge1) / max(len(rouge1), 1), 4),
        "example": {"true": truths[0][:300], "recovered": texts[0][:300]},
    }


def inversion_setting(
    front: Front,
    shadow_front: Front,
    shadow: list[Tokens],
    victim: list[Tokens],
    tokenizer: PreTrainedTokenizerBase,
    embeddings: torch.Tensor,
    noise: float,
    cfg: AttackConfig,
    pad: int,
    clip: float = 0.0,
) -> dict[str, Any]:
    """Train on the shadow records' activations, decode the victim's, score the recovery."""
    gen = torch.Generator().manual_seed(cfg.seed)
    seen = observe(shadow_front, shadow, pad, noise, gen, clip=clip)
    victim_observed = observe(front, victim, pad, noise, gen, clip=clip)
    candidates = torch.unique(seen.tokens[seen.real])  # (k,) sorted token ids
    index = torch.full((embeddings.shape[0],), -100, dtype=torch.long)
    index[candidates] = torch.arange(len(candidates))
    torch.manual_seed(cfg.seed)
    inverter = Inverter(cfg.inversion_model, embeddings.shape[1], embeddings[candidates].float())
    final_loss = train_inverter(
        inverter,
        seen,
        index[seen.tokens],
        cfg.inversion_steps,
        cfg.inversion_lr,
        cfg.seed,
    )
    result = score_recovery(
        recover(inverter, victim_observed, candidates), victim_observed, tokenizer
    )
    coverage = index[victim_observed.tokens[victim_observed.mask]] >= 0
    return {
        **result,
        "noise": noise,
        "activation_clip": clip,
        "candidates": len(candidates),
        "victim_tokens_seen_in_shadow": round(float(coverage.float().mean()), 4),
        "train_loss": round(final_loss, 4),
    }
