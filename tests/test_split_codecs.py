"""The split wire's codecs: per-token int8/int4 activations and gradients, the mask as spans or
bits; their error bounds, their bytes, their screening, and training through them."""

from __future__ import annotations

import math

import pytest
import torch

from silotune.split.adapters import add_segment_adapter
from silotune.split.codecs import MASK_BITS, MASK_SPAN, FloatCodec, decode_mask, encode_mask
from silotune.split.link import MiddleLink, RemoteMiddle, SplitError
from silotune.split.model import SplitCausalLM
from silotune.split.protocol import Frame, Kind
from silotune.split.segments import split_model
from tests.test_split import (
    batch,
    client_model,
    genuine_activations,
    lora_grads,
    lora_llama,
    running_server,
    split_config,
    tiny_llama,
)

LEVELS = {"int8": 127, "int4": 7}


def wire_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("width", [32, 33])
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_each_value_is_within_half_a_step_of_its_token_scale(codec: str, width: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, width, generator=gen) * torch.logspace(-3, 2, 5)[None, :, None]
    x[1, 2] = 0.0  # a token of zeros decodes to zeros
    x[2, 0, 7] = 1e4  # an outlier: the bound below is per token, so it widens only its own
    c = FloatCodec(codec)  # type: ignore[arg-type]
    wire = c.encode("hidden", x)
    got = c.decode("hidden", wire, width)
    assert got.shape == x.shape and got.dtype == torch.float32
    step = x.abs().amax(dim=-1, keepdim=True) / LEVELS[codec]
    assert bool(((got - x).abs() <= step / 2 * (1 + 1e-5)).all())
    assert torch.equal(got[1, 2], torch.zeros(width))
    packed = width if codec == "int8" else math.ceil(width / 2)
    assert wire_bytes(wire) == 3 * 5 * (packed + 4)  # the values and one float32 scale a token


def test_bytes_against_float32_at_a_real_hidden_size() -> None:
    x = torch.randn(4, 96, 576)
    fp32 = wire_bytes(FloatCodec("none").encode("hidden", x))
    bf16 = wire_bytes(FloatCodec("none", "bfloat16").encode("hidden", x))
    int8 = wire_bytes(FloatCodec("int8").encode("hidden", x))
    int4 = wire_bytes(FloatCodec("int4").encode("hidden", x))
    assert (bf16 / fp32, int8 / fp32, int4 / fp32) == pytest.approx((0.5, 0.2517, 0.1267), abs=1e-4)


@pytest.mark.parametrize(
    ("rows", "form"),
    [
        ([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], MASK_SPAN),  # right-padded batch
        ([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], MASK_SPAN),  # left-padded prompts
        ([[0, 0, 0, 0, 0], [0, 1, 1, 0, 0]], MASK_SPAN),  # an empty row, a run in the middle
        ([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]], MASK_BITS),  # a finished row during generation
        ([[1, 0] * 7 + [1]], MASK_BITS),  # 15 positions: bits beyond one byte
        ([[1, 1, 1, 1], [1, 1, 1, 1]], MASK_SPAN),  # no padding at all
        ([[1]], MASK_SPAN),  # one token of one row
    ],
)
def test_the_mask_travels_exactly(rows: list[list[int]], form: str) -> None:
    mask = torch.tensor(rows)
    tensors, meta = encode_mask(mask)
    assert set(tensors) == {form} and meta == {"mask_width": mask.shape[1]}
    assert torch.equal(decode_mask(tensors, meta), mask)
    bools, _ = encode_mask(mask.bool())  # generation's masks may be bool
    assert bools.keys() == tensors.keys()
    assert all(torch.equal(bools[k], tensors[k]) for k in tensors)


