"""What the split server accepts from a client: every frame is screened before it touches state.

A client holding a valid certificate may still send anything (a bug, or an attacker). The
server derives what it expects from the model and the session, never from the frame:

```
 header (clear, authenticated)        payload (after AEAD)            trainer
 ┌──────────────────────────────┐     ┌──────────────────────┐     ┌───────────────────────┐
 │ kind allowed now?            │     │ every float finite   │     │ grad shape = pending  │
 │ tensor names, dtypes, shapes │ ──▶ │ scales >= 0, mask    │ ──▶ │ cache length fits     │
 │ (as this run's codecs write) │     │ spans in the width   │     │ outputs, grads finite │
 │ sizes within model limits    │     │ weight finite, > 0   │     │                       │
 └──────────────────────────────┘     └──────────────────────┘     └───────────────────────┘
   refused before decrypting or copying a byte (no sequence number used)
```
The gRPC message limit is set from the same limits, so an oversized frame is refused by gRPC
before the server buffers it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from silotune.config import Config
from silotune.errors import FrameRejected
from silotune.split.adapters import build_split_model
from silotune.split.codecs import FloatCodec, check_mask, mask_names
from silotune.split.protocol import Frame, Kind, TensorSpec, all_finite
from silotune.split.segments import split_model
from silotune.training.dp import largest_batch

Shape = tuple[int, ...]
# A header of this size holds any legitimate frame's metadata (names of a few hundred tensors).
_HEADER_BYTES = 1 << 20
_FLOAT_DTYPES = {"float32", "bfloat16"}
CACHE_USES = ("", "new", "next")  # no cache; start one (a prompt); continue it (new tokens)


@dataclass(frozen=True)
class Limits:
    """The largest frames a client of this run can legitimately send, and the adapter it averages.

    rows: sequences per frame (the largest batch any phase uses); tokens: positions per sequence
    (prompt up to data.max_length plus every token generation may add)."""

    hidden_size: int
    rows: int
    tokens: int
    client_adapter: dict[str, Shape]
    activations: FloatCodec
    gradients: FloatCodec
    micro_batches: int = 1

    @classmethod
    def of(cls, config: Config, model_config: PretrainedConfig) -> Limits:
        """Limits for `config`'s run on a model with `model_config`."""
        new_tokens = max(
            config.eval.max_new_tokens,
            config.attack.max_new_tokens,
            config.synthetic.instruction_max_new_tokens,
            config.synthetic.response_max_new_tokens,
        )
        train = config.train.batch_size
        if config.privacy.mode == "dp-sgd":  # Poisson sampling: batches vary around batch_size
            train = largest_batch(train)
        rows = max(train, config.eval.batch_size, config.synthetic.batch_size)
        activations, gradients = FloatCodec.pair(config.split)
        return cls(
            hidden_size=int(model_config.hidden_size),
            rows=rows,
            tokens=config.data.max_length + new_tokens,
            client_adapter=client_adapter_layout(config, model_config),
            activations=activations,
            gradients=gradients,
            micro_batches=config.split.micro_batches,
        )

    def max_frame_bytes(self) -> int:
        """The largest legitimate frame (header, tensors, AEAD tag) with room to spare."""
        activations = self.rows * self.tokens * (self.hidden_size * 4 + 1)  # fp32 + bool mask
        adapter = sum(4 * math.prod(shape) for shape in self.client_adapter.values())
        return 2 * max(activations, adapter) + _HEADER_BYTES

    def check_header(self, kind: Kind, specs: list[TensorSpec], meta: dict[str, Any]) -> None:
        """Refuse a frame whose header does not describe what `kind` must carry."""
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise FrameRejected(f"{kind} frame names a tensor twice")
        by_name = {s.name: s for s in specs}
        if kind in (Kind.HELLO, Kind.KEY, Kind.BYE):
            _expect_names(kind, by_name, set())
        elif kind == Kind.ACTIVATIONS:
            _expect_names(kind, by_name, self.activations.names("hidden") | mask_names(by_name))
            train, cache = meta.get("train", False), meta.get("cache", "")
            if not isinstance(train, bool) or cache not in CACHE_USES or (train and cache):
                raise FrameRejected(
                    f"activations frame: train must be true or false and cache one of "
                    f"{CACHE_USES} (only without training), got {train!r}, {cache!r}"
                )
            if "micro" in meta and not train:
                raise FrameRejected("activations frame: only a training step has micro-batches")
            self.micro(kind, meta)
            rows, width = self.activations.check(
                kind, "hidden", by_name, self.rows, self.tokens, self.hidden_size
            )
            covered = check_mask(by_name, meta, rows)
            if not width <= covered <= self.tokens:
                raise FrameRejected(
                    f"activations mask covers {covered} positions for {width} new ones "
                    f"(at most {self.tokens})"
                )
        elif kind == Kind.GRAD:
            _expect_names(kind, by_name, self.gradients.names("grad"))
            self.micro(kind, meta)
            self.gradients.check(kind, "grad", by_name, self.rows, self.tokens, self.hidden_size)
        elif kind == Kind.AVERAGE:
            _expect_names(kind, by_name, set(self.client_adapter))
            for spec in specs:
                if spec.dtype not in _FLOAT_DTYPES or spec.shape != self.client_adapter[spec.name]:
                    raise FrameRejected(
                        f"adapter tensor {spec.name} is {spec.dtype} {list(spec.shape)}, expected "
                        f"float32 {list(self.client_adapter[spec.name])}"
                    )
            weight = meta.get("weight")
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise FrameRejected(f"average weight must be a number, got {weight!r}")
            if not (math.isfinite(weight) and weight > 0):
                raise FrameRejected(f"average weight must be finite and positive, got {weight}")

    def micro(self, kind: Kind, meta: dict[str, Any]) -> tuple[int, int]:
        """The frame's micro-batch (index, count) of its step; (0, 1) for a whole batch."""
        micro = meta.get("micro", [0, 1])
        if (
            not isinstance(micro, list)
            or len(micro) != 2
            or not all(type(v) is int for v in micro)
            or not 0 <= micro[0] < micro[1] <= self.micro_batches
        ):
            raise FrameRejected(
                f"{kind} frame: micro must be [index, count] with 0 <= index < count <= "
                f"{self.micro_batches}, got {str(micro)[:40]}"
            )
        return micro[0], micro[1]


