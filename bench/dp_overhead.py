"""DP-SGD step time ÷ non-private step time of the one training loop, side by side in one run.

    python bench/dp_overhead.py                         # SmolLM2-135M, LoRA, batch 4 x 128
    python bench/dp_overhead.py --model tiny-llama --steps 20

One PEFT LoRA model trains one step at a time, alternating a non-private step and a DP-SGD step
(Opacus per-example gradients of the LoRA parameters only, per-example clipping, Gaussian noise)
so that drifts in machine speed hit both alike. The data are exactly `--batch` records and
train.batch_size is `--batch`, so the Poisson sampling rate is 1 and every DP step sees the same
batch as a plain one. Printed: median step times (wall and this process's CPU seconds) and the
median of the per-step ratios (goal ≤ 1.5). On a shared machine, `--threads 1` keeps other work
from stalling the OpenMP pool, which inflates both kinds of step by several times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from silotune import logs
from silotune.config import load_config
from silotune.config_privacy import PrivacyConfig
from silotune.modeling.adapters import add_lora
from silotune.modeling.load import load_model, resolve_model
from silotune.training.loop import train_steps

PAD = 0
MODES = ("non-private", "DP-SGD")


def random_examples(vocab: int, seq: int, count: int) -> list[tuple[list[int], list[int]]]:
    """Full-length random sequences, so every batch is exactly batch x seq tokens."""
    ids = torch.randint(0, vocab, (count, seq), generator=torch.Generator().manual_seed(0))
    return [(row, row) for row in ids.tolist()]


def run(args: argparse.Namespace, console: Console) -> dict[str, list[tuple[float, float]]]:
    """Alternate the two kinds of step; the measured (wall, CPU) seconds of each."""
    config = load_config(
        None,
        [f"model.name={args.model}", f"train.batch_size={args.batch}", *args.overrides],
        algorithm_checks=False,  # no algorithm runs here: only the training loop
    )
    model = add_lora(load_model(resolve_model(config.model)), config.lora)
    examples = random_examples(int(model.config.vocab_size), args.seq, args.batch)
    privacy = {
        "non-private": None,
        "DP-SGD": PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0, clip_norm=1.0),
    }
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for i in track(range(args.warmup + args.steps), "steps", console=console):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            cpu = time.process_time()
            done = train_steps(model, examples, config.train, 1, PAD, seed=i, privacy=privacy[mode])
            if i >= args.warmup:
                times[mode].append((done.seconds, time.process_time() - cpu))
    return times


def report(
    console: Console, args: argparse.Namespace, times: dict[str, list[tuple[float, float]]]
) -> None:
    """Median step times and the median per-step ratios to the non-private step."""
    title = f"{args.model}, LoRA, batch {args.batch} x {args.seq}, {args.steps} steps, "
    table = Table(title=title + f"{torch.get_num_threads()} threads")
    for col in ("step", "median s", "min s", "÷ non-private", "median CPU s", "min CPU s", "CPU ÷"):
        table.add_column(col)
    for mode in MODES:
        row = [mode]
        for k in (0, 1):  # wall, then CPU seconds; each ratio is the median over step pairs
            ts = [t[k] for t in times[mode]]
            base = [t[k] for t in times["non-private"]]
            ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
            row += [f"{statistics.median(ts):.4f}", f"{min(ts):.4f}", f"{ratio:.3f}"]
        table.add_row(*row)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct or tiny-llama"
    )
    parser.add_argument("--steps", type=int, default=5, help="measured steps per kind")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per kind")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logs.install()
    console = Console(width=120)
    before = os.getloadavg()[0]
    report(console, args, run(args, console))
    console.print(
        f"load average (1 min) {before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
        f"on {os.cpu_count()} cores: other work on the machine slows every step"
    )


if __name__ == "__main__":
    main()
