"""Compressed uploads (`federated.compression`): bytes on the wire ÷ float32 and what rounding
costs the aggregate, side by side in one run.

    python bench/compression.py                  # default model, 3 clients; 7B adapter timings
    python bench/compression.py --steps 6 --clients 4

Part 1 trains, on the default model (SmolLM2-135M-Instruct, the demo's LoRA), a global adapter
for a round and then `--clients` client updates from it on disjoint slices of the bundled
records, as a FedIT round does. It averages the uploads (weights = examples) as they are and as
each codec delivers them, and prints: the serialised Flower records' bytes ÷ the float32
records' bytes, and the coded aggregate's error relative to the float32 aggregate and to the
round's update (aggregate - global). silotune codes each client's update (trained - received);
the row "whole adapter" codes the trained adapter itself instead, to show why.

Part 2 times coding and decoding one adapter of the 7B preset's size (Qwen2.5-7B, LoRA r16 on
q, k, v, o: 10 M values), built on `meta` and filled with random values, and its bytes ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from flwr.app import ArrayRecord
from peft import get_peft_model, get_peft_model_state_dict
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from silotune import logs
from silotune.config import load_config
from silotune.data.load import as_records, load_records
from silotune.data.sft import tokenize_dataset
from silotune.federated.compression import CODECS, Codec
from silotune.modeling.adapters import peft_lora_config, weighted_mean
from silotune.modeling.load import resolve_model
from silotune.records import record_to_adapter
from silotune.training.workbench import Workbench

State = dict[str, torch.Tensor]


def _norm(state: State) -> float:
    return float(torch.sqrt(sum(t.double().square().sum() for t in state.values())))


def _minus(a: State, b: State) -> State:
    return {k: a[k] - b[k] for k in a}


def _bytes(record: ArrayRecord) -> int:
    return record.count_bytes()


def _round(codec: Codec, trained: State, received: State, update: bool) -> tuple[State, int]:
    """What the server has of one upload after `codec`, and the upload's serialised bytes."""
    if not update:
        record = codec.encode(trained)
        decoded = codec.decode(record, {k: tuple(v.shape) for k, v in trained.items()})
        assert isinstance(decoded, ArrayRecord)
        return record_to_adapter(decoded), _bytes(record)
    record = codec.encode(_minus(trained, received))
    decoded = codec.decode(record, {k: tuple(v.shape) for k, v in trained.items()})
    assert isinstance(decoded, ArrayRecord)
    return {k: received[k] + v for k, v in record_to_adapter(decoded).items()}, _bytes(record)


def part1(console: Console, clients: int, steps: int) -> None:
    config = load_config("configs/demo.toml")
    bench = Workbench(resolve_model(config.model), config)
    data = config.data
    records = as_records(load_records(data).dataset)
    examples = tokenize_dataset(records, bench.tokenizer, data.prompt_style, data.max_length)
    share = len(examples) // (clients + 1)
    # A global adapter one round in (B no longer zero), then each client's update from it.
    start, _ = bench.train(bench.initial, examples[:share], steps, seed=0)
    trained, weights = [], []
    for c in range(clients):
        part = examples[share * (c + 1) : share * (c + 2)]
        state, result = bench.train(start, part, steps, seed=c + 1)
        trained.append(state)
        weights.append(float(result.examples))
    exact = weighted_mean(trained, weights)
    fp32 = sum(_bytes(ArrayRecord(s)) for s in trained)
    step = _norm(_minus(exact, start))
    table = Table(title=f"one FedIT round, {clients} clients × {steps} steps, {config.model.name}")
    for column in ("upload", "bytes ÷ float32", "Δ aggregate ÷ aggregate", "Δ aggregate ÷ update"):
        table.add_column(column, justify="right" if column != "upload" else "left")
    table.add_row("float32", "1.0000", "0", "0")
    for name, codec in CODECS.items():
        for update in (True, False):
            got = [_round(codec, s, start, update) for s in trained]
            aggregate = weighted_mean([g for g, _ in got], weights)
            error = _norm(_minus(aggregate, exact))
            table.add_row(
                f"{name} ({'update' if update else 'whole adapter'})",
                f"{sum(b for _, b in got) / fp32:.4f}",
                f"{error / _norm(exact):.2e}",
                f"{error / step:.4f}",
            )
    console.print(table)
    console.print(
        f"adapter: {sum(t.numel() for t in start.values()):,} values in {len(start)} tensors; "
        f"the round's update is {step / _norm(exact):.3f} of the aggregate's norm"
    )


def part2(console: Console) -> None:
    from memory_plan import QWEN25_7B  # the 7B preset's published shape (bench/memory_plan.py)

    config = load_config("configs/fedpit-7b-qlora.toml")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(QWEN25_7B)
        peft = get_peft_model(model, peft_lora_config(config.lora))
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft).items()}
    state = {k: torch.randn(shape) * 0.01 for k, shape in shapes.items()}
    values = sum(t.numel() for t in state.values())
    table = Table(title=f"one adapter of the 7B preset: {values:,} values, {len(state)} tensors")
    for column in ("codec", "bytes ÷ float32", "encode s", "decode s"):
        table.add_column(column, justify="right" if column != "codec" else "left")
    fp32 = _bytes(ArrayRecord(state))
    for name, codec in CODECS.items():
        t0 = time.perf_counter()
        record = codec.encode(state)
        t1 = time.perf_counter()
        codec.decode(record, shapes)
        t2 = time.perf_counter()
        table.add_row(name, f"{_bytes(record) / fp32:.4f}", f"{t1 - t0:.2f}", f"{t2 - t1:.2f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true", help="only the 7B timings")
    args = parser.parse_args()
    logs.install()
    console = Console()
    if not args.skip_train:
        part1(console, args.clients, args.steps)
    part2(console)


if __name__ == "__main__":
    main()
