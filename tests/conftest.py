"""Shared fixtures: a private model cache, the tiny preset, and a tiny Workbench."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from silotune.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep converted models of the test session out of the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SILOTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    """The tiny preset (random 2-layer Llama, bundled data)."""
    return load_config(CONFIGS / "tiny.toml")


@pytest.fixture(scope="session")
def tiny_bench(tiny_config: Config):  # type: ignore[no-untyped-def]
    """A Workbench on the tiny model, shared by tests that only read or reset its adapter."""
    from silotune.modeling.load import resolve_model
    from silotune.training.workbench import Workbench

    return Workbench(resolve_model(tiny_config.model), tiny_config)


@pytest.fixture
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are stamped with the running task's ids, which a Flower app run would set."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
