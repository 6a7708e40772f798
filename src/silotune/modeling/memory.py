"""Plan memory before a run: peak bytes per process from the model's config, not its weights.

```
 model config ──▶ meta skeleton ──▶ parameters per part ──┐
 placement (dtype, quantization, device)                  ├──▶ Estimate per process
 lora.r / targets, batch, max_length, eval, generation ───┘     weights + adapters/optimizer
                                                                + activations + runtime
 device capacity (free GPU memory or available RAM) ──▶ MemoryPlan: fits? how many clients at
                                                        once? Flower's client resources
```

The estimate counts what stays alive at the peak of a step: the frozen weights (NF4 ≈ 0.52
bytes per parameter with double quantization, int8 ≈ 1, norms and embeddings in float32 once
PEFT prepares a quantized base), the adapters with their gradients and AdamW moments (16 bytes
per trainable parameter), the activations kept for the backward pass (every block's, or one
block's plus each block's input with gradient checkpointing), the logits' float32 copies for the
loss, the KV cache of generation, and the runtime itself (CUDA context or the Python process).
Under `privacy.mode = "dp-sgd"` the processes that train with the one training loop add DP-SGD's
share, a column of its own: each example's gradient of the trained adapter (Opacus's
`grad_sample`) and what the per-example hooks and loss hold beside the usual step.
It is a plan, not a measurement, and errs high: `bench/memory_plan.py` compares it with
measured peaks. The CPU's constants (runtime, margin, per-logit bytes) were set from those
measurements; the CUDA ones have not been measured yet (`tests/test_gpu.py` checks the plan
against `torch.cuda.max_memory_allocated` on a GPU machine).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from rich.table import Table
from transformers import PretrainedConfig

from silotune.config import Config
from silotune.errors import ConfigError
from silotune.modeling.placement import Placement
from silotune.modeling.shape import Shape, architecture
from silotune.registry import Registry
from silotune.split.families import check_splittable

GIB = 1024**3
# The CUDA context, or the Python process with torch, transformers and datasets imported.
_RUNTIME = {"cuda": int(0.75 * GIB), "cpu": int(1.0 * GIB)}
# Allocator fragmentation and transient copies; the CPU allocator keeps freed blocks longer.
_MARGIN = {"cuda": 1.10, "cpu": 1.30}
# Per logit besides the logits themselves: the loss's float32 log-softmax, the gradient
# flowing into it, the logits' gradient, and transients of that size (measured on a CPU).
LOGIT_BYTES = 20
_ADAM_BYTES = 16  # fp32 weight + gradient + two AdamW moments, per trainable parameter
_NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + double-quantized absmax
_INT8_BYTES = 1.0


@dataclass(frozen=True)
class Estimate:
    """One process's planned peak, by cause (bytes)."""

    role: str
    weights: int
    adapters: int  # trainable parameters + gradients + optimizer state
    activations: int  # the larger of a training step's and evaluation/generation's
    runtime: int
    margin: float = _MARGIN["cuda"]
    dp_sgd: int = 0  # DP-SGD's per-example gradients and hook buffers (0: no DP-SGD)

    @property
    def total(self) -> int:
        held = self.weights + self.adapters + self.activations + self.dp_sgd
        return int(held * self.margin) + self.runtime


