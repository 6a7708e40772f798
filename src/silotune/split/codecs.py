"""How activations, gradients and the attention mask are written on the split wire.

A float tensor (b, t, d) travels as `wire_dtype`, or quantized per token (one row of d values)
with an absmax scale, so an outlier in one token costs precision only there:

```
 int8   q = round(x / s), s = max|x| / 127, q in [-127, 127]      name: int8 (b, t, d)
 int4   q = round(x / s), s = max|x| / 7,   q in [-7, 7], +8,     name: uint8 (b, t, ⌈d/2⌉)
        two per byte (even index in the low nibble)
        both: name.scale float32 (b, t, 1)            |x - x̂| <= s / 2 per value
```
The mask (b, t) travels as each row's [start, stop) of ones when every row is one run (right-
padded training batches, left-padded prompts), else bit-packed with its width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from silotune.config_split import SplitConfig, WireCodec
from silotune.errors import FrameRejected
from silotune.split.protocol import WIRE_DTYPES, TensorSpec

_LEVELS = {"int8": 127, "int4": 7}
_SCALE = ".scale"
_INT4_OFFSET = 8
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FloatCodec:
    """One direction's tensors (activations or gradients) on the wire: `wire_dtype` floats or
    per-token absmax integers."""

    codec: WireCodec
    wire_dtype: str = "float32"

    @classmethod
    def pair(cls, split: SplitConfig) -> tuple[FloatCodec, FloatCodec]:
        """A run's (activations, gradients) codecs."""
        return cls(split.activation_codec, split.wire_dtype), cls(
            split.gradient_codec, split.wire_dtype
        )

    def encode(self, name: str, x: torch.Tensor) -> Tensors:
        """`x` (b, t, d) as the tensors that carry it, named `name` (and `name.scale`)."""
        if self.codec == "none":
            return {name: x.detach().to(WIRE_DTYPES[self.wire_dtype])}
        x = x.detach().float()
        levels = _LEVELS[self.codec]
        scale = x.abs().amax(dim=-1, keepdim=True) / levels  # (b, t, 1)
        q = torch.round(x / torch.where(scale > 0, scale, 1.0)).clamp_(-levels, levels)
        if self.codec == "int8":
            return {name: q.to(torch.int8), name + _SCALE: scale}
        nibbles = (q + _INT4_OFFSET).to(torch.uint8)
        if nibbles.shape[-1] % 2:  # an odd width gets one zero nibble of padding
            nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=_INT4_OFFSET)
        packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # (b, t, ⌈d/2⌉)
        return {name: packed, name + _SCALE: scale}

    def decode(self, name: str, tensors: Tensors, width: int) -> torch.Tensor:
        """The float32 tensor (b, t, width) that `encode` wrote under `name` (shapes screened
        by `check`); FrameRejected for a negative scale."""
        data = tensors[name]
        if self.codec == "none":
            return data.float()
        scale = tensors[name + _SCALE]
        if bool((scale < 0).any()):
            raise FrameRejected(f"tensor {name}{_SCALE} holds a negative scale")
        if self.codec == "int8":
            return data.float() * scale
        low = (data & 0x0F).to(torch.int16)
        high = (data >> 4).to(torch.int16)
        q = torch.stack([low, high], dim=-1).flatten(-2)[..., :width] - _INT4_OFFSET
        return q.float() * scale

    def names(self, name: str) -> set[str]:
        """The tensor names a frame carrying `name` holds."""
        return {name} if self.codec == "none" else {name, name + _SCALE}

    def check(
        self, what: str, name: str, specs: dict[str, TensorSpec], rows: int, tokens: int, width: int
    ) -> tuple[int, int]:
        """Refuse declared tensors that are not `name` (at most rows x tokens, `width` wide) in
        this codec; return its (rows, tokens)."""
        spec = specs[name]
        shape = spec.shape
        if self.codec == "none":
            dtypes, last = set(WIRE_DTYPES), width
        else:
            dtypes = {"int8"} if self.codec == "int8" else {"uint8"}
            last = width if self.codec == "int8" else math.ceil(width / 2)
        if spec.dtype not in dtypes or len(shape) != 3 or shape[2] != last:
            raise FrameRejected(
                f"{what} tensor {name} must be {' or '.join(sorted(dtypes))} (rows, tokens, "
                f"{last}) for codec {self.codec!r}, got {spec.dtype} {list(shape)}"
            )
        if not (1 <= shape[0] <= rows and 1 <= shape[1] <= tokens):
            raise FrameRejected(
                f"{what} tensor {name} has {shape[0]} rows x {shape[1]} tokens; this run "
                f"allows 1-{rows} rows x 1-{tokens} tokens"
            )
        if self.codec != "none":
            scale = specs[name + _SCALE]
            if scale.dtype != "float32" or scale.shape != (shape[0], shape[1], 1):
                raise FrameRejected(
                    f"{what} tensor {name}{_SCALE} must be float32 {[shape[0], shape[1], 1]}, "
                    f"got {scale.dtype} {list(scale.shape)}"
                )
        return shape[0], shape[1]


