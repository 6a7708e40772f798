"""The CUDA path: bf16 and 4-bit bases on the GPU, split segments there, and the memory plan
against what torch measures. Skipped without CUDA (`pytest -m gpu` on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from silotune.config import Config, load_config
from silotune.modeling.load import resolve_model
from silotune.modeling.memory import GIB, plan_run
from silotune.modeling.placement import resolve_placement
from silotune.modeling.shapes import model_config
from silotune.split.loading import load_segments
from silotune.split.model import SplitCausalLM
from silotune.training.workbench import Workbench

pytestmark = pytest.mark.gpu


def gpu(*overrides: str) -> Config:
    return load_config(
        None, ["model.name=tiny-llama", "model.tiny_layers=4", "model.device=cuda", *overrides]
    )


def examples() -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 200, (48,), generator=gen).tolist() for _ in range(8)]
    return [(row, [-100] * 8 + row[8:]) for row in ids]


def test_auto_picks_the_gpu_and_bf16() -> None:
    placement = resolve_placement(load_config(None, ["model.name=tiny-llama"]))
    assert placement.device.type == "cuda"
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert placement.dtype == expected


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.quantization=4bit"], ["train.gradient_checkpointing=true"]],
    ids=["bf16", "4bit", "checkpointing"],
)
def test_a_gpu_workbench_trains_and_hands_back_cpu_adapters(overrides: list[str]) -> None:
    cfg = gpu(*overrides)
    bench = Workbench(resolve_model(cfg.model), cfg)
    assert next(bench.model.parameters()).device.type == "cuda"
    state, result = bench.train(bench.initial, examples(), 3, seed=1)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    assert result.loss == result.loss  # not NaN
    metrics = bench.evaluate(state, _eval_set(bench, cfg)).metrics()
    assert metrics["eval_loss"] == metrics["eval_loss"]


def _eval_set(bench: Workbench, cfg: Config):  # type: ignore[no-untyped-def]
    from silotune.data.load import load_records
    from silotune.evaluation.evaluator import build_eval_set

    records = load_records(cfg.data).dataset.select(range(4))
    return build_eval_set(records, bench.tokenizer, cfg.data)


@pytest.mark.parametrize("overrides", [[], ["model.quantization=4bit"]], ids=["bf16", "4bit"])
def test_split_on_the_gpu_generates_like_the_whole_model(overrides: list[str]) -> None:
    cfg = gpu(*overrides)
    bench = Workbench(resolve_model(cfg.model), cfg)
    segments = load_segments(cfg, "all")
    split = SplitCausalLM(segments.front, segments.back, segments.middle)
    ids = torch.tensor([[0, 0, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]], device="cuda")
    mask = (ids != 0).long()
    kwargs = {"max_new_tokens": 6, "pad_token_id": 0, "do_sample": False}
    with bench.model.disable_adapter():
        want = bench.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(split.generate(ids, mask, **kwargs), want)


def test_the_plan_bounds_the_measured_peak() -> None:
    """The planned client peak is above what torch allocates in a training step, by < 3x."""
    cfg = gpu("model.tiny_layers=2", "model.tiny_hidden=256", "data.max_length=256")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    bench = Workbench(resolve_model(cfg.model), cfg)
    bench.train(bench.initial, examples(), 2, seed=1)
    measured = torch.cuda.max_memory_allocated() - before
    plan = plan_run(cfg, model_config(resolve_model(cfg.model).location), bench.placement, 80 * GIB)
    assert plan.client is not None
    planned = plan.client.total - plan.client.runtime
    assert measured <= planned < 3 * measured + 64 * 2**20