def test_a_training_step_through_int8_keeps_the_gradients_direction() -> None:
    """int8 both ways: every client-side LoRA gradient within 2 % of the exact one and about a
    quarter of the bytes each way; none exact, so the codec did apply."""
    ids, mask, labels = batch()
    sizes: dict[str, dict[Kind, int]] = {}
    for codec in ("none", "int8"):
        model, peft = lora_llama()  # afresh: the server steps the middle it shares
        peft(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        central = lora_grads(peft.base_model.model)
        peft.zero_grad()
        s = split_model(model, 1, 1)
        config = split_config(
            "split.tls=false",
            "split.encrypt=false",
            f"split.activation_codec={codec}",
            f"split.gradient_codec={codec}",
        )
        with running_server(s, config) as (port, _):
            link = MiddleLink(config, "site-a", f"localhost:{port}", None)
            seen = sizes.setdefault(codec, {})
            link.on_frame = lambda frame, raw, seen=seen: seen.__setitem__(frame.kind, len(raw))  # type: ignore[misc]
            split = SplitCausalLM(s.front, s.back, RemoteMiddle(link))
            split(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            link.close()
        got = lora_grads(peft.base_model.model)
        assert len(got) == 8
        for name, grad in got.items():
            error = float((grad - central[name]).norm() / central[name].norm())
            if codec == "none":
                assert error < 1e-5, name
            else:
                assert 0 < error < 0.02, (name, error)
    for kind in (Kind.ACTIVATIONS, Kind.GRAD):
        assert sizes["int8"][kind] / sizes["none"][kind] < 0.35, (
            kind
        )  # d = 32: 4 scale bytes per 32


@pytest.mark.parametrize("evil_codec", ["none", "int4"])
def test_frames_in_another_codec_or_with_bad_scales_or_spans_are_refused(evil_codec: str) -> None:
    config = split_config("split.tls=false", "split.activation_codec=int8")
    segments = split_model(tiny_llama(), 1, 1)
    add_segment_adapter(segments.middle, config, "middle")
    with running_server(segments, config) as (port, trainer):
        _, link = client_model(config, port, "evil", 0)
        ids, mask, _ = batch()
        hidden = torch.randn(*ids.shape, 32)
        wire = link.activations.encode("hidden", hidden)
        masks, meta = encode_mask(mask)
        meta["train"] = False
        wire["hidden.scale"][0, 0, 0] = -1.0
        with pytest.raises(SplitError, match="negative scale"):
            link.call(Frame(Kind.ACTIVATIONS, 0, {**wire, **masks}, meta))
        wire["hidden.scale"][0, 0, 0] = 1.0
        masks[MASK_SPAN][1, 1] = mask.shape[1] + 1
        with pytest.raises(SplitError, match="outside"):
            link.call(Frame(Kind.ACTIVATIONS, 0, {**wire, **masks}, meta))
        assert link.send_raw(genuine_activations(link, hidden, mask)).kind == Kind.HIDDEN
        link.activations = FloatCodec(evil_codec)  # type: ignore[arg-type]
        with pytest.raises(SplitError, match=r"must be int8|missing hidden\.scale"):
            link.send_raw(genuine_activations(link, hidden, mask))
        link.broken = True  # that frame's sequence number is spent on this side only: no bye
        link.close()
    assert trainer.steps == 0


def test_split_generation_through_int8_stays_close() -> None:
    """Cached decoding with int8 activations both ways: the first step's logits within 2 % of
    the full model's (greedy tokens may differ later; the bench measures what they cost)."""
    model = tiny_llama()
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    s = split_model(model, 1, 1)
    config = split_config("split.tls=false", "split.activation_codec=int8")
    with running_server(s, config) as (port, _):
        link = MiddleLink(config, "c0", f"localhost:{port}", None)
        remote = SplitCausalLM(s.front, s.back, RemoteMiddle(link))
        with torch.no_grad():
            got = remote(input_ids=ids, attention_mask=mask).logits[:, -1]
        out = remote.generate(ids, mask, max_new_tokens=4, pad_token_id=0)
        link.close()
    assert float((got - want).norm() / want.norm()) < 0.02
    assert out.shape == (2, 11)
