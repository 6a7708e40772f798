"""Frames on the split-learning stream: a small JSON header + raw tensor bytes, never pickle.

```
 4 bytes    header length n (big endian)
 n bytes    header (UTF-8 JSON): kind, step, seq, tensors [{name, dtype, shape}], ...
 the rest   payload: the tensors' bytes back to back (AES-256-GCM ciphertext + tag when sealed)
```
The header travels in clear inside TLS and is authenticated as associated data of the payload,
so nobody can alter a step number, a shape or the order of frames without the frame failing.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import torch

from silotune.config import Config
from silotune.errors import FrameRejected
from silotune.security.cipher import FrameSealer

_LEN = struct.Struct(">I")
_MAX_HEADER = 1 << 20
# dtypes allowed on the wire; anything else is refused before bytes are interpreted.
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "bool": torch.bool,
    "int8": torch.int8,  # quantized activations and gradients (split.codecs)
    "uint8": torch.uint8,  # int4 pairs, packed mask bits
    "int32": torch.int32,  # mask spans
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEM_BYTES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in _DTYPES.items()}
_TAG_BYTES = 16  # AES-GCM's tag: the only bytes a payload carries beyond its tensors
_MAX_DIMS = 8
_MAX_ELEMENTS = 1 << 40  # bounds the arithmetic on declared sizes; real limits come from Limits
# What `split.wire_dtype` may choose for activations and gradients (fp16 underflows gradients).
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Kind(StrEnum):
    """What a frame carries."""

    HELLO = "hello"  # client -> server: who, which model split, key agreement
    WELCOME = "welcome"  # server -> client: key agreement reply, server settings
    KEY = "key"  # client -> server: key agreement final message
    ACTIVATIONS = "activations"  # client -> server: front output + padding mask
    HIDDEN = "hidden"  # server -> client: middle output
    GRAD = "grad"  # client -> server: dL/d(middle output)
    GRAD_INPUT = "grad_input"  # server -> client: dL/d(front output)
    AVERAGE = "average"  # client -> server: its front/back adapter at a round's end
    AVERAGED = "averaged"  # server -> client: the averaged adapter
    READY = "ready"  # server -> client: keys agreed, training may start
    ERROR = "error"  # either way: a refusal with a message
    BYE = "bye"  # client -> server: done


@dataclass
class Frame:
    """One decoded frame: its kind, the training step it belongs to, tensors and extra fields."""

    kind: Kind
    step: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def encode(frame: Frame, sealer: FrameSealer) -> bytes:
    """Serialise and seal one frame (the sealer numbers it)."""
    metas, chunks = [], []
    for name, tensor in frame.tensors.items():
        if tensor.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, not sendable")
        t = tensor.detach().contiguous().cpu()
        metas.append({"name": name, "dtype": _NAMES[t.dtype], "shape": list(t.shape)})
        # Through a byte view so bf16 (which numpy lacks) travels too; no copy for contiguous.
        chunks.append(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    seq = sealer.next_seq
    head = {"kind": str(frame.kind), "step": frame.step, "seq": seq, "tensors": metas}
    head.update(frame.meta)
    header = json.dumps(head, separators=(",", ":")).encode()
    used, body = sealer.seal(header, b"".join(chunks))
    assert used == seq
    return _LEN.pack(len(header)) + header + body


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as a frame's header declares it (checked before any payload byte is read)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of its data on the wire."""
        return math.prod(self.shape) * _ITEM_BYTES[self.dtype]


