"""Load on one split server: 8 concurrent clients for a bounded number of steps, per server mode.

    python bench/split_load.py                       # tiny model, 8 clients x 20 steps, each mode
    python bench/split_load.py --clients 16 --steps 50 --modes serial
    python bench/split_load.py --model smollm2-135m-instruct --steps 4

For each mode (serial, batch, per-client) one `silotune split-server` process serves M clients
(threads of this process, mutual TLS + AES-GCM frames, each its own certificate) that all step at
once. Clients replay fixed activations and gradients (`MiddleLink.forward` / `backward`), so the
server does all the computing. Printed per mode: server throughput (samples/s), client step
latency p50 / p99 (forward + backward round trips), the server's peak resident memory, and the
steps lost or mismatched: a client step that failed, a reply for another step or of the wrong
shape, a frame the server refused, or a frame count on the server that differs from what the
clients sent. All of those must be 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from transformers import AutoConfig

from silotune.cli import quiet_libraries
from silotune.config import Config
from silotune.modeling.load import resolve_model
from silotune.security.tls import create_dev_pki
from silotune.split.client import MiddleLink
from split_overhead import bench_config, spawn_server, wait_for_port
from split_scaling import replayed_step

MODES = ("serial", "batch", "per-client")
HANDSHAKE_FRAMES = 2  # HELLO and KEY (with encryption on)


@dataclass
class Load:
    """One mode under load."""

    samples_s: float
    p50_s: float
    p99_s: float
    peak_mib: float
    lost: int  # client steps that did not complete
    mismatched: int  # replies for another step or of the wrong shape
    refused: int  # frames the server answered with an error
    frame_gap: int  # frames the clients sent minus frames the server counted


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size of process `pid` so far (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(config: Config, target: str, certs: Path, clients: int, steps: int, pid: int) -> Load:
    """Run `clients` clients x `steps` steps at once; what the server and the clients saw."""
    b, t = config.train.batch_size, config.data.max_length
    d = int(AutoConfig.from_pretrained(resolve_model(config.model).location).hidden_size)
    links = [MiddleLink(config, f"c{i}", target, certs) for i in range(clients)]
    start_line = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    mismatched = [0] * clients
    failures: list[str] = []

    def client(i: int) -> None:
        hidden, grad, mask = replayed_step(i, b, t, d)
        start_line.wait()
        for _ in range(steps):
            began = time.perf_counter()
            try:
                out = links[i].forward(hidden, mask, train=True)
                back = links[i].backward(grad)
            except Exception as exc:  # counted as lost; the load goes on
                failures.append(f"c{i}: {exc}")
                continue
            latencies[i].append(time.perf_counter() - began)
            if out.shape != hidden.shape or back.shape != hidden.shape:
                mismatched[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    start_line.wait()
    began = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - began
    peak = peak_rss_mib(pid)
    sent = [link.stats.frames for link in links]
    for link in links:
        link.close()
    done = [len(lat) for lat in latencies]
    flat = sorted(x for lat in latencies for x in lat)
    return Load(
        samples_s=sum(done) * b / wall,
        p50_s=statistics.median(flat) if flat else float("nan"),
        p99_s=flat[min(len(flat) - 1, int(0.99 * len(flat)))] if flat else float("nan"),
        peak_mib=peak,
        lost=clients * steps - sum(done),
        mismatched=sum(mismatched) + sum("out of step" in f for f in failures),
        refused=0,
        frame_gap=sum(sent) + clients,  # + BYE; the server's count is subtracted by the caller
    )


def run(args: argparse.Namespace, console: Console) -> dict[str, Load]:
    """One server per mode, loaded by M clients; the server's own account checked at the end."""
    results: dict[str, Load] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pki = tmp / "certs"
        create_dev_pki(pki, [f"c{i}" for i in range(args.clients)])
        for mode in args.modes.split(","):
            config = bench_config(
                args.model, args.batch, args.seq, [*args.overrides, f"split.mode={mode}"]
            )
            folder = tmp / mode
            proc = spawn_server(config, folder, pki, args.clients)
            try:
                target = f"localhost:{wait_for_port(proc, folder)}"
                result = load(config, target, pki, args.clients, args.steps, proc.pid)
                proc.wait(timeout=120)  # it exits once every client said goodbye
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            server = json.loads((folder / "server.json").read_text())
            counted = sum(c["frames_in"] for c in server["clients"].values())
            result.refused = sum(c["rejected"] for c in server["clients"].values())
            result.frame_gap -= counted
            results[mode] = result
            console.print(
                f"{mode:>10}: {result.samples_s:.2f} samples/s, lost {result.lost}, "
                f"mismatched {result.mismatched}"
            )
    return results


def report(console: Console, args: argparse.Namespace, results: dict[str, Load]) -> None:
    """The load table."""
    table = Table(
        title=f"split server under load: {args.model}, {args.clients} clients x {args.steps} "
        f"steps of {args.batch} x {args.seq} tokens, TLS + AES-GCM"
    )
    for col in (
        "mode", "samples/s", "step p50 s", "step p99 s", "server peak MiB",
        "lost", "mismatched", "refused", "frame gap",
    ):  # fmt: skip
        table.add_column(col, justify="right")
    for mode, r in results.items():
        table.add_row(
            mode,
            f"{r.samples_s:.2f}",
            f"{r.p50_s:.3f}",
            f"{r.p99_s:.3f}",
            f"{r.peak_mib:.0f}",
            *(str(v) for v in (r.lost, r.mismatched, r.refused, r.frame_gap)),
        )
    console.print(table)
    bad = {m: r for m, r in results.items() if r.lost or r.mismatched or r.refused or r.frame_gap}
    console.print("every step accounted for" if not bad else f"[red]faults in {sorted(bad)}[/]")


def main() -> None:
    """Parse arguments, load each mode, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args()
    quiet_libraries()
    console = Console() if sys.stdout.isatty() else Console(width=120)
    report(console, args, run(args, console))


if __name__ == "__main__":
    main()
