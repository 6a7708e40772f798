"""Peak memory of a split client and server ÷ whole-model LoRA fine-tuning, each in a fresh process.

    python bench/split_memory.py                           # SmolLM2-135M, batch 4 x 128, 3 steps
    python bench/split_memory.py --model tiny-llama --steps 5
    python bench/split_memory.py --set split.front_blocks=2 --set split.back_blocks=2

The parent starts one child per role (`--role client|client-whole|server|full`) so that no peak
is inherited, and prints them side by side. Each child reads its peak resident set (VmHWM) after
importing, after loading the model + adapter, and after the training steps:

- client: front + back loaded partially (`split.loading.load_segments(config, "client")`), LoRA
  on both, steps of front → stand-in middle → back + loss + backward, as a real client runs them:
  the stand-in returns random hidden states and, on backward, a random gradient, as the server
  would over the link. The middle's weights are never in this process.
- client-whole: the same work after loading the whole model and cutting it (what a client did
  before partial loading).
- server: the middle loaded partially, LoRA, steps of forward on random hidden states + backward
  of a random gradient down to the input (whose gradient goes back to the client).
- full: the whole model with PEFT LoRA trained by `train_steps`, the centralized reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from silotune import logs
from silotune.config import load_config
from silotune.modeling.adapters import add_lora
from silotune.modeling.load import load_model, resolve_model
from silotune.split.adapters import add_segment_adapter
from silotune.split.loading import load_segments
from silotune.split.model import SplitCausalLM
from silotune.split.segments import Middle, split_model
from silotune.training.loop import train_steps

ROLES = ("client", "client-whole", "server", "full")


def peak_mib() -> float:
    """Peak resident set of this process so far (VmHWM), in MiB."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource  # no /proc: ru_maxrss (KiB on Linux)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StandInMiddle(torch.autograd.Function):
    """The server's middle as a client sees it: hidden states come back, and later a gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(hidden)  # (b, t, d)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.randn_like(grad) * 1e-3, None


def stand_in_middle(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A `MiddleFn` for `SplitCausalLM` that never holds the middle's weights."""
    out: torch.Tensor = StandInMiddle.apply(hidden, mask)  # type: ignore[no-untyped-call]
    return out


def child(role: str, overrides: list[str], steps: int, seq: int) -> dict[str, Any]:
    """Load and train as `role`; return its peaks (MiB), the weight bytes it holds, timings."""
    logs.install()
    config = load_config(None, overrides)
    resolve_model(config.model)  # converts the packaged model once; not part of any peak
    after_imports = peak_mib()
    start = time.perf_counter()
    model: nn.Module
    if role == "full":
        model = add_lora(load_model(resolve_model(config.model)), config.lora)
    elif role == "server":
        model = load_segments(config, "server").middle
        add_segment_adapter(model, config, "middle")
    else:
        if role == "client":
            segments = load_segments(config, "client")
        else:
            whole = load_model(resolve_model(config.model))
            segments = split_model(whole, config.split.front_blocks, config.split.back_blocks)
            del whole
        front, back = segments.front, segments.back
        del segments  # the middle is not the client's: let it go, as run_client does
        add_segment_adapter(front, config, "front")
        add_segment_adapter(back, config, "back")
        model = SplitCausalLM(front, back, stand_in_middle)
    load_s = time.perf_counter() - start
    after_load = peak_mib()
    held = {id(t): t for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
    start = time.perf_counter()
    if isinstance(model, Middle):
        server_steps(model, steps, config.train.batch_size, seq, config.train.lr)
    else:
        vocab = config_vocab(model)
        gen = torch.Generator().manual_seed(0)
        rows = torch.randint(0, vocab, (config.train.batch_size * steps, seq), generator=gen)
        examples = [(ids, ids) for ids in rows.tolist()]
        train_steps(model, examples, config.train, steps, pad_id=0, seed=0)
    return {
        "role": role,
        "imports_mib": after_imports,
        "load_mib": after_load,
        "train_mib": peak_mib(),
        "weights_mib": sum(t.numel() * t.element_size() for t in held.values()) / 2**20,
        "load_s": load_s,
        "step_s": (time.perf_counter() - start) / steps,
    }


def config_vocab(model: nn.Module) -> int:
    """Vocabulary size of a PEFT model or a `SplitCausalLM`."""
    if isinstance(model, SplitCausalLM):
        return int(model.vocab_size)
    return int(getattr(model, "config").vocab_size)  # noqa: B009  (PEFT forwards it)


def server_steps(middle: Middle, steps: int, batch: int, seq: int, lr: float) -> None:
    """The server's work per client step: forward, then backward of the client's gradient."""
    params = [p for p in middle.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    width = int(middle.config.hidden_size)
    mask = torch.ones(batch, seq, dtype=torch.long)
    middle.train()
    for _ in range(steps):
        hidden = torch.randn(batch, seq, width, requires_grad=True)  # (b, t, d) from a client
        out = middle(hidden, mask)
        out.backward(torch.randn_like(out))  # hidden.grad is what goes back to the client
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def parent(args: argparse.Namespace) -> None:
    """Run every role in its own process and print the peaks side by side."""
    results: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        cmd = [sys.executable, __file__, "--role", role, "--model", args.model]
        cmd += ["--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch)]
        cmd += [f"--set={o}" for o in args.overrides]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{role} failed:\n{done.stderr[-3000:]}")
        results[role] = json.loads(done.stdout.strip().splitlines()[-1])
    full = results["full"]["train_mib"]
    table = Table(
        title=f"Peak RSS (VmHWM) per process: {args.model}, batch {args.batch} x {args.seq}, "
        f"{args.steps} steps {' '.join(args.overrides)}"
    )
    columns = ("role", "after imports", "after load", "after training", "÷ full", "weights held")
    for col in (*columns, "load s", "step s"):
        table.add_column(col, justify="right")
    for role, r in results.items():
        table.add_row(
            role,
            f"{r['imports_mib']:.0f} MiB",
            f"{r['load_mib']:.0f} MiB",
            f"{r['train_mib']:.0f} MiB",
            f"{r['train_mib'] / full:.2f}",
            f"{r['weights_mib']:.0f} MiB",
            f"{r['load_s']:.1f}",
            f"{r['step_s']:.2f}",
        )
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", choices=ROLES, help="run one role (the parent sets this)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.role is None:
        parent(args)
        return
    overrides = [f"model.name={args.model}", f"train.batch_size={args.batch}", *args.overrides]
    print(json.dumps(child(args.role, overrides, args.steps, args.seq)))


if __name__ == "__main__":
    main()
