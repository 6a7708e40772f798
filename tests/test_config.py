"""Config parsing, overrides, validation errors, and presets."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from silotune.algorithms import ALGORITHMS
from silotune.attacks.audit import ATTACKS
from silotune.config import Config, load_config
from silotune.config_federation import AttackKind, Strategy
from silotune.config_reporting import JudgeKind
from silotune.config_sections import Algorithm, Partitioner, PromptStyle
from silotune.config_split import SplitAdapter, SplitMode
from silotune.data.partition import PARTITIONERS
from silotune.data.prompts import PROMPT_STYLES
from silotune.errors import ConfigError
from silotune.evaluation.judge import JUDGES
from silotune.federated.strategies import (
    STRATEGIES,
)
from silotune.split.adapters import SEGMENT_ADAPTERS
from silotune.split.trainers import TRAINERS

from .conftest import CONFIGS


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_preset_parses(preset: Path) -> None:
    config = load_config(preset)
    assert isinstance(config, Config)
    for name in config.experiment.algorithms:
        ALGORITHMS.get(name)


def test_defaults_without_file() -> None:
    config = load_config(None)
    assert config.model.name == "smollm2-135m-instruct"
    assert config.experiment.algorithms == ("fedit",)


def test_overrides_are_typed_and_win(tmp_path: Path) -> None:
    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "train.rounds=5",
            "train.lr=0.01",
            "experiment.algorithms=['locit']",
            "model.name=my/model",
            "eval.generate=false",
        ],
    )
    assert config.train.rounds == 5
    assert config.train.lr == 0.01
    assert config.experiment.algorithms == ("locit",)
    assert config.model.name == "my/model"
    assert config.eval.generate is False


def test_int_is_accepted_where_float_expected() -> None:
    assert load_config(None, ["partition.alpha=2"]).partition.alpha == 2.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.rounds=0", "train.rounds must be >= 1"),
        ("train.roundz=3", "did you mean 'rounds'"),
        ("trian.rounds=3", "did you mean 'train'"),
        ("train.rounds=two", "train.rounds must be an integer"),
        ("train.rounds=2.5", "train.rounds must be an integer"),
        ("train.lr=true", "train.lr must be a number"),
        ("eval.generate=1", "eval.generate must be true or false"),
        ("partition.method=random", "partition.method must be one of 'iid', 'dirichlet'"),
        ("experiment.algorithms=['fedit','fedavg']", "experiment.algorithms[1] must be one of"),
        ("experiment.algorithms=[]", "experiment.algorithms is empty"),
        ("experiment.algorithms=['fedit','fedit']", "repeats a name"),
        ("partition.alpha=0", "partition.alpha must be > 0"),
        ("federated.fraction_train=1.5", "fraction_train must be in (0, 1]"),
        ("lora.target_modules=q_proj", "lora.target_modules must be a list"),
        ("rounds=3", "expects section.key=value"),
        ("train.rounds", "expects section.key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_dirichlet_needs_a_label_field() -> None:
    with pytest.raises(ConfigError, match=r"needs data\.label_field"):
        load_config(None, ["data.label_field=''"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    not_table = tmp_path / "flat.toml"
    not_table.write_text("train = 3\n")
    with pytest.raises(ConfigError, match=r"\[train\] must be a table"):
        load_config(not_table)


def test_fingerprint_tracks_content() -> None:
    a, b = load_config(None), load_config(None)
    assert a.fingerprint() == b.fingerprint()
    assert load_config(None, ["train.rounds=9"]).fingerprint() != a.fingerprint()


# Each Literal choice type with the registry that builds its names (and its values that build
# nothing: they turn the feature off).
CHOICES = [
    (Algorithm, ALGORITHMS, ()),
    (Strategy, STRATEGIES, ()),
    (PromptStyle, PROMPT_STYLES, ()),
    (Partitioner, PARTITIONERS, ()),
    (SplitMode, TRAINERS, ()),
    (SplitAdapter, SEGMENT_ADAPTERS, ()),
    (AttackKind, ATTACKS, ()),
    (JudgeKind, JUDGES, ("none",)),
]


@pytest.mark.parametrize(
    ("literal", "registry", "off"), CHOICES, ids=[r.kind for _, r, _ in CHOICES]
)
def test_config_choices_match_registries(
    literal: object, registry: object, off: tuple[str, ...]
) -> None:
    """Every choice a config accepts is registered, and every registered name is a choice."""
    choices = sorted(set(typing.get_args(literal)) - set(off))
    assert choices == registry.names()  # type: ignore[attr-defined]
