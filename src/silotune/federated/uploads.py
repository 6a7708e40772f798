"""What a client's upload is, when it is not the adapter the server sent: another rank, A alone,
coded; and what the server makes of the uploads when it is not the strategy's average.

`UploadPlan.of(config)` reads `lora.client_ranks`, `federated.aggregation` and
`federated.compression`. A client truncates the server's adapter to its own rank (`receive`;
FedSA: under its own B, `whole`) and sends what it shares, coded as its update, what it trained
less what it received (`send`); the server decodes a reply against the layout that client must
send, adds what it sent that client, pads it back to the server's rank (`decode`), and only then
screens and aggregates it as any other. FLoRA replaces the strategy's average with the best
rank-r pair of the weighted mean of the clients' products (`combine`); FedEx keeps the average
and a frozen correction that completes it to that mean exactly (`corrected`), which travels
down with the adapter under its own group of names (`split`, `joined`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flwr.app import ArrayRecord

from silotune import tensor_groups
from silotune.config import Config
from silotune.federated import lora_ranks
from silotune.federated.compression import Codec, codec
from silotune.federated.screening import Layout, screen
from silotune.modeling.adapters import StateDict
from silotune.records import adapter_to_record, record_to_adapter

OWN_ADAPTER = "own"  # FedSA: a client's adapter with its own B (client state, its disk's folder)
CORRECTION = "correction"  # FedEx: the group of the server record's frozen residual pairs


@dataclass(frozen=True)
class UploadPlan:
    """How every client's upload relates to the server's adapter."""

    server_rank: int
    ranks: tuple[int, ...] = ()  # each client's rank; empty: every client the server's
    codec: Codec | None = None
    stacking: bool = False  # FLoRA: aggregate the products, not the factors
    a_only: bool = False  # FedSA: only A travels; each client keeps its B
    exact: bool = False  # FedEx: the residual of averaging the factors travels down, frozen

    @classmethod
    def of(cls, config: Config) -> UploadPlan:
        """The plan `config` asks for."""
        fed = config.federated
        return cls(
            server_rank=config.lora.r,
            ranks=tuple(config.lora.client_ranks),
            codec=codec(fed.compression),
            stacking=fed.aggregation == "flora",
            a_only=fed.aggregation == "fedsa",
            exact=fed.aggregation == "fedex",
        )

    @property
    def plain(self) -> bool:
        """Whether uploads are the server's layout in float32 (no decoding)."""
        return not self.ranks and self.codec is None

    @property
    def standard(self) -> bool:
        """Whether every client uploads the server's whole adapter in float32 and the strategy's
        average is the aggregate (what the run's notes need not explain)."""
        return self.plain and not (self.stacking or self.a_only or self.exact)

    def shared(self, state: StateDict) -> StateDict:
        """What of an adapter the server holds and sends: all of it, or (FedSA) its A."""
        return {k: v for k, v in state.items() if lora_ranks.is_a(k)} if self.a_only else state

    def whole(self, shared: StateDict, own: StateDict) -> StateDict:
        """The adapter a client trains and infers with: the shared part, and (FedSA) its own
        B matrices from `own` (a whole adapter; its A is the server's to set)."""
        if not self.a_only:
            return shared
        return {**shared, **{k: v for k, v in own.items() if not lora_ranks.is_a(k)}}

    def rank(self, client: int) -> int:
        """The rank client `client` trains."""
        return self.ranks[client] if self.ranks else self.server_rank

    @staticmethod
    def split(state: StateDict) -> tuple[StateDict, StateDict]:
        """The adapter the server sent, and (FedEx) the frozen correction sent with it."""
        correction = tensor_groups.group(state, CORRECTION)
        head = tensor_groups.key(CORRECTION, "")
        return {k: v for k, v in state.items() if not k.startswith(head)}, correction

    @staticmethod
    def joined(adapter: StateDict, correction: StateDict) -> StateDict:
        """What `split` takes apart."""
        return {**adapter, **{tensor_groups.key(CORRECTION, k): v for k, v in correction.items()}}

    @staticmethod
    def merged(adapter: StateDict, correction: StateDict) -> StateDict:
        """An adapter with a FedEx correction as one LoRA adapter of their summed rank, whose
        products are the sums of theirs."""
        if not correction:
            return adapter
        pairs = lora_ranks.concat(adapter, correction)
        return {k: v.to(adapter[k].dtype) for k, v in pairs.items()}

    def corrected(
        self, states: Sequence[StateDict], weights: Sequence[float], mean: StateDict, old: StateDict
    ) -> StateDict:
        """FedEx: the new frozen correction, the old one plus what the mean of the factors
        (`mean`) misses of the weighted mean of the clients' products, as an exact pair."""
        residual = lora_ranks.concat(lora_ranks.stack(states, weights), mean, signs=[1.0, -1.0])
        return lora_ranks.compress(lora_ranks.concat(old, residual) if old else residual)

    def own(self, trained: StateDict) -> StateDict:
        """What of a trained adapter a FedSA client keeps: its B matrices."""
        return {k: v for k, v in trained.items() if not lora_ranks.is_a(k)}

    def receive(self, state: StateDict, client: int) -> StateDict:
        """The part of the server's adapter `state` that client `client` trains."""
        if self.rank(client) == self.server_rank:
            return state
        return lora_ranks.truncate(state, self.rank(client))

    def send(self, trained: StateDict, received: StateDict) -> ArrayRecord:
        """A client's trained adapter as it travels: its shared part, coded as the update since
        `received` (what rounds to the codes' precision is the update, not the adapter)."""
        trained = self.shared(trained)
        if self.codec is None:
            return adapter_to_record(trained)
        return self.codec.encode({k: trained[k] - received[k] for k in trained})

    def decode(self, record: ArrayRecord, client: object, sent: ArrayRecord) -> ArrayRecord | str:
        """`record` from client `client` as the server's adapter `sent` is laid out, in float32,
        or why it cannot be."""
        if not isinstance(client, int) or client < 0 or (self.ranks and client >= len(self.ranks)):
            return f"client id {client!r} is not one of this run's clients"
        layout = Layout.of(sent)
        shapes = lora_ranks.truncated_shapes(layout.shapes, self.rank(client))
        if self.codec is not None:
            update = self.codec.decode(record, shapes)
            if isinstance(update, str):
                return update
            received = self.receive(record_to_adapter(sent), client)
            record = adapter_to_record(
                {k: received[k] + v for k, v in record_to_adapter(update).items()}
            )
        if reason := screen(record, Layout(shapes)):
            return reason
        if shapes == layout.shapes:
            return record
        return adapter_to_record(lora_ranks.pad(record_to_adapter(record), layout.shapes))

    def combine(self, records: Sequence[ArrayRecord], weights: Sequence[float]) -> ArrayRecord:
        """FLoRA: the best server-rank pair of the weighted mean of the clients' products."""
        states = [record_to_adapter(r) for r in records]
        stacked = lora_ranks.stack(states, weights)
        return adapter_to_record(lora_ranks.project(stacked, self.server_rank, states[0]))

    def describe(self, clients: int) -> str:
        """What the plan does, for the run's notes."""
        parts = []
        if self.ranks:
            ranks = ", ".join(f"client {i}: {r}" for i, r in enumerate(self.ranks[:clients]))
            parts.append(
                f"LoRA ranks per client ({ranks}); each receives the server's rank-"
                f"{self.server_rank} adapter and trains its first components, scaled as the "
                "server's"
            )
        parts.append(
            "aggregate: the best rank-"
            f"{self.server_rank} pair of the weighted mean of the clients' products (FLoRA "
            "stacking, truncated SVD)"
            if self.stacking
            else "aggregate: the strategy's mean of the factors"
            + (", uploads zero-padded to the server's rank (HetLoRA)" if self.ranks else "")
        )
        if self.exact:
            parts.append(
                "FedEx: what the mean of the factors misses of the mean of the clients' products "
                "is kept as a frozen correction every client and the server's evaluation apply"
            )
        if self.a_only:
            parts.append(
                "FedSA: clients upload only their A matrices and keep their B; each infers with "
                "the shared A and its own B"
            )
        if self.codec:
            parts.append(
                f"uploads {self.codec.name}-coded in blocks of {self.codec.block} "
                f"(bitsandbytes), decoded on the server before screening"
            )
        return "; ".join(parts) + "."
