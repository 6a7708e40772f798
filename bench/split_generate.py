"""Split generation tokens/s ÷ centralized generation tokens/s, measured side by side in one run.

    python bench/split_generate.py                       # SmolLM2-135M, prompts of 64, 32 new
    python bench/split_generate.py --batch 1 8 --new 64
    python bench/split_generate.py --model tiny-llama --no-encrypt
    python bench/split_generate.py --batch 1 --reps 20 --no-recomputed   # a tighter interval
    python bench/split_generate.py --batch 1 --pin   # one core each: two one-core machines
    python bench/split_generate.py --no-pipe         # without the bare-pipe floor

The same base and LoRA adapters decode the same random prompts greedily, taking turns (each goes
first in turn, forwards then backwards) so that drifts in machine speed hit them alike:

- centralized: transformers' `generate` on the whole PEFT model, with its KV cache;
- split, cached: front and back here with their KV caches, the middle on a `silotune
  split-server` process over loopback gRPC with mutual TLS and AES-256-GCM frames; the server
  keeps the middle's cache, so each new token crosses the wire alone;
- split, recomputed: the same split model resending the whole sequence for every token (no
  cache anywhere), as the FL-GLM code decodes;
- split, bare pipe: the same front and back, the middle with its cache in a child process behind
  a bare OS pipe (no gRPC, TLS, AEAD, framing, screening or server bookkeeping): the floor any
  transport between two processes has, so cached ÷ bare pipe is what silotune's own link costs
  and bare pipe ÷ centralized what two processes cost on this machine.

A row ends at the model's EOS on every side. Printed per batch size: tokens/s of each (tokens
decoded over seconds, summed over the runs), their ratios to centralized and the cached split
model's to the bare pipe's — with the 95 % intervals of the per-run ratios where both decoded
the same prompts with a cache — and whether the split models produced exactly the centralized
tokens in every run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from silotune import logs
from silotune.config import Config
from silotune.evaluation.intervals import mean_interval
from silotune.modeling.adapters import add_lora
from silotune.modeling.load import load_model, resolve_model
from silotune.procs import run_command
from silotune.security.tls import create_dev_pki
from silotune.split.adapters import add_segment_adapter
from silotune.split.link import MiddleLink, RemoteMiddle
from silotune.split.loading import load_segments
from silotune.split.model import SplitCausalLM
from split_overhead import CLIENT, as_run_processes, bench_config, link_snapshot, split_server

PAD = 0


def prompts(vocab: int, batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    return ids, torch.ones_like(ids)


class PipeMiddle:
    """The middle with its KV cache in a child process behind a bare OS pipe: what a decoding
    step costs between two processes without any of silotune's link (the bench's floor). It
    answers `forward` as `MiddleLink` does for decoding, so `SplitCausalLM` drives it alike."""

    def __init__(self, config: Config, cpus: set[int] | None) -> None:
        context = multiprocessing.get_context("spawn")  # a forked OpenMP pool would hang
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=pipe_server, args=(child, config, cpus), daemon=True)
        self.proc.start()
        child.close()

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, train: bool, cache: str = ""
    ) -> torch.Tensor:
        self.conn.send((hidden.numpy(), mask.numpy(), cache == "new"))
        return torch.from_numpy(self.conn.recv())

    def close(self) -> None:
        """Ask the child to end; kill it if it does not (or died and cannot be asked)."""
        with contextlib.suppress(OSError):  # a child that is gone cannot be asked
            self.conn.send(None)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def pipe_server(conn: Any, config: Config, cpus: set[int] | None) -> None:
    """The child of `PipeMiddle`: the server's middle and adapter, run on each message."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
    middle = load_segments(config, "server").middle
    add_segment_adapter(middle, config, "middle")
    cache = None
    with torch.no_grad():
        while (message := conn.recv()) is not None:
            hidden, mask, first = message
            if first or cache is None:
                cache = middle.new_cache()
            out = middle(torch.from_numpy(hidden), torch.from_numpy(mask), cache)
            conn.send(out.numpy())


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(args: argparse.Namespace, console: Console) -> None:
    server_cpus = None
    if args.pin:  # two one-core machines: this process on CPU 0, the server on CPU 1
        if len(os.sched_getaffinity(0)) < 2:
            sys.exit("--pin needs two CPUs: one for this process, one for the server")
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
        server_cpus = {1}
    torch.manual_seed(0)
    extra = [f"split.tls={str(not args.no_tls).lower()}"]
    extra.append(f"split.encrypt={str(not args.no_encrypt).lower()}")
    config = bench_config(args.model, 1, args.prompt, extra)
    source = resolve_model(config.model)
    central = add_lora(load_model(source), config.lora)
    vocab = int(central.config.vocab_size)
    segments = load_segments(config, "client")
    add_segment_adapter(segments.front, config, "front")
    add_segment_adapter(segments.back, config, "back")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        certs = None
        if not args.no_tls:
            certs = Path(tmp) / "pki"
            create_dev_pki(certs, [CLIENT])
        pipe = None if args.no_pipe else PipeMiddle(config, server_cpus)
        try:
            with split_server(config, "process", Path(tmp), certs, server_cpus) as server:
                link = MiddleLink(config, CLIENT, server.target, certs)
                split = SplitCausalLM(segments.front, segments.back, RemoteMiddle(link))
                piped = None
                if pipe is not None:  # the same front and back, the middle behind the pipe
                    piped = SplitCausalLM(segments.front, segments.back, RemoteMiddle(pipe))  # type: ignore[arg-type]
                for batch in args.batch:
                    rows.append(measure(args, central, split, piped, vocab, batch))
                link.close()
        finally:
            if pipe is not None:
                pipe.close()
    report(args, rows, console)