def all_finite(tensor: torch.Tensor) -> bool:
    """Every value finite (through NumPy where it reads the dtype: on the tiny frames of a
    decoding step torch's per-operation cost dominates)."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float16):
        return bool(np.isfinite(tensor.detach().numpy()).all())
    return bool(torch.isfinite(tensor).all())


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    """The spec a decoded (or about to be sent) tensor has on the wire."""
    return TensorSpec(name, _NAMES[tensor.dtype], tuple(tensor.shape))


# Screens a frame from its header alone: (kind, declared tensors, other header fields).
HeaderCheck = Callable[[Kind, list[TensorSpec], dict[str, Any]], None]


def decode(data: bytes, sealer: FrameSealer, check: HeaderCheck | None = None) -> Frame:
    """Check, open and parse one frame; FrameRejected if it is malformed, tampered or replayed.

    `check` screens the header before the payload is decrypted or copied: a frame it refuses
    uses no sequence number, so the session goes on as if it had never come."""
    if len(data) < _LEN.size:
        raise FrameRejected("frame shorter than its length prefix")
    (n,) = _LEN.unpack_from(data)
    if n > _MAX_HEADER or _LEN.size + n > len(data):
        raise FrameRejected("frame header length is out of range")
    header = data[_LEN.size : _LEN.size + n]
    try:
        head = json.loads(header)
        seq, kind = int(head.pop("seq")), Kind(head.pop("kind"))
        step, specs = int(head.pop("step")), _specs(head.pop("tensors"))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise FrameRejected(f"frame header is malformed ({exc})") from None
    declared, carried = sum(s.nbytes for s in specs), len(data) - _LEN.size - n
    if not declared <= carried <= declared + _TAG_BYTES:
        raise FrameRejected(f"frame payload is {carried} bytes for {declared} bytes of tensors")
    if check is not None:
        check(kind, specs, head)
    payload = sealer.open(seq, header, memoryview(data)[_LEN.size + n :])
    return Frame(kind, step, _tensors(specs, payload), head)


def _specs(metas: Any) -> list[TensorSpec]:
    """The declared tensors, each with a known dtype and a shape of non-negative sane ints."""
    if not isinstance(metas, list):
        raise TypeError("tensors is not a list")
    specs = []
    for meta in metas:
        name, dtype, shape = meta["name"], meta["dtype"], meta["shape"]
        if not isinstance(name, str) or dtype not in _DTYPES or not isinstance(shape, list):
            raise ValueError(f"tensor entry {str(meta)[:80]} is not a named, typed shape")
        if len(shape) > _MAX_DIMS or not all(
            type(d) is int and 0 <= d <= _MAX_ELEMENTS for d in shape
        ):
            raise ValueError(f"tensor {name[:40]!r} has an invalid shape {str(shape)[:80]}")
        spec = TensorSpec(name, dtype, tuple(shape))
        if math.prod(spec.shape) > _MAX_ELEMENTS:
            raise ValueError(f"tensor {name[:40]!r} declares more than 2^40 elements")
        specs.append(spec)
    return specs


def _tensors(specs: list[TensorSpec], payload: bytes) -> dict[str, torch.Tensor]:
    """Rebuild tensors from their declared specs and the concatenated bytes."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    buf = np.frombuffer(payload, dtype=np.uint8) if payload else np.empty(0, np.uint8)
    if sum(s.nbytes for s in specs) != len(buf):
        raise FrameRejected("frame payload length differs from its tensors")
    for spec in specs:
        raw = torch.from_numpy(buf[offset : offset + spec.nbytes].copy())
        out[spec.name] = raw.view(_DTYPES[spec.dtype]).reshape(spec.shape)
        offset += spec.nbytes
    return out


_SHARED_SPLIT_KEYS = (
    "mode",
    "front_blocks",
    "back_blocks",
    "adapter",
    "prefix_tokens",
    "encrypt",
    "key_exchange",
    "wire_dtype",
    "activation_codec",
    "gradient_codec",
    "micro_batches",
    "average_every",
    "average_clients",
)


def run_id(config: Config) -> str:
    """What client and server must agree on (model, adapter, split, training): bound into every
    frame's associated data, so frames of another run or config never open."""
    shared = {k: config.to_dict()[k] for k in ("model", "lora", "split", "train")}
    # Timeouts, windows and addresses are each side's own business.
    shared["split"] = {k: v for k, v in shared["split"].items() if k in _SHARED_SPLIT_KEYS}
    digest = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:12]
    return f"{config.experiment.name}-{digest}"
