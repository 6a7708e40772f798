"""Checks that a backward pass reached everything it should train, before an optimizer step."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn


class MissingGradientError(RuntimeError):
    """A trainable parameter got no gradient from a backward pass: training it would be wrong."""


def check_gradients(params_by_name: Mapping[str, nn.Parameter]) -> None:
    """Raise MissingGradientError naming the parameters whose `.grad` is None.

    Pass exactly the parameters the backward pass should have reached (the adapter being
    trained), after it and before the optimizer step. A zero gradient is legitimate (LoRA A at
    the first step, while B is still zero); None means the loss does not depend on the parameter.
    """
    missing = [name for name, param in params_by_name.items() if param.grad is None]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise MissingGradientError(
            f"{len(missing)} of {len(params_by_name)} trainable parameters got no gradient in "
            f"the backward pass ({shown}): the loss does not depend on them, so training would "
            "silently leave them unchanged. The forward pass skips their layers, or a kernel on "
            "the way has no backward (with a quantized base, compare model.quantization = 'none')"
        )
