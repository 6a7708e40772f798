"""DP-SGD in the one training loop (Opacus) and FFA-LoRA: clipping, noise scale, accounting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import create_accountant

from silotune.config import Config, load_config
from silotune.config_privacy import PrivacyConfig
from silotune.config_sections import TrainConfig
from silotune.data.load import load_records
from silotune.data.sft import collate, tokenize_dataset
from silotune.modeling.adapters import GLOBAL, PRIVATE
from silotune.modeling.load import resolve_model
from silotune.privacy.mechanisms import GaussianUse
from silotune.training.dp import noise_multiplier_for, per_example_loss, train_dp
from silotune.training.loop import Examples, train_steps
from silotune.training.workbench import Workbench

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


def _examples(bench: Workbench, config: Config, n: int) -> Examples:
    records = load_records(config.data).dataset.select(range(n))
    return tokenize_dataset(records, bench.tokenizer, "alpaca", 48)


def _trainable(bench: Workbench) -> dict[str, torch.nn.Parameter]:
    bench.put(GLOBAL, bench.initial)
    bench.use([GLOBAL], [GLOBAL])
    return {n: p for n, p in bench.model.named_parameters() if p.requires_grad}


def _sgd_update(
    bench: Workbench, examples: Examples, clip: float, sigma: float, seed: int = 0
) -> torch.Tensor:
    """The flat change of the adapter after one full-batch DP step with SGD at lr 1."""
    named = _trainable(bench)
    before = torch.cat([p.detach().flatten() for p in named.values()])
    privacy = PrivacyConfig(mode="dp-sgd", clip_norm=clip, noise_multiplier=max(sigma, 1e-12))
    cfg = TrainConfig(batch_size=len(examples))  # q = 1: every example in the step
    optimizer = torch.optim.SGD(list(named.values()), lr=1.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        train_dp(bench.model, named, [], optimizer, examples, cfg, privacy, 1, bench.pad_id, seed)
    return torch.cat([p.detach().flatten() for p in named.values()]) - before


def _outlier(example: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """The same prompt with a long response of one repeated rare token: a huge loss."""
    ids, labels = example
    prompt = [i for i, lab in zip(ids, labels, strict=True) if lab == -100]
    return prompt + [7] * 30, [-100] * len(prompt) + [7] * 30


def test_per_example_clipping_bounds_one_examples_influence(
    tiny_bench: Workbench, tiny_config: Config
) -> None:
    examples = _examples(tiny_bench, tiny_config, 4)
    swapped = [*examples[:3], _outlier(examples[3])]
    clip = 1e-3
    plain = _sgd_update(tiny_bench, examples, clip, 0.0)
    odd = _sgd_update(tiny_bench, swapped, clip, 0.0)
    # Each example adds at most clip / expected batch; swapping one moves it by twice that.
    assert plain.norm() <= clip * (1 + 1e-4)
    assert (odd - plain).norm() <= 2 * clip / 4 * (1 + 1e-4)
    # Unclipped, the outlier moves the adapter far more: the bound above is clipping's doing.
    loose = _sgd_update(tiny_bench, examples, 1e6, 0.0)
    loose_odd = _sgd_update(tiny_bench, swapped, 1e6, 0.0)
    assert (loose_odd - loose).norm() > 100 * 2 * clip / 4


def test_noise_has_std_noise_multiplier_times_clip_over_the_expected_batch(
    tiny_bench: Workbench, tiny_config: Config
) -> None:
    examples = _examples(tiny_bench, tiny_config, 4)
    clip, sigma = 0.5, 2.0
    noise = _sgd_update(tiny_bench, examples, clip, sigma) - _sgd_update(
        tiny_bench, examples, clip, 0.0
    )
    assert noise.numel() > 1000  # the std estimate is within ~2 % (one sigma)
    assert noise.mean().abs() < 0.1 * sigma * clip / 4
    assert noise.std().item() == pytest.approx(sigma * clip / 4, rel=0.1)


def test_training_returns_the_gaussian_use_and_keeps_no_frozen_per_sample_grads(
    tiny_bench: Workbench, tiny_config: Config
) -> None:
    examples = _examples(tiny_bench, tiny_config, 10)
    _trainable(tiny_bench)
    frozen = [p for p in tiny_bench.model.parameters() if not p.requires_grad]
    seen: list[float] = []

    def on_step(step: int, loss: float) -> None:
        seen.append(loss)
        assert all(getattr(p, "grad_sample", None) is None for p in frozen)

    privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.3, clip_norm=0.7)
    cfg = tiny_config.train
    result = train_steps(
        tiny_bench.model, examples, cfg, 12, tiny_bench.pad_id, 3, on_step=on_step, privacy=privacy
    )
    assert result.privacy == GaussianUse(noise_multiplier=1.3, sample_rate=4 / 10, steps=12)
    assert len(seen) == 12 and result.steps == 12
    # Opacus's fields and hooks are gone: the shared model trains as before afterwards.
    assert not any(hasattr(p, "grad_sample") for p in tiny_bench.model.parameters())
    assert not hasattr(tiny_bench.model, "autograd_grad_sample_hooks")


def test_an_empty_poisson_batch_is_a_noise_only_step(
    tiny_bench: Workbench, tiny_config: Config
) -> None:
    examples = _examples(tiny_bench, tiny_config, 20)
    named = _trainable(tiny_bench)
    cfg = TrainConfig(batch_size=1)  # q = 1/20: about a third of the steps draw nobody
    privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0)
    losses: list[float] = []
    optimizer = torch.optim.SGD(list(named.values()), lr=0.1)
    run = train_dp(
        tiny_bench.model,
        named,
        [],
        optimizer,
        examples,
        cfg,
        privacy,
        8,
        tiny_bench.pad_id,
        0,
        on_step=lambda _, loss: losses.append(loss),
    )
    assert any(math.isnan(v) for v in losses) and not all(math.isnan(v) for v in losses)
    assert math.isfinite(run.loss)
    assert run.use == GaussianUse(1.0, 1 / 20, 8)


def test_the_calibrated_noise_reaches_the_target_epsilon_over_the_planned_steps() -> None:
    cfg = TrainConfig(rounds=3, local_steps=5, batch_size=4)
    for accountant in ("rdp", "prv"):
        privacy = PrivacyConfig(mode="dp-sgd", target_epsilon=4.0, accountant=accountant)
        sigma = noise_multiplier_for(privacy, cfg, records=40)
        engine = create_accountant(mechanism=accountant)
        engine.history = [(sigma, 0.1, 15)]  # q = 4 / 40, rounds x local steps
        epsilon = engine.get_epsilon(delta=1 / 400)  # the default δ: 1 / (10 x records)
        assert 3.9 <= epsilon <= 4.0
        engine.history = [(0.9 * sigma, 0.1, 15)]
        assert engine.get_epsilon(delta=1 / 400) > 4.0
    fixed = PrivacyConfig(mode="dp-sgd", noise_multiplier=0.8, target_epsilon=4.0)
    assert noise_multiplier_for(fixed, cfg, records=40) == 0.8


def test_off_is_the_plain_loop(tiny_bench: Workbench, tiny_config: Config) -> None:
    examples = _examples(tiny_bench, tiny_config, 8)
    _trainable(tiny_bench)
    plain = train_steps(tiny_bench.model, examples, tiny_config.train, 2, tiny_bench.pad_id, 1)
    first = tiny_bench.take(GLOBAL)
    _trainable(tiny_bench)
    off = train_steps(
        tiny_bench.model,
        examples,
        tiny_config.train,
        2,
        tiny_bench.pad_id,
        1,
        privacy=PrivacyConfig(),
    )
    assert off.privacy is None and plain.privacy is None and off.loss == plain.loss
    assert all(torch.equal(first[k], v) for k, v in tiny_bench.take(GLOBAL).items())


def test_dp_sgd_with_small_noise_still_lowers_the_training_loss(
    tiny_bench: Workbench, tiny_config: Config
) -> None:
    examples = _examples(tiny_bench, tiny_config, 8)
    _trainable(tiny_bench)
    batch = collate(examples, tiny_bench.pad_id)

    def loss() -> float:
        with torch.no_grad():
            logits = tiny_bench.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask
            )
            return float(per_example_loss(logits.logits, batch.labels).mean())

    before = loss()
    cfg = TrainConfig(batch_size=4, lr=2e-2)
    privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=0.05, clip_norm=1.0)
    train_steps(tiny_bench.model, examples, cfg, 30, tiny_bench.pad_id, 0, privacy=privacy)
    assert loss() < before - 0.1


@pytest.mark.parametrize("dp", [False, True])
def test_freeze_a_keeps_a_at_its_initialisation_while_b_trains(dp: bool) -> None:
    overrides = ["lora.freeze_a=true", "privacy.mode=dp-sgd", "privacy.noise_multiplier=0.5"]
    config = load_config(TINY, overrides if dp else overrides[:1])
    bench = Workbench(resolve_model(config.model), config, private=True)
    examples = _examples(bench, config, 8)
    # Every selection keeps A frozen, also when an adapter becomes trainable again.
    bench.use([GLOBAL, PRIVATE], [GLOBAL, PRIVATE])
    trainable = [n for n, p in bench.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    privacy = config.privacy
    for name, active in ((GLOBAL, [GLOBAL]), (PRIVATE, [GLOBAL, PRIVATE])):
        start = bench.take(name)
        bench.use(active, [name])
        train_steps(bench.model, examples, config.train, 3, bench.pad_id, 1, privacy=privacy)
        after = bench.take(name)
        for key, value in after.items():
            if "lora_A" in key:
                assert torch.equal(value, start[key]), key
            else:
                assert not torch.equal(value, start[key]), key


def test_per_example_loss_is_each_examples_mean_next_token_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    labels[0, :2] = -100  # a prompt
    labels[1, 4:] = -100  # right padding
    expected = []
    for row, labs in zip(logits, labels, strict=True):
        pairs = [(row[t], labs[t + 1]) for t in range(5) if labs[t + 1] != -100]
        losses = [torch.nn.functional.cross_entropy(lg, lab) for lg, lab in pairs]
        expected.append(torch.stack(losses).mean())
    assert torch.allclose(per_example_loss(logits, labels), torch.stack(expected), atol=1e-6)


def test_the_update_is_the_mean_of_each_examples_clipped_gradient() -> None:
    # Without dropout a batch's per-example gradients equal those of each example alone.
    config = load_config(TINY, ["lora.dropout=0"])
    bench = Workbench(resolve_model(config.model), config)
    examples = _examples(bench, config, 4)
    named = _trainable(bench)
    bench.model.train()
    grads = []
    for example in examples:
        batch = collate([example], bench.pad_id)
        out = bench.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        loss = per_example_loss(out.logits, batch.labels)[0]
        grads.append(
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(named.values()))])
        )
    norms = torch.stack([g.norm() for g in grads])
    clip = float(norms.median())  # some examples are clipped, some are not
    assert (norms > clip).any() and (norms < clip).any()
    clipped = [g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in grads]  # Opacus's factor
    expected = -torch.stack(clipped).sum(dim=0) / len(examples)  # SGD at lr 1, expected batch 4
    update = _sgd_update(bench, examples, clip, 0.0)
    assert torch.allclose(update, expected, rtol=1e-4, atol=1e-7 * clip)