MASK_SPAN = "mask_span"
MASK_BITS = "mask_bits"


def encode_mask(mask: torch.Tensor) -> tuple[Tensors, dict[str, Any]]:
    """The mask (b, t) as each row's [start, stop) of ones if every row is one run, else its
    bits packed 8 to a byte; with the header field `mask_width` = t. (NumPy: a decoding step
    sends one of these per token, and torch's per-op cost dominates on tensors this small.)"""
    bits = mask.detach().cpu().numpy().astype(bool)
    width = bits.shape[1]
    meta = {"mask_width": width}
    if bits.all():  # no padding (batch-1 decoding, full training batches): one op, not five
        return {MASK_SPAN: torch.tensor([[0, width]] * bits.shape[0], dtype=torch.int32)}, meta
    ones = bits.sum(axis=1)
    start = np.where(ones > 0, bits.argmax(axis=1), 0)
    positions = np.arange(width)
    runs = (positions >= start[:, None]) & (positions < (start + ones)[:, None])
    if np.array_equal(runs, bits):
        span = np.stack([start, start + ones], axis=1).astype(np.int32)
        return {MASK_SPAN: torch.from_numpy(span)}, meta
    return {MASK_BITS: torch.from_numpy(np.packbits(bits, axis=1))}, meta  # (b, ⌈t/8⌉)


def decode_mask(tensors: Tensors, meta: dict[str, Any]) -> torch.Tensor:
    """The (b, t) long mask `encode_mask` wrote (shapes screened by `check_mask`); FrameRejected
    for a span outside [0, t] or ending before it starts."""
    width = int(meta["mask_width"])
    if MASK_SPAN in tensors:
        span = tensors[MASK_SPAN].numpy().astype(np.int64)
        start, stop = span[:, :1], span[:, 1:]
        if bool(((start < 0) | (stop < start) | (stop > width)).any()):
            raise FrameRejected("activations mask_span holds a span outside [0, mask_width]")
        positions = np.arange(width)
        return torch.from_numpy(((positions >= start) & (positions < stop)).astype(np.int64))
    bits = np.unpackbits(tensors[MASK_BITS].numpy(), axis=1, count=width)
    return torch.from_numpy(bits.astype(np.int64))


def check_mask(specs: dict[str, TensorSpec], meta: dict[str, Any], rows: int) -> int:
    """Refuse a declared mask that is not one of the two forms for `rows` rows; its width."""
    width = meta.get("mask_width")
    if type(width) is not int or width < 1:
        raise FrameRejected(f"activations frame: mask_width must be a positive int, got {width!r}")
    expected: dict[str, tuple[str, tuple[int, ...]]] = {
        MASK_SPAN: ("int32", (rows, 2)),
        MASK_BITS: ("uint8", (rows, math.ceil(width / 8))),
    }
    given = [name for name in expected if name in specs]
    if len(given) != 1:
        raise FrameRejected(f"activations frame must carry one of {MASK_SPAN} or {MASK_BITS}")
    dtype, shape = expected[given[0]]
    spec = specs[given[0]]
    if (spec.dtype, spec.shape) != (dtype, shape):
        raise FrameRejected(
            f"activations {given[0]} must be {dtype} {list(shape)}, got {spec.dtype} "
            f"{list(spec.shape)}"
        )
    return width


def mask_names(specs: dict[str, TensorSpec]) -> set[str]:
    """Which of the mask's tensor names a frame declares."""
    return {MASK_SPAN, MASK_BITS} & set(specs)