@dataclass
class MemoryPlan:
    """The processes that share one device, and how many clients can run at once."""

    device: str
    capacity: int  # bytes free on the device when planned
    estimates: list[Estimate]
    shared: int  # bytes of processes always resident (server, evaluation)
    client: Estimate | None  # one client process (None: nothing runs concurrently)
    clients: int  # client processes the run starts
    concurrent: bool  # all clients must be resident at once (split), else they may queue
    knobs: list[str] = field(default_factory=list)

    @property
    def parallel(self) -> int:
        """How many clients fit at once (0: not even one)."""
        if self.client is None:
            return 1 if self.shared <= self.capacity else 0
        room = self.capacity - self.shared
        return max(0, min(self.clients, room // max(self.client.total, 1)))

    @property
    def needed(self) -> int:
        """Bytes the run needs at the least (all clients resident when they must be)."""
        if self.client is None:
            return self.shared
        return self.shared + self.client.total * (self.clients if self.concurrent else 1)

    @property
    def fits(self) -> bool:
        return self.needed <= self.capacity

    def check(self) -> None:
        """Refuse a plan that cannot fit, naming what to turn."""
        if self.fits:
            return
        raise ConfigError(
            f"this run needs about {self.needed / GIB:.1f} GiB on {self.device} but "
            f"{self.capacity / GIB:.1f} GiB is free; "
            + ("; or ".join(self.knobs) or "use a smaller model")
            + " (`silotune plan CONFIG` prints the plan)"
        )

    def client_resources(self, cpus: int) -> dict[str, float]:
        """Flower simulation's per-client resources: on a GPU as many clients as fit share it
        (a GPU fraction each), on a CPU one client at a time uses every core."""
        if self.device.startswith("cuda") and self.client is not None:
            parallel = max(1, self.parallel)
            return {"num_cpus": max(1, cpus // parallel), "num_gpus": 1.0 / parallel}
        return {"num_cpus": cpus, "num_gpus": 0.0}

    @property
    def dp_sgd(self) -> bool:
        """Some process plans for DP-SGD's per-example gradients (the table shows their column)."""
        return any(e.dp_sgd for e in self.estimates)

    def rows(self) -> list[tuple[str, ...]]:
        """One row per process (GiB): role, weights, adapters, activations, (DP-SGD,) runtime,
        total."""
        rows = []
        for e in self.estimates:
            sizes = [e.weights, e.adapters, e.activations, *([e.dp_sgd] if self.dp_sgd else [])]
            rows.append(
                (e.role, *(f"{b / GIB:.2f}" for b in (*sizes, e.runtime)), f"{e.total / GIB:.2f}")
            )
        return rows

    def table(self) -> Table:
        """The plan as a rich table (GiB per process)."""
        table = Table(title=self.summary(), title_justify="left")
        columns = ["process", "weights", "adapters+optim", "activations"]
        columns += ["DP-SGD per-example"] if self.dp_sgd else []
        for column in (*columns, "runtime", "peak"):
            table.add_column(column, justify="left" if column == "process" else "right")
        for row in self.rows():
            table.add_row(*row)
        return table

    def summary(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        line = (
            f"memory plan on {self.device}: {self.needed / GIB:.1f} GiB needed, "
            f"{self.capacity / GIB:.1f} GiB free: {verdict}"
        )
        if self.client is not None and not self.concurrent:
            if self.device.startswith("cuda"):
                line += f"; {self.parallel} of {self.clients} clients at once"
            else:
                line += "; one client at a time, on every core"
        return line


@dataclass(frozen=True)
class Process:
    """One process an algorithm starts (or model copy it adds), as the plan sizes it; each
    algorithm's registration describes its own, so this module names none."""

    role: str  # the plan's row
    # runner: trains in the runner's own process; resident: alive for the whole run beside it
    # (a server, or a second model copy in the runner); client: one per client.
    host: Literal["runner", "resident", "client"]
    blocks: int | None = None  # transformer blocks it holds (None: all but blocks_elsewhere)
    blocks_elsewhere: int = 0  # blocks other processes hold (a split model's ends)
    ends: bool = True  # it holds the embeddings and the head
    adapters: int = 1  # LoRA adapters it trains (0: it only evaluates)
    batches: int = 1  # training batches stacked into one step (0: it trains nothing)
    quantized: bool = True  # the base's quantization applies (else it keeps the compute dtype)
    generates: bool = False  # it self-generates synthetic data with [synthetic]'s lengths
    concurrent: bool = False  # a client that must be resident with all the others at once

    @property
    def one_loop(self) -> bool:
        """It trains with the one local training loop, which runs DP-SGD under [privacy]: the
        runner and the clients (a split server and resident copies do not)."""
        return self.adapters > 0 and self.batches > 0 and self.host != "resident"


# Each algorithm's processes by name; `silotune.jobs.register` fills it with the algorithm.
WORKLOADS: Registry[Callable[[Config], tuple[Process, ...]]] = Registry("algorithm")


@dataclass(frozen=True)
class Workload:
    """The sizes a step works on, from the config."""

    rows: int  # sequences in one training step (batches stacked)
    seq: int
    eval_batch: int
    gen_tokens: int
    adapters: int  # adapters trained by one process
    dp_sgd: bool = False  # its steps are DP-SGD's (per-example gradients)
    freeze_a: bool = False  # only LoRA's B matrices train


def workload(config: Config, process: Process) -> Workload:
    """The sizes `process` works on under `config`."""
    eval_cfg, synth = config.eval, config.synthetic
    gen = eval_cfg.max_new_tokens if eval_cfg.generate else 0
    eval_batch = eval_cfg.batch_size
    if process.generates:
        gen = max(gen, synth.instruction_max_new_tokens + synth.response_max_new_tokens)
        eval_batch = max(eval_batch, synth.batch_size)
    return Workload(
        rows=config.train.batch_size * process.batches,
        seq=config.data.max_length,
        eval_batch=eval_batch,
        gen_tokens=gen,
        adapters=process.adapters,
        dp_sgd=config.privacy.mode == "dp-sgd" and process.one_loop,
        freeze_a=config.lora.freeze_a,
    )


def estimate(
    role: str,
    shape: Shape,
    placement: Placement,
    work: Workload,
    blocks: int,
    ends: bool,
) -> Estimate:
    """Peak of a process that holds `blocks` blocks and, with `ends`, the embeddings and head,
    and trains the workload's adapters."""
    e = torch.finfo(placement.dtype).bits // 8
    if placement.quantized:
        per_linear = _NF4_BYTES if placement.quantization == "4bit" else _INT8_BYTES
        # PEFT's k-bit preparation keeps every unquantized weight in float32.
        weights = blocks * (shape.block_linear * per_linear + shape.block_other * 4)
        weights += (shape.embed + shape.head) * 4 if ends else 0
        if placement.device.type == "cpu":
            # Quantizing in RAM reads the full-precision weights first; the CPU allocator
            # keeps that memory (measured: a 4-bit base peaks above a float32 one on a CPU).
            weights += blocks * shape.block_linear * e
    else:
        weights = blocks * (shape.block_linear + shape.block_other) * e
        weights += (shape.embed + shape.head) * e if ends else 0
    trainable = blocks * shape.lora_per_block * work.adapters
    tokens = work.rows * work.seq
    # Kept for backward, per token and block: two RMS norms' float32 intermediates (6 d),
    # q, rotated q, attention output, o_proj input, residuals, down_proj output (~9 d), k, v,
    # rotated k (3 kv), the MLP's gate, up, activation and product (4 I); flash/memory-efficient
    # attention keeps no t x t scores. Plus LoRA's float32 inputs.
    per_block = e * (15 * shape.hidden + 3 * shape.kv_dim + 4 * shape.intermediate)
    per_block += 4 * shape.lora_inputs * work.adapters
    if placement.gradient_checkpointing:
        kept = tokens * (blocks * e * shape.hidden + per_block)
    else:
        kept = tokens * blocks * per_block
    logits = tokens * shape.vocab * (e + LOGIT_BYTES) if ends else 0
    train_peak = kept + logits + tokens * e * shape.hidden * 2
    # Evaluation: one block's activations; the loss's logits; generation's KV cache.
    eval_tokens = work.eval_batch * (work.seq + work.gen_tokens)
    cache = eval_tokens * blocks * 2 * shape.kv_dim * e
    eval_logits = work.eval_batch * work.seq * shape.vocab * (e + 4) if ends else 0
    eval_peak = cache + eval_logits + work.eval_batch * work.seq * per_block
    return Estimate(
        role=role,
        weights=int(weights),
        adapters=trainable * _ADAM_BYTES,
        activations=int(max(train_peak, eval_peak)),
        runtime=_RUNTIME.get(placement.device.type, _RUNTIME["cpu"]),
        margin=_MARGIN.get(placement.device.type, _MARGIN["cpu"]),
        dp_sgd=dp_sgd_bytes(shape, work, blocks, ends) if work.dp_sgd else 0,
    )


def dp_sgd_bytes(shape: Shape, work: Workload, blocks: int, ends: bool) -> int:
    """DP-SGD's share of a training step: per-example gradients of the trained adapter (float32,
    as Opacus keeps them), the hooks' per-example buffers and the per-example loss's copies."""
    # One adapter trains at a time (the others only take part), all of it or with freeze_a its B.
    trained = blocks * (shape.lora_b_per_block if work.freeze_a else shape.lora_per_block)
    # grad_sample (b, *p.shape) for each trained parameter, plus DPOptimizer's clipped sum.
    gradients = (work.rows + 1) * trained * 4
    tokens = work.rows * work.seq
    # A hook computes one layer's per-example gradient from its input and output gradient
    # (float32 copies, scaled by the batch size), one block's layers at a time at the most.
    hooks = tokens * 4 * (shape.lora_inputs + shape.lora_outputs)
    # Each example's own loss shifts the logits (a copy), and its gradient flows back into a
    # zero-filled full-size tensor: two float32 logits more than the model's built-in loss.
    logits = 2 * tokens * shape.vocab * 4 if ends else 0
    return gradients + hooks + logits


def plan_run(
    config: Config,
    hf_config: PretrainedConfig,
    placement: Placement,
    capacity: int | None = None,
) -> MemoryPlan:
    """The plan for `silotune run` of `config` on one machine (simulation, or split processes)."""
    per_algorithm = [WORKLOADS.get(name)(config) for name in config.experiment.algorithms]
    if any(p.blocks is not None or p.blocks_elsewhere for ps in per_algorithm for p in ps):
        check_splittable(hf_config)  # a split: refuse a family it cannot cut, before any weights
    lora = config.lora
    shape = architecture(hf_config, lora.target_modules, lora.r)
    capacity = device_capacity(placement.device) if capacity is None else capacity
    clients = config.partition.clients

    def sized(process: Process) -> Estimate:
        place = placement if process.quantized else replace(placement, quantization="none")
        blocks = process.blocks
        if blocks is None:
            blocks = shape.layers - process.blocks_elsewhere
        work = workload(config, process)
        return estimate(process.role, shape, place, work, blocks, process.ends)

    # The runner's own process evaluates the base and the servers' adapters (training nothing),
    # and trains the algorithms that run in it.
    in_runner = [sized(p) for ps in per_algorithm for p in ps if p.host == "runner"]
    evaluation = Process("runner (evaluation)", "runner", adapters=0, batches=0)
    estimates = [max(in_runner, key=lambda e: e.total) if in_runner else sized(evaluation)]
    shared = estimates[0].total
    queued: list[Estimate] = []  # clients that may wait their turn
    at_once: list[Estimate] = []  # clients that must all be resident together
    # Algorithms whose clients may queue first, then those whose clients run all at once; each
    # lists its resident processes before its clients, and of queued clients the largest.
    for together in (False, True):
        for processes in per_algorithm:
            if any(p.concurrent for p in processes) != together:
                continue
            for process in (p for p in processes if p.host != "runner"):
                e = sized(process)
                if process.host == "resident":
                    estimates.append(e)
                    shared += e.total
                elif process.concurrent:
                    estimates.append(e)
                    at_once.append(e)
                else:
                    queued.append(e)
        if not together and queued:
            estimates.append(max(queued, key=lambda e: e.total))
    client = max(queued, key=lambda e: e.total) if queued else None
    concurrent = False
    for e in at_once:
        if client is None or e.total * clients > client.total:
            client, concurrent = e, True
    plan = MemoryPlan(
        str(placement.device), capacity, estimates, shared, client, clients, concurrent
    )
    plan.knobs = _knobs(config, placement, at_once)
    return plan


def _knobs(config: Config, placement: Placement, at_once: list[Estimate]) -> list[str]:
    """The settings that would lower the plan, in the order worth trying."""
    knobs = []
    if not placement.gradient_checkpointing:
        knobs.append("set train.gradient_checkpointing = true")
    if placement.quantization != "4bit":
        knobs.append("set model.quantization = '4bit'")
    if placement.dtype == torch.float32:
        knobs.append("set model.dtype = 'bfloat16'")
    knobs.append(f"lower train.batch_size (now {config.train.batch_size})")
    knobs.append(f"lower data.max_length (now {config.data.max_length})")
    for e in at_once:
        knobs.append(f"run fewer {e.role}s (partition.clients, now {config.partition.clients})")
    return knobs


def device_capacity(device: torch.device) -> int:
    """Bytes free on `device` now: free GPU memory, or the RAM the OS says is available."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def gib(value: float) -> int:
    """GiB -> bytes (for `--memory-gib`)."""
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"memory must be a positive number of GiB, got {value}")
    return int(value * GIB)
