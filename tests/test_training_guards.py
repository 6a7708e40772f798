"""A trainable parameter the backward pass does not reach stops training with an error naming
it, instead of silently staying as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from silotune.config import Config, load_config
from silotune.modeling.adapters import GLOBAL, PRIVATE
from silotune.modeling.load import resolve_model
from silotune.training.guards import MissingGradientError, check_gradients
from silotune.training.loop import train_steps
from silotune.training.workbench import Workbench


def tiny() -> Config:
    return load_config(None, ["model.name=tiny-llama", "lora.dropout=0.0"])


def examples() -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(4):
        ids = torch.randint(5, 200, (16,), generator=gen).tolist()
        rows.append((ids, [-100] * 4 + ids[4:]))
    return rows


def test_a_zero_gradient_passes_and_a_missing_one_is_named() -> None:
    reached, cut_off = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    reached.grad = torch.zeros(2)  # LoRA A at the first step: zero, but reached
    check_gradients({"reached": reached})
    with pytest.raises(MissingGradientError, match=r"1 of 2 trainable parameters.*\(cut_off\)"):
        check_gradients({"reached": reached, "cut_off": cut_off})


@pytest.mark.parametrize("proximal_mu", [0.0, 1.0], ids=["fedavg", "fedprox"])
def test_training_refuses_a_parameter_the_loss_does_not_reach(proximal_mu: float) -> None:
    bench = Workbench(resolve_model(tiny().model), tiny())
    # A trainable tensor no layer uses, like a LoRA weight behind a kernel with no backward.
    bench.model.base_model.model.lm_head.register_parameter("stray", nn.Parameter(torch.zeros(4)))
    # FedProx's term depends on every parameter: it must not count as reaching this one.
    with pytest.raises(MissingGradientError, match=r"lm_head\.stray"):
        bench.train(bench.initial, examples(), 2, seed=1, proximal_mu=proximal_mu)
    # The failed step changed nothing.
    after = bench.take(GLOBAL)
    assert all(torch.equal(after[k], bench.initial[k]) for k in after)


def test_a_loss_that_reaches_no_trainable_parameter_names_them() -> None:
    cfg = tiny()
    bench = Workbench(resolve_model(cfg.model), cfg)
    bench.use([GLOBAL], [])  # the adapter takes part but is frozen: only the stray one trains
    bench.model.base_model.model.lm_head.register_parameter("stray", nn.Parameter(torch.zeros(4)))
    with pytest.raises(MissingGradientError, match=r"1 of 1 .*lm_head\.stray"):
        train_steps(bench.model, examples(), cfg.train, 1, bench.pad_id, seed=1)


def test_a_frozen_second_adapter_is_not_checked() -> None:
    """FedPIT trains `private` with `global` active but frozen: only `private` must be reached."""
    bench = Workbench(resolve_model(tiny().model), tiny(), private=True)
    bench.put(GLOBAL, bench.initial)
    bench.put(PRIVATE, bench.initial_private)
    bench.fit(PRIVATE, examples(), 2, seed=1, active=[GLOBAL, PRIVATE])
    private = bench.take(PRIVATE)
    assert any(not torch.equal(private[k], bench.initial_private[k]) for k in private)
    assert all(torch.equal(bench.take(GLOBAL)[k], bench.initial[k]) for k in bench.initial)
