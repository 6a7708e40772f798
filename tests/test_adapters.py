"""LoRA adapters: Flower record round trip, key checks, stock PEFT loading, training effects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from silotune.config import Config
from silotune.data.load import load_records
from silotune.data.sft import collate, tokenize_dataset
from silotune.modeling.adapters import adapter_nbytes, get_adapter, set_adapter
from silotune.modeling.load import resolve_model
from silotune.records import adapter_to_record, record_to_adapter, tensor_bytes
from silotune.seeds import derive_seed
from silotune.training.workbench import Workbench


def _trained(bench: Workbench, config: Config, steps: int = 3) -> dict[str, torch.Tensor]:
    records = load_records(config.data).dataset.select(range(16))
    examples = tokenize_dataset(records, bench.tokenizer, "alpaca", 64)
    state, _ = bench.train(bench.initial, examples, steps, seed=1)
    return state


def test_record_round_trip_is_exact(tiny_bench: Workbench, tiny_config: Config) -> None:
    state = _trained(tiny_bench, tiny_config)
    record = adapter_to_record(state)
    back = record_to_adapter(record)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert back[key].dtype == value.dtype
        assert torch.equal(back[key], value)
    assert tensor_bytes(record) == adapter_nbytes(state)
    assert record.count_bytes() > tensor_bytes(record)  # headers and key names on top


def test_only_lora_tensors_are_in_the_adapter(tiny_bench: Workbench) -> None:
    keys = list(tiny_bench.initial)
    assert keys and all("lora_" in k for k in keys)
    assert any("q_proj" in k for k in keys) and any("v_proj" in k for k in keys)


def test_set_adapter_rejects_wrong_keys(tiny_bench: Workbench) -> None:
    state = dict(tiny_bench.initial)
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="keys differ"):
        set_adapter(tiny_bench.model, state)


def test_training_changes_only_the_adapter_and_lowers_loss(
    tiny_bench: Workbench, tiny_config: Config
) -> None:
    base_before = {k: v.clone() for k, v in tiny_bench.model.named_parameters() if "lora_" not in k}
    records = load_records(tiny_config.data).dataset.select(range(8))
    examples = tokenize_dataset(records, tiny_bench.tokenizer, "alpaca", 64)
    batch = collate(examples, tiny_bench.pad_id)

    def loss(state: dict[str, torch.Tensor]) -> float:
        set_adapter(tiny_bench.model, state)
        with torch.no_grad():
            out = tiny_bench.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            )
        return float(out.loss)

    state, result = tiny_bench.train(tiny_bench.initial, examples, steps=30, seed=0)
    assert result.steps == 30 and result.examples == 8
    assert loss(state) < loss(tiny_bench.initial) - 0.1
    for k, v in tiny_bench.model.named_parameters():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), f"base parameter {k} changed"


def test_training_is_reproducible_by_seed(tiny_bench: Workbench, tiny_config: Config) -> None:
    a = _trained(tiny_bench, tiny_config)
    b = _trained(tiny_bench, tiny_config)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_proximal_term_keeps_the_update_closer(tiny_bench: Workbench, tiny_config: Config) -> None:
    records = load_records(tiny_config.data).dataset.select(range(8))
    examples = tokenize_dataset(records, tiny_bench.tokenizer, "alpaca", 64)
    start = _trained(tiny_bench, tiny_config)
    free, _ = tiny_bench.train(start, examples, 10, seed=3)
    prox, _ = tiny_bench.train(start, examples, 10, seed=3, proximal_mu=50.0)

    def dist(s: dict[str, torch.Tensor]) -> float:
        return sum(float((s[k] - start[k]).norm() ** 2) for k in s)

    assert dist(prox) < dist(free)


def test_saved_adapter_loads_in_stock_peft(
    tiny_bench: Workbench, tiny_config: Config, tmp_path: Path
) -> None:
    state = _trained(tiny_bench, tiny_config, steps=5)
    target = tmp_path / "adapters" / "global"
    target.parent.mkdir()
    tiny_bench.save(state, target)
    assert (target / "adapter_config.json").is_file()
    assert (target / "adapter_model.safetensors").is_file()

    source = resolve_model(tiny_config.model)
    base = AutoModelForCausalLM.from_pretrained(source.location)
    loaded = PeftModel.from_pretrained(base, str(target))
    loaded.eval()
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    set_adapter(tiny_bench.model, state)
    with torch.no_grad():
        expected = tiny_bench.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert not torch.allclose(
        got,
        base.get_base_model()(input_ids=ids).logits if hasattr(base, "get_base_model") else got + 1,
    )


def test_derive_seed_is_stable() -> None:
    assert derive_seed(0, "client", 1, 2) == derive_seed(0, "client", 1, 2)
    assert derive_seed(0, "client", 1, 2) != derive_seed(0, "client", 2, 1)
    assert 0 <= derive_seed("x") < 2**31


def test_get_adapter_returns_copies(tiny_bench: Workbench) -> None:
    state = get_adapter(tiny_bench.model)
    key = next(iter(state))
    state[key].add_(1.0)
    assert not torch.equal(get_adapter(tiny_bench.model)[key], state[key])
