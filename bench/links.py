"""Emulated network links for the split benches: a private network namespace, `tc tbf` bandwidth
each way, and a delay proxy for latency (this kernel has `tbf` but not `netem`).

```
 client ──lo──▶ DelayProxy ──lo (tbf, up)────▶ server port
 client ◀──lo── DelayProxy ◀──lo (tbf, down)── server port
```
Only the proxy↔server hop is shaped (u32 filters on the server's port, one `tbf` per direction,
so up and down each get the full rate as on a duplex link); every chunk the proxy forwards waits
the one-way delay first. Everything lives on the loopback of a namespace the bench made with
`unshare --net`, so no real interface or address is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

NAMESPACE_ENV = "SILOTUNE_BENCH_NETNS"  # set in the re-executed bench, inside its namespace
MTU = 1500  # a real link's frame size (loopback's 65536 would hide per-packet costs)


@dataclass(frozen=True)
class Link:
    """A link profile: rate each way and one-way delay (None: plain loopback, no proxy)."""

    name: str
    mbit_s: float | None
    delay_ms: float

    def describe(self) -> str:
        """'1000 Mbit/s, 0.5 ms' (or 'loopback')."""
        if self.mbit_s is None:
            return "loopback"
        return f"{self.mbit_s:g} Mbit/s, {self.delay_ms:g} ms one way"


LINKS = {
    "loopback": Link("loopback", None, 0.0),
    "lan": Link("lan", 1000.0, 0.5),
    "metro": Link("metro", 100.0, 5.0),
    "wan": Link("wan", 20.0, 25.0),
}


def enter_namespace() -> None:
    """Re-execute this script inside a new network namespace (root only); exit 0 with a message
    where that is not possible, so a bench run elsewhere skips rather than fails."""
    if os.environ.get(NAMESPACE_ENV) == "1":
        _run(["ip", "link", "set", "lo", "up"])
        _run(["ip", "link", "set", "lo", "mtu", str(MTU)])
        return
    missing = [tool for tool in ("unshare", "ip", "tc") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        why = f"missing {', '.join(missing)}" if missing else "not root"
        print(f"skipped: emulated links need root and unshare, ip, tc ({why})")
        sys.exit(0)
    env = {**os.environ, NAMESPACE_ENV: "1"}
    argv = ["unshare", "--net", "--", sys.executable, *sys.argv]
    sys.exit(subprocess.run(argv, env=env, check=False).returncode)


def shape(link: Link, port: int) -> None:
    """Shape traffic to and from `port` on lo to `link`'s rate (clears any earlier shaping)."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False)
    if link.mbit_s is None:
        return
    rate = f"{link.mbit_s:g}mbit"
    bytes_s = link.mbit_s * 1e6 / 8
    burst = max(64 * 1024, int(bytes_s / 100))  # 10 ms at line rate, at least 64 KiB
    limit = max(4 << 20, int(bytes_s))  # a second's worth queued: TCP backs off, nothing drops
    tc = ["tc", "qdisc", "add", "dev", "lo"]
    _run([*tc, "root", "handle", "1:", "htb", "default", "30"])
    for cls in ("10", "20", "30"):  # classes only sort traffic; each tbf below shapes it
        classid = ["parent", "1:", "classid", f"1:{cls}"]
        _run(["tc", "class", "add", "dev", "lo", *classid, "htb", "rate", "10gbit"])
    for cls in ("10", "20"):
        shaper = ["tbf", "rate", rate, "burst", str(burst), "limit", str(limit)]
        _run([*tc, "parent", f"1:{cls}", "handle", f"{cls}:", *shaper])
    for field, cls in (("dport", "10"), ("sport", "20")):
        match = ["u32", "match", "ip", field, str(port), "0xffff", "flowid", f"1:{cls}"]
        _run(["tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", *match])


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed: {done.stderr.strip()}")


class DelayProxy:
    """Forwards TCP connections from a loopback port to `target_port`, holding every chunk for
    `delay_ms` each way (order kept). The delay can change between measurements."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pump(client, server)
            self._pump(server, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Two threads: one reads and stamps chunks, one writes each once its delay is up."""
        queue: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()

        def read() -> None:
            while chunk := _recv(source):
                with ready:
                    queue.append((time.monotonic() + self.delay_s, chunk))
                    ready.notify()
            with ready:
                queue.append((0.0, b""))
                ready.notify()

        def write() -> None:
            while True:
                with ready:
                    ready.wait_for(lambda: bool(queue))
                    due, chunk = queue.popleft()
                if not chunk:
                    _shutdown(sink)
                    return
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                try:
                    sink.sendall(chunk)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        """Stop accepting (open connections end with their peers)."""
        self._closed = True
        self._listener.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 16)
    except OSError:
        return b""


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
