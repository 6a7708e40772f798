"""The floor under a split decoding step's wire time: a gRPC stream echo between two processes.

    python bench/grpc_floor.py                 # 2.4 KB messages (one SmolLM2 decoding frame)
    python bench/grpc_floor.py --bytes 20000 --busy-ms 30

A server process echoes every message of one bidirectional stream; the client sends one, waits
for its echo, then computes for `--busy-ms` (matrix products on every thread, as the split
client's front and back do) before the next, so both processes wake from a wait as a split
decoding step does. The stream is driven as `split.link.MiddleLink` drives it (a request queue
feeding gRPC's consumer thread, the reply iterator read by the caller). Printed: the round
trip's median and mean, plain and over mutual TLS — time that no silotune code runs in.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from silotune.procs import run_command
from silotune.security.tls import create_dev_pki
from split_overhead import as_run_processes

CLIENT = "bench-client"
METHOD = "/floor.Echo/Stream"


def serve(certs: str) -> None:
    """The echo server: prints its port, serves until its parent closes stdin."""

    def echo(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    handler = grpc.stream_stream_rpc_method_handler(echo)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("floor.Echo", {"Stream": handler})]
    )
    if certs:
        pki = Path(certs)
        credentials = grpc.ssl_server_credentials(
            [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
            root_certificates=(pki / "ca.pem").read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("localhost:0", credentials)
    else:
        port = server.add_insecure_port("localhost:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # until the parent closes it
    server.stop(None)


def channel(port: int, certs: Path | None) -> grpc.Channel:
    if certs is None:
        return grpc.insecure_channel(f"localhost:{port}")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "clients" / f"{CLIENT}.key").read_bytes(),
        certificate_chain=(certs / "clients" / f"{CLIENT}.pem").read_bytes(),
    )
    return grpc.secure_channel(f"localhost:{port}", credentials)


def round_trips(args: argparse.Namespace, certs: Path | None) -> list[float]:
    """Seconds of each measured echo over one stream to a fresh server process."""
    argv = [sys.executable, __file__, "--serve", str(certs or "")]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as server:
        assert server.stdout is not None and server.stdin is not None
        port = int(server.stdout.readline())
        outbox: queue.Queue[bytes | None] = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (item := outbox.get()) is not None:
                yield item

        with channel(port, certs) as chan:
            replies = chan.stream_stream(METHOD)(requests())
            message, work = os.urandom(args.bytes), torch.randn(256, 256)
            seconds = []
            for i in range(args.warmup + args.messages):
                start = time.perf_counter()
                outbox.put(message)
                assert next(replies) == message
                if i >= args.warmup:
                    seconds.append(time.perf_counter() - start)
                busy_until = time.perf_counter() + args.busy_ms / 1e3
                while time.perf_counter() < busy_until:
                    work @ work
            outbox.put(None)
        server.stdin.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bytes", type=int, default=2400, help="message size")
    parser.add_argument("--busy-ms", type=float, default=30.0, help="compute between messages")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    as_run_processes()
    console = Console(width=120)
    console.print(
        f"gRPC stream echo between two processes: {args.bytes} B messages, "
        f"{args.busy_ms:g} ms of compute between them, {args.messages} round trips"
    )
    table = Table()
    for col in ("transport", "median ms", "mean ms"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp) / "pki"
        create_dev_pki(pki, [CLIENT])
        for name, certs in (("plain", None), ("mutual TLS", pki)):
            seconds = round_trips(args, certs)
            median, mean = statistics.median(seconds), statistics.mean(seconds)
            table.add_row(name, f"{1e3 * median:.2f}", f"{1e3 * mean:.2f}")
    console.print(table)


if __name__ == "__main__":  # SIGTERM stops it as Ctrl-C does: no server or key is left
    sys.exit(run_command(lambda: main() or 0, "free space and run it again"))
