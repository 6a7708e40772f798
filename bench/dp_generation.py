"""DP few-shot generation's tokens/s ÷ non-private generation's, at the same batch, side by side.

    python bench/dp_generation.py                        # SmolLM2-135M, 4 groups, batch 5
    python bench/dp_generation.py --model tiny-llama --repeats 3

FedPIT's instruction step both ways on the same model and records: non-private, `batch` prompts of
`icl_examples` records each in one batch (one instruction per row); DP (`synthetic.dp`), one block
of the public prompt and `groups` group prompts in the same batch size (one instruction per
block: every row takes the vote's token). Both stop as FedPIT does (at the next task header, EOS
or `--tokens`); tokens/s counts the instructions' own tokens. Alternating the two evens out drifts
in machine speed. Printed: median tokens/s of each and the median per-pair ratio, against the
goal 1 / (groups x 1.3), which holds when the groups' prompts run batched, not one by one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from silotune import logs
from silotune.config import load_config
from silotune.data.generators import plain_instructions, private_instructions
from silotune.data.load import load_records
from silotune.modeling.adapters import add_lora
from silotune.modeling.load import load_model, load_tokenizer, resolve_model
from silotune.privacy.mechanisms import GaussianUse

MODES = ("non-private", "DP")


def run(args: argparse.Namespace, console: Console) -> dict[str, list[float]]:
    """Alternate the two generations; tokens/s of each repeat."""
    config = load_config(
        None,
        [f"model.name={args.model}", *args.overrides],
        algorithm_checks=False,  # no algorithm runs here: only the generation
    )
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(source)
    model = add_lora(load_model(source), config.lora)
    records = load_records(config.data).dataset.select(range(args.records))
    local = [{k: str(r[k]) for k in ("instruction", "input", "output")} for r in records]
    syn = replace(
        config.synthetic,
        dp=True,
        dp_noise_multiplier=1.0,
        dp_groups=args.groups,
        instruction_max_new_tokens=args.tokens,
        batch_size=args.groups + 1,
    )
    plain = replace(syn, per_round=args.groups + 1, instruction_temperature=0.0)
    dp = replace(syn, per_round=1)
    use = GaussianUse(1.0, 0.5, 1)
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in track(range(args.warmup + args.repeats), "repeats", console=console):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            start = time.perf_counter()
            if mode == "DP":
                out = private_instructions(model, tokenizer, local, dp, i, use)
            else:
                out = plain_instructions(model, tokenizer, local, plain, i)
            seconds = time.perf_counter() - start
            tokens = sum(len(tokenizer(g.text, add_special_tokens=False)["input_ids"]) for g in out)
            if i >= args.warmup:
                rates[mode].append(max(tokens, 1) / seconds)
    return rates


def report(console: Console, args: argparse.Namespace, rates: dict[str, list[float]]) -> None:
    """Median tokens/s and the median per-pair ratio DP ÷ non-private."""
    title = f"{args.model}, {args.groups} groups, batch {args.groups + 1}, {args.tokens} tokens, "
    table = Table(title=title + f"{torch.get_num_threads()} threads")
    for col in ("generation", "median tokens/s", "÷ non-private (median of pairs)"):
        table.add_column(col)
    ratio = statistics.median(d / p for d, p in zip(rates["DP"], rates["non-private"], strict=True))
    table.add_row("non-private", f"{statistics.median(rates['non-private']):.1f}", "1.00")
    table.add_row("DP (one block)", f"{statistics.median(rates['DP']):.1f}", f"{ratio:.3f}")
    console.print(table)
    goal = 1 / (args.groups * 1.3)
    verdict = "meets" if ratio >= goal else "misses"
    console.print(f"goal: ≥ 1 / ({args.groups} x 1.3) = {goal:.3f}; {verdict} it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--records", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logs.install()
    console = Console()
    report(console, args, run(args, console))


if __name__ == "__main__":
    main()