def measure(
    args: argparse.Namespace,
    central: torch.nn.Module,
    split: SplitCausalLM,
    piped: SplitCausalLM | None,
    vocab: int,
    batch: int,
) -> tuple[int, dict[str, float], bool, dict[str, float], dict[str, tuple[float, float]]]:
    new = args.new
    link = split.middle.link  # type: ignore[union-attr]
    parts: dict[str, float] = {}  # the cached runs' link counters, summed

    # Both stop a row at the model's EOS (and pad it after), so they decode the same tokens.
    eos = central.generation_config.eos_token_id  # type: ignore[union-attr]
    eos = eos[0] if isinstance(eos, list) else eos

    def centralized(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = central.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=eos,
            use_cache=True,
        )
        return out

    def cached(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return split.generate(ids, mask, new, pad_token_id=PAD, eos_token_id=eos)

    def recomputed(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return split.generate(ids, mask, new, pad_token_id=PAD, eos_token_id=eos, use_cache=False)

    def bare_pipe(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert piped is not None
        return piped.generate(ids, mask, new, pad_token_id=PAD, eos_token_id=eos)

    runs = {"centralized": centralized, "split, cached": cached}
    if piped is not None:
        runs["split, bare pipe"] = bare_pipe
    if not args.no_recomputed:
        runs["split, recomputed"] = recomputed
    names = list(runs)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list[int]] = {n: [] for n in names}  # decoded, rows x steps taken
    same = True
    for rep in range(args.reps + 1):  # the first round warms up and is not counted
        ids, mask = prompts(vocab, batch, args.prompt, seed=rep)
        order = names[rep % len(names) :] + names[: rep % len(names)]  # each goes first in turn
        order = order if rep % 2 == 0 else order[::-1]
        outs = {}
        for name in order:
            before = link_snapshot(link)
            with torch.no_grad():
                s, outs[name] = timed(lambda fn=runs[name], i=ids, m=mask: fn(i, m))
            if rep and name == "split, cached":
                after = link_snapshot(link)
                for key in after:
                    parts[key] = parts.get(key, 0.0) + after[key] - before[key]
                parts["seconds"] = parts.get("seconds", 0.0) + s
                parts["steps"] = parts.get("steps", 0.0) + outs[name].shape[1] - ids.shape[1]
            if rep:
                seconds[name].append(s)
                tokens[name].append(batch * (outs[name].shape[1] - ids.shape[1]))
        same &= torch.equal(outs["centralized"], outs["split, cached"])
        same &= piped is None or torch.equal(outs["centralized"], outs["split, bare pipe"])
    tokens_per_s = {n: sum(tokens[n]) / sum(s) for n, s in seconds.items()}
    intervals = {"cached": ratio_interval(seconds, tokens, "split, cached", "centralized")}
    if piped is not None:
        intervals["pipe"] = ratio_interval(seconds, tokens, "split, bare pipe", "centralized")
        intervals["cached/pipe"] = ratio_interval(
            seconds, tokens, "split, cached", "split, bare pipe"
        )
    return batch, tokens_per_s, same, parts, intervals


def ratio_interval(
    seconds: dict[str, list[float]], tokens: dict[str, list[int]], name: str, base: str
) -> tuple[float, float]:
    """The 95 % t-interval of `name`'s tokens/s over `base`'s, per run (paired: each run
    decodes the same prompts on both sides); NaN with fewer than two runs."""
    per_run = [
        (tn / sn) / (tb / sb)
        for tn, sn, tb, sb in zip(
            tokens[name], seconds[name], tokens[base], seconds[base], strict=True
        )
    ]
    _, _, low, high = mean_interval(per_run)
    return (math.nan, math.nan) if low is None or high is None else (low, high)


def with_interval(value: float, interval: tuple[float, float] | None) -> str:
    """A ratio and its interval for a table cell ("" for a ratio not measured)."""
    if math.isnan(value):
        return ""
    low, high = interval or (math.nan, math.nan)
    return f"{value:.3f}" + ("" if math.isnan(low) else f" [{low:.3f}, {high:.3f}]")


def report(args: argparse.Namespace, rows: list, console: Console) -> None:  # type: ignore[type-arg]
    table = Table(
        title=(
            f"greedy generation, {args.model}: prompts of {args.prompt} tokens, up to {args.new} "
            f"new, {args.reps} runs; split over loopback gRPC"
            + ("" if args.no_tls else " + mutual TLS")
            + ("" if args.no_encrypt else " + AES-256-GCM")
        ),
        title_justify="left",
    )
    for col in (
        "batch",
        "centralized tok/s",
        "split cached tok/s",
        "bare pipe tok/s",
        "split recomputed tok/s",
        "cached ÷ centralized [95 %]",
        "bare pipe ÷ centralized [95 %]",
        "cached ÷ bare pipe [95 %]",
        "recomputed ÷ centralized",
        "same tokens",
    ):
        table.add_column(col, justify="right")
    for batch, tps, same, _, intervals in rows:
        c, s = tps["centralized"], tps["split, cached"]
        r = tps.get("split, recomputed", math.nan)
        b = tps.get("split, bare pipe", math.nan)

        table.add_row(
            str(batch),
            f"{c:.1f}",
            f"{s:.1f}",
            "" if math.isnan(b) else f"{b:.1f}",
            "" if math.isnan(r) else f"{r:.1f}",
            with_interval(s / c, intervals.get("cached")),
            with_interval(b / c, intervals.get("pipe")),
            with_interval(s / b, intervals.get("cached/pipe")),
            "" if math.isnan(r) else f"{r / c:.2f}",
            "yes" if same else "NO",
        )
    console.print(table)
    parts = Table(
        title="where a cached split decoding step's time goes (ms per step, prompt step included)",
        title_justify="left",
    )
    for col in (
        "batch",
        "split step",
        "centralized step",
        "overhead",
        "client compute",
        "server compute",
        "transport + server framing",
        "client framing",
        "client AEAD",
    ):
        parts.add_column(col, justify="right")
    for batch, tps, _, p, _ in rows:
        steps = p["steps"]
        step, wait = p["seconds"] / steps, p["wait"] / steps
        framing, aead, server = (
            p["serialize"] / steps,
            p["aead_client"] / steps,
            p["server"] / steps,
        )
        central = batch / tps["centralized"]
        cells = (step, central, step - central, step - wait - framing - aead, server)
        cells += (wait - server, framing, aead)
        parts.add_row(str(batch), *(f"{1e3 * v:.2f}" for v in cells))
    console.print(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-tls", action="store_true")
    parser.add_argument("--no-encrypt", action="store_true")
    parser.add_argument(
        "--no-recomputed", action="store_true", help="skip the uncached split decoding"
    )
    parser.add_argument(
        "--no-pipe", action="store_true", help="skip the split model over a bare pipe (the floor)"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="one core each, as two one-core machines: this process (client and centralized "
        "decoding) on CPU 0, the server on CPU 1, one thread each",
    )
    args = parser.parse_args()
    as_run_processes()
    logs.install()
    run(args, Console(width=140))


if __name__ == "__main__":  # SIGTERM stops it as Ctrl-C does: no server or key is left
    sys.exit(run_command(lambda: main() or 0, "free space and run it again"))