def _expect_names(kind: Kind, got: dict[str, TensorSpec], expected: set[str]) -> None:
    if set(got) != expected:
        missing, extra = sorted(expected - set(got)), sorted(set(got) - expected)
        parts = [f"missing {', '.join(missing[:3])}"] if missing else []
        parts += [f"unexpected {', '.join(extra[:3])}"] if extra else []
        raise FrameRejected(f"{kind} frame has the wrong tensors: {'; '.join(parts)}")


def check_values(frame: Frame) -> None:
    """Refuse a frame (already authenticated) whose floating-point tensors hold NaN or Inf."""
    for name, tensor in frame.tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise FrameRejected(f"{frame.kind} tensor {name} holds NaN or Inf")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse a computed tensor (a middle output, a gradient) that is not finite."""
    if not all_finite(tensor):
        raise FrameRejected(f"{what} is not finite (NaN or Inf); the step is refused")


def client_adapter_layout(config: Config, model_config: PretrainedConfig) -> dict[str, Shape]:
    """Names and shapes of a client's front/back adapter, as it sends them to be averaged.

    Built on `meta` from the model's config with the same adapter code the clients run, so it
    costs no memory and cannot drift from what a client actually holds."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)  # type: ignore[no-untyped-call]
    segments = split_model(model, config.split.front_blocks, config.split.back_blocks)
    both = build_split_model(config, segments, lambda hidden, mask: hidden)
    return {name: tuple(p.shape) for name, p in both.named_parameters() if p.requires_grad}
