"""Device, dtype, quantization and gradient checkpointing: resolution, refusals, and the CPU
paths of bf16 and bitsandbytes 4-/8-bit bases (bitsandbytes has a CPU backend)."""

from __future__ import annotations

import importlib.util

import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch

from silotune.config import Config, load_config
from silotune.errors import ConfigError
from silotune.modeling.load import resolve_model
from silotune.modeling.placement import resolve_placement
from silotune.split.adapters import add_segment_adapter
from silotune.split.loading import block_device_map, load_segments
from silotune.split.model import SplitCausalLM
from silotune.training.workbench import Workbench

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU machine")


def tiny(*overrides: str) -> Config:
    return load_config(None, ["model.name=tiny-llama", "lora.dropout=0.0", *overrides])


def examples() -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(5, 200, (24,), generator=gen).tolist()
        rows.append((ids, [-100] * 8 + ids[8:]))
    return rows


@needs_cpu_only
def test_defaults_keep_the_cpu_path() -> None:
    placement = resolve_placement(tiny())
    assert placement.on_cpu_fp32
    assert placement.device == torch.device("cpu") and placement.dtype == torch.float32


@needs_cpu_only
def test_a_gpu_device_without_cuda_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"no CUDA GPU.*model.device = 'auto' or 'cpu'"):
        resolve_placement(tiny("model.device=cuda"))


def test_unknown_device_names_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"model.device must be auto, cpu, cuda or cuda:N"):
        tiny("model.device=gpu0")


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _=None: "Tesla V100")
    with pytest.raises(ConfigError, match=r"Tesla V100.*no native bfloat16.*model.dtype"):
        resolve_placement(tiny("model.device=cuda", "model.dtype=bfloat16"))
    # "auto" falls back to float32 there instead of failing.
    assert resolve_placement(tiny("model.device=cuda")).dtype == torch.float32


def test_quantization_without_bitsandbytes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name)
    )
    with pytest.raises(ConfigError, match=r"bitsandbytes.*model.quantization = 'none'"):
        resolve_placement(tiny("model.quantization=4bit"))


@pytest.mark.parametrize(
    "overrides",
    [["model.dtype=bfloat16"], ["model.quantization=4bit"], ["model.quantization=8bit"]],
    ids=["bf16", "4bit", "8bit"],
)
def test_lower_precision_bases_train_float32_adapters(overrides: list[str]) -> None:
    cfg = tiny(*overrides)
    reference = Workbench(resolve_model(cfg.model), tiny())
    bench = Workbench(resolve_model(cfg.model), cfg)
    # The base-model fingerprint does not depend on how each machine holds the base.
    assert bench.fingerprint() == reference.fingerprint()
    state, result = bench.train(bench.initial, examples(), 3, seed=1)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    assert any(not torch.equal(state[k], bench.initial[k]) for k in state)
    _, ref_result = reference.train(reference.initial, examples(), 3, seed=1)
    # Same model, rounded differently: the losses agree to the rounding's order.
    assert result.loss == pytest.approx(ref_result.loss, abs=0.05)


def test_gradient_checkpointing_computes_the_same_update() -> None:
    plain = Workbench(resolve_model(tiny().model), tiny())
    checkpointed = Workbench(resolve_model(tiny().model), tiny("train.gradient_checkpointing=true"))
    a, ra = plain.train(plain.initial, examples(), 3, seed=1)
    b, rb = checkpointed.train(checkpointed.initial, examples(), 3, seed=1)
    assert ra.loss == pytest.approx(rb.loss, abs=1e-6)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "avx512_bf16"),
    [
        (["model.dtype=bfloat16"], False),
        (["model.quantization=4bit"], False),
        (["model.quantization=4bit"], True),
        (["model.quantization=8bit"], True),
    ],
    ids=["bf16", "4bit", "4bit-avx512bf16", "8bit-avx512bf16"],
)
def test_split_segments_in_lower_precision_generate_like_the_whole_model(
    overrides: list[str], avx512_bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The segments of a bf16, 4-bit or 8-bit base decode the same tokens as that base whole,
    and both still train after that inference."""
    # bitsandbytes' 4-bit layers read the CPU's AVX512-BF16 support when built and then repack
    # their weights for an inference-only kernel: decide it here, so every CPU runs both cases.
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: avx512_bf16)
    cfg = tiny("model.tiny_layers=4", *overrides)
    bench = Workbench(resolve_model(cfg.model), cfg)
    segments = load_segments(cfg, "all")
    split = SplitCausalLM(segments.front, segments.back, segments.middle)
    ids = torch.tensor([[0, 0, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    mask = (ids != 0).long()
    kwargs = {"max_new_tokens": 6, "pad_token_id": 0, "do_sample": False}
    with bench.model.disable_adapter():
        want = bench.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = split.generate(ids, mask, **kwargs)
    assert torch.equal(got, want)
    # The segments train in that precision too.
    for name, segment in (("front", segments.front), ("middle", segments.middle)):
        add_segment_adapter(segment, cfg, name)
    out = split(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in segments.middle.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    # The whole model generated too: its adapter still learns (the loop checks every gradient).
    state, _ = bench.train(bench.initial, examples(), 1, seed=1)
    assert any(not torch.equal(state[k], bench.initial[k]) for k in state)


def test_accelerate_spreads_the_middle_over_two_gpus() -> None:
    """The device map for split.server_device_map = 'auto' (planned without GPUs)."""
    segments = load_segments(tiny("model.tiny_layers=6"), "server")
    middle = segments.middle  # blocks 1..4
    block = sum(p.numel() * p.element_size() for p in middle.layers[0].parameters())
    # accelerate keeps room for one more block on every GPU but the last.
    devices = block_device_map(middle, {0: block * 3, 1: block * 3})
    assert devices == {0: "cuda:0", 1: "cuda:0", 2: "cuda:1", 3: "cuda:1"}
    with pytest.raises(ConfigError, match=r"do not fit on the GPUs.*model.quantization"):
        block_device_map(middle, {0: int(block * 1.5), 1: int(block * 1.5)})
