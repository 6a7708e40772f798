"""A split client's training step as k micro-batches in flight (`split.micro_batches`).

Unpipelined, each of the four transfers of a step waits for the one before. Pipelined, the
client sends every micro-batch's activations before it reads the first reply, and every
micro-batch's gradient before it reads the first returned one, so its front and back work on
one micro-batch while the wire and the server's middle work on another:

```
 client  F0 F1 F2 ·· B0 B1 B2 ········ b0 b1 b2        F: front, B: back + loss + its backward
 wire       →0 →1 →2 ←0 ←1 ←2 ↑0 ↑1 ↑2 ↓0 ↓1 ↓2     b: the front's backward
 server        M0 M1 M2          m0 m1 m2 step         M/m: the middle's forward / backward
```
Each micro-batch's loss is its share of the batch's (token sums over the batch's label
tokens), so the gradients add up to the whole batch's and the server steps once, after the last
micro-batch's backward: the update equals the unpipelined one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from silotune.data.sft import IGNORE_INDEX
from silotune.split.link import MiddleLink

if TYPE_CHECKING:
    from silotune.split.model import SplitCausalLM


def pipelined_loss(
    model: SplitCausalLM,
    link: MiddleLink,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """The batch's mean next-token loss, computed as `count` micro-batches over `link`; its
    backward runs theirs, pipelined the same way, into the segments' gradients."""
    anchor = torch.zeros((), requires_grad=True)  # so that autograd calls our backward
    batch = (input_ids, mask, labels)  # in a tuple: data, not inputs autograd should track
    loss: torch.Tensor = _Pipelined.apply(anchor, model, link, batch, count)  # type: ignore[no-untyped-call]
    return loss


class _Pipelined(torch.autograd.Function):
    """Forward: fronts out, backs in. Backward: back gradients out, front gradients in."""

    @staticmethod
    def forward(
        ctx: Any,
        anchor: torch.Tensor,
        model: SplitCausalLM,
        link: MiddleLink,
        batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        count: int,
    ) -> torch.Tensor:
        input_ids, mask, labels = batch  # (b, t) each
        rows = [r for r in torch.arange(input_ids.shape[0]).tensor_split(count) if len(r)]
        micros = [(j, len(rows)) for j in range(len(rows))]
        # Shifted as ForCausalLMLoss shifts: the batch's label tokens, shared by every share.
        tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
        fronts, losses, outs = [], [], []
        with torch.enable_grad():
            for micro, r in zip(micros, rows, strict=True):
                fronts.append(model.front(input_ids[r], mask[r]))  # (b_j, t, d)
                link.post_forward(fronts[-1], mask[r], train=True, micro=micro)
            with _draining(link, len(rows)) as received:
                for r, front in zip(rows, fronts, strict=True):
                    try:
                        out = link.take_forward(front).requires_grad_(True)  # leaf (b_j, t, d)
                    finally:
                        received()
                    logits = model.back(out, mask[r])
                    losses.append(
                        ForCausalLMLoss(
                            logits, labels[r], model.vocab_size, num_items_in_batch=tokens
                        )
                    )
                    outs.append(out)
        ctx.parts = (link, micros, fronts, outs, losses)
        return torch.stack([loss.detach() for loss in losses]).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, ...]:
        link, micros, fronts, outs, losses = ctx.parts
        ctx.parts = None
        with torch.enable_grad():
            for micro, out, loss in zip(micros, outs, losses, strict=True):
                torch.autograd.backward(loss, grad)  # the back's gradients, and out.grad
                link.post_backward(out.grad, micro)
            with _draining(link, len(micros)) as received:
                for front in fronts:
                    try:
                        grad_in = link.take_backward(front)
                    finally:
                        received()
                    if front.requires_grad:  # a frozen front has nothing to train
                        torch.autograd.backward(front, grad_in)
        return (None,) * 5


class _draining:
    """Counts the replies read; if anything fails before all are, reads the rest still owed so
    the session stays in step (one reply per request), then lets the error through."""

    def __init__(self, link: MiddleLink, owed: int) -> None:
        self.link, self.owed = link, owed

    def __enter__(self) -> Any:
        def received() -> None:
            self.owed -= 1

        return received

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self.link.drain(self.owed)
