"""Partial loading of split segments: each role holds only its own weights, and the same ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from silotune.config import Config, load_config
from silotune.errors import ConfigError
from silotune.modeling.load import load_model, load_tokenizer, resolve_model
from silotune.split import loading
from silotune.split.loading import SegmentNotLoadedError, load_segments
from silotune.split.segments import Segments, split_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Federated learning keeps data home."]


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(None, ["model.name=tiny-llama", "model.tiny_layers=4"])


@pytest.fixture(scope="module")
def batch(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Real tokens, right-padded (b, t)."""
    tokenizer = load_tokenizer(resolve_model(config.model))
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def full_logits(config: Config, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The whole model's split (what roles.py did before), run locally: (b, t, vocab)."""
    model = load_model(resolve_model(config.model))
    whole = split_model(model, config.split.front_blocks, config.split.back_blocks)
    logits = _run(whole, whole, whole, batch)
    with torch.no_grad():
        direct = model(input_ids=batch[0], attention_mask=batch[1]).logits
    # Padded positions get other position ids in the split (see Segment.run_blocks): compare
    # the model itself on real tokens only.
    real = batch[1].bool()
    assert (logits[real] - direct[real]).abs().max() < 1e-6
    return logits


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _layer_tensors(segment: nn.Module) -> list[torch.Tensor]:
    return _tensors(segment.get_submodule("layers"))


def _run(
    front: Segments, middle: Segments, back: Segments, batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """back(middle(front(ids))) with each segment taken from its own load: (b, t, vocab)."""
    ids, mask = batch
    with torch.no_grad():
        logits: torch.Tensor = back.back(middle.middle(front.front(ids, mask), mask), mask)
    return logits


def test_client_and_server_roles_give_the_full_models_logits(
    config: Config, batch: tuple[torch.Tensor, torch.Tensor], full_logits: torch.Tensor
) -> None:
    client = load_segments(config, "client")
    server = load_segments(config, "server")
    assert torch.equal(_run(client, server, client, batch), full_logits)
    everything = load_segments(config, "all")
    assert torch.equal(_run(everything, everything, everything, batch), full_logits)


def _no_whole_model(_: object) -> None:
    raise AssertionError("the whole model was loaded")


def test_each_role_materialises_only_its_own_segments(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "load_model", _no_whole_model)
    client = load_segments(config, "client")
    assert all(not t.is_meta for t in _tensors(client.front) + _tensors(client.back))
    assert all(t.is_meta for t in _layer_tensors(client.middle))
    assert client.back.lm_head.weight is client.front.embed_tokens.weight  # tied, as in the file
    assert all(t.dtype == torch.float32 for t in _tensors(client.back) if t.is_floating_point())
    assert not any(m.training for s in (client.front, client.back) for m in s.modules())

    server = load_segments(config, "server")
    assert all(not t.is_meta for t in _tensors(server.middle))
    dropped = [server.front.embed_tokens, server.back.norm, server.back.lm_head]
    assert all(t.is_meta for m in dropped for t in _tensors(m))
    assert all(t.is_meta for s in (server.front, server.back) for t in _layer_tensors(s))


def test_a_dropped_segment_refuses_to_run(
    config: Config, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    client = load_segments(config, "client")
    hidden = client.front(*batch)
    with pytest.raises(SegmentNotLoadedError, match="middle segment was not loaded"):
        client.middle(hidden, batch[1])


def test_folders_without_safetensors_load_whole_with_the_same_result(
    config: Config,
    batch: tuple[torch.Tensor, torch.Tensor],
    full_logits: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_files(_: Path) -> None:
        return None

    monkeypatch.setattr(loading, "_weight_files", no_files)
    client = load_segments(config, "client")
    server = load_segments(config, "server")
    assert all(t.is_meta for t in _layer_tensors(client.middle))
    assert all(t.is_meta for t in _tensors(server.front.embed_tokens))
    assert torch.equal(_run(client, server, client, batch), full_logits)


def test_sharded_checkpoints_load_through_their_index(
    config: Config,
    batch: tuple[torch.Tensor, torch.Tensor],
    full_logits: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = load_model(resolve_model(config.model))
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = load_config(None, ["model.name=" + str(tmp_path)])
    monkeypatch.setattr(loading, "load_model", _no_whole_model)
    client = load_segments(sharded, "client")
    server = load_segments(sharded, "server")
    assert torch.equal(_run(client, server, client, batch), full_logits)


def test_a_family_with_buffers_outside_its_file_loads_whole_with_the_same_logits(
    tmp_path: Path,
) -> None:
    """Gemma scales its embeddings by a buffer the checkpoint does not hold: partial loading
    cannot rebuild it, so the roles load the whole model and keep their parts, still exact."""
    from .test_split_families import batch as family_batch
    from .test_split_families import tiny_model

    model = tiny_model("gemma2")
    model.save_pretrained(tmp_path)
    ids, mask, _ = family_batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    config = load_config(None, [f"model.name={tmp_path}"])
    client, server = load_segments(config, "client"), load_segments(config, "server")
    got = _run(client, server, client, (ids, mask))
    real = mask.bool()
    assert torch.equal(got[real], want[real])


def test_a_family_the_split_cannot_cut_is_refused_before_its_weights_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt2", vocab_size=97, n_embd=32, n_layer=4, n_head=4, n_positions=64
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    monkeypatch.setattr(loading, "load_model", _no_whole_model)
    monkeypatch.setattr(loading, "_read", _no_whole_model)
    with pytest.raises(ConfigError, match=r"cannot cut GPT2LMHeadModel .*not in the test matrix"):
        load_segments(load_config(None, [f"model.name={tmp_path}"]), "server")
