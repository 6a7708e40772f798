"""The memory plan ÷ the measured peak, and the plans of the 7B-class presets.

    python bench/memory_plan.py                 # SmolLM2-135M on this machine's device
    python bench/memory_plan.py --model tiny-llama
    python bench/memory_plan.py --skip-measure  # only the 7B-class plans

Part 1 measures: for each setting (float32; gradient checkpointing; a 4-bit base; a longer
batch) a fresh child process loads a federated client's Workbench (FedPIT: global + private
adapters), trains `--steps` steps per adapter and evaluates, and reports its peak and its mean
seconds per training step: the resident set (VmHWM)
on a CPU, `torch.cuda.max_memory_allocated` + the CUDA context on a GPU. The parent prints it
next to the plan's estimate for that client (`silotune.modeling.memory`).

Part 2 prints, without downloading anything, the plan of each 7B-class preset on GPUs of 24, 40
and 80 GiB: the architecture is built on `meta` from the model's published shape.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import PretrainedConfig

from silotune import logs
from silotune.config import load_config
from silotune.modeling.load import resolve_model
from silotune.modeling.memory import GIB, plan_run
from silotune.modeling.placement import planned_placement, resolve_placement
from silotune.modeling.shapes import GLM4_9B, QWEN25_7B, model_config

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "float32, 4 x 128": [],
    "gradient checkpointing": ["train.gradient_checkpointing=true"],
    "4-bit base": ["model.quantization=4bit"],
    "float32, 8 x 256": ["train.batch_size=8", "data.max_length=256"],
    "checkpointing, 8 x 512": [
        "train.batch_size=8",
        "data.max_length=512",
        "train.gradient_checkpointing=true",
    ],
}
# The presets' models, as their hubs publish them (silotune.modeling.shapes).
PRESETS: dict[str, PretrainedConfig] = {
    "fedpit-7b-qlora.toml": QWEN25_7B,
    "split-7b.toml": QWEN25_7B,
    "split-glm4-9b.toml": GLM4_9B,
}


def overrides(model: str, extra: list[str]) -> list[str]:
    return [f"model.name={model}", "experiment.algorithms=['fedpit']", *extra]


def child(model: str, extra: list[str], steps: int) -> None:
    """Load one client, train and evaluate; print its peak in bytes as JSON."""
    from silotune.data.load import load_records
    from silotune.data.sft import tokenize_dataset
    from silotune.evaluation.evaluator import build_eval_set
    from silotune.modeling.adapters import GLOBAL, PRIVATE
    from silotune.training.workbench import Workbench

    config = load_config(None, overrides(model, extra))
    bench = Workbench(resolve_model(config.model), config, private=True)
    records = load_records(config.data).dataset
    data = tokenize_dataset(
        records, bench.tokenizer, config.data.prompt_style, config.data.max_length
    )
    # Every sequence exactly data.max_length tokens (records repeated, then cut), as planned.
    length = config.data.max_length
    examples = [((ids * 8)[:length], (labels * 8)[:length]) for ids, labels in data[:32]]
    first = bench.fit(GLOBAL, examples, steps, seed=1, active=[GLOBAL])
    second = bench.fit(PRIVATE, examples, steps, seed=2, active=[GLOBAL, PRIVATE])
    step_s = (first.seconds + second.seconds) / (2 * steps)
    held_out = build_eval_set(records.select(range(8)), bench.tokenizer, config.data)
    bench.evaluate(bench.take(GLOBAL), held_out, bench.take(PRIVATE))
    if bench.placement.device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_allocated() + (total - free - torch.cuda.memory_reserved())
    else:
        peak = peak_rss()
    print(json.dumps({"peak": peak, "step_s": step_s}))


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args: argparse.Namespace, console: Console) -> None:
    table = Table(
        title=f"a FedPIT client of {args.model}, {args.steps} steps per adapter + evaluation",
        title_justify="left",
    )
    columns = ("setting", "device", "planned GiB", "measured GiB", "planned ÷ measured", "s/step")
    for col in columns:
        table.add_column(col, justify="left" if col == "setting" else "right")
    for name, extra in SETTINGS.items():
        config = load_config(None, overrides(args.model, extra))
        placement = resolve_placement(config)
        location = resolve_model(config.model).location
        plan = plan_run(config, model_config(location), placement, capacity=10**15)
        assert plan.client is not None
        argv = [sys.executable, __file__, "--child", json.dumps(extra), "--model", args.model]
        argv += ["--steps", str(args.steps)]
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        measured = result["peak"]
        planned = plan.client.total
        table.add_row(
            name,
            str(placement.device),
            f"{planned / GIB:.2f}",
            f"{measured / GIB:.2f}",
            f"{planned / measured:.2f}",
            f"{result['step_s']:.2f}",
        )
    console.print(table)


def presets(console: Console) -> None:
    table = Table(
        title="7B-class presets (their models' published shapes), planned on one GPU",
        title_justify="left",
    )
    for col in ("preset", "process", "peak GiB", "24 GiB", "40 GiB", "80 GiB"):
        table.add_column(col, justify="left" if col in ("preset", "process") else "right")
    for name, shape in PRESETS.items():
        config = load_config(ROOT / "configs" / name)
        placement = planned_placement(config, "cuda")
        plans = {cap: plan_run(config, shape, placement, cap * GIB) for cap in (24, 40, 80)}
        first = plans[80]
        for i, estimate in enumerate(first.estimates):
            verdicts = ["", "", ""]
            if i == 0:
                verdicts = [_verdict(p) for p in plans.values()]
            table.add_row(
                name if i == 0 else "",
                estimate.role,
                f"{estimate.total / GIB:.1f}",
                *verdicts,
            )
        table.add_row("", "whole run, one machine", f"{first.needed / GIB:.1f}", "", "", "")
    console.print(table)


def _verdict(plan) -> str:  # type: ignore[no-untyped-def]
    if not plan.fits:
        return "does not fit"
    if plan.client is not None and not plan.concurrent:
        return f"fits, {plan.parallel} at once"
    return "fits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--skip-measure", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logs.install()
    if args.child is not None:
        child(args.model, json.loads(args.child), args.steps)
        return
    console = Console(width=140)
    if not args.skip_measure:
        measure(args, console)
    presets(console)


if __name__ == "__main__":
    main()
