"""The memory plan: sizes from a model's config, what lowers them, fitting and refusing."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from silotune.cli import main
from silotune.config import Config, load_config
from silotune.errors import ConfigError
from silotune.modeling.memory import GIB, plan_run
from silotune.modeling.placement import Placement
from silotune.modeling.shape import architecture

from .conftest import CONFIGS

# Llama-2-7B's published shape: built on meta, nothing is downloaded or allocated.
LLAMA_7B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
GPU = torch.device("cuda:0")


def config(*overrides: str) -> Config:
    return load_config(None, ["experiment.algorithms=['fedit']", *overrides])


def client_gib(cfg: Config, placement: Placement) -> float:
    plan = plan_run(cfg, LLAMA_7B, placement, capacity=80 * GIB)
    assert plan.client is not None
    return plan.client.total / GIB


def test_parameters_are_counted_from_the_config() -> None:
    shape = architecture(LLAMA_7B, ("q_proj", "v_proj"), 8)
    assert shape.params == pytest.approx(6.74e9, rel=0.01)  # Llama-2-7B
    assert shape.lora_per_block == 2 * 8 * (4096 + 4096)
    assert shape.head == 32000 * 4096  # not tied


def test_a_7b_plan_matches_its_published_sizes() -> None:
    """bf16 weights are 2 bytes a parameter; QLoRA's NF4 base is about a quarter of that."""
    cfg = config("data.max_length=512")
    bf16 = plan_run(cfg, LLAMA_7B, Placement(GPU, torch.bfloat16, "none"), capacity=80 * GIB)
    nf4 = plan_run(cfg, LLAMA_7B, Placement(GPU, torch.bfloat16, "4bit"), capacity=80 * GIB)
    assert bf16.estimates[0].weights / GIB == pytest.approx(12.55, rel=0.02)
    # 6.48B linear weights at ~0.52 bytes + embeddings and head upcast to fp32 by PEFT.
    assert 3.5 < nf4.estimates[0].weights / GIB < 4.5


def test_each_knob_lowers_the_client_peak() -> None:
    base = config("data.max_length=1024", "train.batch_size=8")
    bf16 = Placement(GPU, torch.bfloat16, "none")
    peak = client_gib(base, bf16)
    checkpointed = config(
        "data.max_length=1024", "train.batch_size=8", "train.gradient_checkpointing=true"
    )
    assert client_gib(checkpointed, Placement(GPU, torch.bfloat16, "none", True)) < peak * 0.75
    assert client_gib(base, Placement(GPU, torch.bfloat16, "4bit")) < peak - 6
    assert client_gib(config("data.max_length=512", "train.batch_size=8"), bf16) < peak
    assert client_gib(base, Placement(GPU, torch.float32, "none")) > peak


def test_clients_share_a_gpu_as_far_as_they_fit() -> None:
    cfg = config("partition.clients=8", "data.max_length=512", "train.gradient_checkpointing=true")
    placement = Placement(GPU, torch.bfloat16, "4bit", True)
    plan = plan_run(cfg, LLAMA_7B, placement, capacity=40 * GIB)
    assert plan.client is not None and plan.fits
    per = plan.client.total
    assert plan.parallel == (40 * GIB - plan.shared) // per
    assert 1 <= plan.parallel < 8
    resources = plan.client_resources(cpus=16)
    assert resources["num_gpus"] == pytest.approx(1 / plan.parallel)
    assert resources["num_cpus"] == 16 // plan.parallel
    # A CPU runs one client at a time on every core, whatever fits.
    cpu = plan_run(cfg, LLAMA_7B, Placement(torch.device("cpu"), torch.float32, "none"), 10**15)
    assert cpu.client_resources(cpus=16) == {"num_cpus": 16, "num_gpus": 0.0}


def test_split_clients_must_all_fit_at_once() -> None:
    cfg = config("experiment.algorithms=['split']", "partition.clients=4", "data.max_length=512")
    placement = Placement(GPU, torch.bfloat16, "none")
    plan = plan_run(cfg, LLAMA_7B, placement, capacity=80 * GIB)
    roles = [e.role for e in plan.estimates]
    assert roles == ["runner (evaluation)", "split server", "split client"]
    assert plan.concurrent and plan.needed == plan.shared + 4 * plan.estimates[-1].total
    server = plan.estimates[1]
    assert server.weights / GIB == pytest.approx(12.55 * 30 / 32, rel=0.05)  # 30 middle blocks


def test_a_plan_that_cannot_fit_names_the_knobs() -> None:
    cfg = config("data.max_length=512")
    plan = plan_run(cfg, LLAMA_7B, Placement(GPU, torch.bfloat16, "none"), capacity=16 * GIB)
    assert not plan.fits
    with pytest.raises(ConfigError) as err:
        plan.check()
    message = str(err.value)
    assert "GiB on cuda:0" in message
    for knob in ("train.gradient_checkpointing = true", "model.quantization = '4bit'",
                 "train.batch_size (now 4)", "data.max_length (now 512)"):  # fmt: skip
        assert knob in message


def test_plan_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(CONFIGS / "tiny.toml")]) == 0
    out = capsys.readouterr().out
    assert "fedit client" in out and "fits" in out
    code = main(["plan", str(CONFIGS / "tiny.toml"), "--memory-gib", "0.1"])
    assert code == 2
    assert "lower train.batch_size" in capsys.readouterr().err
