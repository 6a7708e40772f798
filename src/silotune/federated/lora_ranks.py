"""LoRA adapters of different ranks on one federation: truncate, pad, stack and project.

PEFT keys a LoRA pair as `<module>.lora_A.weight` (rank x in) and `<module>.lora_B.weight`
(out x rank). A client of rank r trains the first r components of the server's rank-R adapter
(`truncate`); the server pads its upload back with zeros (`pad`, HetLoRA). Stacking (FLoRA)
concatenates the clients' pairs along the rank, B weighted, so that the stacked product is
exactly the weighted sum of the clients' products; `project` then gives the best rank-R pair
of that sum (truncated SVD), so the next round starts from it. Every client's adapter scales by
lora.alpha / lora.r whatever its rank (see modeling.adapters.peft_lora_config), so components
mean the same on all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from silotune.modeling.adapters import StateDict

A, B = ".lora_A.", ".lora_B."
Shapes = Mapping[str, tuple[int, ...]]


def is_a(name: str) -> bool:
    """Whether `name` is a LoRA A matrix."""
    return A in name


def partner(name: str) -> str:
    """The B matrix of A matrix `name`."""
    return name.replace(A, B)


def rank_of(shapes: Shapes) -> int:
    """The rank of an adapter layout (its A matrices' first dimension)."""
    ranks = {shape[0] for name, shape in shapes.items() if is_a(name)}
    if len(ranks) != 1:
        raise ValueError(f"an adapter has one rank; these tensors have {sorted(ranks)}")
    return ranks.pop()


def truncated_shapes(shapes: Shapes, rank: int) -> dict[str, tuple[int, ...]]:
    """The layout of the first `rank` components of an adapter laid out as `shapes`."""
    return {
        name: (rank, *shape[1:]) if is_a(name) else (*shape[:-1], rank)
        for name, shape in shapes.items()
    }


def a_only(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """The A matrices of a layout (what a shared-A client uploads)."""
    return {name: shape for name, shape in shapes.items() if is_a(name)}


def truncate(state: StateDict, rank: int) -> StateDict:
    """The first `rank` components of `state`."""
    return {name: (t[:rank] if is_a(name) else t[..., :rank]).clone() for name, t in state.items()}


def pad(state: StateDict, shapes: Shapes) -> StateDict:
    """`state` (a truncation of `shapes`) zero-padded to `shapes`."""
    out = {}
    for name, t in state.items():
        full = torch.zeros(shapes[name], dtype=t.dtype)
        if is_a(name):
            full[: t.shape[0]] = t
        else:
            full[..., : t.shape[-1]] = t
        out[name] = full
    return out


def stack(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """One pair per module whose product is the weighted mean of the clients' products:
    A's concatenated along the rank, B's scaled by each client's weight share (float64)."""
    total = float(sum(weights))
    return concat(*states, signs=[w / total for w in weights])


def project(stacked: StateDict, rank: int, like: StateDict) -> StateDict:
    """The best rank-`rank` pair (Frobenius) of each stacked product, split evenly between A
    and B (each carries the singular values' square roots), in `like`'s dtypes; zero-padded
    where the product's rank is lower."""
    out: StateDict = {}
    for name, (b, s, a) in _svds(stacked).items():
        keep = min(rank, s.numel())
        out.update(_pair(name, b[:, :keep], s[:keep], a[:keep], rank))
    return {k: v.to(like[k].dtype) for k, v in out.items()}


def compress(stacked: StateDict, tolerance: float = 1e-5) -> StateDict:
    """Each stacked product as a pair of its numerical rank (singular values above `tolerance`
    x the largest of all modules: well above float32 rounding, so the rank does not depend on
    the order the clients' sums were taken in), every module padded to the largest such rank
    (one adapter has one rank; at least 1), in float32."""
    svds = _svds(stacked)
    largest = max((float(s.max()) for _, s, _ in svds.values() if s.numel()), default=0.0)
    kept = {name: int((s > tolerance * largest).sum()) for name, (_, s, _) in svds.items()}
    rank = max(1, *kept.values()) if kept else 1
    out: StateDict = {}
    for name, (b, s, a) in svds.items():
        k = kept[name]
        out.update(_pair(name, b[:, :k], s[:k], a[:k], rank))
    return {k: v.to(torch.float32) for k, v in out.items()}


def _svds(stacked: StateDict) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A matrix name -> (U, S, Vh) of its pair's product B·A, from thin factorisations."""
    out = {}
    for name, a in stacked.items():
        if not is_a(name):
            continue
        b = stacked[partner(name)].to(torch.float64)
        # B A = Qb (Rb Ra^T) Qa^T: the SVD of the small core gives the product's.
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.to(torch.float64).T)
        u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
        u, vh = qb @ u, vh @ qa.T
        # Each component's sign fixed (its largest entry in U positive): the same product gives
        # the same factors, whatever order its sums were taken in.
        signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))
        signs[signs == 0] = 1.0
        out[name] = (u * signs, s, vh * signs.T)
    return out


def _pair(name: str, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> StateDict:
    """A rank-`rank` pair (zero-padded) of U diag(S) Vh, the singular values split evenly."""
    root = s.sqrt()
    new_b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    new_b[:, : s.numel()] = u * root
    new_a[: s.numel()] = root[:, None] * vh
    return {name: new_a, partner(name): new_b}


def concat(*states: StateDict, signs: Sequence[float] = ()) -> StateDict:
    """One pair per module whose product is the sum of the states' products (each times its
    sign, 1 by default): A matrices stacked along the rank, B matrices side by side."""
    signs = list(signs) or [1.0] * len(states)
    out: StateDict = {}
    for name in (n for n in states[0] if is_a(n)):
        b = partner(name)
        out[name] = torch.cat([st[name].to(torch.float64) for st in states], dim=0)
        out[b] = torch.cat(
            [st[b].to(torch.float64) * sign for st, sign in zip(states, signs, strict=True)],
            dim=-1,
        )
    return out


def product(state: StateDict, name: str) -> torch.Tensor:
    """B·A of A matrix `name`'s pair, in float64."""
    return state[partner(name)].to(torch.float64) @ state[name].to(torch.float64)


def product_gap(
    states: Sequence[StateDict], weights: Sequence[float], aggregate: StateDict, sent: StateDict
) -> float | None:
    """How far the aggregate's products B·A are from the weighted mean of the clients' products,
    relative to how far that mean moved from the products sent out (Frobenius norms over every
    module): 0 for an exact aggregate; for FedAvg of the factors, the error FedEx-LoRA removes.
    None when the adapters hold no LoRA pairs (FedSA's A alone) or the mean did not move."""
    if not any(is_a(n) and partner(n) in aggregate for n in aggregate):
        return None
    mean = stack(states, weights)
    gap = _squared_norm(concat(aggregate, mean, signs=[1.0, -1.0]))
    moved = _squared_norm(concat(mean, sent, signs=[1.0, -1.0]))
    return math.sqrt(max(gap, 0.0) / moved) if moved > 0.0 else None


def _squared_norm(pairs: StateDict) -> float:
    """Σ over modules of ‖B·A‖², from the rank x rank Gram matrices: tr(BᵀB · AAᵀ), without
    forming any out x in product (this runs every round, on every module)."""
    total = 0.0
    for name, a in pairs.items():
        if is_a(name):
            b = pairs[partner(name)].to(torch.float64)
            a64 = a.to(torch.float64)
            total += float(torch.trace((b.T @ b) @ (a64 @ a64.T)))
    return total
