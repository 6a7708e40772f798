"""What the split server accepts from a client: every frame is screened before it touches state.

A client holding a valid certificate may still send anything (a bug, or an attacker). The
server derives what it expects from the model and the session, never from the frame:

```
 header (clear, authenticated)        payload (after AEAD)            trainer
 ┌──────────────────────────────┐     ┌──────────────────────┐     ┌───────────────────────┐
 │ kind allowed now?            │     │ every float finite   │     │ grad shape = pending  │
 │ tensor names, dtypes, shapes │ ──▶ │ mask 0/1 (bool)      │ ──▶ │ cache length fits     │
 │ sizes within model limits    │     │ weight finite, > 0   │     │ outputs, grads finite │
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
from silotune.split.protocol import WIRE_DTYPES, Frame, Kind, TensorSpec
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
        return cls(
            hidden_size=int(model_config.hidden_size),
            rows=rows,
            tokens=config.data.max_length + new_tokens,
            client_adapter=client_adapter_layout(config, model_config),
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
            _expect_names(kind, by_name, {"hidden", "mask"})
            train, cache = meta.get("train", False), meta.get("cache", "")
            if not isinstance(train, bool) or cache not in CACHE_USES or (train and cache):
                raise FrameRejected(
                    f"activations frame: train must be true or false and cache one of "
                    f"{CACHE_USES} (only without training), got {train!r}, {cache!r}"
                )
            hidden, mask = by_name["hidden"], by_name["mask"]
            rows, width = self._hidden(kind, hidden)
            if mask.dtype != "bool" or len(mask.shape) != 2 or mask.shape[0] != rows:
                raise FrameRejected(
                    f"activations mask must be bool ({rows}, >= {width}), got {mask.dtype} "
                    f"{list(mask.shape)}"
                )
            if not width <= mask.shape[1] <= self.tokens:
                raise FrameRejected(
                    f"activations mask covers {mask.shape[1]} positions for {width} new ones "
                    f"(at most {self.tokens})"
                )
        elif kind == Kind.GRAD:
            _expect_names(kind, by_name, {"grad"})
            self._hidden(kind, by_name["grad"])
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

    def _hidden(self, kind: Kind, spec: TensorSpec) -> tuple[int, int]:
        """Check a (rows, tokens, hidden) float tensor; return (rows, tokens)."""
        shape = spec.shape
        if spec.dtype not in WIRE_DTYPES or len(shape) != 3 or shape[2] != self.hidden_size:
            raise FrameRejected(
                f"{kind} tensor {spec.name} must be float32 or bfloat16 (rows, tokens, "
                f"{self.hidden_size}), got {spec.dtype} {list(shape)}"
            )
        if not (1 <= shape[0] <= self.rows and 1 <= shape[1] <= self.tokens):
            raise FrameRejected(
                f"{kind} tensor {spec.name} has {shape[0]} rows x {shape[1]} tokens; this run "
                f"allows 1-{self.rows} rows x 1-{self.tokens} tokens"
            )
        return shape[0], shape[1]


def _expect_names(kind: Kind, got: dict[str, TensorSpec], expected: set[str]) -> None:
    if set(got) != expected:
        missing, extra = sorted(expected - set(got)), sorted(set(got) - expected)
        parts = [f"missing {', '.join(missing[:3])}"] if missing else []
        parts += [f"unexpected {', '.join(extra[:3])}"] if extra else []
        raise FrameRejected(f"{kind} frame has the wrong tensors: {'; '.join(parts)}")


def check_values(frame: Frame) -> None:
    """Refuse a frame (already authenticated) whose floating-point tensors hold NaN or Inf."""
    for name, tensor in frame.tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FrameRejected(f"{frame.kind} tensor {name} holds NaN or Inf")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse a computed tensor (a middle output, a gradient) that is not finite."""
    if not bool(torch.isfinite(tensor).all()):
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
