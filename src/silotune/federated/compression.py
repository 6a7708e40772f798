"""Compressed uploads: a client's adapter as 8-bit or 4-bit blockwise codes, and back.

bitsandbytes quantizes each tensor in blocks with one float32 scale (the block's largest
magnitude) per block: `int8` is its dynamic 8-bit map in blocks of 256 values (1 + 4/256 bytes a
value), `nf4` QLoRA's 4-bit NormalFloat in blocks of 64 (1/2 + 4/64 bytes a value). Every tensor
is flattened and zero-padded to whole blocks, in the order of its sorted name, and the upload is
two flat arrays, `codes` (uint8) and `absmax` (float32), so Flower's per-array framing is paid
twice, not once per tensor. Both sides know the tensor names and shapes (the server sent them):
nothing else travels. The server decodes before it screens and aggregates, and refuses a reply
whose arrays are not exactly what that layout gives, or whose scales are negative, NaN or Inf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from silotune.modeling.adapters import StateDict

CODES = "codes"
ABSMAX = "absmax"
Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Codec:
    """One blockwise quantization: its block size and code bits."""

    name: str
    block: int
    bits: int

    def sizes(self, shapes: Shapes) -> tuple[int, int]:
        """Bytes of codes and number of scales for tensors of these `shapes`."""
        blocks = sum(_blocks(math.prod(shape), self.block) for shape in shapes.values())
        return blocks * self.block * self.bits // 8, blocks

    def ratio(self, shapes: Shapes) -> float:
        """Tensor bytes on the wire (codes and scales) ÷ the same tensors in float32."""
        codes, scales = self.sizes(shapes)
        values = sum(math.prod(shape) for shape in shapes.values())
        return (codes + 4 * scales) / (4 * values) if values else 1.0

    def encode(self, state: StateDict) -> ArrayRecord:
        """The tensors of `state` as one record of codes and scales."""
        codes, scales = [], []
        for name in sorted(state):
            flat = state[name].detach().to("cpu", torch.float32).reshape(-1)
            padded = torch.nn.functional.pad(flat, (0, _pad(flat.numel(), self.block)))
            code, absmax = _quantize(self, padded)
            codes.append(code.reshape(-1))
            scales.append(absmax.reshape(-1).to(torch.float32))
        return ArrayRecord(
            {
                CODES: Array(torch.cat(codes).numpy() if codes else np.zeros(0, np.uint8)),
                ABSMAX: Array(torch.cat(scales).numpy() if scales else np.zeros(0, np.float32)),
            }
        )

    def decode(self, record: ArrayRecord, shapes: Shapes) -> ArrayRecord | str:
        """`record` decoded to float32 tensors of `shapes`, or why it cannot be."""
        if set(record.keys()) != {CODES, ABSMAX}:
            return f"a {self.name} upload holds {CODES!r} and {ABSMAX!r}, got {sorted(record)}"
        codes, absmax = record[CODES].numpy(), record[ABSMAX].numpy()
        n_codes, n_scales = self.sizes(shapes)
        if codes.dtype != np.uint8 or codes.shape != (n_codes,):
            return f"{CODES} is {codes.dtype} {codes.shape}, expected uint8 ({n_codes},)"
        if absmax.dtype != np.float32 or absmax.shape != (n_scales,):
            return f"{ABSMAX} is {absmax.dtype} {absmax.shape}, expected float32 ({n_scales},)"
        if not (np.isfinite(absmax).all() and (absmax >= 0).all()):
            return f"{ABSMAX} holds a negative, NaN or Inf scale"
        out: dict[str, Array] = {}
        code_at, scale_at = 0, 0
        for name in sorted(shapes):
            n = math.prod(shapes[name])
            blocks = _blocks(n, self.block)
            code_len = blocks * self.block * self.bits // 8
            if not n:
                out[name] = Array(np.zeros(shapes[name], np.float32))
                continue
            values = _dequantize(
                self,
                torch.from_numpy(codes[code_at : code_at + code_len].copy()),
                torch.from_numpy(absmax[scale_at : scale_at + blocks].copy()),
            )
            out[name] = Array(values.reshape(-1)[:n].reshape(shapes[name]).numpy())
            code_at, scale_at = code_at + code_len, scale_at + blocks
        return ArrayRecord(out)


CODECS: dict[str, Codec] = {
    "int8": Codec("int8", block=256, bits=8),
    "nf4": Codec("nf4", block=64, bits=4),
}


def codec(name: str) -> Codec | None:
    """The codec called `name`; None for "none" (uploads travel as float32)."""
    return None if name == "none" else CODECS[name]


def _blocks(values: int, block: int) -> int:
    return -(-values // block)


def _pad(values: int, block: int) -> int:
    return _blocks(values, block) * block - values


@cache
def _functional():  # type: ignore[no-untyped-def]
    # Imported on first use: bitsandbytes is slow to import and only compressed runs need it.
    import bitsandbytes.functional as bnb

    return bnb


@cache
def _code(name: str) -> torch.Tensor:
    bnb = _functional()
    code = bnb.get_4bit_type("nf4", device="cpu") if name == "nf4" else bnb.create_dynamic_map()
    return cast(torch.Tensor, code)


def _quantize(codec: Codec, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bnb = _functional()
    if codec.bits == 4:
        packed, state = bnb.quantize_4bit(values, blocksize=codec.block, quant_type="nf4")
        return cast(torch.Tensor, packed), cast(torch.Tensor, state.absmax)
    code, state = bnb.quantize_blockwise(values, code=_code(codec.name), blocksize=codec.block)
    return cast(torch.Tensor, code), cast(torch.Tensor, state.absmax)


def _dequantize(codec: Codec, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    bnb = _functional()
    values = absmax.numel() * codec.block
    if codec.bits == 4:
        state = bnb.QuantState(
            absmax=absmax,
            shape=torch.Size([values]),
            code=_code("nf4"),
            blocksize=codec.block,
            quant_type="nf4",
            dtype=torch.float32,
        )
        return cast(torch.Tensor, bnb.dequantize_4bit(codes.view(-1, 1), state))
    decoded = bnb.dequantize_blockwise(
        codes, absmax=absmax, code=_code(codec.name), blocksize=codec.block
    )
    return cast(torch.Tensor, decoded)
