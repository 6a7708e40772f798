"""The memory plan: sizes from a model's config, what lowers them, fitting and refusing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from silotune.cli import main
from silotune.config import Config, load_config
from silotune.config_privacy import PrivacyConfig
from silotune.data.load import load_records
from silotune.data.sft import tokenize_dataset
from silotune.errors import ConfigError
from silotune.modeling.adapters import GLOBAL
from silotune.modeling.load import resolve_model
from silotune.modeling.memory import GIB, plan_run
from silotune.modeling.placement import Placement, planned_placement
from silotune.modeling.shape import architecture
from silotune.modeling.shapes import GLM4_9B, model_config
from silotune.training.loop import train_steps
from silotune.training.workbench import Workbench

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


def test_a_preset_is_planned_without_a_download(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline, the presets' large models are planned from their published shapes; any other
    hub id still needs its config.json."""

    def unreachable(location: str, **kwargs: object) -> None:
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {location}")

    monkeypatch.setattr(AutoConfig, "from_pretrained", unreachable)
    assert model_config("THUDM/glm-4-9b-chat-hf") is GLM4_9B
    with pytest.raises(ConfigError, match="cannot load model 'someone/not-a-preset'"):
        model_config("someone/not-a-preset")
    preset = str(CONFIGS / "split-glm4-9b.toml")
    assert main(["plan", preset, "--device", "cuda", "--memory-gib", "80"]) == 0
    assert "split server" in capsys.readouterr().out


DP = ("privacy.mode=dp-sgd", "privacy.noise_multiplier=1.0")


def test_dp_sgd_adds_per_example_gradients_to_the_training_processes() -> None:
    """Llama-2-7B, LoRA r8 on q/v, batch 4 x 512: DP's share is its own column, by hand."""
    placement = Placement(GPU, torch.bfloat16, "none")
    off = plan_run(config("data.max_length=512"), LLAMA_7B, placement, capacity=80 * GIB)
    on = plan_run(config("data.max_length=512", *DP), LLAMA_7B, placement, capacity=80 * GIB)
    assert off.client is not None and on.client is not None
    trained = 32 * 2 * 8 * (4096 + 4096)  # every block's q and v adapter, A and B
    tokens = 4 * 512
    expected = (
        (4 + 1) * trained * 4  # grad_sample per example + the clipped sum, float32
        + tokens * 4 * 2 * (4096 + 4096)  # one block's LoRA inputs and output gradients
        + 2 * tokens * 32000 * 4  # the per-example loss's shifted logits and their gradient
    )
    assert on.client.dp_sgd == expected
    assert replace(on.client, dp_sgd=0) == off.client  # nothing else moves
    assert on.client.total - off.client.total == pytest.approx(expected * 1.10, abs=2)
    assert on.estimates[0].dp_sgd == 0  # the runner only evaluates
    # FFA-LoRA trains only B: half the per-example gradients here.
    ffa = plan_run(
        config("data.max_length=512", "lora.freeze_a=true", *DP), LLAMA_7B, placement, 80 * GIB
    )
    assert ffa.client is not None
    assert on.client.dp_sgd - ffa.client.dp_sgd == (4 + 1) * trained // 2 * 4
    # The table shows DP's share only when there is one.
    assert len(off.rows()[0]) == 6 and len(on.rows()[0]) == 7
    assert "DP-SGD per-example" in [c.header for c in on.table().columns]
    assert "DP-SGD per-example" not in [c.header for c in off.table().columns]


def test_dp_sgd_is_planned_where_the_one_loop_trains() -> None:
    """LocIT trains in the runner (DP); of split's processes its clients run DP-SGD, the
    server (the middle) does not."""
    placement = Placement(GPU, torch.bfloat16, "none")
    local = plan_run(config("experiment.algorithms=['locit']", *DP), LLAMA_7B, placement, 80 * GIB)
    assert local.estimates[0].role == "runner" and local.estimates[0].dp_sgd > 0
    wire = [f"defence.{k}=1.0" for k in ("activation_clip", "activation_noise")]
    wire += [f"defence.{k}=1.0" for k in ("gradient_clip", "gradient_noise")]
    split = plan_run(
        config("experiment.algorithms=['split']", *DP, *wire), LLAMA_7B, placement, 80 * GIB
    )
    shares = {e.role: e.dp_sgd for e in split.estimates}
    assert shares["split client"] > 0 and shares["split server"] == 0


def test_planned_per_example_gradients_are_what_opacus_holds(
    tiny_bench: Workbench, tiny_config: Config
) -> None:
    """A real DP-SGD step on the tiny model keeps batch x the planned trained parameters."""
    lora = tiny_config.lora
    hf_config = model_config(resolve_model(tiny_config.model).location)
    shape = architecture(hf_config, lora.target_modules, lora.r)
    planned = shape.layers * shape.lora_per_block * 4  # float32 bytes per example
    records = load_records(tiny_config.data).dataset.select(range(8))
    examples = tokenize_dataset(records, tiny_bench.tokenizer, "alpaca", 48)
    tiny_bench.put(GLOBAL, tiny_bench.initial)
    tiny_bench.use([GLOBAL], [GLOBAL])
    trained = [p for p in tiny_bench.model.parameters() if p.requires_grad]
    held: list[tuple[int, int]] = []  # (examples drawn, bytes of grad_sample)

    def on_step(step: int, loss: float) -> None:
        samples = [p.grad_sample for p in trained]
        held.append((len(samples[0]), sum(s.numel() * s.element_size() for s in samples)))

    privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0)
    train_steps(
        tiny_bench.model,
        examples,
        tiny_config.train,
        3,
        tiny_bench.pad_id,
        0,
        on_step=on_step,
        privacy=privacy,
    )
    tiny_bench.put(GLOBAL, tiny_bench.initial)
    assert held and all(size == drawn * planned for drawn, size in held)
    assert any(drawn > 0 for drawn, _ in held)


def test_the_glm4_9b_split_preset_is_planned_from_its_published_shape() -> None:
    """FL-GLM's own family: GLM-4-9B-Chat (transformers-native) is split and planned like the
    7B presets, without a download."""
    cfg = load_config(CONFIGS / "split-glm4-9b.toml")
    assert architecture(GLM4_9B, cfg.lora.target_modules, 8).params == pytest.approx(
        9.4e9, rel=0.01
    )
    placement = planned_placement(cfg, "cuda")  # as the preset asks: 4-bit, bf16, checkpointing
    plan = plan_run(cfg, GLM4_9B, placement, capacity=80 * GIB)
    roles = {e.role: e.total / GIB for e in plan.estimates}
    assert plan.fits and 7 < roles["split server"] < 11 and plan.client is not None
    assert 9 < plan.client.total / GIB < 14
    gpt2 = AutoConfig.for_model("gpt2")
    with pytest.raises(ConfigError, match=r"cannot cut .*gpt2.*test matrix"):
        plan_run(cfg, gpt2, placement, capacity=80 * GIB)
