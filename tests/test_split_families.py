"""Every family split learning claims, proven on a tiny random model of it: split logits equal the
full model's, split LoRA gradients on every segment equal the full model's, and cached split
decoding gives the full model's greedy tokens; every other layout is refused, naming why."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from silotune.data.sft import IGNORE_INDEX
from silotune.errors import ConfigError
from silotune.modeling.shape import architecture
from silotune.split.families import SPLIT_FAMILIES, check_splittable
from silotune.split.model import SplitCausalLM
from silotune.split.segments import split_model

VOCAB = 97
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
}
# What a family's forward does outside its blocks, set where its config has the field, at values
# that change the logits well beyond rounding (random logits are about 0.5 in size).
OUTSIDE = {
    "embedding_multiplier": 4.0,  # Granite, HyperCLOVA X (µP)
    "logits_scaling": 0.25,  # Granite divides, HyperCLOVA X multiplies
    "logit_scale": 8.0,  # Cohere
    "final_logit_softcapping": 0.3,  # Gemma 2 / 3, VaultGemma
    "sliding_window": 6,  # shorter than the batch: the window must be honoured
}
# Exact where the arithmetic is the same; mixture-of-experts routing may sum experts in another
# order (seen: up to 1.8e-7 at logits of about 0.4).
TOLERANCE = 1e-6


def tiny_model(family: str) -> PreTrainedModel:
    """A random 4-block model of `family`, with what its forward does outside the blocks on."""
    defaults = AutoConfig.for_model(family)
    extra = {k: v for k, v in OUTSIDE.items() if getattr(defaults, k, None) is not None}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # token ids outside the tiny vocabulary, and the like
        try:
            config = AutoConfig.for_model(family, **TINY, **extra)
            model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
        finally:
            hf_logging.set_verbosity(verbosity)
    return model.eval()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and labels, 12 tokens: longer than the sliding window."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[2, 6:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    labels[:, :3] = IGNORE_INDEX
    return ids, mask, labels


@pytest.mark.parametrize("family", SPLIT_FAMILIES)
def test_the_family_splits_exactly(family: str) -> None:
    model = tiny_model(family)
    ids, mask, labels = batch()
    real = mask.bool()

    # 1. The logits: back(middle(front(x))) is the model.
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        s = split_model(model, 1, 1)
        out = s.back(s.middle(s.front(ids, mask), mask), mask)
    torch.testing.assert_close(out[real], full[real], rtol=0, atol=TOLERANCE)
    assert full[real].std() > 10 * TOLERANCE  # not a model whose logits are all the same

    # 2. The gradients, with LoRA on every block's projections (so on every segment); not on a
    # mixture's router, whose output is no plain linear map in some families.
    targets = sorted(
        {n.rsplit(".", 1)[-1] for n, m in s.middle.named_modules() if isinstance(m, nn.Linear)}
        - {"router", "gate"}
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    peft = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)  # B starts at zero: make every adapter tensor matter
    peft(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    want = {n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None}
    peft.zero_grad()
    s = split_model(model, 1, 1)
    SplitCausalLM(s.front, s.back, s.middle)(
        input_ids=ids, attention_mask=mask, labels=labels
    ).loss.backward()
    got = {n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None}
    blocks = {n.split(".layers.")[1].split(".")[0] for n in want}
    assert got.keys() == want.keys() and blocks == {"0", "1", "2", "3"}
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7, msg=name)

    # 3. Cached decoding: the prompt once, then one token at a time through every segment.
    prompts = torch.where(mask.bool(), ids, torch.zeros_like(ids))[:, :7]
    left = torch.ones_like(prompts)
    left[0, :2] = 0
    prompts = torch.where(left.bool(), prompts, torch.zeros_like(prompts))
    with torch.no_grad():
        greedy = peft.generate(
            input_ids=prompts,
            attention_mask=left,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        split = SplitCausalLM(s.front, s.back, s.middle)
        assert torch.equal(split.generate(prompts, left, 5, pad_token_id=0), greedy)


@pytest.mark.parametrize("family", SPLIT_FAMILIES)
def test_the_memory_plan_counts_every_parameter_of_the_family(family: str) -> None:
    model = tiny_model(family)
    shape = architecture(model.config, ("q_proj", "v_proj"), 4)
    norm = sum(p.numel() for p in model.get_submodule("model.norm").parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.get_submodule("model.layers")]
    total = sum(p.numel() for p in model.parameters())
    # Every block as the largest (Gemma 4's global blocks are larger): exact when all are alike.
    assert shape.params + norm == total + sum(max(blocks) - b for b in blocks)
    assert shape.layers == 4 and shape.vocab == VOCAB


def config_of(family: str, **fields: Any) -> Any:
    return AutoConfig.for_model(family, **fields)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (lambda: config_of("bart"), "encoder-decoder"),
        (lambda: config_of("qwen3_5_text"), "not all attention blocks .*linear_attention"),
        (lambda: config_of("nanochat"), "normalises the embeddings before the first block"),
        (lambda: config_of("llama", auto_map={"AutoModel": "x.Y"}), None),
        (lambda: config_of("gpt2"), "not in the test matrix"),
    ],
    ids=["encoder-decoder", "hybrid-recurrent", "outside-the-blocks", "remote-code", "unproven"],
)
def test_a_layout_the_split_cannot_cut_is_refused_naming_why(
    config: Any, reason: str | None
) -> None:
    hf_config = config()
    if reason is None:  # a listed family's name does not let remote code through
        hf_config.model_type = "chatglm"
        reason = "remote code"
    with pytest.raises(ConfigError, match=f"cannot cut .*{hf_config.model_type}.*: .*{reason}"):
        check_splittable(hf_config)
