"""Record-level DP for split learning: the wire's calibrated Gaussian mechanisms, DP-SGD on the
front/back adapters through the remote middle, and the ledger's joint accounting of the three."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from silotune.algorithms.split import split_releases
from silotune.cli import main
from silotune.config import load_config
from silotune.config_privacy import PrivacyConfig
from silotune.data.sft import IGNORE_INDEX
from silotune.defences.split import WireNoise
from silotune.errors import ConfigError
from silotune.privacy.accounting import planned_uses
from silotune.privacy.ledger import Ledger, compose, noise_for_target, record_delta
from silotune.privacy.mechanisms import GaussianUse, joint
from silotune.split.adapters import add_segment_adapter
from silotune.split.link import MiddleLink, RemoteMiddle
from silotune.split.model import SplitCausalLM
from silotune.split.protocol import Frame, Kind
from silotune.split.segments import split_model
from silotune.training.dp import per_example_loss, sample_rate
from silotune.training.loop import train_steps

from .conftest import CONFIGS
from .test_split import VOCAB, batch, randomise_lora, running_server, split_config, tiny_llama

WIRE = [
    "defence.activation_clip=2.0",
    "defence.activation_noise=8.0",
    "defence.gradient_clip=0.5",
    "defence.gradient_noise=8.0",
]
DP = ['privacy.mode="dp-sgd"', "privacy.target_epsilon=4.0", *WIRE]


def _dp_split(*more: str):  # type: ignore[no-untyped-def]
    return split_config('experiment.algorithms=["split"]', *DP, *more)


def test_activation_clipping_bounds_each_example_and_calibrates_the_noise() -> None:
    config = split_config("defence.activation_clip=2.0")
    hidden = torch.randn(3, 5, 8)
    hidden[1] *= 1e-3  # already inside the clip: left as it is
    out = WireNoise(config.defence, seed=0).activations(hidden)
    norms = out.flatten(1).norm(dim=1)
    assert torch.allclose(norms[[0, 2]], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(out[1], hidden[1])
    # With noise: activation_noise x activation_clip per element, whatever the activations' scale.
    noisy = split_config("defence.activation_clip=2.0", "defence.activation_noise=0.5")
    big = torch.randn(64, 32, 16) * 100
    diff = WireNoise(noisy.defence, seed=0).activations(big) - WireNoise(
        config.defence, seed=0
    ).activations(big)
    assert diff.std().item() == pytest.approx(1.0, rel=0.02)


def test_mechanisms_on_the_same_batches_join_into_one() -> None:
    a, b = GaussianUse(2.0, 0.1, 5), GaussianUse(2.0, 0.1, 5)
    both = joint([a, b])
    assert both.noise_multiplier == pytest.approx(math.sqrt(2.0))
    assert (both.sample_rate, both.steps) == (0.1, 5)
    assert joint([a]) == a
    assert joint([a, GaussianUse(0.0, 0.1, 5)]).noise_multiplier == 0.0
    with pytest.raises(ValueError, match="share rate and steps"):
        joint([a, GaussianUse(2.0, 0.2, 5)])
    # The ledger joins a round's one-loop mechanisms, and only within the round.
    ledger = Ledger({0: 40})
    for rnd in (1, 2):
        ledger.account(0, rnd, "adapter", a)
        ledger.account(0, rnd, "activations", b)
    delta = record_delta(0.0, 40)
    # Activations are rows of the sampled records: the rounds' joint use is not amplified.
    unamplified = joint([GaussianUse(2.0, 1.0, 5)] * 2)
    assert ledger.epsilon(0) == pytest.approx(compose([unamplified] * 2, delta, "rdp"))
    alone = compose([GaussianUse(2.0, 1.0, 5)] * 2, delta, "rdp")
    assert ledger.epsilon(0) > ledger.epsilon(0, "adapter") == pytest.approx(alone)


def test_the_target_leaves_the_adapter_what_the_wire_does_not_spend() -> None:
    config = _dp_split()
    releases = split_releases(config)
    assert {m: r for m, r in releases.items() if r is None} == {
        "activations": None,
        "gradients": None,
        "adapter": None,
    }
    records = 30
    uses = planned_uses(config, releases, records)
    train = config.train
    rate = sample_rate(train.batch_size, records)
    assert uses["activations"] == GaussianUse(8.0, rate, train.local_steps)
    assert uses["gradients"].noise_multiplier == 8.0
    whole = joint(list(uses.values()))
    delta = record_delta(0.0, records)
    # No amplification by sampling: the wire shows which records each step sampled.
    target = noise_for_target(4.0, delta, 1.0, train.rounds * train.local_steps, "rdp")
    assert whole.noise_multiplier == pytest.approx(target)
    unamplified = dataclasses.replace(whole, sample_rate=1.0)
    spent = compose([unamplified] * config.train.rounds, delta, "rdp")
    assert spent == pytest.approx(4.0, rel=1e-3)
    with pytest.raises(ConfigError, match=r"raise them or privacy\.target_epsilon"):
        planned_uses(_dp_split("defence.activation_noise=0.3"), releases, records)


def test_split_settings_that_dp_cannot_cover_are_refused() -> None:
    with pytest.raises(ConfigError, match="missing: activations"):
        split_config('experiment.algorithms=["split"]', *DP, "defence.activation_clip=0")
    with pytest.raises(ConfigError, match=r"split\.adapter = lora"):
        _dp_split('split.adapter="prefix"')
    with pytest.raises(ConfigError, match="max_epsilon cannot stop a split client"):
        _dp_split("privacy.max_epsilon=5")
    off = split_config('experiment.algorithms=["split"]', *WIRE)
    reasons = split_releases(off)
    assert "shuffled batches" in str(reasons["activations"])
    assert "without DP" in str(reasons["adapter"])


def _client(config, port: int):  # type: ignore[no-untyped-def]
    s = split_model(tiny_llama(seed=0), 1, 1)
    add_segment_adapter(s.front, config, "front")
    add_segment_adapter(s.back, config, "back")
    randomise_lora(s.front)
    randomise_lora(s.back)
    link = MiddleLink(config, "c0", f"localhost:{port}", None)
    return SplitCausalLM(s.front, s.back, RemoteMiddle(link)), link


@pytest.mark.filterwarnings("ignore:Full backward hook")  # Opacus needs hooks on frozen inputs
def test_per_example_gradients_through_the_remote_middle_are_each_examples_own() -> None:
    """Opacus's hooks on front and back see the server's gradient per example: each example's
    gradient equals the one it gets alone from the same middle."""
    config = split_config("split.tls=false", "split.encrypt=false")
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    randomise_lora(segments.middle)
    reference_middle = copy.deepcopy(segments.middle)  # the server steps its own after backward
    ids, mask, labels = batch()
    with running_server(segments, config) as (port, _):
        model, link = _client(config, port)
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        out = module(input_ids=ids, attention_mask=mask)
        per_example_loss(out.logits, labels).mean().backward()
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        samples = {n: p.grad_sample.clone() for n, p in named.items()}  # type: ignore[attr-defined]
        module.to_standard_module()
        link.close()
    model.middle = reference_middle
    assert len(samples) == 8  # q, v x A, B in front block 0 and back block 3
    for i in range(ids.shape[0]):
        model.zero_grad()
        length = int(mask[i].sum())
        one = model(input_ids=ids[i : i + 1, :length], attention_mask=mask[i : i + 1, :length])
        per_example_loss(one.logits, labels[i : i + 1, :length]).sum().backward()
        for name, p in named.items():
            assert p.grad is not None
            torch.testing.assert_close(samples[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_dp_sgd_split_client_trains_on_poisson_batches_through_the_server() -> None:
    """Batches of every size the sampler draws cross the wire, larger than batch_size too; an
    empty one is a noise-only step that sends nothing."""
    config = _dp_split("split.tls=false", "split.encrypt=false", "train.batch_size=2")
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(5):
        ids = torch.randint(0, VOCAB, (10,), generator=gen).tolist()
        examples.append((ids, [IGNORE_INDEX] * 3 + ids[3:]))
    rows: list[int] = []
    with running_server(segments, config) as (port, trainer):
        model, link = _client(config, port)

        def seen(frame: Frame, _raw: bytes) -> None:
            if frame.kind == Kind.ACTIVATIONS:
                rows.append(frame.tensors["hidden"].shape[0])

        link.on_frame = seen
        # Replayable: the sampler's draws (and so this test) are the same every time.
        privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, replayable_noise=True)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        result = train_steps(model, examples, config.train, 40, 0, seed=3, privacy=privacy)
        link.close()
    assert result.privacy == GaussianUse(1.0, sample_rate(2, 5), 40)
    assert trainer.steps == len(rows) < 40  # the empty batches never reached the server
    assert max(rows) > config.train.batch_size
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.slow
def test_a_dp_sgd_split_run_reports_every_release_at_the_target(tmp_path: Path) -> None:
    out = tmp_path / "run"
    sets = [
        'experiment.algorithms=["split"]',
        "model.tiny_layers=3",
        "train.rounds=2",
        "privacy.audit=true",
        "privacy.canaries=20",
        *DP,
    ]
    assert main(["run", str(CONFIGS / "tiny.toml"), "--out", str(out), *_sets(sets)]) == 0
    summary = json.loads((out / "summary.json").read_text())  # one algorithm: the run's own
    clients = summary["privacy"]["clients"]
    assert len(clients) == 3
    for client in clients.values():
        assert 3.95 <= client["epsilon"] <= 4.0  # the calibration stops within 0.01 below
        mechanisms = client["mechanisms"]
        assert set(mechanisms) == {"activations", "gradients", "adapter"}
        assert all(m["guarantee"] and m["epsilon"] < 4.0 for m in mechanisms.values())
    assert "Privacy ledger" in (out / "report.md").read_text()
    audit = summary["privacy"]["audit"]  # the client's whole split model scored its canaries
    assert audit["canaries"] == 20 and 0 <= audit["epsilon_lower_bound"] <= 4.0


def _sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def test_load_config_sees_the_split_checks() -> None:
    # The checks run for `silotune run` too, not only in split_config.
    with pytest.raises(ConfigError, match="missing"):
        load_config(
            CONFIGS / "tiny.toml",
            [
                'experiment.algorithms=["split"]',
                'privacy.mode="dp-sgd"',
                "privacy.target_epsilon=4",
            ],
        )
