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

With `--hostile N` (default 1), N more clients with valid certificates attack the server during
the load (NaN and Inf activations, a forward followed by a NaN gradient, gradients of the wrong
shape); every attack must be refused, and the honest clients must still lose 0 steps.
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

from silotune import logs
from silotune.config import Config
from silotune.modeling.load import resolve_model
from silotune.procs import run_command
from silotune.security.tls import create_dev_pki
from silotune.split.link import MiddleLink, SplitError
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
    refused: int  # honest clients' frames the server answered with an error
    frame_gap: int  # frames the clients sent minus frames the server counted
    attacks: int = 0  # hostile frames sent
    attacks_refused: int = 0  # of which the server refused (must equal attacks)


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size of process `pid` so far (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def attack(link: MiddleLink, i: int, b: int, t: int, d: int, stop: threading.Event) -> list[int]:
    """Send hostile but authenticated frames until `stop`; [frames sent, frames refused]."""
    hidden, grad, mask = replayed_step(100 + i, b, t, d)
    nan, inf = hidden.clone(), hidden.clone()
    nan[0, 0, 0], inf[-1, -1, -1] = float("nan"), float("inf")
    bad_grad = grad.clone()
    bad_grad[0, 0, 0] = float("nan")
    attacks = [
        lambda: link.forward(nan, mask, train=True),
        lambda: link.forward(inf, mask, train=False),
        lambda: link.backward(grad[:, :1]),  # the wrong shape, and no step to answer
        lambda: (link.forward(hidden, mask, train=True), link.backward(bad_grad)),
    ]
    counts = [0, 0]
    while not stop.is_set():
        for hit in attacks:
            counts[0] += 1
            try:
                hit()
            except SplitError:
                counts[1] += 1
    return counts


def load(
    config: Config, target: str, certs: Path, clients: int, steps: int, pid: int, hostile: int
) -> Load:
    """Run `clients` clients x `steps` steps at once (and `hostile` attackers beside them);
    what the server and the clients saw."""
    b, t = config.train.batch_size, config.data.max_length
    d = int(AutoConfig.from_pretrained(resolve_model(config.model).location).hidden_size)
    links = [MiddleLink(config, f"c{i}", target, certs) for i in range(clients)]
    attackers = [MiddleLink(config, f"h{i}", target, certs) for i in range(hostile)]
    stop = threading.Event()
    hits: list[list[int]] = [[0, 0] for _ in range(hostile)]
    raiders = [
        threading.Thread(
            target=lambda i=i: hits.__setitem__(i, attack(attackers[i], i, b, t, d, stop))
        )
        for i in range(hostile)
    ]
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
    for th in [*threads, *raiders]:
        th.start()
    start_line.wait()
    began = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - began
    stop.set()
    for th in raiders:
        th.join()
    peak = peak_rss_mib(pid)
    sent = [link.stats.frames for link in [*links, *attackers]]
    for link in [*links, *attackers]:
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
        frame_gap=sum(sent) + clients + hostile,  # + BYE; the caller subtracts the server's
        attacks=sum(h[0] for h in hits),
        attacks_refused=sum(h[1] for h in hits),
    )


def run(args: argparse.Namespace, console: Console) -> dict[str, Load]:
    """One server per mode, loaded by M clients; the server's own account checked at the end."""
    results: dict[str, Load] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pki = tmp / "certs"
        ids = [f"c{i}" for i in range(args.clients)] + [f"h{i}" for i in range(args.hostile)]
        create_dev_pki(pki, ids)
        for mode in args.modes.split(","):
            config = bench_config(
                args.model, args.batch, args.seq, [*args.overrides, f"split.mode={mode}"]
            )
            folder = tmp / mode
            proc = spawn_server(config, folder, pki, args.clients + args.hostile)
            try:
                target = f"localhost:{wait_for_port(proc, folder)}"
                result = load(config, target, pki, args.clients, args.steps, proc.pid, args.hostile)
                proc.wait(timeout=120)  # it exits once every client said goodbye
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            server = json.loads((folder / "server.json").read_text())
            counted = sum(c["frames_in"] for c in server["clients"].values())
            result.refused = sum(
                c["rejected"] for name, c in server["clients"].items() if name.startswith("c")
            )
            result.frame_gap -= counted
            results[mode] = result
            console.print(
                f"{mode:>10}: {result.samples_s:.2f} samples/s, lost {result.lost}, "
                f"mismatched {result.mismatched}, attacks refused "
                f"{result.attacks_refused}/{result.attacks}"
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
        "lost", "mismatched", "refused", "frame gap", "attacks refused",
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
            f"{r.attacks_refused}/{r.attacks}",
        )
    console.print(table)
    bad = {
        m: r
        for m, r in results.items()
        if r.lost or r.mismatched or r.refused or r.frame_gap or r.attacks_refused != r.attacks
    }
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
    parser.add_argument("--hostile", type=int, default=1, help="attacking clients beside them")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args()
    logs.install()
    console = Console() if sys.stdout.isatty() else Console(width=120)
    report(console, args, run(args, console))


if __name__ == "__main__":  # SIGTERM stops it as Ctrl-C does: no server or key is left
    sys.exit(run_command(lambda: main() or 0, "free space and run it again"))
