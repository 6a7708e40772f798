"""A split model's trained segments saved as one PEFT adapter of the whole base model."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from silotune.modeling.adapters import write_peft_folder
from silotune.split.adapters import add_segment_adapter, whole_model_adapter
from silotune.split.model import SplitCausalLM
from silotune.split.segments import Segments, split_model
from silotune.split.trainers import adapter_state

from .test_split import batch, split_config, tiny_llama


def _exported(adapter: str, folder: Path) -> tuple[Segments, PeftModel]:
    """A split of a 4-block model with trained-looking adapters, and its export loaded in PEFT."""
    config = split_config(
        f"split.adapter={adapter}",
        "split.prefix_tokens=3",
        "split.front_blocks=1",
        "split.back_blocks=1",
    )
    s = split_model(tiny_llama(), 1, 1)
    for role, segment in (("front", s.front), ("middle", s.middle), ("back", s.back)):
        add_segment_adapter(segment, config, role)
    with torch.no_grad():  # every adapter tensor away from its start
        for p in (p for m in (s.front, s.middle, s.back) for p in m.parameters()):
            if p.requires_grad:
                p.normal_(0, 0.1)
    state = adapter_state(SplitCausalLM(s.front, s.back, s.middle))
    tensors, adapter_config = whole_model_adapter(config, s.back.config, state)
    write_peft_folder(folder, tensors, adapter_config)
    return s, PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()


def test_lora_export_is_the_split_model_in_peft(tmp_path: Path) -> None:
    s, loaded = _exported("lora", tmp_path / "adapter")
    ids, mask, _ = batch()
    with torch.no_grad():
        expected = SplitCausalLM(s.front, s.back, s.middle)(ids, mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
        base = tiny_llama()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert not torch.allclose(base[real], expected[real], atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


def test_prefix_export_gives_every_block_its_segments_prefix(tmp_path: Path) -> None:
    s, loaded = _exported("prefix", tmp_path / "adapter")
    with torch.no_grad():
        peft_cache = loaded.get_prompt(2)
        ours = [kv for segment in (s.front, s.middle, s.back) for kv in segment.prefix(2)]
    assert len(ours) == len(peft_cache.layers) == 4
    for layer, (key, value) in zip(peft_cache.layers, ours, strict=True):
        assert torch.equal(layer.keys, key) and torch.equal(layer.values, value)
