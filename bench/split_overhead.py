"""Split-learning (FL-GLM) step time ÷ centralized step time, measured side by side in one run.

    python bench/split_overhead.py                          # SmolLM2-135M, batch 4 x 128, 10 steps
    python bench/split_overhead.py --model tiny-llama --steps 30
    python bench/split_overhead.py --no-encrypt             # mutual TLS, no AEAD on the frames
    python bench/split_overhead.py --no-tls --no-encrypt    # plain gRPC
    python bench/split_overhead.py --server thread          # server in this process

Three models of the same base, LoRA config and batch train one step each, in alternating order
(A B C, then C B A, ...) so that drifts in machine speed hit all of them alike:

- centralized: the PEFT model, the reference;
- split, in-process: front → `Middle` → back in this process (the cost of cutting the model);
- split, gRPC: front and back here, the middle on a split server over loopback gRPC with mutual
  TLS and AES-256-GCM frames (unless turned off), one client.

The server runs by default as a separate `silotune split-server` process, as `silotune run` and a
real deployment run it: its own address space, GIL and torch thread pool, so its framing and AEAD
do not borrow this process's interpreter. It is still measured reliably: every reply carries the
server's compute seconds, and the server writes its AEAD seconds to server.json when it exits.
`--server thread` serves from a thread of this process instead (shared GIL and thread pool).

Printed: median step times and the median of the per-step ratios to centralized; the breakdown
of a gRPC split step (mean seconds per step) and the bytes it moved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table
from torch import nn

from silotune import logs
from silotune.config import Config, load_config
from silotune.modeling.adapters import add_lora
from silotune.modeling.load import load_model, resolve_model
from silotune.procs import run_command
from silotune.security.tls import create_dev_pki
from silotune.split.adapters import add_segment_adapter
from silotune.split.link import MiddleLink, RemoteMiddle
from silotune.split.loading import load_segments
from silotune.split.model import SplitCausalLM
from silotune.split.process import environment, shorten_spin
from silotune.split.server import serve
from silotune.split.trainers import build_trainer
from silotune.training.loop import train_steps

CLIENT = "bench-client"
START_TIMEOUT_S = 300.0
PAD = 0

Examples = list[tuple[list[int], list[int]]]


def as_run_processes() -> None:
    """Re-execute this benchmark with the libgomp spin `silotune run` gives its split processes
    (read once, when torch loads), unless the environment sets one: the client side measured
    here is then the process a run would start."""
    if shorten_spin():
        os.execv(sys.executable, [sys.executable, *sys.argv])


def bench_config(model: str, batch: int, seq: int, extra: list[str]) -> Config:
    """The config both sides of a benchmark run use (the server reads it from JSON)."""
    return load_config(
        None,
        [
            "experiment.name=bench-split",
            f"model.name={model}",
            "model.tiny_layers=4",  # tiny-llama: one block each for front, back, two for the server
            f"train.batch_size={batch}",
            f"data.max_length={seq}",
            *extra,
        ],
    )


def random_examples(vocab: int, seq: int, count: int, seed: int = 0) -> Examples:
    """Full-length random sequences, so every batch is exactly batch x seq tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, seq), generator=gen).tolist()
    return [(row, row) for row in ids]


def spawn_server(
    config: Config, folder: Path, certs: Path | None, clients: int, cpus: set[int] | None = None
) -> subprocess.Popen[bytes]:
    """Start `silotune split-server` on a free loopback port (see `wait_for_port`), on the CPUs
    `cpus` only if given (its threads, started later, inherit them)."""
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "config.json"
    config_file.write_text(json.dumps(config.to_dict()))
    tls = ["--certs", str(certs)] if certs is not None else ["--insecure"]
    argv = [
        *(sys.executable, "-m", "silotune.cli", "split-server", str(config_file)),
        *("--listen", "127.0.0.1:0", "--clients", str(clients), "--out", str(folder)),
        *tls,
    ]
    with (folder / "server.log").open("wb") as log:  # started as `silotune run` starts it
        pin = None if cpus is None else lambda: os.sched_setaffinity(0, cpus)
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=environment(), preexec_fn=pin
        )


