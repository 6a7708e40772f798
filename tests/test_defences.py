"""Defences: noise on the split wire, Flower's DP wrappers, and their config checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from silotune.attacks.inversion import Tokens, observe
from silotune.config import Config, load_config
from silotune.config_federation import DefenceConfig
from silotune.defences.federated import describe, train_mods, with_dp
from silotune.defences.split import WireNoise
from silotune.errors import ConfigError
from silotune.federated.strategies import (
    build_strategy,
)

ROOT = Path(__file__).resolve().parents[1]


def test_activation_noise_scales_with_each_tokens_rms() -> None:
    hidden = torch.randn(4, 32, 64) * torch.linspace(0.1, 10.0, 32)[None, :, None]
    noisy = WireNoise(DefenceConfig(activation_noise=0.5), seed=1).activations(hidden)
    added = noisy - hidden
    rms = hidden.pow(2).mean(-1).sqrt()  # (4, 32)
    ratio = added.pow(2).mean(-1).sqrt() / rms
    assert ratio.mean().item() == pytest.approx(0.5, rel=0.1)
    assert WireNoise(DefenceConfig(), seed=1).activations(hidden) is hidden


def test_the_inversion_attack_models_the_defence_noise_alike() -> None:
    """The attack never imports the defence; its noise model must still match it, token by
    token (each token's scale differs here, so a global RMS would not pass)."""
    scale = torch.logspace(-2, 2, 16)[None, :, None]
    hidden = torch.randn(64, 16, 32) * scale
    defended = WireNoise(DefenceConfig(activation_noise=1.0), seed=0).activations(hidden)

    def front(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden[: ids.shape[0]]

    records = [Tokens([1] * 16, [True] * 16)] * 64
    seen = observe(front, records, 0, 1.0, torch.Generator().manual_seed(3), batch_size=64)
    per_token_defence = (defended - hidden).std(dim=(0, 2))  # (16,)
    per_token_attack = (seen.hidden - hidden).std(dim=(0, 2))
    ratio = per_token_attack / per_token_defence
    assert ratio.min().item() > 0.9 and ratio.max().item() < 1.1
    assert per_token_defence[-1] > 1000 * per_token_defence[0]


def test_gradients_are_clipped_per_example_then_noised() -> None:
    grad = torch.randn(3, 8, 16) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]
    clipped = WireNoise(DefenceConfig(gradient_clip=1.0), seed=0).gradients(grad)
    norms = clipped.flatten(1).norm(dim=1)
    assert norms[0].item() == pytest.approx(grad[0].norm().item())  # under the clip: kept
    assert norms[1:].max().item() <= 1.0 + 1e-5
    noisy = WireNoise(DefenceConfig(gradient_clip=1.0, gradient_noise=0.5), seed=0).gradients(grad)
    assert (noisy - clipped).std().item() == pytest.approx(0.5, rel=0.1)


def test_defence_and_attack_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="gradient_clip"):
        load_config(None, ["defence.gradient_noise=0.5"])
    with pytest.raises(ConfigError, match="inversion"):
        load_config(None, ['attack.kinds=["inversion"]'])  # the default algorithm is fedit
    with pytest.raises(ConfigError, match="prefix_fraction"):
        load_config(None, ["attack.prefix_fraction=1.0"])
    with pytest.raises(ConfigError, match="dp"):
        load_config(None, ["defence.dp=laplace"])
    with pytest.raises(ConfigError, match="client-fixed"):
        load_config(None, ['experiment.algorithms=["fedpit"]', "defence.dp=server-fixed"])
    with pytest.raises(ConfigError, match="victim"):
        load_config(
            None,
            ['experiment.algorithms=["split"]', 'attack.kinds=["inversion"]', "attack.victim=3"],
        )
    ok = load_config(None, ['attack.kinds=["extraction","membership"]', "defence.dp=client-fixed"])
    assert ok.attack.kinds == ("extraction", "membership")


def test_dp_wraps_the_metered_strategy_with_flowers_wrapper(tiny_config: Config) -> None:
    inner = build_strategy(tiny_config.federated, 3, weight="dp-weight")
    assert with_dp(inner, DefenceConfig(), 3) is inner
    assert train_mods(DefenceConfig()) == []
    for kind, name in (
        ("client-fixed", "DifferentialPrivacyClientSideFixedClipping"),
        ("server-fixed", "DifferentialPrivacyServerSideFixedClipping"),
    ):
        defence = DefenceConfig(dp=kind, dp_noise_multiplier=0.5, dp_clipping_norm=2.0)  # type: ignore[arg-type]
        wrapped: Any = with_dp(inner, defence, 3)
        assert type(wrapped).__name__ == name and wrapped.strategy is inner
        assert wrapped.clipping_norm == 2.0 and wrapped.noise_multiplier == 0.5
        assert "clips every update to L2 norm 2" in describe(defence)
    assert len(train_mods(DefenceConfig(dp="client-fixed"))) == 1


@pytest.mark.slow
def test_client_side_clipping_bounds_each_rounds_update(tmp_path: Path) -> None:
    """FedIT under Flower's client-side fixed clipping, no noise: every round moves the global
    adapter by at most the clipping norm (the mean of clipped updates)."""
    from rich.console import Console

    from silotune.runner import plan_experiment, run_experiment

    clip = 0.05
    config = load_config(
        ROOT / "configs" / "tiny.toml",
        [
            'experiment.algorithms=["fedit"]',
            "train.rounds=2",
            "eval.generate=false",
            "defence.dp=client-fixed",
            f"defence.dp_clipping_norm={clip}",
            "defence.dp_noise_multiplier=0.0",
        ],
    )
    out = run_experiment(plan_experiment(config, tmp_path / "run"), Console(quiet=True))
    final = load_file(str(out / "adapters" / "global" / "adapter_model.safetensors"))
    from silotune.modeling.load import resolve_model
    from silotune.training.workbench import Workbench

    initial = Workbench(resolve_model(config.model), config).initial
    moved = torch.sqrt(sum(((final[k] - initial[k]) ** 2).sum() for k in initial))
    assert 0 < moved.item() <= 2 * clip + 1e-4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["eval_loss"] > 0
    assert "fixed DP" in (out / "report.md").read_text()
