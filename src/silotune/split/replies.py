"""What a split client accepts from its server: the server is a peer too, and a faulty or hostile
one must not hand the client's model a tensor it did not ask for.

```
 reply          checked against what this client sent
 HIDDEN         the kind due; the codec's tensors, dtypes and (rows, tokens, width) of the
 GRAD_INPUT     request it answers; every decoded value finite
 AVERAGED       the adapter's names, shapes and float dtypes; every value finite
```
Each check raises FrameRejected naming what was wrong; the link turns it into a SplitError.
"""

from __future__ import annotations

import torch

from silotune.errors import FrameRejected
from silotune.modeling.adapters import StateDict
from silotune.split.codecs import FloatCodec
from silotune.split.protocol import Frame, Kind, all_finite, spec_of


def reply_tensor(
    reply: Frame, kind: Kind, name: str, codec: FloatCodec, like: torch.Tensor
) -> torch.Tensor:
    """The float32 tensor, shaped as `like` (b, t, d), that `reply` carries under `name`."""
    _expect_kind(reply, kind)
    specs = {key: spec_of(key, tensor) for key, tensor in reply.tensors.items()}
    expected = codec.names(name)
    if set(specs) != expected:
        raise FrameRejected(
            f"{kind} reply carries {[n[:40] for n in sorted(specs)[:4]]}, expected "
            f"{sorted(expected)}"
        )
    rows, tokens, width = like.shape
    codec.check(f"{kind} reply", name, specs, rows, tokens, width)
    out = codec.decode(name, reply.tensors, width)
    if out.shape != like.shape:
        raise FrameRejected(
            f"{kind} reply is {list(out.shape)} for a request of {list(like.shape)}"
        )
    if not all_finite(out):
        raise FrameRejected(f"{kind} reply holds NaN or Inf")
    return out


def averaged_adapter(reply: Frame, sent: StateDict) -> StateDict:
    """The averaged adapter in `reply`: the tensors `sent` named, each its shape, float, finite."""
    _expect_kind(reply, Kind.AVERAGED)
    got = reply.tensors
    if set(got) != set(sent):
        missing, extra = sorted(set(sent) - set(got)), sorted(set(got) - set(sent))
        raise FrameRejected(
            f"averaged adapter: missing {missing[:3]}, unexpected {[n[:40] for n in extra[:3]]}"
        )
    for key, tensor in got.items():
        if not tensor.is_floating_point() or tensor.shape != sent[key].shape:
            raise FrameRejected(
                f"averaged adapter tensor {key} is {tensor.dtype} {list(tensor.shape)}, "
                f"expected a float {list(sent[key].shape)}"
            )
        if not all_finite(tensor):
            raise FrameRejected(f"averaged adapter tensor {key} holds NaN or Inf")
    return {key: tensor.to(sent[key].dtype).clone() for key, tensor in got.items()}


def _expect_kind(reply: Frame, kind: Kind) -> None:
    if reply.kind != kind:
        raise FrameRejected(f"the server answered with a {reply.kind} frame where {kind} was due")