def wait_for_port(proc: subprocess.Popen[bytes], folder: Path) -> int:
    """The port a spawned server writes once it listens; exit with its log if it died."""
    deadline = time.monotonic() + START_TIMEOUT_S
    port_file = folder / "port"
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            log = (folder / "server.log").read_text(errors="replace")
            sys.exit(f"split server exited before listening:\n{log[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"split server did not listen within {START_TIMEOUT_S:g} s")


@dataclass
class ServerHandle:
    """Where the client connects, and how to read the server's AEAD seconds once it is done."""

    target: str
    crypto_s: Callable[[], float]


@contextmanager
def split_server(
    config: Config, kind: str, tmp: Path, certs: Path | None, cpus: set[int] | None = None
) -> Iterator[ServerHandle]:
    """A split server for one client, as a process (on `cpus` if given) or as a thread of
    this process."""
    if kind == "process":
        proc = spawn_server(config, tmp / "server", certs, clients=1, cpus=cpus)
        target = f"localhost:{wait_for_port(proc, tmp / 'server')}"

        def process_crypto() -> float:
            proc.wait(timeout=60)
            summary = json.loads((tmp / "server" / "server.json").read_text())
            return float(summary["clients"][CLIENT]["crypto_s"])

        try:
            yield ServerHandle(target, process_crypto)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return
    middle = load_segments(config, "server").middle
    add_segment_adapter(middle, config, "middle")
    server, port, service = serve(build_trainer(middle, config), config, "127.0.0.1:0", certs, 1)

    def thread_crypto() -> float:
        service.state.done.wait(timeout=60)
        return service.state.stats[CLIENT].crypto_s

    try:
        yield ServerHandle(f"localhost:{port}", thread_crypto)
    finally:
        server.stop(grace=1.0)


def link_snapshot(link: MiddleLink) -> dict[str, float]:
    """The link's cumulative counters (bytes, seconds) at this moment."""
    s = link.stats
    return {
        "bytes_up": s.bytes_up,
        "bytes_down": s.bytes_down,
        "serialize": s.serialize_s,
        "wait": s.wait_s,
        "server": s.server_s,
        "aead_client": link.sealer.seconds,
    }


def run(args: argparse.Namespace, console: Console) -> None:
    """Build the three models, alternate their steps, print the tables."""
    extra = [f"split.tls={str(not args.no_tls).lower()}"]
    extra.append(f"split.encrypt={str(not args.no_encrypt).lower()}")
    config = bench_config(args.model, args.batch, args.seq, [*extra, *args.overrides])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs: Path | None = None
        if config.split.tls:
            certs = tmp / "certs"
            create_dev_pki(certs, [CLIENT])
        with split_server(config, args.server, tmp, certs) as server:
            central = add_lora(load_model(resolve_model(config.model)), config.lora)
            segments = load_segments(config)
            for role in ("front", "middle", "back"):
                add_segment_adapter(getattr(segments, role), config, role)
            link = MiddleLink(config, CLIENT, server.target, certs)
            models: dict[str, nn.Module] = {
                "centralized": central,
                "split, in-process": SplitCausalLM(segments.front, segments.back, segments.middle),
                "split, gRPC": SplitCausalLM(segments.front, segments.back, RemoteMiddle(link)),
            }
            hidden = int(segments.front.config.hidden_size)
            vocab = int(segments.front.config.vocab_size)
            examples = random_examples(vocab, args.seq, 4 * args.batch)
            times: dict[str, list[float]] = {name: [] for name in models}
            deltas: list[dict[str, float]] = []
            order = list(models)
            for i in track(range(args.warmup + args.steps), "steps", console=console):
                for name in order if i % 2 == 0 else order[::-1]:
                    before = link_snapshot(link)
                    done = train_steps(models[name], examples, config.train, 1, PAD, seed=i)
                    if i < args.warmup:
                        continue
                    times[name].append(done.seconds)
                    if name == "split, gRPC":
                        after = link_snapshot(link)
                        delta = {k: after[k] - before[k] for k in after}
                        deltas.append({**delta, "step": done.seconds})
            link.close()
            server_crypto = server.crypto_s() / (args.warmup + args.steps)
    report(console, config, args, times, deltas, server_crypto, hidden)


def report(
    console: Console,
    config: Config,
    args: argparse.Namespace,
    times: dict[str, list[float]],
    deltas: list[dict[str, float]],
    server_crypto: float,
    hidden: int,
) -> None:
    """Print the step-time table, the breakdown and the traffic."""
    wire = "TLS" if config.split.tls else "no TLS"
    wire += " + AES-GCM" if config.split.encrypt else ", no AEAD"
    title = (
        f"{config.model.name}, LoRA r{config.lora.r} on {','.join(config.lora.target_modules)}, "
        f"batch {args.batch} × {args.seq} tokens, split {config.split.front_blocks}/…/"
        f"{config.split.back_blocks}, {wire}, server as a {args.server}; "
        f"{args.steps} steps after {args.warmup} warm-up"
    )
    table = Table(title=title)
    for col in ("model", "median step s", "min step s", "÷ centralized (median of pairs)"):
        table.add_column(col, justify="right")
    base = times["centralized"]
    ratios: dict[str, float] = {}
    for name, ts in times.items():
        ratios[name] = statistics.median(t / c for t, c in zip(ts, base, strict=True))
        table.add_row(name, f"{statistics.median(ts):.4f}", f"{min(ts):.4f}", f"{ratios[name]:.3f}")
    console.print(table)

    def mean(key: str) -> float:
        return statistics.fmean(d[key] for d in deltas)

    step = mean("step")
    parts = {
        "client compute (front + back + its optimizer)": step
        - mean("wait")
        - mean("serialize")
        - mean("aead_client"),
        "server compute (middle forward + backward + step)": mean("server"),
        "serialization (client framing, copies)": mean("serialize"),
        "AEAD, client (seal + open)": mean("aead_client"),
        "AEAD, server (seal + open)": server_crypto,
        "transport (wait − server compute − server AEAD)": mean("wait")
        - mean("server")
        - server_crypto,
    }
    breakdown = Table(title="one gRPC split step, mean over the measured steps")
    for col in ("part", "s per step", "share of step"):
        breakdown.add_column(col, justify="right")
    for name, seconds in parts.items():
        breakdown.add_row(name, f"{seconds:.4f}", f"{seconds / step:.1%}")
    breakdown.add_row("whole step", f"{step:.4f}", "100.0%")
    console.print(breakdown)

    size = {"float32": 4, "bfloat16": 2}[config.split.wire_dtype]
    activations = args.batch * args.seq * hidden * size
    mask = args.batch * args.seq
    up, down = mean("bytes_up"), mean("bytes_down")
    console.print(
        f"bytes per step: {up:,.0f} up, {down:,.0f} down; ÷ raw tensors "
        f"(activations + mask + gradient up, output + gradient down): "
        f"{up / (2 * activations + mask):.4f} up, {down / (2 * activations):.4f} down"
    )
    console.print(
        f"split over gRPC ÷ centralized = {ratios['split, gRPC']:.3f} (goal ≤ 1.15 on loopback; "
        f"FL-GLM paper ≈ 2.0 on one machine with two GPUs); cutting the model alone costs "
        f"{ratios['split, in-process']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct or tiny-llama"
    )
    parser.add_argument("--steps", type=int, default=10, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--no-tls", action="store_true", help="plain gRPC instead of mutual TLS")
    parser.add_argument("--no-encrypt", action="store_true", help="no AES-GCM on the frames")
    parser.add_argument("--server", choices=("process", "thread"), default="process")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args()
    as_run_processes()
    logs.install()
    console = Console(width=120)
    before = os.getloadavg()[0]
    run(args, console)
    console.print(
        f"load average (1 min) {before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
        f"on {os.cpu_count()} cores: other work on the machine slows every step"
    )


if __name__ == "__main__":  # SIGTERM stops it as Ctrl-C does: no server or key is left
    sys.exit(run_command(lambda: main() or 0, "free space and run it again"))
